"""`ff generate`: greedy text from the same prompt, without and with the intervention (METHOD §7).

    from pipelines.generate import generate_pair
    pair = generate_pair(lm, "runs/ff_l8", "The mitochondria is", max_new_tokens=30,
                         setting=Setting(mode="clamp", multiplier=50, top_n=20))
    print(pair.clean, "|", pair.unlearned)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipelines.config import Setting
from pipelines.errors import EvalError
from pipelines.evaluate import check_model
from pipelines.intervene import Intervention, load_run, run_setting


class GenerationPair(NamedTuple):
    """Unpacks as `clean, unlearned = generate_pair(...)`."""

    clean: str
    unlearned: str


@torch.inference_mode()
def _greedy(lm: Any, prompt: str, max_new_tokens: int) -> str:
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                            pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_pair(lm: Any, run_dir: str | Path, prompt: str, max_new_tokens: int = 40,
                  setting: Setting | dict | None = None) -> GenerationPair:
    """Greedy continuations of `prompt` by the clean model and by the model with the run's
    features edited. `setting` may be a Setting, a dict (e.g. an eval result's best.setting (pipelines/result.py)),
    or None for the run's best (`run_setting`). An empty feature set gives two identical texts."""
    if max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    run = load_run(run_dir)
    check_model(run, lm)
    if setting is None:
        setting = run_setting(run_dir)
    elif isinstance(setting, dict):
        setting = Setting.from_dict(setting)
    if not setting.edits_features and setting.mode != "splice":
        raise EvalError(f"generation with mode '{setting.mode}' is not meaningful; use ablate, clamp or splice")
    run.sae.to(lm.device)
    iv = Intervention(run, setting)
    clean = _greedy(lm, prompt, max_new_tokens)
    with iv.hooked(lm.model):
        unlearned = _greedy(lm, prompt, max_new_tokens)
    return GenerationPair(clean, unlearned)
