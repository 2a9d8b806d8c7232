"""`ff bake` with a research variant of its training data or of the blocks it updates, each
measured against the default bake and not adopted (docs/results.md); kept here to measure them
again.

- `--splice S`: a share S of each step's contexts changes corpus midway (a retain context
  continues into unlearn text and the other way round), each token's target by its own corpus, so
  that the update is taught to follow the topic at hand rather than what came before it
  ("baking with contexts that change topic midway").
- `--own-samples N [--sample-prefix TEXT]`: N contexts sampled from the clean model itself
  (temperature 1, from BOS and TEXT), kept where the setting's gate stays shut, stand for half of
  each step's retain rows: retain text as broad as what the model knows, where the store's retain
  corpus is narrow ("retain text sampled from the model itself").
- `--first-block K`: the low-rank update covers blocks K..L only; the blocks below keep their
  weights ("which blocks the bake updates").

    python scripts/bake_variants.py --run ff-demo/runs/layer_4/featureforget --out ff-baked-s50 --splice 0.5
    python scripts/bake_variants.py --run ff-demo/runs/layer_4/featureforget --out ff-baked-own \\
        --own-samples 64 --set multiplier=300
    python scripts/bake_variants.py --run ff-demo/runs/layer_4/featureforget --out ff-baked-fb3 \\
        --first-block 3 --set multiplier=300
    ff eval --model ff-baked-s50 --preset demo --json

Every other bake field as `ff bake --set FIELD=VALUE` takes it (`--set multiplier=300`). The same
command after an interruption resumes, as `ff bake` does (the samples are kept in OUT.bake/).
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
    ap.add_argument("--splice", type=float, default=0.0, help="share of each step's contexts spliced (0 to 1)")
    ap.add_argument("--own-samples", type=int, default=0,
                    help="contexts to sample from the model as retain text (half of each step's retain rows)")
    ap.add_argument("--sample-prefix", default="", help="text the samples start with, after BOS")
    ap.add_argument("--first-block", type=int, default=0, help="the lowest block the update covers")
    ap.add_argument("--store", default=None, help="store to train on (default: the run's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a bake field, FIELD=VALUE")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    from pipelines.bake import bake

    try:
        cfg = apply_sets(BakeConfig(), parse_sets(BakeConfig, args.sets))
        lm = load_model(RunFolder(args.run).run_config().model, device="cpu")
        res = bake(args.run, args.out, lm, cfg, store=args.store, overwrite=args.overwrite, splice=args.splice,
                   own_samples=args.own_samples, sample_prefix=args.sample_prefix, first_block=args.first_block)
    except FFError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {res.out_dir} ({res.steps} steps, {res.seconds:.0f} s); held-out error to the edit: "
          f"retain {res.loss['retain_before']:.3f} -> {res.loss['retain_after']:.3f}, "
          f"unlearn {res.loss['unlearn_before']:.3f} -> {res.loss['unlearn_after']:.3f}")


if __name__ == "__main__":
    main()
