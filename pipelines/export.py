"""`ff export`: a run's SAE in SAELens's on-disk format (`--format saelens`), or a Hugging Face
model folder with the run's chosen edit inside the model (`--format hf`, `export_hf`).

SAELens:

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

Hugging Face (`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`, no ff needed):

    OUT/config.json                    the model's config, with "featureforget" (the edit: setting,
                                       layer, gate, threshold, window, scales) and "auto_map"
    OUT/model.safetensors              the model's weights and the edit's tensors ("featureforget.*":
                                       the selected features' encoder and decoder rows, clamp targets,
                                       the gate's detector)
    OUT/modeling_featureforget.py      pipelines/hf_modeling.py, the run's model class filled in
    OUT/tokenizer files, OUT/README.md the model card: setting, measured scores, threat model
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cache.atomic import atomic_write, replace_dir
from cache.models import EMBEDDED
from pipelines.errors import EvalError
from pipelines.intervene import load_run
from pipelines.result import Entry, EvalResult, Part
from trainer.gate import GATE_MIN_TOKENS
from trainer.run import RunFolder

HF_IDS = {EMBEDDED: "google/gemma-3-270m"}
"""ff model specs whose Hugging Face / TransformerLens name differs from the spec."""


class Export(NamedTuple):
    out_dir: Path
    cfg: dict[str, Any]


def check_out(out: Path, overwrite: bool) -> None:
    """An export writes into an empty or new folder, or replaces one with `overwrite`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise EvalError(f"export folder {out} exists and is not empty; pass --overwrite or pick another")


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
    check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    sae, c = run.sae, run.config
    with torch.no_grad():
        tensors = saelens_weights(sae.W_enc.float().cpu(), sae.b_enc.float().cpu(), sae.W_dec.float().cpu(),
                                  sae.b_dec.float().cpu(), run.scale)
    model = str(c.model or "unknown")
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
        "context_size": c.ctx_len,
        "prepend_bos": True,
        "dataset_path": c.store or "",
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "neuronpedia_id": None,
        "seqpos_slice": [None],
    }
    meta = {
        "exported_by": "featureforget", "run": str(run.path), "method": run.method,
        "model": model, "model_hash": c.model_hash, "layer": run.layer,
        "scale_folded": run.scale,
        "hook": "output of decoder block `layer` (HF hidden_states[layer + 1]); BOS excluded in training",
        "candidates": run.features["candidate"].nonzero().flatten().tolist(),
    }
    if model == EMBEDDED:
        meta["note"] = ("trained on ff's embedded Gemma 3 270M (Q4_K_M GGUF dequantized), close to but "
                        "not bit-identical with google/gemma-3-270m")
    atomic_write(out / "sae_weights.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(out / "cfg.json", json.dumps(cfg, indent=2) + "\n")
    atomic_write(out / "ff_meta.json", json.dumps(meta, indent=2) + "\n")
    return Export(out, cfg)


HF_MODELING_FILE = "modeling_featureforget.py"
HF_CLASS = "FeatureForgetForCausalLM"


def edit_spec(iv: Any, model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An Intervention as the exported folder's edit: its configuration (config.json's
    "featureforget") and its tensors (pipelines/hf_modeling.py, FeatureForgetEdit)."""
    s = iv.setting
    if not s.edits_features:
        raise EvalError(f"the setting '{s.label}' edits no features: export an unlearning setting "
                        "(clamp, ablate, retain_mean or project)")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    gate = "none" if iv.threshold is None else s.gate
    det = iv.detector if gate == "probe" else None
    spec = {
        "setting": s.label, "mode": s.mode, "gate": gate, "layer": iv.layer, "gate_layer": iv.gate_layer,
        "scale": float(iv.scale), "gate_scale": float(iv.gate_scale),
        "threshold": None if iv.threshold is None else float(iv.threshold), "window": iv.window,
        "min_tokens": GATE_MIN_TOKENS, "bos_token_id": getattr(cfg, "bos_token_id", None),
        "n_features": iv.n_features, "features": iv.features.tolist(),
        "detector_hidden": 0 if det is None or det.W_HD is None else int(det.W_HD.shape[0]),
        "project_rank": int(iv.Q_DR.shape[1]),
    }
    f32 = {"W_enc": iv.W_enc_DS, "b_enc": iv.b_enc_S, "W_dec": iv.W_dec_SD, "b_dec": iv.b_dec_D, "t": iv.t_S,
           "mean_r": iv.mean_r_S, "Q": iv.Q_DR}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in f32.items()}
    D = iv.d_model
    if det is None:
        tensors.update(det_w=torch.zeros(0), det_W=torch.zeros(0, D), det_c=torch.zeros(0))
    else:
        H = spec["detector_hidden"]
        tensors.update(det_w=det.w.float().cpu(), det_W=(det.W_HD if H else torch.zeros(0, D)).float().cpu(),
                       det_c=(det.c_H if H else torch.zeros(0)).float().cpu())
    return spec, tensors


def _modeling_source(base_class: str) -> str:
    src = (Path(__file__).parent / "hf_modeling.py").read_text()
    line = 'BASE_CLASS = "Gemma3ForCausalLM"'
    assert src.count(line) == 1
    return src.replace(line, f'BASE_CLASS = "{base_class}"')


def _load_class(path: Path) -> type:
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("ff_export_modeling", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return getattr(module, HF_CLASS)


def export_hf(run_dir: str | Path, out_dir: str | Path, lm: Any, setting: Any = None, *,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face model folder: the model's weights with the run's chosen edit inside
    its forward pass (pipelines/hf_modeling.py), the tokenizer and a model card (`model_card`).
    `setting`: the chosen one (RUN/unlearning.json) unless given. Written to a temporary folder
    beside OUT and renamed when complete."""
    import shutil

    import transformers

    from pipelines.evaluate import check_model
    from pipelines.intervene import Intervention, chosen_setting

    run = load_run(run_dir)
    out = Path(out_dir)
    check_out(out, overwrite)
    setting = setting if setting is not None else chosen_setting(run_dir)
    base = type(lm.model).__name__
    if not hasattr(transformers, base) or not hasattr(lm.model, "model") or not hasattr(lm.model.model, "layers"):
        raise EvalError(f"cannot export a {base}: ff exports decoder-only transformers models whose blocks are "
                        "model.layers")
    check_model(run, lm)
    iv = Intervention(run, setting)
    spec, tensors = edit_spec(iv, lm.model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = _modeling_source(base)
    (tmp / HF_MODELING_FILE).write_text(source)
    cls = _load_class(tmp / HF_MODELING_FILE)
    config = lm.model.config.__class__.from_dict(lm.model.config.to_dict())
    config.featureforget = spec
    config.auto_map = {"AutoModelForCausalLM": f"{HF_MODELING_FILE[:-3]}.{HF_CLASS}"}
    config.architectures = [HF_CLASS]
    with torch.device("meta"):
        model = cls(config)
    state = {k: v.detach().cpu() for k, v in lm.model.state_dict().items()}
    state.update({f"featureforget.{k}": v for k, v in tensors.items()})
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    (tmp / HF_MODELING_FILE).write_text(source)  # save_pretrained does not copy it
    (tmp / "README.md").write_text(model_card(run_dir, spec, lm.info.name))
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # some writers create their files private; the folder is meant to be shared
        f.chmod(0o666 & ~umask)
    return replace_dir(tmp, out)


def model_card(run_dir: str | Path, spec: dict[str, Any], model_name: str) -> str:
    """The exported folder's README: what the edit is, what was measured (RUN/unlearning.json's
    chosen setting, test halves) and what it does not protect against."""
    best = EvalResult.load(RunFolder(run_dir).result).best or Entry()

    def score(e: Entry | Part | None) -> str:
        t = e.test if e else None
        if t is None or t.unlearning_score is None:
            return "not measured"
        lo, hi = t.ci95 or (float("nan"), float("nan"))
        return (f"{t.unlearning_score:.3f} [{lo:.2f}, {hi:.2f}] (forget accuracy {t.forget_mcq.before:.2f} -> "
                f"{t.forget_mcq.after:.2f}, retain {t.retain_mcq.before:.2f} -> "
                f"{t.retain_mcq.after:.2f}; {t.questions} test questions)")

    lines = [f"# {model_name}, with FeatureForget unlearning", "",
             f"`{model_name}` with the unlearning edit of FeatureForget run `{Path(run_dir).name}` inside its forward "
             "pass (modeling_featureforget.py: torch and transformers only). Load it with",
             "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)", "```", "",
             "## The edit", "",
             f"- setting: `{spec['setting']}` ({spec['n_features']} SAE features at the output of block "
             f"{spec['layer']}, edit `{spec['mode']}`)",
             f"- gate: `{spec['gate']}`" + ("" if spec["gate"] == "none" else
                                           f", reading block {spec['gate_layer']}, its signal averaged over "
                                           + (f"the last {spec['window']} tokens" if spec["window"]
                                              else "every token so far")),
             "", "## Measured (`ff eval`, test halves, 95% bootstrap intervals)", "",
             f"- unlearning score in distribution, plain prompts: {score(best)}",
             f"- out of distribution: {score(best.ood)}"]
    low = best.formats_min.test if best.formats_min else None
    if low is not None:
        lines.append(f"- minimum over prompt formats (test): {low:.3f}")
    flu = (best.fluency or {}).get("forget_text")
    if flu:
        lines.append(f"- fluency: the clean model's NLL of continuations of forget prompts {flu.nll:.2f} nats/token "
                     f"(its own continuations: {flu.nll_clean:.2f})")
    lines += ["", "## Threat model", "",
              "The edit acts at inference inside this model's forward pass. It does not protect against anyone "
              "who has the weights: removing `modeling_featureforget.py` (or loading without "
              "`trust_remote_code`) gives the original model back, and fine-tuning can restore what the edit "
              "hides. It is meant for serving: the model answers forget-domain questions worse while general ones "
              "keep their answers, as measured above on the prompt formats listed in the run's report.", ""]
    return "\n".join(lines)


VERIFY_PROMPTS = ("Question: Which organelle makes most of the cell's ATP?\nAnswer: the mitochondrion, where",
                  "The history of the printing press begins in the fifteenth century, when")


@torch.no_grad()
def verify_hf(folder: str | Path, lm: Any, run_dir: str | Path, setting: Any, *, atol: float = 1e-3) -> float:
    """Load the exported folder as a user would and compare its logits on VERIFY_PROMPTS (one
    padded batch) with the hooked edit's on each prompt alone; return the largest difference,
    an EvalError above `atol`."""
    from transformers import AutoModelForCausalLM

    from pipelines.intervene import unlearned

    exported = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    exported.to(lm.device).eval()
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(list(VERIFY_PROMPTS), return_tensors="pt", padding=True).to(lm.device)
    finally:
        tok.padding_side = side
    got = exported(**batch).logits
    err = 0.0
    with unlearned(lm.model, run_dir, setting):
        for i, prompt in enumerate(VERIFY_PROMPTS):
            ids = tok(prompt, return_tensors="pt").input_ids.to(lm.device)
            want = lm.model(ids).logits[0]
            err = max(err, float((got[i, -ids.shape[1]:] - want).abs().max()))
    if not err <= atol:
        raise EvalError(f"the exported folder {folder} does not reproduce the hooked edit (largest logit "
                        f"difference {err:.3g} > {atol:g}); please report this")
    return err
