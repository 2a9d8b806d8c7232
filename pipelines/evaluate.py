"""`ff eval`: unlearning metrics of one run folder (METHOD §8).

    from cache.models import load_model
    from pipelines.evaluate import EvalConfig, evaluate_run
    lm = load_model("gemma-3-270m")
    result = evaluate_run("runs/ff_l8", lm, EvalConfig())      # a JSON-able dict

Per run: SAE quality on held-out text (FVU, L0, dead fraction, loss recovered from CE clean /
SAE spliced / zero-ablated), then a sweep over intervention settings (METHOD §7) with MCQ
accuracy and CE loss before/after on forget and retain data, the SAEBench unlearning score
`1 - acc_after / acc_before` on forget questions, and the best setting among those that keep
retain accuracy >= retain_ratio * clean. Clean passes are cached per loaded model (evalsets.py).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.config import EvalConfig, Setting, SweepGrid  # noqa: F401  (re-exported for the CLI)
from pipelines.errors import EvalError
from pipelines.evalsets import EvalData, eval_data
from pipelines.fastlm import verify_fast_path
from pipelines.intervene import Intervention, LoadedRun, load_run
from trainer.evaluate import eval_corpus

METRICS = ("forget_mcq", "retain_mcq", "forget_loss", "retain_loss")
_SETS = {"forget_mcq": "forget_mcq", "retain_mcq": "retain_mcq",
         "forget_loss": "forget_text", "retain_loss": "retain_text"}


def check_model(run: LoadedRun, lm: Any) -> None:
    """The run must have been trained on the activations of `lm` (STYLE 3: name both sides)."""
    want, have = run.config.get("model_hash"), lm.info.weights_hash
    if want is not None and want != have:
        raise EvalError(f"{run.path} was trained on model '{run.config.get('model')}' ({want}) but the "
                        f"loaded model is '{lm.info.name}' ({have}); evaluate it with --model "
                        f"{run.config.get('model')}")
    if run.sae.d_model != lm.info.d_model:
        raise EvalError(f"{run.path} has d_model {run.sae.d_model} but model '{lm.info.name}' has "
                        f"{lm.info.d_model}")
    if not 0 <= run.layer < lm.info.n_layers:
        raise EvalError(f"{run.path} is for layer {run.layer} but model '{lm.info.name}' has "
                        f"{lm.info.n_layers} layers")


def unlearning_score(before: float, after: float) -> float | None:
    """SAEBench: 1 - acc_after / acc_before on forget questions; None when acc_before is 0."""
    return 1.0 - after / before if before > 0 else None


def pick_best(sweep: list[dict[str, Any]], retain_ratio: float) -> tuple[dict[str, Any] | None, str | None]:
    """The highest unlearning score among settings that edit at least one feature and keep
    retain MCQ accuracy >= retain_ratio * clean -> (entry, None), or (None, reason)."""
    real = [e for e in sweep if e["n_features"] > 0 and e["unlearning_score"] is not None]
    if not real:
        return None, "no setting selected any feature (the run has no candidates?)"
    ok = [e for e in real  # the 1e-9 keeps e.g. 0.495 >= 0.99 * 0.5 true despite float rounding
          if e["retain_mcq"]["after"] >= retain_ratio * e["retain_mcq"]["before"] - 1e-9]
    if not ok:
        top = max(real, key=lambda e: e["retain_mcq"]["after"])
        return None, (f"no setting kept retain MCQ accuracy >= {retain_ratio:g} x clean "
                      f"({top['retain_mcq']['before']:.3f}); the closest was {top['label']} "
                      f"at {top['retain_mcq']['after']:.3f}")
    return max(ok, key=lambda e: e["unlearning_score"]), None  # max keeps the first of ties


def sae_quality(run: LoadedRun, data: EvalData, model: Any, ce_clean: float) -> dict[str, Any]:
    """On held-out text at the run's layer (METHOD §8): FVU, MSE, L0, dead fraction of the
    activations, and CE loss clean / SAE spliced / zero-ablated -> loss recovered."""
    acts = data.forget_text.activations(run.layer) + data.retain_text.activations(run.layer)
    dev = run.sae.W_dec.device
    ev = eval_corpus(run.sae, (a.to(dev, torch.float32) * run.scale for a in acts))
    ce_sae = data.retain_text.run(model, Intervention(run, Setting(mode="splice"))).value
    if run.layer not in data.zero_ce:  # independent of the SAE: shared by every run at the layer
        data.zero_ce[run.layer] = data.retain_text.run(model, Intervention(run, Setting(mode="zero"))).value
    ce_zero = data.zero_ce[run.layer]
    denom = ce_zero - ce_clean
    return {"fvu": ev.fvu, "mse": ev.mse, "l0": ev.l0, "tokens": ev.tokens,
            "dead_fraction": 1.0 - float(ev.fired_F.float().mean()),
            "ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero,
            "loss_recovered": (ce_zero - ce_sae) / denom if denom > 0 else None}


def measure(data: EvalData, model: Any, iv: Intervention, clean: dict[str, float],
            metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """One sweep entry: `metrics` before/after `iv` (the others get "after": None)."""
    t0 = time.perf_counter()
    values: dict[str, float | None] = {m: None for m in METRICS}
    rerun = 0
    for m in metrics:
        if iv.n_features == 0:  # nothing to edit: the clean values are exact
            values[m] = clean[m]
            continue
        res = getattr(data, _SETS[m]).run(model, iv)
        values[m], rerun = res.value, rerun + res.rows_rerun
    e: dict[str, Any] = {"setting": iv.setting.to_dict(), "label": iv.setting.label,
                         "n_features": iv.n_features}
    e.update({m: {"before": clean[m], "after": values[m]} for m in METRICS})
    after = values["forget_mcq"]
    e["unlearning_score"] = None if after is None else unlearning_score(clean["forget_mcq"], after)
    e["rows_rerun"], e["seconds"] = rerun, round(time.perf_counter() - t0, 2)
    return e


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _describe(e: dict[str, Any]) -> str:
    f, r = e["forget_mcq"], e["retain_mcq"]
    score = "n/a" if e["unlearning_score"] is None else f"{e['unlearning_score']:.3f}"
    return (f"{e['label']} ({e['n_features']} features): forget MCQ {f['before']:.3f}->{f['after']:.3f}, "
            f"retain MCQ {r['before']:.3f}->{r['after']:.3f}, score {score} ({e['seconds']:.1f} s)")


def evaluate_run(run_dir: str | Path, lm: Any, cfg: EvalConfig | None = None, *, progress: bool = True,
                 data: EvalData | None = None) -> dict[str, Any]:
    """Evaluate one run folder with a loaded model (cache.models.LoadedModel) -> a JSON-able dict.

    `data` defaults to the evaluation sets memoised for (lm, cfg): the clean passes are paid
    once per loaded model, and only the residual stream of a new layer is added per run (call
    `eval_data(lm, cfg).prepare(lm.model, layers)` first to capture all layers in one pass).
    """
    cfg = cfg or EvalConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    run = load_run(run_dir)
    check_model(run, lm)
    run.sae.to(lm.device)
    model, tag = lm.model, f"[eval {run.path.name}: {run.method} layer {run.layer}]"
    verify_fast_path(model, run.layer)
    data = data or eval_data(lm, cfg)
    _log(progress, f"{tag} clean passes ...")
    data.prepare(model, run.layer)
    clean = {m: getattr(data, _SETS[m]).clean_value() for m in METRICS}
    _log(progress, f"{tag} clean: " + " ".join(f"{m} {v:.3f}" for m, v in clean.items())
         + f" ({time.perf_counter() - t0:.0f} s)")
    sae = sae_quality(run, data, model, clean["retain_loss"])
    _log(progress, f"{tag} SAE: fvu {sae['fvu']:.3f} l0 {sae['l0']:.1f} dead {sae['dead_fraction']:.3f} "
                   f"loss recovered {sae['loss_recovered']} ({time.perf_counter() - t0:.0f} s)")
    settings = cfg.grid.settings(run.method)
    metrics = METRICS if cfg.sweep_losses else ("forget_mcq", "retain_mcq")
    sweep = []
    for i, setting in enumerate(settings, 1):
        sweep.append(measure(data, model, Intervention(run, setting), clean, metrics))
        _log(progress, f"{tag} {i}/{len(settings)} {_describe(sweep[-1])}")
    best, reason = pick_best(sweep, cfg.retain_ratio)
    if best is not None and not cfg.sweep_losses:  # CE losses for the best setting only
        iv = Intervention(run, Setting.from_dict(best["setting"]))
        losses = measure(data, model, iv, clean, ("forget_loss", "retain_loss"))
        best.update({m: losses[m] for m in ("forget_loss", "retain_loss")})
    return {
        "run": str(run.path), "layer": run.layer, "method": run.method, "model": lm.info.name,
        "best": best, "best_reason": reason, "clean": clean, "sweep": sweep, "sae": sae,
        "data": {"forget_questions": data.forget_mcq.size, "retain_questions": data.retain_mcq.size,
                 "forget_tokens": data.forget_text.size, "retain_tokens": data.retain_text.size},
        "config": cfg.to_dict(), "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
    }
