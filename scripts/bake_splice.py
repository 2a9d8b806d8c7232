"""`ff bake` with spliced contexts: a share of each step's contexts changes corpus midway (a retain
context continues into unlearn text and the other way round), each token's target by its own
corpus, so that the update is taught to follow the topic at hand rather than what came before it.
Measured against the default bake and not adopted (docs/results.md, "baking with contexts that
change topic midway"); kept here to measure it again.

    python scripts/bake_splice.py --run ff-demo/runs/layer_4/featureforget --out ff-baked-s50 --splice 0.5
    ff eval --model ff-baked-s50 --preset demo --json

Every other bake field as `ff bake --set FIELD=VALUE` takes it (`--set multiplier=300`). The same
command after an interruption resumes, as `ff bake` does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.errors import FFError  # noqa: E402
from cache.models import load_model  # noqa: E402
from cache.options import apply_sets, parse_sets  # noqa: E402
from pipelines.config import BakeConfig  # noqa: E402
from trainer.run import RunFolder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="an evaluated run folder (its unlearning.json names the setting)")
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--splice", type=float, default=0.5, help="share of each step's contexts spliced (0 to 1)")
    ap.add_argument("--store", default=None, help="store to train on (default: the run's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a bake field, FIELD=VALUE")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    from pipelines.bake import bake

    try:
        cfg = apply_sets(BakeConfig(), parse_sets(BakeConfig, args.sets))
        lm = load_model(RunFolder(args.run).run_config().model, device="cpu")
        res = bake(args.run, args.out, lm, cfg, store=args.store, overwrite=args.overwrite, splice=args.splice)
    except FFError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {res.out_dir} ({res.steps} steps, {res.seconds:.0f} s); held-out error to the edit: "
          f"retain {res.loss['retain_before']:.3f} -> {res.loss['retain_after']:.3f}, "
          f"unlearn {res.loss['unlearn_before']:.3f} -> {res.loss['unlearn_after']:.3f}")


if __name__ == "__main__":
    main()
