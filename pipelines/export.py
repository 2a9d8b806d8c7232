"""`ff export`: write a run's SAE in SAELens's on-disk format.

    OUT/cfg.json                 SAELens config ("standard" ReLU SAE, flat pre-6.0 field names,
                                 which SAELens 3.x-5.x read as they are and 6.x converts on load)
    OUT/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    OUT/ff_meta.json             what SAELens has no field for: run, model hash, candidate features

Our SAE works on x * scale (METHOD §0). The export folds the scale into the weights (as SAELens's
`fold_activation_norm_scaling_factor` does), so the exported SAE takes raw activations and
`normalize_activations` is "none":
    f = ReLU((s x - b_dec) W_enc + b_enc) = ReLU((x - b_dec/s)(s W_enc) + b_enc)
    x_hat = (f W_dec + b_dec) / s = f (W_dec/s) + b_dec/s
Feature activations are unchanged, so clamp values (-m) mean the same thing in both tools;
decoder rows then have norm 1/s instead of 1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cache.models import EMBEDDED
from pipelines.errors import EvalError
from pipelines.intervene import load_run

HF_IDS = {EMBEDDED: "google/gemma-3-270m"}
"""ff model specs whose Hugging Face / TransformerLens name differs from the spec."""


class Export(NamedTuple):
    out_dir: Path
    cfg: dict[str, Any]


def saelens_weights(W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, W_dec_FD: torch.Tensor,
                    b_dec_D: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Fold the normalisation scale into the weights (see the module docstring)."""
    return {"W_enc": (W_enc_DF * scale).contiguous(), "b_enc": b_enc_F.clone().contiguous(),
            "W_dec": (W_dec_FD / scale).contiguous(), "b_dec": (b_dec_D / scale).contiguous()}


def export_saelens(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Export:
    """Write RUN's SAE to OUT in SAELens format; returns the folder and the cfg written."""
    from safetensors.torch import save_file

    run = load_run(run_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvalError(f"export folder {out} exists and is not empty; pass --overwrite or pick another")
    out.mkdir(parents=True, exist_ok=True)
    sae, c = run.sae, run.config
    with torch.no_grad():
        tensors = saelens_weights(sae.W_enc.float().cpu(), sae.b_enc.float().cpu(), sae.W_dec.float().cpu(),
                                  sae.b_dec.float().cpu(), run.scale)
    model = str(c.get("model", "unknown"))
    cfg = {
        "architecture": "standard",
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": HF_IDS.get(model, model),
        "hook_name": f"blocks.{run.layer}.hook_resid_post",
        "hook_layer": run.layer,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",  # the scale is folded into the weights
        "context_size": c.get("ctx_len"),
        "prepend_bos": True,
        "dataset_path": c.get("store", ""),
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "neuronpedia_id": None,
        "seqpos_slice": [None],
    }
    meta = {
        "exported_by": "featureforget", "run": str(run.path), "method": run.method,
        "model": model, "model_hash": c.get("model_hash"), "layer": run.layer,
        "scale_folded": run.scale,
        "hook": "output of decoder block `layer` (HF hidden_states[layer + 1]); BOS excluded in training",
        "candidates": run.features["candidate"].nonzero().flatten().tolist(),
    }
    if model == EMBEDDED:
        meta["note"] = ("trained on ff's embedded Gemma 3 270M (Q4_K_M GGUF dequantized), close to but "
                        "not bit-identical with google/gemma-3-270m")
    _atomic(out / "sae_weights.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic(out / "cfg.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    _atomic(out / "ff_meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return Export(out, cfg)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
