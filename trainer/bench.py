"""Trainer benchmarks: ratios measured in one run (STYLE habit 11), not timed tests.

    python -m trainer.bench                              # step cost, d_model 640, expansion 4
    python -m trainer.bench --store stores/demo.zarr --layer 6 --expansion 8

Prints:
- step: FeatureForget phase-2 step / baseline step, same tokens per step (target <= 1.3);
- data (with --store): a training step fed by the store's TokenStream / the same step fed
  from a tensor already in memory (target ~1.0: the prefetch thread hides the reads).
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.config import TrainConfig
from trainer.featureforget import FeatureForget
from trainer.sae import SAE
from trainer.steps import make_optimizer, train_step


def time_steps(fn, n: int, repeats: int = 3) -> float:
    """Best mean seconds per call over `repeats` rounds of n calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def bench_step(d_model: int, expansion: int, half_batch: int, n: int) -> None:
    cfg = TrainConfig(expansion=expansion, n_clusters=min(32, expansion * d_model))
    base_cfg = cfg.replace(method="baseline")
    sae = SAE(d_model, expansion * d_model, generator=torch.Generator().manual_seed(0))
    ff = FeatureForget(sae.d_sae, cfg)
    for name in ("alpha_r", "alpha_u", "freq_r", "freq_u"):
        getattr(ff, name).uniform_()
    ff.refresh()
    opt = make_optimizer(cfg, sae, ff)
    x_r, x_u = torch.randn(half_batch, d_model), torch.randn(half_batch, d_model)
    t_base = time_steps(lambda: train_step(sae, None, opt, base_cfg, x_r, x_u, phase2=False), n)
    t_ff = time_steps(lambda: train_step(sae, ff, opt, cfg, x_r, x_u, phase2=True), n)
    print(f"step  d_model {d_model} d_sae {sae.d_sae} tokens/step {2 * half_batch} "
          f"({int(ff.candidate.sum())} candidates)")
    print(f"      baseline {t_base * 1e3:.1f} ms  featureforget {t_ff * 1e3:.1f} ms  "
          f"ratio {t_ff / t_base:.3f} (target <= 1.3)")


def bench_data(store: str, layer: int, expansion: int, n: int) -> None:
    from trainer.data import TokenStream, open_training_data

    cfg = TrainConfig.preset("demo").replace(expansion=expansion, method="baseline")
    data = open_training_data(store, layer, cfg.eval_frac)
    B = cfg.tokens_per_half_batch(data.ctx_len)
    sae = SAE(data.d_model, expansion * data.d_model)
    opt = make_optimizer(cfg, sae, None)
    streams = [TokenStream(c.train, batch_size=B, buffer_chunks=cfg.buffer_chunks, seed=0,
                           stream_id=i) for i, c in enumerate((data.retain, data.unlearn))]
    mem_r, mem_u = next(streams[0]).clone(), next(streams[1]).clone()
    t_mem = time_steps(lambda: train_step(sae, None, opt, cfg, mem_r, mem_u, phase2=False), n)
    t_store = time_steps(lambda: train_step(sae, None, opt, cfg, next(streams[0]), next(streams[1]),
                                            phase2=False), n)
    for s in streams:
        s.close()
    print(f"data  {B} tokens per stream batch, buffer {cfg.buffer_chunks} chunks")
    print(f"      from memory {t_mem * 1e3:.1f} ms  from store {t_store * 1e3:.1f} ms  "
          f"ratio {t_store / t_mem:.3f} (target ~1.0)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=640)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--half-batch", type=int, default=4 * 127, help="tokens per stream batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--store", default=None)
    p.add_argument("--layer", type=int, default=None)
    a = p.parse_args()
    bench_step(a.d_model, a.expansion, a.half_batch, a.steps)
    if a.store is not None:
        bench_data(a.store, a.layer, a.expansion, a.steps)


if __name__ == "__main__":
    main()
