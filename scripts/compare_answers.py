"""Model folders (baked or exported) compared question by question on the plain-format question
sets of an `ff eval` preset, against their base model: each set's accuracy on the dev and test
halves; with `--against`, the paired difference between two groups of folders (the folders of a
group are seeds of one variant: each question's answer is averaged over them, then the questions
are resampled, the seeds fixed); and the general questions the base model answers that every
folder loses.

    python scripts/compare_answers.py ff-baked-fb3 ff-baked-fb3-s1 --against ff-baked ff-baked-s1

Each folder is scored once (about a minute on the demo's 740 questions); `--out` keeps every
answer as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.errors import FFError  # noqa: E402
from cache.models import load_model  # noqa: E402
from pipelines.artifact import base_of  # noqa: E402
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.data import load_mcq, sample_split  # noqa: E402
from pipelines.evalsets import eval_data  # noqa: E402
from pipelines.scoring import paired_difference  # noqa: E402

SETS = ("forget_mcq", "retain_mcq", "ood_forget_mcq", "ood_retain_mcq")


def answers(path: str, cfg: EvalConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(per-question correctness, test-half mask) of the model at `path` on each plain-format set
    the preset has."""
    lm = load_model(path, device="cpu")
    lm = dataclasses.replace(lm, info=dataclasses.replace(lm.info, weights_hash=f"{lm.info.weights_hash}+{path}"))
    data = eval_data(lm, cfg)
    data.prepare(lm.model, [])
    return {n: (getattr(data, n).clean_result().correct_Q.bool(), getattr(data, n).test_Q.bool())
            for n in SETS if data.has(n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="model folders (seeds of one variant)")
    ap.add_argument("--against", nargs="*", default=[], help="the folders to compare with, as many, in seed order")
    ap.add_argument("--base", default=None, help="the model the folders are compared with. Default: their base")
    ap.add_argument("--preset", default="demo", help="ff eval preset whose question sets are scored. [demo]")
    ap.add_argument("--out", default=None, help="write every answer here as JSON")
    args = ap.parse_args()
    if args.against and len(args.against) != len(args.folders):
        raise SystemExit(f"error: --against takes as many folders as are compared ({len(args.folders)}), "
                         f"got {len(args.against)}")
    cfg = EvalConfig.preset(args.preset).replace(forget_text=None, retain_text=None, ood_forget_text=None,
                                                 ood_retain_text=None, formats=("plain",))
    try:
        base = args.base or base_of(args.folders[0]) or args.folders[0]
        scored = {p: answers(p, cfg) for p in [base, *args.folders, *args.against]}
    except FFError as e:
        raise SystemExit(f"error: {e}") from None
    got = {p: {n: c for n, (c, _) in a.items()} for p, a in scored.items()}
    test = {n: t for n, (_, t) in scored[base].items()}
    if args.out:
        Path(args.out).write_text(json.dumps({p: {n: c.int().tolist() for n, c in a.items()} for p, a in got.items()}))

    for n, test_Q in test.items():
        cells = []
        for name, m in (("dev", ~test_Q), ("test", test_Q)):
            accs = ", ".join(f"{float(got[p][n][m].double().mean()):.3f}" for p in [*args.folders, *args.against])
            cells.append(f"{name} {float(got[base][n][m].double().mean()):.3f} -> {accs}")
        print(f"{n}: " + "; ".join(cells))
    if args.against:
        print("\npaired difference, folders minus --against (accuracy; mean over seeds, 95% bootstrap):")
        for n, test_Q in test.items():
            b = torch.stack([got[p][n] for p in args.folders]).double().mean(0)
            a = torch.stack([got[p][n] for p in args.against]).double().mean(0)
            cells = []
            for name, m in (("dev", ~test_Q), ("test", test_Q)):
                d, (lo, hi) = paired_difference(torch.ones(int(m.sum())), a[m], b[m], n=4000)
                cells.append(f"{name} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            print(f"  {n}: " + "; ".join(cells))
    for n in ("retain_mcq", "ood_retain_mcq"):
        if n not in test:
            continue
        lost = [i for i in range(len(got[base][n]))
                if got[base][n][i] and not any(got[p][n][i] for p in [*args.folders, *args.against])]
        qs = sample_split(load_mcq(getattr(cfg, n), "retain"), cfg.max_questions, cfg.sample_seed)[0]
        print(f"\n{n}: the base model answers {int(got[base][n].sum())} of {len(got[base][n])}; "
              f"lost by every folder: {len(lost)}")
        for i in lost:
            print(f"  {qs[i].question}")


if __name__ == "__main__":
    main()
