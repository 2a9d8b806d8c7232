"""`ff eval --model OUT`: a model folder scored as it is (no run, no hook) against the model it
was made from, with the same question sets, prompt formats, halves, intervals, CE and fluency as
the hooked edit's evaluation (pipelines/evaluate.py).

    from cache.models import load_model
    from pipelines.artifact import evaluate_model
    res = evaluate_model(load_model("gemma-3-270m"), load_model("baked/"), EvalConfig.preset("demo"))

"before" is the base model's answer, "after" the folder's; the entry has the shape of a chosen
setting in `ff eval --json` (dev and test halves, `formats`, `formats_min`, `ood`, `fluency`), so
the same report lines read it. Nothing is chosen: there is one model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.config import EvalConfig
from pipelines.errors import EvalError
from pipelines.evalsets import FLUENCY_NEW_TOKENS, EvalData, eval_data
from pipelines.result import Entry, Fluency, Halves, MinScores, ModelEvalResult, Pair, Part
from pipelines.scoring import half, min_score, unlearning_score


def base_of(folder: str | Path) -> str | None:
    """The model a baked folder was made from (its featureforget_bake.json), or None."""
    from pipelines.bake import BAKE_FILE

    meta = Path(folder) / BAKE_FILE
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("base_model")
    except (OSError, json.JSONDecodeError):
        return None


def check_plain(folder: str | Path) -> None:
    """ff scores a folder through its decoder blocks; an exported folder (ff export --format hf)
    applies its edit in its own forward, which that bypasses: refuse it rather than measure the
    clean model under its name."""
    cfg = Path(folder) / "config.json"
    try:
        exported = "featureforget" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return  # load_model says what is wrong with the folder
    if exported:
        raise EvalError(f"{folder} is an exported folder (ff export --format hf): its edit runs in custom code that "
                        "ff eval --model does not use; evaluate the run with ff eval --run, or the folder one choice "
                        "per row with scripts/check_export.py")


def _prepared(lm: Any, cfg: EvalConfig) -> EvalData:
    data = eval_data(lm, cfg)
    data.prepare(lm.model, [])
    return data


def _part(base: EvalData, other: EvalData, prefix: str, cfg: EvalConfig, kind: type[Part] = Part) -> Part | None:
    """One side (in distribution "" or "ood_", a `kind` record): MCQ before/after per half and
    prompt format with intervals on the test halves, and the held-out CE."""
    f, r = f"{prefix}forget_mcq", f"{prefix}retain_mcq"
    if not (base.has(f) and base.has(r)):
        return None
    pairs = {}
    for key in ("forget_mcq", "retain_mcq", "forget_loss", "retain_loss"):
        name = f"{prefix}{key.replace('_loss', '_text')}"
        if base.has(name):
            pairs[key] = Pair.build(before=getattr(base, name).clean_value(), after=getattr(other, name).clean_value())
    out = kind.build(**pairs)
    formats = {}
    for fmt in base.formats:
        suffix = "" if fmt == "plain" else f"@{fmt}"
        fs, rs = getattr(base, f + suffix), getattr(base, r + suffix)
        fc = (fs.clean_result().correct_Q, getattr(other, f + suffix).clean_result().correct_Q)
        rc = (rs.clean_result().correct_Q, getattr(other, r + suffix).clean_result().correct_Q)
        halves = Halves.build(dev=half(fc, rc, ~fs.test_Q, ~rs.test_Q),
                              test=half(fc, rc, fs.test_Q, rs.test_Q, bootstrap=cfg.bootstrap, seed=cfg.sample_seed))
        if fmt == "plain":
            out = out.updated(dev=halves.dev, test=halves.test,
                              unlearning_score=unlearning_score(getattr(base, f).clean_value(),
                                                                getattr(other, f).clean_value()))
        else:
            formats[fmt] = halves
    if formats:
        out = out.updated(formats=formats)
        out = out.updated(formats_min=MinScores.build(dev=min_score(out, "dev"), test=min_score(out, "test")))
    return out


def _fluency(base_lm: Any, base: EvalData, other_lm: Any) -> dict[str, Fluency]:
    """Greedy continuations of the prose prompts by the folder's model, scored by the base model
    (pipelines/fluency.py), against the base model's own."""
    from pipelines.fluency import continuation_nll, greedy, summarize

    if not base.fluency:
        return {}
    base.fluency_of(base_lm.model, base_lm.tokenizer, None)  # the base model's own continuations, once
    out = {}
    for name, ids in base.fluency.items():
        ref = base.fluency_ref[name]
        edited = greedy(other_lm.model, ids, FLUENCY_NEW_TOKENS, batch=len(ids))
        changed = (edited != ref.cont_PN).any(-1)
        nll = ref.nll_P.clone()
        if bool(changed.any()):
            nll[changed] = continuation_nll(base_lm.model, ids[changed], edited[changed], batch=len(ids))
        out[name] = summarize(base_lm.tokenizer, ids, edited, nll, ref, examples=3)
    return out


def evaluate_model(base_lm: Any, other_lm: Any, cfg: EvalConfig, *, progress: bool = True) -> ModelEvalResult:
    """Score `other_lm` against `base_lm` on the configured sets (module docstring)."""
    import sys

    if base_lm.info.tokenizer_hash != other_lm.info.tokenizer_hash:
        raise EvalError(f"'{other_lm.info.name}' and its base '{base_lm.info.name}' have different tokenizers: "
                        "pass the model it was made from with --base")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[eval {other_lm.info.name}] {msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    base = _prepared(base_lm, cfg)
    log(f"base model {base_lm.info.name} scored")
    other = _prepared(other_lm, cfg)
    log("model scored")
    entry = _part(base, other, "", cfg, Entry) or Entry.build()
    ood = _part(base, other, "ood_", cfg)
    if ood is not None:
        entry = entry.updated(ood=ood)
    entry = entry.updated(fluency=_fluency(base_lm, base, other_lm))
    log("fluency measured")
    return ModelEvalResult.build(model=other_lm.info.name, base=base_lm.info.name, best=entry,
                                 config=cfg.to_dict(), seconds=round(time.perf_counter() - t0, 1))
