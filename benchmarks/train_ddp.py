"""Distributed training benchmark: `ff train` in one process against N gloo processes
(torchrun) on the same store, global batch and seed; ratios measured in one run (STYLE 11).

    python benchmarks/train_ddp.py --store ff-demo/store.zarr --layer 4
    python benchmarks/train_ddp.py --store ff-demo/store.zarr --layer 4 --method baseline --steps 100

Both commands get the machine's cores the same way: the single process runs `--threads`
torch / OpenMP threads (default: every core), each of the N ranks threads / N. Each command is
the CLI's `ff train` (cli.main) behind a shim that notes when every training step ends, so the
training loop (data, steps, reclustering, logging, checkpoints) is timed apart from start-up
and the final passes. The two commands alternate for `--rounds` rounds, so that a change in the
machine's load hits both; each keeps its best round. Prints, for each: loop tokens/s (global
tokens per step x steps, after `--skip` warm-up steps) and end-to-end wall time; then N-process
tokens/s / 1-process tokens/s (target >= 0.8: N processes no more than 20% slower per token)
and how far the two runs' weights are apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHIM = """
import atexit, json, os, sys, time
sys.path.insert(0, {root!r})
import trainer.steps as s
ends, step = [], s.train_step
def timed(*a, **k):
    out = step(*a, **k)
    ends.append(time.perf_counter())
    return out
s.train_step = timed
if os.environ.get("RANK", "0") == "0":
    atexit.register(lambda: open(os.environ["FF_BENCH_TIMES"], "w").write(json.dumps(ends)))
from cli import main
main(prog_name="ff")
"""


def run_ff(args: list[str], *, procs: int, threads: int, work: Path, name: str) -> dict:
    """One `ff train` (through the shim) -> loop step end times, wall seconds, run folder."""
    shim, times, out = work / "shim.py", work / f"{name}.times.json", work / name
    shim.write_text(SHIM.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "FF_BENCH_TIMES": str(times)}
    launch = [sys.executable] if procs == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={procs}"]
    t = time.perf_counter()
    subprocess.run([*launch, str(shim), "train", *args, "--out", str(out), "--quiet"], env=env,
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return {"ends": json.loads(times.read_text()), "wall": time.perf_counter() - t, "out": out}


def weight_gap(a: Path, b: Path) -> float:
    """Largest |difference| of the two runs' SAE weights, relative to the largest weight."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from trainer.run import RunFolder

    x, y = load_file(str(RunFolder(a).sae)), load_file(str(RunFolder(b).sae))
    return max(float((x[k] - y[k]).abs().max() / x[k].abs().max().clamp_min(1e-30)) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="an activation store (e.g. ff-demo/store.zarr)")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--preset", default="demo")
    p.add_argument("--method", default="featureforget")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timing")
    p.add_argument("--procs", type=int, default=2, help="torchrun processes (gloo)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads of the single process; each of N ranks gets threads / N (at least 1)")
    a = p.parse_args()
    from cache.store import open_store

    meta = open_store(a.store).meta
    from trainer.config import TrainConfig

    cfg = TrainConfig.preset(a.preset)
    tokens_per_step = cfg.batch_contexts * (meta.ctx_len - 1)
    args = ["--store", a.store, "--preset", a.preset, "--set", f"method={a.method}", "--set", f"steps={a.steps}"]
    args += ["--layer", str(a.layer)] if a.layer is not None else []
    print(f"ff train --preset {a.preset} --set method={a.method} --set steps={a.steps}: "
          f"{tokens_per_step} tokens per step (global batch), d_model {meta.d_model}")
    with tempfile.TemporaryDirectory() as tmp:
        work, best = Path(tmp), {}
        for i in range(a.rounds):
            for procs in (1, a.procs):
                r = run_ff(args, procs=procs, threads=max(1, a.threads // procs), work=work,
                           name=f"p{procs}-{i}")
                ends = r["ends"][a.skip:]
                r["rate"] = tokens_per_step * (len(ends) - 1) / (ends[-1] - ends[0])
                how = "1 process " if procs == 1 else f"{procs} processes"
                print(f"  round {i + 1}: {how} ({max(1, a.threads // procs)} thread(s) each): "
                      f"loop {r['rate']:,.0f} tokens/s, end to end {r['wall']:.1f} s", flush=True)
                if procs not in best or r["rate"] > best[procs]["rate"]:
                    best[procs] = r
        print(f"  best loop tokens/s: 1 process {best[1]['rate']:,.0f}, {a.procs} processes "
              f"{best[a.procs]['rate']:,.0f}; ratio {best[a.procs]['rate'] / best[1]['rate']:.3f} "
              f"(target >= 0.8)")
        print(f"  SAE weights, largest relative difference: "
              f"{weight_gap(best[1]['out'], best[a.procs]['out']):.1e}")


if __name__ == "__main__":
    main()
