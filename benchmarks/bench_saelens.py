"""`ff train`'s step against SAELens's, same tokens, same SAE, rounds interleaved in one run.

    ff cache --layers 4 --contexts 384 --out l4.zarr
    python benchmarks/bench_saelens.py --store l4.zarr --layer 4

Both sides train one SAE of the same size (d_model x expansion), initialised with the same
weights and set to the sparsity of a trained one (`--active`: the share of features firing, as in
bench_train.py), on the same batches of real activations from the store, held in memory (the
data path is bench_train.py's subject). SAELens: its own `SAETrainer._train_step` on a
`StandardTrainingSAE` (L1 penalty, Adam, gradient clipping, firing statistics), the step its
`fit` loop runs. ff: `trainer.steps.train_step` for the baseline SAE and for FeatureForget's
phase 2 (the dual objective with gates and cluster thresholds). Both with learning rate 0, so
that the SAEs keep the sparsity they are set to while every step does all of its work.

Prints the median over rounds of tokens/s per side and ff / SAELens (target >= 2.0).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_batches(store: str, layer: int, half_batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (retain, unlearn) batches of half_batch real activations each, as the training reader
    returns them (float32, in file order)."""
    from trainer.data import open_training_data

    data = open_training_data(store, layer, 0.0)
    out = []
    for corpus in (data.retain, data.unlearn):
        rows, k = [], 0
        while sum(len(r) for r in rows) < n * half_batch and k < len(corpus.train):
            a = torch.as_tensor(corpus.train.read(k), dtype=torch.float32)
            rows.append(a.reshape(-1, a.shape[-1]))
            k += 1
        out.append(torch.cat(rows)[: n * half_batch].reshape(n, half_batch, -1))
    return [(out[0][i], out[1][i]) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="an ff cache store")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--half-batch", type=int, default=4 * 127, help="tokens per corpus per step (ff's demo step)")
    p.add_argument("--steps", type=int, default=30, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    p.add_argument("--active", type=float, default=0.02, help="share of features firing (trained SAE: 1-2%%)")
    a = p.parse_args()

    import sae_lens
    from bench_train import sparsify_
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from trainer.config import TrainConfig
    from trainer.featureforget import FeatureForget
    from trainer.sae import SAE
    from trainer.steps import make_optimizer, set_lr, train_step

    batches = load_batches(a.store, a.layer, a.half_batch, 8)
    d_model = batches[0][0].shape[-1]
    tokens = 2 * a.half_batch
    cfg = TrainConfig(expansion=a.expansion, n_clusters=min(32, a.expansion * d_model))
    base_cfg = cfg.replace(method="baseline")
    sae = SAE(d_model, a.expansion * d_model, generator=torch.Generator().manual_seed(0))
    sparsify_(sae, torch.cat([torch.cat(b) for b in batches]), a.active)
    ff = FeatureForget(sae.d_sae, cfg)
    for name in ("alpha_r", "alpha_u", "freq_r", "freq_u"):
        getattr(ff, name).uniform_()
    ff.refresh()
    opt = make_optimizer(cfg, sae, ff)
    set_lr(opt, 0.0)

    lens_sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_model, d_sae=sae.d_sae, dtype="float32",
                                                             device="cpu", l1_coefficient=5.0))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(lens_sae, name).copy_(getattr(sae, name))
    cfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=tokens, lr=0.0, lr_end=0.0)
    trainer = SAETrainer(cfg,
                         lens_sae, data_provider=iter(()))

    def run(fn, n):
        t = time.perf_counter()
        for i in range(n):
            fn(*batches[i % len(batches)])
        return n * tokens / (time.perf_counter() - t)

    sides = {
        "ff baseline": lambda r, u: train_step(sae, None, opt, base_cfg, r, u, phase2=False),
        "ff featureforget": lambda r, u: train_step(sae, ff, opt, cfg, r, u, phase2=True),
        "saelens standard": lambda r, u: trainer._train_step(lens_sae, torch.cat([r, u])),
    }
    for fn in sides.values():  # warm-up
        run(fn, 2)
    got = {k: [] for k in sides}
    for _ in range(a.rounds):
        for k, fn in sides.items():
            got[k].append(run(fn, a.steps))
    with torch.no_grad():
        x = torch.cat(batches[0])
        l0 = float((lens_sae.encode(x) > 0).float().sum(-1).mean())
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"d_model {d_model}, d_sae {sae.d_sae}, {tokens} tokens/step, {a.rounds} rounds of {a.steps} steps; "
          f"L0 {l0:.0f} ({l0 / sae.d_sae:.1%} active)")
    lens = statistics.median(got["saelens standard"])
    for k, v in got.items():
        med = statistics.median(v)
        print(f"{k:<18} {med:>10,.0f} tokens/s (median; rounds {', '.join(f'{x:,.0f}' for x in v)})"
              + ("" if k.startswith("saelens") else f"   ff / SAELens {med / lens:.2f} (target >= 2.0)"))


if __name__ == "__main__":
    main()
