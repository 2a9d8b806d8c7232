"""Benchmark `ff cache` in one process against N concurrent shards of one store, in one run.

    python benchmarks/cache_shards.py                              # embedded Gemma 3 270M, 2 shards
    python benchmarks/cache_shards.py --contexts 128 --shards 2 --layers 3,8,13

Runs the real CLI as subprocesses, as a user would: first one `ff cache`, then N
`ff cache --shard i/N` started together into a second store. Prints tokens/s of each
(every token of both corpora / wall-clock seconds from the first start to the last exit, model
loading included), their ratio, and whether the two stores are equal file for file.
On one machine the shards share its cores: each gets cores/N torch threads (--threads-per-shard),
as torchrun's OMP_NUM_THREADS=1 does for one process per core; the single process keeps torch's
default (every core). Across GPUs or machines each shard brings its own device.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_together(commands: list[list[str]], env: dict[str, str]) -> tuple[float, list[str]]:
    """Start every command at once -> (wall-clock seconds until the last exits, their outputs)."""
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "cli", *c], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in commands]
    outs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - t
    for p, out in zip(procs, outs):
        if p.returncode:
            sys.exit(f"ff cache failed:\n{out}")
    return seconds, outs


def same_files(a: Path, b: Path) -> bool:
    def files(p: Path) -> dict[str, bytes]:
        return {str(f.relative_to(p)): f.read_bytes() for f in p.rglob("*")
                if f.is_file() and not f.relative_to(p).parts[0].startswith(".ff-")}

    return files(a) == files(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--layers", default="auto", help="comma-separated; default: scaled paper layers")
    ap.add_argument("--contexts", type=int, default=128, help="retain contexts (unlearn: the same)")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads-per-shard", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ff-bench-shards-"))
    base = ["cache", "--model", args.model, "--layers", args.layers, "--contexts", str(args.contexts),
            "--set", f"ctx_len={args.ctx_len}", "--quiet"]
    n_tokens = 2 * args.contexts * args.ctx_len
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    one_s, _ = run_together([[*base, "--out", str(tmp / "one.zarr")]], env)
    shard_env = {**env, "OMP_NUM_THREADS": str(args.threads_per_shard)}
    many_s, many_out = run_together([[*base, "--out", str(tmp / "many.zarr"), "--shard", f"{i}/{args.shards}"]
                                     for i in range(args.shards)], shard_env)
    written = sum(int(m.replace(",", "")) for m in re.findall(r"wrote ([\d,]+) tokens", "".join(many_out)))
    equal = same_files(tmp / "one.zarr", tmp / "many.zarr")

    print(f"model {args.model}, {n_tokens:,} tokens (2 x {args.contexts} contexts x {args.ctx_len}), "
          f"{os.cpu_count()} cores")
    print(f"1 process ({os.cpu_count()} torch threads)   : {n_tokens / one_s:8,.0f} tok/s  ({one_s:.1f} s wall)")
    print(f"{args.shards} shards ({args.threads_per_shard} thread(s) each)  : {n_tokens / many_s:8,.0f} tok/s  "
          f"({many_s:.1f} s wall; shards wrote {written:,} tokens)")
    print(f"shards / 1 process = {one_s / many_s:.2f}")
    print(f"stores equal file for file: {'yes' if equal else 'NO'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
