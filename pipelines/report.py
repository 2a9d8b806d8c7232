"""The `ff run` report: report.json, report.md and four PNG figures.

Figures follow the paper: unlearning score per layer for FeatureForget vs the baseline SAE
(Fig. 1a), training loss curves (Fig. 1b); plus feature importance alpha_r vs alpha_u
coloured by cluster with the candidates marked, and the forget/retain trade-off of the sweep.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cache.atomic import atomic_write
from pipelines.result import Answers, Detection, Entry, EvalResult, Gate, Half, Halves, Pair, Part, SplitSide
from trainer.run import RunFolder

FIGURES = {
    "scores": "fig_unlearning_score.png",
    "loss": "fig_training_loss.png",
    "importance": "fig_importance.png",
    "tradeoff": "fig_tradeoff.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


GATE_NAMES = {"none": "static", "sequence": "gated", "probe": "probe-gated"}
"""How the report names each gate mode (pipelines/config.py GATES)."""


def _test(b: Entry | Part | None) -> tuple[float, list[float] | None]:
    """(test-half score, its 95% interval); (nan, None) where no setting was retain-safe."""
    if not b or b.test is None or b.test.unlearning_score is None:
        return float("nan"), None
    return float(b.test.unlearning_score), b.test.ci95


Results = dict[str, dict[int, EvalResult]]
"""Per variant ("featureforget", "baseline") and layer, the run's evaluation."""


def configurations(results: Results, layer: int) -> list[tuple[str, Entry | None, str | None]]:
    """The four compared configurations at a layer: (name, best entry or None, reason)."""
    out = []
    for variant, label in (("baseline", "baseline SAE"), ("featureforget", "FeatureForget")):
        res = results.get(variant, {}).get(layer)
        if res is None:
            continue
        for gate, how in GATE_NAMES.items():
            g = (res.best_by_gate or {}).get(gate)
            if g is not None:
                out.append((f"{label}, {how}", g.best, g.reason))
    return out


def fig_scores(results: Results, path: Path) -> None:
    plt = _plt()
    layers = sorted({l for r in results.values() for l in r})
    names = sorted({n for l in layers for n, _, _ in configurations(results, l)})
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(layers))
    for k, name in enumerate(names):
        vals, errs = [], [[], []]
        for l in layers:
            b = next((b for n, b, _ in configurations(results, l) if n == name), None)
            v, ci = _test(b)
            vals.append(0.0 if v != v else v)
            errs[0].append(0.0 if ci is None else max(0.0, v - ci[0]))
            errs[1].append(0.0 if ci is None else max(0.0, ci[1] - v))
        ax.bar(x + k * width, vals, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [f"layer {l}" for l in layers])
    ax.set_ylabel("test-half unlearning score")
    ax.set_title("Unlearning score (dev-selected, retain MCQ >= 0.99 of clean), 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    f = RunFolder(run_dir).metrics
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []


def fig_loss(runs: dict[str, dict[int, Path]], path: Path) -> None:
    plt = _plt()
    layers = sorted({l for r in runs.values() for l in r})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.4), squeeze=False)
    for ax, l in zip(axes[0], layers):
        for m, by_layer in sorted(runs.items()):
            rows = read_metrics(by_layer[l]) if l in by_layer else []
            key = "recon_r" if rows and "recon_r" in rows[-1] else "loss"
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=f"{m} ({key})")
        ax.set_title(f"layer {l}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def fig_importance(ff_runs: dict[int, Path], path: Path) -> None:
    from safetensors.numpy import load_file

    plt = _plt()
    layers = sorted(ff_runs)
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.2 * max(1, len(layers)), 3.8), squeeze=False)
    for ax, l in zip(axes[0], layers):
        f = load_file(str(RunFolder(ff_runs[l]).features))
        eps = 1e-9
        ar, au = f["alpha_r"] + eps, f["alpha_u"] + eps
        ax.scatter(ar, au, c=f["cluster"], cmap="tab20", s=3, alpha=0.6, linewidths=0)
        cand = f["candidate"].astype(bool)
        ax.scatter(ar[cand], au[cand], facecolors="none", edgecolors="red", s=16, linewidths=0.7,
                   label=f"candidates ({int(cand.sum())})")
        lo, hi = min(ar.min(), au.min()), max(ar.max(), au.max())
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.7)
        ax.set(xscale="log", yscale="log", xlabel="alpha_r (retain importance)", ylabel="alpha_u (unlearn importance)",
               title=f"layer {l}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _drop(p: Pair) -> float:
    return float(p.before - p.after)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier of (retain drop, forget drop) points: no other point has a
    smaller retain drop and a larger forget drop."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def fig_tradeoff(results: Results, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = "os^vD"
    for k, (m, by_layer) in enumerate(sorted(results.items())):
        for l, res in sorted(by_layer.items()):
            for gate, ls in (("none", ":"), ("sequence", "-"), ("probe", "--")):
                pts = [(_drop(e.retain_mcq), _drop(e.forget_mcq)) for e in res.sweep or []
                       if e.gate_mode == gate and e.forget_mcq.after is not None]
                if pts:
                    ax.scatter(*zip(*pts), marker=markers[k % len(markers)], s=8, alpha=0.4)
                    ax.plot(*zip(*frontier(pts)), ls=ls, marker=markers[k % len(markers)], ms=4, lw=1,
                            label=f"{m} L{l} {GATE_NAMES[gate]}")
    ax.axvline(0, color="k", lw=0.5)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("retain MCQ accuracy drop")
    ax.set_ylabel("forget MCQ accuracy drop")
    ax.set_title("Forget vs retain drop over the sweep; lines: frontiers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_pair(d: Pair | SplitSide | None, digits: int = 3) -> str:
    return f"{_num(d.before, digits)} -> {_num(d.after, digits)}" if d else "n/a"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _change(d: Pair | None) -> str:
    if not d or d.after is None or not d.before:
        return "n/a"
    return f"{d.before:.2f} -> {d.after:.2f} ({d.after / d.before - 1:+.1%})"


def _retain_kept(t: Half, ratio: float) -> str:
    """The test half's retain MCQ, flagged where it fell below `ratio` of clean (the bound the dev
    half chose by)."""
    r = t.retain_mcq
    low = r is not None and r.after is not None and r.before and r.after < ratio * r.before - 1e-12
    return _fmt_pair(r, 2) + (f" (below {ratio:g} of clean)" if low else "")


def markdown_table(results: Results) -> str:
    """Per layer, the four configurations: test score with interval, MCQ, CE and gate."""
    ratio = next((r.retain_bounds()[0] for m in results.values() for r in m.values()), 0.99)
    head = ("| layer | configuration | setting | test score [95% CI] | correct-subset score | forget MCQ (test) | "
            "retain MCQ (test) | forget CE | retain CE | gate open: retain / forget text | gate AUROC text / MCQ | "
            "selected features' AUROC text / MCQ |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for l in sorted({l for r in results.values() for l in r}):
        for name, b, reason in configurations(results, l):
            if b is None:
                rows.append(f"| {l} | {name} | no retain-safe setting | n/a | n/a | | | | | | | |")
                continue
            t, g = b.test, b.gate or Gate()
            rows.append(
                f"| {l} | {name} | {b.label} | {_num(t.unlearning_score)}{_ci(t.ci95)} | "
                f"{_num(t.correct_subset_score)} | {_fmt_pair(t.forget_mcq, 2)} | "
                f"{_retain_kept(t, ratio)} | {_change(b.forget_loss)} | {_change(b.retain_loss)} | "
                f"{_num(g.open_rate_retain, 2)} / {_num(g.open_rate_forget, 2)} | "
                f"{_aurocs(_det(b))} | {_aurocs(b.selection)} |")
    return head + "\n" + "\n".join(rows)


def limits_table(results: Results) -> str:
    """Where each configuration's test score comes from: the forget test questions on which its
    gate opened or stayed shut, and the ceiling (opened questions at chance, shut ones as clean)."""
    rows = ["| layer | configuration | gate opens on forget questions | opened: before -> after | "
            "shut: before -> after | ceiling under this gate | test score |", "|---|---|---|---|---|---|---|"]
    for l in sorted({l for r in results.values() for l in r}):
        for name, b, _ in configurations(results, l):
            sp = b.gate.forget_split if b and b.gate else None
            if not sp:
                continue
            o, c = sp.opened, sp.shut
            n = o.questions + c.questions
            rows.append(f"| {l} | {name} | {o.questions}/{n} | {_fmt_pair(o, 2)} | "
                        f"{_fmt_pair(c, 2) if c.questions else '-'} | {_num(sp.ceiling)} | "
                        f"{_num(b.test.unlearning_score)} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def formats_table(results: Results) -> str:
    """Per configuration and prompt format, the chosen setting's test score with its interval and
    the retain accuracy, in and out of distribution (ff eval --formats), and the minimum."""
    head = " | ".join(["format", "test score [95% CI]", "forget MCQ", "retain MCQ"])
    rows = ["| layer | configuration | where | " + head + " |", "|---|---|---|---|---|---|---|"]
    for l in sorted({l for r in results.values() for l in r}):
        for name, b, _ in configurations(results, l):
            for where, part in (("in distribution", b), ("out of distribution", b.ood if b else None)):
                if not part or not part.formats or part.test is None:
                    continue
                for fmt, p in part.by_format():
                    t = p.test
                    rows.append(f"| {l} | {name} | {where} | {fmt} | {_num(t.unlearning_score)}{_ci(t.ci95)} "
                                f"| {_fmt_pair(t.forget_mcq, 2)} | {_fmt_pair(t.retain_mcq, 2)} |")
                low = part.formats_min.test if part.formats_min else None
                rows.append(f"| {l} | {name} | {where} | **minimum** | **{_num(low)}** | | |")
    return "\n".join(rows) if len(rows) > 2 else ""


def fluency_table(results: Results) -> str:
    """Per configuration, the fluency of the chosen setting's greedy continuations of held-out
    prose prompts (pipelines/fluency.py), with one example of a forget-prose continuation."""
    rows = ["| layer | configuration | prose | clean-model NLL: edited (own) | distinct bigrams: edited (own) | "
            "changed |", "|---|---|---|---|---|---|"]
    examples = []
    for l in sorted({l for r in results.values() for l in r}):
        for name, b, _ in configurations(results, l):
            for side, f in ((b.fluency if b else None) or {}).items():
                rows.append(f"| {l} | {name} | {side.replace('_text', '')} | {f.nll:.2f} ({f.nll_clean:.2f}) | "
                            f"{f.distinct:.2f} ({f.distinct_clean:.2f}) | {f.changed:.2f} |")
                if side == "forget_text" and f.examples:
                    ex = f.examples[0]
                    examples.append(f"- {name}, layer {l}: {_quote(ex.prompt, 80)} -> clean: "
                                    f"{_quote(ex.clean, 120)}; edited: {_quote(ex.edited, 120)}")
    if len(rows) <= 2:
        return ""
    return "\n".join(rows) + ("\n\nExamples (forget prose):\n\n" + "\n".join(examples) if examples else "")


HELD_BACK = 3
"""Rows per configuration in the "held back by the retain bounds" table."""


def held_back(res: EvalResult, gate: str, n: int = HELD_BACK) -> list[tuple[float, str, str]]:
    """(dev score, label, bound broken) of the `n` settings of one evaluation's sweep with gate
    `gate` that score higher on the dev half than the chosen one (every one that edits where none
    qualified) but break a retain bound, best first: the other side of the frontier."""
    from pipelines.scoring import why_unsafe

    ratio, ce = res.retain_bounds()
    best = res.chosen(gate)
    floor = best.dev.unlearning_score if best else float("-inf")
    above = [(e.dev.unlearning_score, e.label, f"{why}{_culprits(e, why)}") for e in res.sweep or []
             if e.gate_mode == gate and e.n_features > 0
             and e.dev.unlearning_score is not None and e.dev.unlearning_score > floor
             and (why := why_unsafe(e, ratio, ce)) is not None]
    return sorted(above, key=lambda a: -a[0])[:n]


def _quote(item: str | None, width: int = 60) -> str:
    text = (item or "?").replace("|", "/").replace("\n", " ")
    return f'"{text[:width]}{"..." if len(text) > width else ""}"'


def _culprits(e: Entry, why: str, n: int = 2) -> str:
    """What broke the bound, from the entry's diagnostics (pipelines/evaluate.py): the first retain
    dev questions it lost, or the held-out retain passages its gate opened on, with the gate's
    margin above its threshold (always > 0 there; "static" without a gate; "" where the entry
    has none recorded)."""
    if why.startswith("retain MCQ"):
        head, items = "lost", [i for i in (e.retain_lost.items if e.retain_lost else []) if i.half == "dev"]
    else:
        head, items = "opened on", e.retain_text_opened or []

    def margin(m: float | None) -> str:
        return "static" if m is None else f"gate margin {m:+.2f}"

    named = [f"{_quote(i.item)} ({margin(i.gate_margin)})" for i in items[:n]]
    return f"; {head}: " + ", ".join(named) if named else ""


def held_back_table(results: Results) -> str:
    """`held_back` per configuration, as one table."""
    rows = ["| layer | configuration | setting | dev score | chosen's dev score | held back by |",
            "|---|---|---|---|---|---|"]
    for variant, label in (("baseline", "baseline SAE"), ("featureforget", "FeatureForget")):
        for l, res in sorted(results.get(variant, {}).items()):
            for gate, how in GATE_NAMES.items():
                if gate not in (res.best_by_gate or {}):
                    continue
                best = res.best_by_gate[gate].best
                chosen = _num(best.dev.unlearning_score) if best else "none qualified"
                for score, name, why in held_back(res, gate):
                    rows.append(f"| {l} | {label}, {how} | {name} | {score:.3f} | {chosen} | {why} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _det(b: Entry) -> Detection | None:
    """The topic-detection AUROCs of an entry's gate: the probe's detector for a probe-gated
    setting, the selected features' firing share for the sequence gate, none when static."""
    g = b.gate or Gate()
    if g.mode == "none":
        return None
    return g.detection if g.mode == "probe" else b.selection


def _aurocs(d: Detection | None, ood: bool = False) -> str:
    """"text / MCQ" AUROCs of a detection (in or out of distribution); "-" if none."""
    text, mcq = d.pair(ood) if d else (None, None)
    if text is None and mcq is None:
        return "-"
    return f"{_num(text, 2)} / {_num(mcq, 2)}"


def ood_table(results: Results) -> str:
    """Out of distribution: the setting chosen on the OOD dev half, scored on its test half."""
    head = ("| layer | method | setting (OOD dev-selected) | OOD test score [95% CI] | biology MCQ (test) | "
            "general MCQ (test) | biology CE | general CE | gate AUROC OOD text / MCQ | "
            "selected features' AUROC OOD text / MCQ | ID-selected setting's OOD test score |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for l in sorted({l for r in results.values() for l in r}):
        for m in sorted(results, key=lambda m: (m != "featureforget", m)):
            res = results[m].get(l)
            if res is None:
                continue
            b = res.best_ood
            transfer = res.best.ood.test if res.best and res.best.ood else None
            tr = f"{_num(transfer.unlearning_score)}{_ci(transfer.ci95)}" if transfer else "n/a"
            if b is None:
                rows.append(f"| {l} | {m} | {res.best_ood_reason or 'n/a'} | n/a | | | | | | | {tr} |")
                continue
            o = b.ood
            rows.append(
                f"| {l} | {m} | {b.label} | {_num(o.test.unlearning_score)}{_ci(o.test.ci95)} | "
                f"{_fmt_pair(o.test.forget_mcq, 2)} | {_fmt_pair(o.test.retain_mcq, 2)} | "
                f"{_change(o.forget_loss)} | {_change(o.retain_loss)} | "
                f"{_aurocs(_det(b), ood=True)} | {_aurocs(b.selection, ood=True)} | {tr} |")
    return head + "\n" + "\n".join(rows)


def ood_verdict(results: Results) -> str:
    """FeatureForget vs the baseline SAE on the out-of-distribution test half, per layer: the
    settings chosen on the OOD dev half, and the in-distribution choices; intervals and the
    paired difference on the same questions."""
    lines = []
    for l in sorted({l for r in results.values() for l in r}):
        ff, base = (results.get(m, {}).get(l) for m in ("featureforget", "baseline"))
        for how, pick in (("chosen on the OOD dev half", lambda r: r.best_ood.ood if r and r.best_ood else None),
                          ("the in-distribution choices", lambda r: r.best.ood if r and r.best else None)):
            a, b = pick(ff), pick(base)
            if not a or not b or a.test is None or b.test is None:
                continue
            lines.append(_verdict_line(l, how, a, b, "FeatureForget", "the baseline SAE", "OOD test scores"))
    return "\n".join(lines)


def verdict(results: Results) -> str:
    """FeatureForget vs the baseline SAE under the same gate, by test-half intervals."""
    lines = []
    for l in sorted({l for r in results.values() for l in r}):
        conf = {n: b for n, b, _ in configurations(results, l)}
        for how in GATE_NAMES.values():
            a, b = conf.get(f"FeatureForget, {how}"), conf.get(f"baseline SAE, {how}")
            if f"FeatureForget, {how}" not in conf or f"baseline SAE, {how}" not in conf:
                continue
            lines.append(_verdict_line(l, how, a, b, f"FeatureForget ({how})", f"the baseline SAE ({how})"))
            lines += _format_verdicts(l, how, a, b)
    return "\n".join(lines)


def _format_verdicts(layer: int, how: str, a: Entry | None, b: Entry | None) -> list[str]:
    """The verdict in each prompt format both chosen settings were scored in (ff eval --formats),
    with the paired difference on the format's test questions."""
    fa, fb = ((x.formats if x else None) or {} for x in (a, b))
    return [_verdict_line(layer, f"{how}, format {fmt}", fa[fmt], fb[fmt], "FeatureForget", "the baseline SAE")
            for fmt in fa if fmt in fb]


def _verdict_line(layer: int, how: str, a: Entry | Part | Halves | None, b: Entry | Part | Halves | None, name_a: str,
                  name_b: str, scores: str = "test scores") -> str:
    """One verdict line: the intervals' verdict (pipelines/scoring.py), both test scores and the
    paired difference where the two were scored on the same questions."""
    from pipelines.scoring import verdict as compare

    line = compare(_test(a)[1], _test(b)[1], name_a, name_b)
    return f"- layer {layer}, {how}: {line}; {scores} {_num(_test(a)[0])} vs {_num(_test(b)[0])}{_paired(a, b)}."


def _difference(before_Q: Any, after_a_Q: Any, after_b_Q: Any, note: str = "") -> str:
    """"+d [lo, hi] on the same test questions (...)": score A minus score B, paired bootstrap
    (pipelines/scoring.py paired_difference); "" where no question was known before."""
    from pipelines.scoring import paired_difference

    got = paired_difference(before_Q, after_a_Q, after_b_Q)
    if got is None:
        return ""
    diff, (lo, hi) = got
    where = "above zero" if lo > 0 else "below zero" if hi < 0 else "contains zero"
    return f"{diff:+.3f} [{lo:+.2f}, {hi:+.2f}] on the same test questions (paired bootstrap{note}; {where})"


def _paired(a: Entry | Part | Halves | None, b: Entry | Part | Halves | None) -> str:
    """"; difference ..." where both chosen settings were scored on the same test questions (`ff
    run` evaluates every run on one sample; equal clean answers are checked as well), else ""."""
    from pipelines.scoring import unbits

    fa, fb = (x.test.forget_correct if x and x.test else None for x in (a, b))
    if not fa or not fb or fa.before != fb.before:
        return ""
    diff = _difference(unbits(fa.before), unbits(fa.after), unbits(fb.after))
    return f"; difference {diff}" if diff else ""


Seeds = dict[str, dict[int, list[EvalResult]]]
"""Per variant and layer, each training seed's evaluation."""


def seeds_table(seeds: Seeds) -> str:
    """Mean and spread of the test score over training seeds, per method, layer and gate, and of
    the out-of-distribution test score of each seed's OOD choice."""
    rows = ["| layer | method | gate | seeds | test score mean | min - max |", "|---|---|---|---|---|---|"]
    for m, by_layer in sorted(seeds.items()):
        for l, res_list in sorted(by_layer.items()):
            for gate in GATE_NAMES:
                vals = [_test(r.chosen(gate))[0] for r in res_list]
                vals = [v for v in vals if v == v]
                if vals:
                    rows.append(f"| {l} | {m} | {gate} | {len(res_list)} ({len(vals)} retain-safe) | "
                                f"{np.mean(vals):.3f} | {min(vals):.3f} - {max(vals):.3f} |")
            ood = [_test(r.best_ood.ood if r.best_ood else None)[0]
                   for r in res_list]  # each seed's OOD-dev-chosen setting, any gate
            ood = [v for v in ood if v is not None and v == v]
            if ood:
                rows.append(f"| {l} | {m} | out of distribution (chosen on its dev half) | {len(res_list)} "
                            f"({len(ood)} general-safe) | {np.mean(ood):.3f} | {min(ood):.3f} - {max(ood):.3f} |")
    return "\n".join(rows)


def seeds_verdict(seeds: Seeds) -> str:
    """The verdicts per training seed (in and out of distribution), and FeatureForget minus the
    baseline SAE averaged over the seeds with a paired bootstrap interval over the (shared) test
    questions, per layer, gate and prompt format, in and out of distribution."""
    import torch

    from pipelines.scoring import unbits

    n = min((len(rs) for by in seeds.values() for rs in by.values()), default=0)
    lines = []
    for k in range(n):
        per_seed = {m: {l: rs[k] for l, rs in by.items()} for m, by in seeds.items()}
        lines += [f"- seed {k}: {line[2:]}" for line in (verdict(per_seed) + "\n" + ood_verdict(per_seed)).splitlines()
                  if line]
    for l in sorted({l for by in seeds.values() for l in by}):
        for gate, how in GATE_NAMES.items():
            for where in ("", "out of distribution"):
                fmts = dict.fromkeys(fmt for by in seeds.values() for r in by.get(l, [])[:n]
                                     for fmt, _ in _sides(r.chosen(gate), where))
                for fmt in fmts:
                    answers = [[_test_answers(r, gate, where, fmt) for r in seeds.get(m, {}).get(l, [])[:n]]
                               for m in ("featureforget", "baseline")]
                    ff, base = answers  # per method, each seed's test-half answers ({before, after})
                    if n < 2 or not all(ff + base) or len({h.before for h in ff + base}) != 1:
                        continue  # a seed without a retain-safe setting, or other questions: no average
                    mean_after = [torch.stack([unbits(h.after).double() for h in hs]).mean(0) for hs in answers]
                    name = ", ".join([how] + ([where] if where else []) + ([f"format {fmt}"] if fmt != "plain" else []))
                    if diff := _difference(unbits(ff[0].before), *mean_after, note=" over questions, the seeds fixed"):
                        lines.append(f"- layer {l}, {name}, mean over {n} seeds: FeatureForget minus the baseline "
                                     f"SAE {diff}.")
    return "\n".join(lines)


def _test_answers(r: EvalResult, gate: str, where: str, fmt: str) -> Answers | None:
    """The per-question test answers of `r`'s chosen setting under `gate` in prompt format `fmt`,
    in distribution or out of it (`_sides`); None where it was not scored there."""
    halves = dict(_sides(r.chosen(gate), where)).get(fmt)
    return halves.test.forget_correct if halves and halves.test else None


def _sides(best: Entry | None, where: str) -> list[tuple[str, Halves]]:
    """A chosen entry's halves per prompt format ("plain" first), in distribution (`where` "") or
    on its out-of-distribution side."""
    part = best if not where or best is None else best.ood
    return part.by_format() if part is not None else []


def write_report(out: Path, results: Results, runs: dict[str, dict[int, Path]],
                 header: dict[str, Any], seeds: Seeds | None = None) -> dict[str, Path]:
    """Write report.json, report.md and the figures into `out`; return the figure paths."""
    out.mkdir(parents=True, exist_ok=True)
    figs = {k: out / v for k, v in FIGURES.items()}
    fig_scores(results, figs["scores"])
    fig_loss(runs, figs["loss"])
    fig_importance(runs.get("featureforget", {}), figs["importance"])
    fig_tradeoff(results, figs["tradeoff"])
    payload = {**header, "results": {m: {str(l): r.to_dict() for l, r in by.items()} for m, by in results.items()}}
    if seeds:
        payload["seeds"] = {m: {str(l): [{g: c.to_dict() for g, c in r.best_by_gate.items()} for r in rs]
                                for l, rs in by.items()} for m, by in seeds.items()}
    atomic_write(out / "report.json", json.dumps(payload, indent=2))
    md = [f"# FeatureForget report: {header.get('model')}", "",
          f"Store `{header.get('store')}`, layers {', '.join(map(str, header.get('layers', [])))}, "
          f"training preset `{header.get('preset')}`.", "",
          "Questions are a seeded random sample split into a dev half and a test half. Per configuration, the "
          "setting is chosen on the dev half (highest unlearning score `1 - acc_after/acc_before` among settings that "
          "keep retain-question accuracy >= 0.99 of clean and held-out retain CE within the configured rise) and "
          "reported on the test half, with a 95% bootstrap interval over questions. The correct-subset score is "
          "SAEBench's protocol: the score on the test questions the clean model answers correctly.", "",
          "## In distribution", "", markdown_table(results), "", "## Verdict", "",
          verdict(results) or "n/a", ""]
    if limits := limits_table(results):
        md += ["## What limits the score", "",
               "On the forget test questions: where the gate opened and where it stayed shut. The ceiling is the "
               "score if every opened question fell to chance and the shut ones kept their clean answers: below it, "
               "the edit leaves answers the gate reached; the gap to the static ceiling is the detector's.", "",
               limits, ""]
    if held := held_back_table(results):
        md += ["## Held back by the retain bounds", "",
               f"Settings that score higher on the dev half than the chosen one but break a retain bound (the "
               f"{HELD_BACK} highest per configuration): the frontier's other side, and which bound binds.", "",
               held, ""]
    if fmts := formats_table(results):
        md += ["## Prompt formats", "",
               "Each question set scored in every prompt format of the suite (pipelines/formats.py: an instruction "
               "header, general few-shot examples, a general preamble, a dialogue, a biology passage before the "
               "question); the setting was chosen on the dev halves by its minimum over formats, retain-safe in "
               "each.", "", fmts, ""]
    if flu := fluency_table(results):
        md += ["## Fluency", "",
               "Greedy continuations (32 tokens) of the first words of held-out paragraphs with the chosen setting, "
               "scored by the clean model (mean NLL per token; its own continuations in brackets), their "
               "distinct-bigram ratio, and the share that differ from the clean model's.", "", flu, ""]
    md += ["## Out of distribution", "",
           "Textbook-style biology and general-knowledge questions and prose that the training corpora never "
           "contain; general accuracy must stay >= 0.99 of clean.", "", ood_table(results), ""]
    if ood_lines := ood_verdict(results):
        md += [ood_lines, ""]
    if seeds:
        md += ["## Training seeds", "", seeds_table(seeds), ""]
        if per_seed := seeds_verdict(seeds):
            md += [per_seed, ""]
    md += [f"![{k}]({p.name})" for k, p in figs.items()]
    atomic_write(out / "report.md", "\n".join(md) + "\n")
    return figs
