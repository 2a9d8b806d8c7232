"""How close the evaluation's clean pass comes to the machine's arithmetic: the demo's question and
text sets through the whole model once (what `ff eval` pays before any setting, shared by every run
of an `ff run`), against the floating-point rate of plain matrix products of the model's own shapes
on this machine.

    python benchmarks/bench_clean_pass.py                    # the demo preset on the embedded model

Printed: the sets' tokens (real and with padding), the scored positions, an estimate of the
floating-point work (2 x the decoder blocks' weights per token processed, causal attention, and the
LM head at each scored position), the clean pass's seconds and rate, the rate of the same model's
matrix products alone (an MLP projection over a batch of 2048 tokens, the LM head over 256
positions), and the ratio. A ratio near 1 says the pass is as fast as its arithmetic allows here:
a shorter evaluation then needs less work (fewer sets, questions or continuations), not a faster
code path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.models import decoder_layers, load_model  # noqa: E402
from cache.runtime import keep_freed_memory  # noqa: E402
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.evalsets import eval_data  # noqa: E402
from pipelines.fastlm import kv_reuse_ok, text_config, verify_fast_path  # noqa: E402


def work(data, model) -> tuple[int, int, int, float]:
    """(real tokens, tokens with padding, scored positions, estimated FLOP) of the clean pass."""
    cfg = text_config(model)
    layers = decoder_layers(model)
    blocks = sum(p.numel() for layer in layers for p in layer.parameters())
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    vocab, d = model.get_output_embeddings().weight.shape
    real = padded = positions = 0
    flop = 0.0
    for s in data.sets:
        for b in s.batches:
            B, T = b.input_ids_BT.shape
            real += int((b.seg_BT >= 0).sum())
            padded += B * T
            n_pos = len(torch.unique(b.row_N * T + b.col_N))
            positions += n_pos
            flop += 2.0 * blocks * B * T  # every weight once per token, multiply and add
            flop += 2.0 * 2.0 * B * (T * (T + 1) / 2) * heads * head_dim * len(layers)  # QK^T and AV, causal
            flop += 2.0 * vocab * d * n_pos
    return real, padded, positions, flop


def gemm_rate(model, reps: int = 5) -> float:
    """FLOP/s of the model's two main matrix products on this machine (best of `reps`)."""
    cfg = text_config(model)
    W_head = model.get_output_embeddings().weight
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, cfg.hidden_size, generator=g)
    W = torch.randn(inter, cfg.hidden_size, generator=g)
    h = torch.randn(256, cfg.hidden_size, generator=g)
    best = float("inf")
    with torch.inference_mode():
        torch.nn.functional.linear(x, W)
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(x, W)
            torch.nn.functional.linear(h, W_head)
            best = min(best, time.perf_counter() - t)
    flop = 10 * 2.0 * x.shape[0] * inter * cfg.hidden_size + 2.0 * 256 * W_head.shape[0] * W_head.shape[1]
    return flop / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="model name or path (default: the embedded one)")
    ap.add_argument("--preset", default="demo", help="the evaluation preset whose sets are scored")
    ap.add_argument("--layer", type=int, default=4, help="the edited layer whose residuals the pass keeps")
    args = ap.parse_args()

    keep_freed_memory()  # as `ff` does when it starts
    lm = load_model(args.model, device="cpu")
    model = lm.model
    data = eval_data(lm, EvalConfig.preset(args.preset))
    real, padded, positions, flop = work(data, model)
    print(f"{len(data.sets)} sets: {real:,} tokens ({padded:,} with padding), {positions:,} scored positions, "
          f"about {flop / 1e12:.1f} TFLOP", flush=True)
    rate = gemm_rate(model)
    print(f"matrix products of the model's shapes: {rate / 1e9:.0f} GFLOP/s", flush=True)
    verify_fast_path(model, args.layer)  # as ff eval does: checks the rerun path, decides the kept keys and values
    kv_above = args.layer if kv_reuse_ok(model, args.layer) else None
    t = time.perf_counter()
    data.prepare(model, [args.layer], kv_above=kv_above)
    dt = time.perf_counter() - t
    print(f"clean pass: {dt:.0f} s, {flop / dt / 1e9:.0f} GFLOP/s, {flop / dt / rate:.2f} of the matrix products' rate")


if __name__ == "__main__":
    main()
