"""Trainer benchmarks: ratios measured in one run (STYLE habit 11), not timed tests.

    python benchmarks/bench_train.py                                  # step cost only
    python benchmarks/bench_train.py --store ff-demo/store.zarr --layer 8

Prints:
- step: FeatureForget phase-2 step time / baseline step time, same tokens (target <= 1.3);
- data (with --store): training steps/s fed by the store's TokenStream / steps/s fed one fixed
  batch already in memory, no data pipeline at all (target >= 0.9: the prefetch thread hides
  the reads); and / steps/s fed by the same stream over the same tokens held in RAM;
- memory (with --store): peak resident memory while streaming through the whole store with a
  small shuffle buffer, against the size of the store's float32 activations (bounded).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import torch

from cache.store import open_store
from trainer.config import TrainConfig
from trainer.featureforget import FeatureForget
from trainer.sae import SAE
from trainer.steps import make_optimizer, set_lr, train_step


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


def time_pair(fa, fb, n: int, repeats: int = 3) -> tuple[float, float]:
    """time_steps for two functions, rounds interleaved so that machine drift hits both."""
    fa(), fb()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        best_a = min(best_a, time_steps(fa, n, repeats=1))
        best_b = min(best_b, time_steps(fb, n, repeats=1))
    return best_a, best_b


def sparsify_(sae: SAE, x_BD: torch.Tensor, active: float) -> None:
    """Set b_enc so that about `active` of the features fire on x, as in a trained SAE."""
    with torch.no_grad():
        pre = ((x_BD - sae.b_dec) @ sae.W_enc).flatten()
        sae.b_enc.fill_(-float(pre.kthvalue(int(len(pre) * (1 - active))).values))


def bench_step(d_model: int, expansion: int, half_batch: int, n: int, active: float) -> None:
    cfg = TrainConfig(expansion=expansion, n_clusters=min(32, expansion * d_model))
    base_cfg = cfg.replace(method="baseline")
    sae = SAE(d_model, expansion * d_model, generator=torch.Generator().manual_seed(0))
    ff = FeatureForget(sae.d_sae, cfg)
    for name in ("alpha_r", "alpha_u", "freq_r", "freq_u"):
        getattr(ff, name).uniform_()
    ff.refresh()
    opt = make_optimizer(cfg, sae, ff)
    set_lr(opt, 0.0)  # every step still does all its work, but the SAE keeps its sparsity
    x_r, x_u = torch.randn(half_batch, d_model), torch.randn(half_batch, d_model)
    sparsify_(sae, torch.cat([x_r, x_u]), active)
    t_base, t_ff = time_pair(lambda: train_step(sae, None, opt, base_cfg, x_r, x_u, phase2=False),
                             lambda: train_step(sae, ff, opt, cfg, x_r, x_u, phase2=True), n)
    print(f"step  d_model {d_model} d_sae {sae.d_sae} tokens/step {2 * half_batch} "
          f"({int(ff.candidate.sum())} candidates, {active:.0%} of features active)")
    print(f"      baseline {t_base * 1e3:.1f} ms  featureforget {t_ff * 1e3:.1f} ms  "
          f"ratio {t_ff / t_base:.3f} (target <= 1.3)")


def bench_data(store: str, layer: int, expansion: int, n: int, active: float) -> None:
    from trainer.data import ArraySource, TokenStream, open_training_data

    cfg = TrainConfig.preset("demo").replace(expansion=expansion, method="baseline")
    data = open_training_data(store, layer, cfg.eval_frac)
    B = cfg.tokens_per_half_batch(data.ctx_len)
    sae = SAE(data.d_model, expansion * data.d_model)
    opt = make_optimizer(cfg, sae, None)
    set_lr(opt, 0.0)  # every step still does all its work, but the SAE keeps its sparsity

    def streams(sources):
        return [TokenStream(src, batch_size=B, buffer_chunks=cfg.buffer_chunks, seed=0, stream_id=i)
                for i, src in enumerate(sources)]

    zarr_s = streams([data.retain.train, data.unlearn.train])
    # The same tokens held in memory, through the same shuffling stream (reads cost nothing).
    ram_s = streams([ArraySource(np.concatenate([c.train.read(k) for k in range(len(c.train))]),
                                 len(c.train.read(0))) for c in (data.retain, data.unlearn)])
    mem_r, mem_u = next(ram_s[0]).clone(), next(ram_s[1]).clone()
    sparsify_(sae, torch.cat([mem_r, mem_u]), active)

    def step(ss):
        return lambda: train_step(sae, None, opt, cfg, next(ss[0]), next(ss[1]), phase2=False)

    t_fixed, t_store = time_pair(lambda: train_step(sae, None, opt, cfg, mem_r, mem_u, phase2=False),
                                 step(zarr_s), n)
    t_ram, t_store2 = time_pair(step(ram_s), step(zarr_s), n)
    for s in zarr_s + ram_s:
        s.close()
    print(f"data  {B} tokens per stream batch, buffer {cfg.buffer_chunks} chunks, {n}-step rounds")
    print(f"      one fixed batch in memory {1 / t_fixed:.2f} steps/s  from store {1 / t_store:.2f} steps/s  "
          f"ratio {t_fixed / t_store:.3f} (target >= 0.9)")
    print(f"      same tokens streamed from memory {1 / t_ram:.2f} steps/s  from store {1 / t_store2:.2f} "
          f"steps/s  ratio {t_ram / t_store2:.3f} (target >= 0.9)")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(store: str, layer: int, expansion: int, buffer_chunks: int = 2) -> None:
    """Stream every retain and unlearn token of `layer` once through training steps."""
    from trainer.data import TokenStream, open_training_data

    cfg = TrainConfig.preset("demo").replace(expansion=expansion, method="baseline", buffer_chunks=buffer_chunks)
    data = open_training_data(store, layer, cfg.eval_frac)
    B = cfg.tokens_per_half_batch(data.ctx_len)
    sae = SAE(data.d_model, expansion * data.d_model)
    opt = make_optimizer(cfg, sae, None)
    streams = [TokenStream(c.train, batch_size=B, buffer_chunks=buffer_chunks, seed=0, stream_id=i)
               for i, c in enumerate((data.retain, data.unlearn))]
    st = open_store(store)
    store_bytes = sum(c.n_contexts * c.ctx_len * c.d_model * 4 for c in (st.corpus(n) for n in st.corpora))
    steps = max(1, store_bytes // (4 * data.d_model * 2 * B))  # about one pass over the store
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(steps):
        train_step(sae, None, opt, cfg, next(streams[0]), next(streams[1]), phase2=False)
    stop.set()
    t.join()
    for s in streams:
        s.close()
    print(f"memory {steps} steps over layer {layer} of the store, buffer {buffer_chunks} chunks per stream")
    print(f"      store activations (float32) {store_bytes / 2**20:.0f} MiB; peak RSS growth while training "
          f"{(peak[0] - base) / 2**20:.0f} MiB (ratio {(peak[0] - base) / store_bytes:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=640)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--half-batch", type=int, default=4 * 127, help="tokens per stream batch")
    p.add_argument("--steps", type=int, default=100, help="steps per timing round (3 rounds)")
    p.add_argument("--active", type=float, default=0.02,
                   help="fraction of features firing, as in a trained SAE (demo runs: 1-2%%)")
    p.add_argument("--store", default=None)
    p.add_argument("--layer", type=int, default=None)
    a = p.parse_args()
    bench_step(a.d_model, a.expansion, a.half_batch, a.steps, a.active)
    if a.store is not None:
        bench_data(a.store, a.layer, a.expansion, a.steps, a.active)
        bench_memory(a.store, a.layer, a.expansion)


if __name__ == "__main__":
    main()
