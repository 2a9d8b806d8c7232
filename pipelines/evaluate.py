"""`ff eval`: unlearning metrics of one run folder (METHOD §8).

    from cache.models import load_model
    from pipelines.evaluate import EvalConfig, evaluate_run
    lm = load_model("gemma-3-270m")
    result = evaluate_run("runs/ff_l8", lm, EvalConfig())      # a pipelines.result.EvalResult

Per run: SAE quality on held-out text (FVU, L0, dead fraction, loss recovered from CE clean /
SAE spliced / zero-ablated), then a sweep over intervention settings (METHOD §7) with MCQ
accuracy and CE loss before/after on forget and retain data, the SAEBench unlearning score
`1 - acc_after / acc_before` on forget questions, and the best setting among those that keep
retain accuracy >= retain_ratio * clean. Clean passes are cached per loaded model (evalsets.py).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipelines.config import EvalConfig, Setting, SweepGrid  # noqa: F401  (re-exported for the CLI)
from pipelines.errors import EvalError
from pipelines.evalsets import EvalData, SetResult, eval_data
from pipelines.fastlm import kv_reuse_ok, verify_fast_path
from pipelines.intervene import (
    Intervention,
    LoadedRun,
    load_run,
    make_gate,
    probe_detector,
    probe_layer,
    probe_problem,
)
from pipelines.result import (
    RESULT_FORMAT,
    Choice,
    Detection,
    Entry,
    EvalResult,
    Fluency,
    Gate,
    Halves,
    Lost,
    LostItem,
    MinScores,
    OpenedRow,
    Pair,
    Part,
    SaeQuality,
)
from pipelines.scoring import FORGET_PROSE, auroc, gate_split, half, min_score, pick_best, retain_safe, unlearning_score
from trainer.evaluate import eval_corpus

METRICS = ("forget_mcq", "retain_mcq", "forget_loss", "retain_loss")
_SETS = {"forget_mcq": "forget_mcq", "retain_mcq": "retain_mcq",
         "forget_loss": "forget_text", "retain_loss": "retain_text"}
OOD_METRICS = ("ood_forget_mcq", "ood_retain_mcq", "ood_forget_loss", "ood_retain_loss")
_SETS.update({"ood_forget_mcq": "ood_forget_mcq", "ood_retain_mcq": "ood_retain_mcq",
              "ood_forget_loss": "ood_forget_text", "ood_retain_loss": "ood_retain_text"})


def check_model(run: LoadedRun, lm: Any) -> None:
    """The run must have been trained on the activations of `lm` (STYLE 3: name both sides)."""
    want, have = run.config.model_hash, lm.info.weights_hash
    if not lm.info.matches(want):
        raise EvalError(f"{run.path} was trained on model '{run.config.model}' ({want}) but the "
                        f"loaded model is '{lm.info.name}' ({have}); evaluate it with --model "
                        f"{run.config.model}")
    if run.sae.d_model != lm.info.d_model:
        raise EvalError(f"{run.path} has d_model {run.sae.d_model} but model '{lm.info.name}' has "
                        f"{lm.info.d_model}")
    if not 0 <= run.layer < lm.info.n_layers:
        raise EvalError(f"{run.path} is for layer {run.layer} but model '{lm.info.name}' has "
                        f"{lm.info.n_layers} layers")


def sae_quality(run: LoadedRun, data: EvalData, model: Any, ce_clean: float) -> SaeQuality:
    """On held-out text at the run's layer (METHOD §8): FVU, MSE, L0, dead fraction of the
    activations, and CE loss clean / SAE spliced / zero-ablated -> loss recovered."""
    acts = data.forget_text.activations(run.layer) + data.retain_text.activations(run.layer)
    dev = run.sae.W_dec.device
    ev = eval_corpus(run.sae, (a.to(dev, torch.float32) * run.scale for a in acts))
    ce_sae = data.retain_text.run(model, Intervention(run, Setting(mode="splice", gate="none"))).value
    if run.layer not in data.zero_ce:  # independent of the SAE: shared by every run at the layer
        zero = Intervention(run, Setting(mode="zero", gate="none"))
        data.zero_ce[run.layer] = data.retain_text.run(model, zero).value
    ce_zero = data.zero_ce[run.layer]
    denom = ce_zero - ce_clean
    return SaeQuality.build(fvu=ev.fvu, mse=ev.mse, l0=ev.l0, tokens=ev.tokens,
                            dead_fraction=1.0 - float(ev.fired_F.float().mean()),
                            ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero,
                            loss_recovered=(ce_zero - ce_sae) / denom if denom > 0 else None)


MAX_ITEMS = 8
"""At most this many questions / text rows per list of an entry (`retain_lost`, `retain_text_opened`)."""

Answered = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor, Tensor]
"""Per question of a forget and a retain set: (forget (correct before, after), retain (correct
before, after), forget test mask, retain test mask)."""


@dataclass
class Measured:
    """A sweep entry, or a chosen setting measured in full, with what its halves were made from:
    `correct` the answers per part ("" and "ood_" in the plain format, "@fmt" and "ood_@fmt" in the
    others), `results` the sets' results per metric, `fluency` the forget-prose continuations
    (EvalData.fluency_of's `done`)."""

    entry: Entry
    correct: dict[str, Answered] = field(default_factory=dict)
    results: dict[str, SetResult] = field(default_factory=dict)
    fluency: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def part(self, key: str) -> Part | None:
        """The in-distribution side (key "", the entry itself) or the out-of-distribution one ("ood_")."""
        return self.entry.ood if key else self.entry

    def update(self, key: str, **changes: Any) -> None:
        """Set fields of the side `key` (see `part`)."""
        self.entry = self.entry.updated(ood=self.entry.ood.updated(**changes)) if key else self.entry.updated(**changes)


def _margins(es: Any, iv: Intervention) -> Tensor | None:
    """Per question or row of `es`: how far the gate's peak rose above its threshold (> 0: it
    opened somewhere); None without a gate."""
    return None if iv.threshold is None else es.gate_peaks(iv) - iv.threshold


def lost_items(es: Any, correct: tuple[Tensor, Tensor], iv: Intervention) -> Lost:
    """The questions of `es` that `iv` turns from right to wrong: how many, and the first
    MAX_ITEMS (dev half first) with the question and the gate's margin (`_margins`). A gated
    setting edits only where its gate opened, so each margin is > 0: a small one is a borderline
    opening, a large one a confident false opening."""
    lost_Q = correct[0].bool() & ~correct[1].bool()
    idx = sorted(torch.nonzero(lost_Q).flatten().tolist(), key=lambda q: (bool(es.test_Q[q]), q))
    margin = _margins(es, iv) if idx else None
    items = [LostItem.build(index=q, half="test" if es.test_Q[q] else "dev", item=es.items[q] if es.items else None,
                            gate_margin=None if margin is None else round(float(margin[q]), 4))
             for q in idx[:MAX_ITEMS]]
    return Lost.build(count=len(idx), items=items)


def opened_rows(es: Any, iv: Intervention) -> list[OpenedRow]:
    """The text rows of `es` on which the gate opens, widest margin first (at most MAX_ITEMS)."""
    margin = _margins(es, iv)
    if margin is None:
        return []
    rows = sorted(torch.nonzero(margin > 0).flatten().tolist(), key=lambda r: -float(margin[r]))
    return [OpenedRow.build(row=r, item=es.items[r] if es.items else None, gate_margin=round(float(margin[r]), 4))
            for r in rows[:MAX_ITEMS]]


def _plain_safe(e: Entry, ratio: float) -> bool:
    """Whether the entry keeps the retain dev questions of the plain format (in or out of
    distribution): only then can it be chosen, and only then are the other formats worth scoring."""
    return any(p is not None and p.dev is not None and retain_safe(p, ratio, float("inf")) for p in (e, e.ood))


def measure(data: EvalData, model: Any, iv: Intervention, clean: dict[str, Any],
            metrics: tuple[str, ...], formats: float | str | None = "all",
            done: dict[str, SetResult] | None = None) -> Measured:
    """One sweep entry: `metrics` before/after `iv` (the others get "after": None), with the
    dev and test halves of the MCQ sets (scoring.half), and of every other prompt format
    (`measure_formats`): always ("all"), never (None), or only where the entry keeps the plain
    retain dev questions at this ratio of clean (a float: the sweep's shortcut, since a setting
    unsafe in one format is never chosen). `done`: results of the same setting measured before
    (the sweep's entry), used as they are instead of running their sets again."""
    t0 = time.perf_counter()
    res: dict[str, SetResult | None] = {m: None for m in clean}
    rerun = 0
    for m in metrics:
        if m not in clean:
            continue
        if done and m in done:
            res[m] = done[m]
            continue
        res[m] = clean[m] if iv.n_features == 0 else getattr(data, _SETS[m]).run(model, iv)
        rerun += res[m].rows_rerun
    out = Measured(Entry.build(setting=iv.setting.to_dict(), label=iv.setting.label, n_features=iv.n_features),
                   results={m: r for m, r in res.items() if r is not None})
    for prefix in ("", "ood_"):
        f_mcq, r_mcq, _, r_loss = (f"{prefix}{m}" for m in METRICS)
        if f_mcq not in clean:
            continue
        part = out.entry if not prefix else Part.build()
        part = part.updated(**{m[len(prefix):]: Pair.build(before=clean[m].value,
                                                           after=None if res[m] is None else res[m].value)
                               for m in (f"{prefix}{m}" for m in METRICS) if m in clean})
        f_set, r_set = getattr(data, _SETS[f_mcq]), getattr(data, _SETS[r_mcq])
        if res[f_mcq] is not None and res[r_mcq] is not None:
            fc = (clean[f_mcq].correct_Q, res[f_mcq].correct_Q)
            rc = (clean[r_mcq].correct_Q, res[r_mcq].correct_Q)
            out.correct[prefix] = (fc, rc, f_set.test_Q, r_set.test_Q)
            part = part.updated(dev=half(fc, rc, ~f_set.test_Q, ~r_set.test_Q),
                                test=half(fc, rc, f_set.test_Q, r_set.test_Q))
            if iv.n_features:
                part = part.updated(retain_lost=lost_items(r_set, rc, iv))
        if res.get(r_loss) is not None and iv.n_features:
            part = part.updated(retain_text_opened=opened_rows(getattr(data, _SETS[r_loss]), iv))
        if prefix:
            out.entry = out.entry.updated(ood=part)
        else:
            f = part.forget_mcq
            out.entry = part.updated(unlearning_score=None if f.after is None else unlearning_score(f.before, f.after))
    if formats is not None and (formats == "all" or _plain_safe(out.entry, formats)):
        rerun += measure_formats(out, data, model, iv, clean_only=iv.n_features == 0)
    out.entry = out.entry.updated(rows_rerun=rerun, seconds=round(time.perf_counter() - t0, 2))
    return out


def measure_formats(m: Measured, data: EvalData, model: Any, iv: Intervention, *, clean_only: bool = False) -> int:
    """The entry's MCQ halves in every prompt format besides "plain" (EvalConfig.formats), in
    place: the `formats` of each side hold {fmt: dev and test halves} as the plain halves are.
    Returns the rows rerun."""
    rerun = 0
    found: dict[str, dict[str, Halves]] = {}
    for fmt in data.formats:
        if fmt == "plain":
            continue
        for prefix in ("", "ood_"):
            names = (f"{prefix}forget_mcq@{fmt}", f"{prefix}retain_mcq@{fmt}")
            if m.part(prefix) is None or not all(data.has(n) for n in names):
                continue
            pairs = []
            for es in (getattr(data, n) for n in names):
                before = es.clean_result()
                after = before if clean_only else es.run(model, iv)
                rerun += after.rows_rerun
                pairs.append((before.correct_Q, after.correct_Q))
            f_set, r_set = (getattr(data, n) for n in names)
            m.correct[f"{prefix}@{fmt}"] = (*pairs, f_set.test_Q, r_set.test_Q)
            found.setdefault(prefix, {})[fmt] = Halves.build(dev=half(pairs[0], pairs[1], ~f_set.test_Q, ~r_set.test_Q),
                                                             test=half(pairs[0], pairs[1], f_set.test_Q, r_set.test_Q))
    for prefix, halves in found.items():
        m.update(prefix, formats=halves)
    return rerun


def retain_losses(m: Measured, data: EvalData, model: Any, iv: Intervention, clean: dict[str, Any],
                  ratio: float) -> None:
    """Without sweep_losses: the held-out retain CE (in and out of distribution) of an entry
    that keeps the retain questions of the dev half, in place. Retain-safety needs it (pick_best
    bounds its rise), and a setting that already loses retain questions needs no more; the
    forget-side CE is measured for the chosen settings only."""
    for key, prefix in (("retain_loss", ""), ("ood_retain_loss", "ood_")):
        part = m.part(prefix)
        if part is None or key not in clean or part.dev is None or iv.n_features == 0:
            continue
        if retain_safe(part, ratio, float("inf")):  # the questions alone
            text = getattr(data, _SETS[key])
            m.results[key] = text.run(model, iv)
            m.update(prefix, retain_loss=part.retain_loss.updated(after=m.results[key].value),
                     retain_text_opened=opened_rows(text, iv))


def _carry_formats(src: Measured, dst: Measured) -> None:
    """Copy the prompt-format halves (and their per-question answers) that the sweep measured for
    an entry into its complete re-measurement, in place: they do not depend on the CE losses."""
    for prefix in ("", "ood_"):
        s = src.part(prefix)
        if s is not None and s.formats is not None and dst.part(prefix) is not None:
            dst.update(prefix, formats=dict(s.formats))
    dst.correct.update({k: v for k, v in src.correct.items() if "@" in k})


def sweep_fluency(swept: list[tuple[Measured, Intervention]], data: EvalData, lm: Any, cfg: EvalConfig) -> None:
    """The fluency of the forget-prose continuations (in and out of distribution) of the entries
    that are retain-safe on the dev half, in place (`fluency[FORGET_PROSE]` of each side), all
    settings decoded together (EvalData.fluency_many): the fluency bound
    (EvalConfig.max_fluency_nll_rise) decides among those, and a setting that is not retain-safe
    needs no more measuring."""
    if cfg.max_fluency_nll_rise is None:
        return
    jobs = []
    for m, iv in swept:
        if iv.n_features == 0:
            continue
        todo = {}
        for name, prefix, ce in (("forget_text", "", cfg.max_retain_ce_rise),
                                 ("ood_forget_text", "ood_", cfg.max_ood_retain_ce_rise)):
            part = m.part(prefix)
            if part is not None and part.dev is not None and name in data.fluency \
                    and retain_safe(part, cfg.retain_ratio, ce):
                todo[name] = prefix
        if todo:
            jobs.append((m, iv, todo))
    if not jobs:
        return
    got = data.fluency_many(lm.model, lm.tokenizer, [iv for _, iv, _ in jobs], [list(todo) for *_, todo in jobs],
                            dones=[m.fluency for m, _, _ in jobs])
    for (m, _, todo), fl in zip(jobs, got):
        for name, prefix in todo.items():
            f = fl[name]
            m.update(prefix, fluency={FORGET_PROSE: Fluency.build(nll=f.nll, nll_clean=f.nll_clean, distinct=f.distinct,
                                                                  distinct_clean=f.distinct_clean, changed=f.changed)})


def _with_intervals(part: Part, correct: dict[str, Answered], key: str, cfg: EvalConfig,
                    halves: tuple[str, ...], *, formats: bool = True, least: bool = True) -> Part:
    """`part` (the side `key`, "" or "ood_") with the plain `halves` ("dev", "test") measured again
    with their intervals and per-question answers; with `formats`, every other prompt format's test
    half too; with `least`, the minimum score over formats (`formats_min`)."""
    fc, rc, f_test, r_test = correct[key]
    masks = {"dev": (~f_test, ~r_test), "test": (f_test, r_test)}
    part = part.updated(**{h: half(fc, rc, *masks[h], bootstrap=cfg.bootstrap, seed=cfg.sample_seed) for h in halves})
    if not part.formats:
        return part
    if formats:
        part = part.updated(formats={fmt: h.updated(test=half(*correct[f"{key}@{fmt}"], bootstrap=cfg.bootstrap,
                                                               seed=cfg.sample_seed))
                                     for fmt, h in part.formats.items()})
    if least:
        part = part.updated(formats_min=MinScores.build(dev=min_score(part, "dev"), test=min_score(part, "test")))
    return part


def gate_quality(m: Measured, iv: Intervention, key: str, data: EvalData,
                 detection: dict[tuple, Detection]) -> Gate:
    """A chosen setting's gate: threshold, open rates on the text sets and on the test-half
    questions, where the score comes from on the forget test questions of the side `key`
    (scoring.gate_split), and the gate's topic detection (memoised in `detection`: the signal
    depends on the run (probe) or the selection (sequence), not the threshold)."""
    fc, _, f_test, _ = m.correct[key]
    rates = {}
    for name in ("retain_text", "forget_text", "ood_retain_text", "ood_forget_text"):
        if data.has(name):
            opened = getattr(data, name).row_shares(iv)[1]
            rates[f"open_rate_{name.replace('_text', '')}"] = float(opened.double().mean())
    questions, split = {}, None  # test-half questions on which the gate opens somewhere (its peak passes the threshold)
    for name in ("forget_mcq", "retain_mcq", "ood_forget_mcq", "ood_retain_mcq"):
        if data.has(name):
            es = getattr(data, name)
            opened_Q = (es.gate_peaks(iv) > iv.threshold if iv.threshold is not None
                        else torch.ones(len(es.test_Q), dtype=torch.bool))
            questions[name.replace("_mcq", "")] = float(opened_Q[es.test_Q].double().mean())
            if name == f"{key}forget_mcq":
                split = gate_split(fc[0], fc[1], opened_Q, f_test, es.layout.n_choices_Q)
    gate_key = (iv.setting.gate,) if iv.setting.gate != "sequence" else ("sequence", iv.setting.set_key)
    if gate_key not in detection:
        detection[gate_key] = detector_quality(data, iv)
    return Gate.build(mode=iv.setting.gate, percentile=iv.setting.gate_percentile if iv.threshold is not None else None,
                      threshold=iv.threshold, **rates, open_rate_questions=questions, forget_split=split,
                      detection=detection[gate_key])


def chosen_entries(full: dict[str, Measured], choices: list[tuple[str, str]], best_label: str | None,
                   best_ood_label: str | None, cfg: EvalConfig) -> dict[str, Entry]:
    """Per chosen label, what every choice of that setting shares: its complete measurement
    (`full`) with intervals where some choice reports them. `choices`: (label, key) per
    choice, key "" for the in-distribution ones and "ood_" for the out-of-distribution one: an
    in-distribution choice reports every prompt format's test half; the out-of-distribution choice
    both halves of its out-of-distribution side, and the in-distribution choice (`best_label`) the
    transfer of its setting, that side's test half."""
    shared = {}
    for label, m in full.items():
        e = m.entry
        if any(lab == label and not key for lab, key in choices) and e.formats:
            e = e.updated(formats=_with_intervals(e, m.correct, "", cfg, (), least=False).formats)
        ood_halves = ("dev", "test") if label == best_ood_label else \
            ("test",) if label == best_label and e.ood is not None and e.ood.dev is not None else ()
        if ood_halves:
            e = e.updated(ood=_with_intervals(e.ood, m.correct, "ood_", cfg, ood_halves))
        shared[label] = e
    return shared


def calibrate_probe(settings: list[Setting], run: LoadedRun, data: EvalData, cfg: EvalConfig) -> list[Setting]:
    """Probe-gated settings with their detector and threshold chosen on the dev halves
    (cfg.gate_calibration "dev"). Threshold: the setting's
    percentile of the highest detector score of every retain dev question, pooled in and out of
    distribution. Detector: of the run's probes (one per L2 penalty, trainer/gate/detector.py), the
    one whose gate, at the highest percentile asked for, opens on the most forget dev questions
    (ties: the default); chosen per window (Setting.gate_window). The test halves never enter."""
    if cfg.gate_calibration not in ("dev", "train"):
        raise EvalError(f"unknown gate calibration '{cfg.gate_calibration}': use dev or train")
    todo = [s for s in settings if s.gate == "probe" and s.gate_threshold is None and s.edits_features]
    if cfg.gate_calibration == "train" or not todo:
        return settings
    chosen: dict[Setting, Setting] = {}
    for window in dict.fromkeys(s.gate_window for s in todo):
        group = [s for s in todo if s.gate_window == window]  # own detector, thresholds
        top = max(s.gate_percentile for s in group)
        pcts = {s.gate_percentile for s in group}
        best: tuple[float, tuple[str, float | None], dict[float, float]] | None = None
        fixed = group[0].probe_l2 is not None or group[0].probe_kind != "linear"
        for kind, l2 in [(group[0].probe_kind, group[0].probe_l2)] if fixed else run.gate.detectors():
            probe = group[0].replace(gate_threshold=0.0, probe_l2=l2, probe_kind=kind)
            thr, opened = probe_thresholds(run, data, probe, pcts, top)
            if best is None or opened > best[0]:
                best = (opened, (kind, l2), thr)
        assert best is not None  # evaluate_run refuses a run without a probe before this
        _, (kind, l2), thr = best
        chosen.update({s: s.replace(gate_threshold=thr[s.gate_percentile], probe_l2=l2, probe_kind=kind)
                       for s in group})
    return [chosen.get(s, s) for s in settings]


CALIBRATION_EXCLUDED = ("after_bio",)
"""Prompt formats whose retain questions do not calibrate the gate: their biology passage opens
it, as it should; what counts there is that the general question keeps its answer, which the
retain bound checks."""


def calibration_sets(data: EvalData, role: str) -> tuple[str, ...]:
    """The MCQ sets of `role` whose dev halves calibrate the probe gate: every prompt format but
    CALIBRATION_EXCLUDED, in and out of distribution."""
    fmts = [f for f in data.formats if f not in CALIBRATION_EXCLUDED]
    return tuple(f"{p}{role}_mcq" + ("" if f == "plain" else f"@{f}") for p in ("", "ood_") for f in fmts)


def probe_thresholds(run: LoadedRun, data: EvalData, setting: Setting, percentiles: set[float],
                     top: float) -> tuple[dict[float, float], float]:
    """({percentile: threshold score} from the retain dev questions, share of forget dev
    questions on which the gate opens at the `top` percentile, one of `percentiles`) for one probe."""
    iv = Intervention(run, setting)  # refuses a run without that probe
    bias = probe_detector(run, setting.probe_l2, setting.probe_kind).b

    def dev_peaks(names: tuple[str, ...]) -> Tensor:
        peaks = [getattr(data, n).gate_peaks(iv)[~getattr(data, n).test_Q] for n in names if data.has(n)]
        peak_Q = torch.cat(peaks).double() if peaks else torch.zeros(0, dtype=torch.float64)
        return peak_Q[torch.isfinite(peak_Q)]

    retain_Q = dev_peaks(calibration_sets(data, "retain"))
    if len(retain_Q) == 0:
        raise EvalError("no retain dev question is long enough to calibrate the probe gate on")
    thr = {p: float(torch.quantile(retain_Q, p / 100.0)) + bias for p in percentiles}
    forget_Q = dev_peaks(tuple(n for n in calibration_sets(data, "forget") if not n.startswith("ood_")))
    opened = float((forget_Q + bias > thr[top]).double().mean()) if len(forget_Q) else 0.0
    return thr, opened


def detector_quality(data: EvalData, iv: Intervention) -> Detection:
    """Topic detection by the gate's own signal (the probe's score, or the selected features'
    firing share): AUROC of each row's peak between forget and retain held-out rows."""
    out: dict[str, float | None] = {}
    for prefix in ("", "ood_"):
        for kind in ("text", "mcq"):
            f, r = f"{prefix}forget_{kind}", f"{prefix}retain_{kind}"
            name = f"auroc_{kind}" + (f"_{prefix.rstrip('_')}" if prefix else "")
            ok = data.has(f) and data.has(r) and iv.threshold is not None
            out[name] = auroc(getattr(data, f).gate_peaks(iv), getattr(data, r).gate_peaks(iv)) if ok else None
    return Detection.build(**out)


def selection_quality(data: EvalData, iv: Intervention) -> Detection:
    """Topic detection by the selected features: AUROC of the per-sequence firing share between
    forget and retain held-out sequences (text contexts; MCQ prompts), in and out of distribution."""
    out: dict[str, float | None] = {}
    for prefix in ("", "ood"):
        for kind in ("text", "mcq"):
            f, r = f"{prefix + '_' if prefix else ''}forget_{kind}", f"{prefix + '_' if prefix else ''}retain_{kind}"
            name = f"auroc_{kind}" + (f"_{prefix}" if prefix else "")
            if data.has(f) and data.has(r) and iv.n_features:
                out[name] = auroc(getattr(data, f).row_shares(iv)[0], getattr(data, r).row_shares(iv)[0])
            else:
                out[name] = None
    return Detection.build(n_features=iv.n_features, **out)


def _pick(sweep: list[Measured], ratio: float, ce: float, **kw: Any) -> tuple[Measured | None, str | None]:
    """scoring.pick_best over the sweep's entries: (the chosen one or None, reason)."""
    i, reason = pick_best([m.entry for m in sweep], ratio, ce, **kw)
    return (None if i is None else sweep[i]), reason


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _describe(t: Entry) -> str:
    """One progress line for a sweep entry (dev halves)."""
    f, r, ood = t.dev.forget_mcq, t.dev.retain_mcq, t.ood
    ood_s = "" if ood is None or ood.dev is None or ood.dev.unlearning_score is None else \
        f", ood dev score {ood.dev.unlearning_score:.3f} (general {ood.dev.retain_mcq.after:.3f})"
    low = ""
    if t.formats:
        m_ood = min_score(ood) if ood is not None and ood.formats else None
        low = f"; minimum over formats {maybe_num(min_score(t))}, ood {maybe_num(m_ood)}"
    return (f"{t.label} ({t.n_features} features): dev forget MCQ {f.before:.3f}->{f.after:.3f}, "
            f"retain MCQ {r.before:.3f}->{r.after:.3f}, score {maybe_num(t.dev.unlearning_score)}{ood_s}{low} "
            f"({t.seconds:.1f} s)")


def maybe_num(v: float | None) -> str:
    """A score to three decimals, or "n/a" (the progress lines and `ff eval`'s summary)."""
    return "n/a" if v is None else f"{v:.3f}"


def save_result(run_dir: str | Path, res: EvalResult) -> Path:
    """Write `res` to RUN/unlearning.json; an interrupted write leaves the previous file whole."""
    from trainer.run import RunFolder, write_json

    path = RunFolder(run_dir).result
    write_json(path, res.to_dict())
    return path


def evaluate_run(run_dir: str | Path, lm: Any, cfg: EvalConfig | None = None, *, progress: bool = True,
                 data: EvalData | None = None) -> EvalResult:
    """Evaluate one run folder with a loaded model (cache.models.LoadedModel) -> its result.

    `data` defaults to the evaluation sets memoised for (lm, cfg): the clean passes are paid
    once per loaded model, and only the residual stream of a new layer is added per run (call
    `eval_data(lm, cfg).prepare(lm.model, layers)` first to capture all layers in one pass).
    """
    cfg = cfg or EvalConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    run = load_run(run_dir)
    check_model(run, lm)
    if "probe" in cfg.grid.gates and (problem := probe_problem(run)) is not None:  # before the clean passes
        raise EvalError(f"{run.path} {problem}: retrain it, or sweep the other gates with --set gates=both")
    if "probe" in cfg.grid.gates and cfg.gate_calibration == "train":
        make_gate(run, Setting(gate="probe"), torch.arange(0))  # a run from an older ff may have no calibration
    run.sae.to(lm.device)
    model, tag = lm.model, f"[eval {run.path.name}: {run.method} layer {run.layer}]"
    verify_fast_path(model, run.layer)
    data = data or eval_data(lm, cfg)
    _log(progress, f"{tag} clean passes ...")
    kv_above = run.layer if kv_reuse_ok(model, run.layer) else None
    need = data.kv_bytes(model, run.layer) if kv_above is not None else 0
    if need > data.kv_budget:
        _log(progress, f"{tag} the clean keys and values would take {need / 2**30:.1f} GiB (> kv_cache_gib "
                       f"{data.kv_budget / 2**30:g}): every changed row is rerun whole")
    data.prepare(model, sorted({run.layer, probe_layer(run)[0]}), kv_above=kv_above)
    clean = {m: getattr(data, _SETS[m]).clean_result() for m in METRICS + OOD_METRICS if data.has(_SETS[m])}
    _log(progress, f"{tag} clean: " + " ".join(f"{m} {v.value:.3f}" for m, v in clean.items())
         + f" ({time.perf_counter() - t0:.0f} s)")
    sae = sae_quality(run, data, model, clean["retain_loss"].value)
    _log(progress, f"{tag} SAE: fvu {sae.fvu:.3f} l0 {sae.l0:.1f} dead {sae.dead_fraction:.3f} "
                   f"loss recovered {sae.loss_recovered} ({time.perf_counter() - t0:.0f} s)")
    settings = calibrate_probe(cfg.grid.settings(run.method), run, data, cfg)
    all_metrics = tuple(clean)
    metrics = all_metrics if cfg.sweep_losses else tuple(m for m in all_metrics if m.endswith("_mcq"))
    sweep: list[Measured] = []
    ivs: list[Intervention] = []
    selection: dict[str, Detection] = {}
    for i, setting in enumerate(settings, 1):
        iv = Intervention(run, setting)
        if setting.set_key not in selection:
            selection[setting.set_key] = selection_quality(data, iv)
        m = measure(data, model, iv, clean, metrics, formats=cfg.retain_ratio)
        if not cfg.sweep_losses:
            retain_losses(m, data, model, iv, clean, cfg.retain_ratio)
        sweep.append(m)
        ivs.append(iv)
        _log(progress, f"{tag} {i}/{len(settings)} {_describe(m.entry)}")
    t_fl = time.perf_counter()
    sweep_fluency(list(zip(sweep, ivs)), data, lm, cfg)
    if cfg.max_fluency_nll_rise is not None:
        _log(progress, f"{tag} fluency of the retain-safe settings ({time.perf_counter() - t_fl:.1f} s)")
    swept = {m.entry.label: m for m in sweep}

    # the choices: in and out of distribution, and per gate
    ratio, nll = cfg.retain_ratio, cfg.max_fluency_nll_rise
    best, best_reason = _pick(sweep, ratio, cfg.max_retain_ce_rise, max_nll=nll)
    if any(m.entry.ood is not None for m in sweep):
        best_ood, best_ood_reason = _pick(sweep, ratio, cfg.max_ood_retain_ce_rise, ood=True, max_nll=nll)
    else:
        best_ood, best_ood_reason = None, "no out-of-distribution sets configured"
    by_gate = {gate: _pick([m for m in sweep if m.entry.gate_mode == gate], ratio, cfg.max_retain_ce_rise, max_nll=nll)
               for gate in cfg.grid.gates}
    picked = [(best, ""), (best_ood, "ood_"), *((b, "") for b, _ in by_gate.values())]
    choices = [(m.entry.label, key) for m, key in picked if m is not None]

    full: dict[str, Measured] = {}  # label -> the chosen setting measured in full, once however often chosen
    for label, _ in choices:
        if label in full:
            continue
        m = swept[label]
        if cfg.sweep_losses:  # every metric measured already
            full[label] = m
            continue
        iv = Intervention(run, Setting.from_dict(m.entry.setting))
        if cfg.reuse:  # the CE losses the sweep left out; the rest as the sweep measured it
            full[label] = measure(data, model, iv, clean, all_metrics, formats=None, done=m.results)
            _carry_formats(m, full[label])
        else:  # every set again, prompt formats included
            full[label] = measure(data, model, iv, clean, all_metrics)
    shared = chosen_entries(full, choices, best and best.entry.label, best_ood and best_ood.entry.label, cfg)
    detection: dict[tuple, Detection] = {}
    fluent: dict[str, dict[str, Fluency]] = {}  # label -> the chosen setting's fluency, every prose set
    if data.fluency and full:  # the chosen settings decode together
        labels = list(full)
        got = data.fluency_many(model, lm.tokenizer, [Intervention(run, Setting.from_dict(full[k].entry.setting))
                                                      for k in labels], examples=3,
                                dones=[swept[k].fluency if cfg.reuse else {} for k in labels])
        fluent = dict(zip(labels, got))

    def chosen(m: Measured | None, key: str) -> Entry | None:
        """The choice `m` as reported: intervals on its in-distribution halves (key ""), the gate,
        the selection's topic detection and its fluency on every prose set, with examples."""
        if m is None:
            return None
        label, iv = m.entry.label, Intervention(run, Setting.from_dict(m.entry.setting))
        e = shared[label]
        if not key:
            e = _with_intervals(e, full[label].correct, "", cfg, ("dev", "test"), formats=False)
            e = e.updated(unlearning_score=e.test.unlearning_score)
        e = e.updated(gate=gate_quality(full[label], iv, key, data, detection), selection=selection[iv.setting.set_key])
        return e.updated(fluency=fluent[label]) if label in fluent else e

    result = EvalResult.build(
        format=RESULT_FORMAT, run=str(run.path), layer=run.layer, method=run.method, model=lm.info.name,
        best=chosen(best, ""), best_reason=best_reason, best_ood=chosen(best_ood, "ood_"),
        best_ood_reason=best_ood_reason,
        best_by_gate={g: Choice.build(best=chosen(b, ""), reason=reason) for g, (b, reason) in by_gate.items()},
        clean={m: v.value for m, v in clean.items()}, sweep=[m.entry for m in sweep], selection=selection, sae=sae,
        data={name: s.size for name, s in data.by_name.items()}, config=cfg.to_dict())
    _log(progress, f"{tag} chosen settings measured in full (CE losses, test halves, fluency; "
                   f"{time.perf_counter() - t0:.0f} s)")
    return result.updated(seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1))
