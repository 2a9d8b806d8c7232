"""Activation-mass shares of a FeatureForget run's candidate set against the SAEBench set of
the same size from a baseline run (held-out tokens of both corpora, from each run's
features.safetensors), as in docs/method.md "Candidate rule".

    python scripts/mass_shares.py RUNS/layer_8/featureforget RUNS/layer_8/baseline
"""
from __future__ import annotations

import argparse

from safetensors.torch import load_file

from trainer.evaluate import mass_share, saebench_select
from trainer.run import RunFolder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("featureforget_run")
    p.add_argument("baseline_run")
    a = p.parse_args()
    ff = load_file(str(RunFolder(a.featureforget_run).features))
    base_run = RunFolder(a.baseline_run)
    base = load_file(str(base_run.features))
    threshold = base_run.run_config().train.saebench_retain_freq
    cand = ff["candidate"]
    n = int(cand.sum())
    sel = saebench_select(base["freq_r"], base["freq_u"], n, threshold)
    for name, feats, mask in (("FeatureForget candidates", ff, cand), ("SAEBench set, baseline", base, sel)):
        print(f"{name:<26} n {int(mask.sum()):5d}  unlearn share {100 * mass_share(feats['eval_mass_u'], mask):6.2f}%  "
              f"retain share {100 * mass_share(feats['eval_mass_r'], mask):6.2f}%")


if __name__ == "__main__":
    main()
