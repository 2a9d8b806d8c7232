"""How well does each of a run's probe detectors find the forget questions?

Usage (from the repository root, after `ff run --preset demo --out ff-demo`):

    .venv/bin/python scripts/detector_compare.py --run ff-demo/runs/layer_4/featureforget

For every detector the run stores (the linear ones, one per L2 penalty, and the "mlp" one;
trainer/gate/detector.py), it calibrates the probe gate as `ff eval` does (a percentile of the highest
score of every retain dev question, in and out of distribution pooled) and prints on what share
of each question set the gate then opens somewhere, on the dev and the test halves, on what
share of the held-out text rows, and the AUROC of the question peaks. `ff eval` keeps the
detector that opens on the most forget dev questions; the test columns say whether that carries.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.models import load_model  # noqa: E402
from pipelines.config import EvalConfig, Setting  # noqa: E402
from pipelines.evalsets import eval_data  # noqa: E402
from pipelines.evaluate import probe_thresholds  # noqa: E402
from pipelines.intervene import Intervention, load_run  # noqa: E402
from pipelines.scoring import auroc  # noqa: E402
from trainer.gate.detector import PROBE_L2  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="A run folder (ff train / ff run).")
    ap.add_argument("--preset", default="demo", help="The evaluation data preset (ff eval --preset).")
    ap.add_argument("--percentile", type=float, default=99.0, help="The gate's retain percentile.")
    args = ap.parse_args()
    run = load_run(args.run)
    lm = load_model(run.config.model, device="cpu")
    data = eval_data(lm, EvalConfig.preset(args.preset))
    probe = Setting(mode="clamp", multiplier=1.0, top_n=20, selection="saebench", gate="probe", gate_threshold=0.0)
    gate_layer = Intervention(run, probe).gate_layer
    data.prepare(lm.model, sorted({run.layer, gate_layer}))
    mcq = [n for n in ("forget_mcq", "retain_mcq", "ood_forget_mcq", "ood_retain_mcq") if data.has(n)]
    text = [n for n in ("forget_text", "retain_text", "ood_forget_text", "ood_retain_text") if data.has(n)]
    print(f"run {args.run}: gate open at p{args.percentile:g} of the retain dev questions' peaks (dev / test)")
    print("| detector | " + " | ".join(n.replace("_mcq", " questions") for n in mcq) + " | "
          + " | ".join(n.replace("_text", " text") for n in text) + " | AUROC questions (ID / OOD) |")
    print("|" + "---|" * (2 + len(mcq) + len(text)))
    for kind, l2 in run.gate.detectors():
        setting = probe.replace(probe_kind=kind, probe_l2=l2)
        iv = Intervention(run, setting)
        score, _ = probe_thresholds(run, data, setting, {args.percentile}, args.percentile)  # as ff eval does
        thr = score[args.percentile] - iv.detector.b  # in the peaks' units
        peaks = {n: getattr(data, n).gate_peaks(iv) for n in mcq + text}
        dev = {n: peaks[n][~getattr(data, n).test_Q] for n in mcq}

        def rate(p: torch.Tensor) -> str:
            return f"{float((p > thr).double().mean()):.2f}"

        cells = [f"{rate(dev[n])} / {rate(peaks[n][getattr(data, n).test_Q])}" for n in mcq]
        cells += [rate(peaks[n]) for n in text]
        aucs = [f"{auroc(peaks[f'{p}forget_mcq'], peaks[f'{p}retain_mcq']):.3f}"
                for p in ("", "ood_") if f"{p}forget_mcq" in peaks]
        name = kind if kind == "mlp" else f"linear, L2 {PROBE_L2 if l2 is None else l2:g}"
        print(f"| {name} (threshold {score[args.percentile]:.3g}) | " + " | ".join(cells)
              + f" | {' / '.join(aucs)} |", flush=True)


if __name__ == "__main__":
    main()
