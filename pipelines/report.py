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


def _score(res: dict[str, Any]) -> float:
    best = res.get("best")
    return float(best["unlearning_score"]) if best else 0.0


def fig_scores(results: dict[str, dict[int, dict]], path: Path) -> None:
    plt = _plt()
    methods = sorted(results, key=lambda m: (m != "featureforget", m))
    layers = sorted({l for r in results.values() for l in r})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(layers))
    for k, m in enumerate(methods):
        ax.bar(x + k * width, [_score(results[m].get(l, {})) for l in layers], width, label=m)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, [f"layer {l}" for l in layers])
    ax.set_ylabel("unlearning score (1 - acc_after/acc_before)")
    ax.set_title("Unlearning score, retain MCQ kept >= 0.99 of clean")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "metrics.jsonl"
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig_importance(ff_runs: dict[int, Path], path: Path) -> None:
    from safetensors.numpy import load_file

    plt = _plt()
    layers = sorted(ff_runs)
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.2 * max(1, len(layers)), 3.8), squeeze=False)
    for ax, l in zip(axes[0], layers):
        f = load_file(str(ff_runs[l] / "features.safetensors"))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _drop(entry: dict[str, Any], key: str) -> float:
    return float(entry[key]["before"] - entry[key]["after"])


def fig_tradeoff(results: dict[str, dict[int, dict]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    markers = "os^vD"
    for k, (m, by_layer) in enumerate(sorted(results.items())):
        for l, res in sorted(by_layer.items()):
            pts = sorted((_drop(e, "retain_mcq"), _drop(e, "forget_mcq")) for e in res.get("sweep", []))
            if pts:
                ax.plot(*zip(*pts), marker=markers[k % len(markers)], ms=4, lw=0.8, label=f"{m} L{l}")
    ax.axvline(0, color="k", lw=0.5)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("retain MCQ accuracy drop")
    ax.set_ylabel("forget MCQ accuracy drop")
    ax.set_title("Trade-off over the sweep (up-left is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_pair(d: dict[str, float | None] | None, digits: int = 3) -> str:
    return f"{_num(d.get('before'), digits)} -> {_num(d.get('after'), digits)}" if d else "n/a"


def markdown_table(results: dict[str, dict[int, dict]]) -> str:
    head = ("| layer | method | best setting | unlearning score | forget MCQ | retain MCQ | forget loss | "
            "retain loss | FVU | L0 | loss recovered |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for l in sorted({l for r in results.values() for l in r}):
        for m in sorted(results, key=lambda m: (m != "featureforget", m)):
            res = results[m].get(l)
            if res is None:
                continue
            b, sae = res.get("best"), res.get("sae", {})
            setting = ", ".join(f"{k}={v}" for k, v in (b or {}).get("setting", {}).items()) or "none kept retain"
            rows.append(
                f"| {l} | {m} | {setting} | {_score(res):.3f} | {_fmt_pair((b or {}).get('forget_mcq'))} | "
                f"{_fmt_pair((b or {}).get('retain_mcq'))} | {_fmt_pair((b or {}).get('forget_loss'))} | "
                f"{_fmt_pair((b or {}).get('retain_loss'))} | {_num(sae.get('fvu'))} | "
                f"{_num(sae.get('l0'), 1)} | {_num(sae.get('loss_recovered'))} |")
    return head + "\n" + "\n".join(rows)


def verdict(results: dict[str, dict[int, dict]]) -> str:
    ff, base = results.get("featureforget", {}), results.get("baseline", {})
    lines = []
    for l in sorted(set(ff) & set(base)):
        a, b = _score(ff[l]), _score(base[l])
        word = "beats" if a > b else ("ties" if a == b else "does NOT beat")
        lines.append(f"- layer {l}: FeatureForget {a:.3f} {word} the baseline SAE {b:.3f}.")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, dict[int, dict]], runs: dict[str, dict[int, Path]],
                 header: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and the figures into `out`; return the figure paths."""
    out.mkdir(parents=True, exist_ok=True)
    figs = {k: out / v for k, v in FIGURES.items()}
    fig_scores(results, figs["scores"])
    fig_loss(runs, figs["loss"])
    fig_importance(runs.get("featureforget", {}), figs["importance"])
    fig_tradeoff(results, figs["tradeoff"])
    payload = {**header, "results": {m: {str(l): r for l, r in by.items()} for m, by in results.items()}}
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    md = [f"# FeatureForget report: {header.get('model')}", "",
          f"Store `{header.get('store')}`, layers {', '.join(map(str, header.get('layers', [])))}, "
          f"training preset `{header.get('preset')}`.", "",
          "Best setting per run = the highest unlearning score `1 - acc_after/acc_before` on the forget questions "
          "among the sweep settings that keep retain-question accuracy >= 0.99 of clean (METHOD section 8).", "",
          markdown_table(results), "", "## Verdict", "", verdict(results) or "n/a", ""]
    md += [f"![{k}]({p.name})" for k, p in figs.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return figs
