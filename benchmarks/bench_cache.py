"""Benchmark `ff cache` against bare baselines on the same batches, in one run.

    python benchmarks/bench_cache.py                      # embedded Gemma 3 270M, layers 3,8,13
    python benchmarks/bench_cache.py --contexts 512 --layers 3,8,13

Prints tokens/s of:
- ff cache: truncated forward + bf16 conversion + background Zarr writes (the real `build_cache`);
- bare: the same truncated forward, nothing written (target: ff / bare >= 0.95);
- naive: a full forward with output_hidden_states=True, then np.save of the requested layers
  (target: ff / naive >= 4).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache.build import CacheConfig, build_cache, default_layers
from cache.capture import forward_layers
from cache.corpora import pack, resolve_corpus
from cache.models import load_model
from cache.store import chunk_contexts_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--layers", default=None, help="comma-separated; default: scaled paper layers")
    ap.add_argument("--contexts", type=int, default=256, help="retain contexts (unlearn: the same)")
    ap.add_argument("--ctx-len", type=int, default=128)
    args = ap.parse_args()

    lm = load_model(args.model)
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else default_layers(lm.info.n_layers)
    cc = chunk_contexts_for(args.ctx_len, lm.info.d_model, "bfloat16")
    batches = []
    for role in ("retain", "unlearn"):
        toks = pack(resolve_corpus("demo", role), lm.tokenizer, n_contexts=args.contexts, ctx_len=args.ctx_len).tokens
        batches += [torch.from_numpy(toks[i:i + cc].astype(np.int64)) for i in range(0, len(toks), cc)]
    n_tokens = sum(b.numel() for b in batches)
    print(f"model {args.model}, layers {layers}, {n_tokens:,} tokens in {len(batches)} batches of {cc} contexts, "
          f"torch threads {torch.get_num_threads()}")

    with torch.inference_mode():  # warm-up
        forward_layers(lm.model, batches[0], torch.ones_like(batches[0]), layers)

    tmp = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    try:
        t = time.perf_counter()
        for b in batches:
            forward_layers(lm.model, b, torch.ones_like(b), layers)
        bare = n_tokens / (time.perf_counter() - t)

        cfg = CacheConfig(model=args.model, layers=layers, contexts=args.contexts, ctx_len=args.ctx_len)
        res = build_cache(cfg, tmp / "store.zarr", progress=False, lm=lm)
        ff = res.tokens_done / res.forward_seconds

        t = time.perf_counter()
        with torch.inference_mode():
            for i, b in enumerate(batches):
                hs = lm.model(input_ids=b, attention_mask=torch.ones_like(b), output_hidden_states=True).hidden_states
                for l in layers:
                    np.save(tmp / f"naive_{i}_{l}.npy", hs[l + 1].float().numpy())
        naive = n_tokens / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"bare truncated forward : {bare:10,.0f} tok/s")
    print(f"ff cache               : {ff:10,.0f} tok/s")
    print(f"naive full forward+save: {naive:10,.0f} tok/s")
    print(f"ff / bare  = {ff / bare:.3f}   (target >= 0.95)")
    print(f"ff / naive = {ff / naive:.2f}    (target >= 4)")


if __name__ == "__main__":
    main()
