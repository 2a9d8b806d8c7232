"""What keeping freed memory in the heap (cache/runtime.py, set by `ff` when it starts) saves on
the evaluation's heaviest step: the LM head over chunks of scored positions, then the log of the
sum of exponentials over the vocabulary (pipelines/fastlm.py `head_logprobs`).

    python benchmarks/bench_malloc.py --rounds 3

Each round runs the same work in two fresh processes, one with glibc's default malloc and one
after `keep_freed_memory()`, in alternating order: `--chunks` chunks of 256 positions through a
head of the embedded model's shape (262,144 x 640, float32, random weights, seeded). Printed per
process: seconds, minor page faults, system CPU seconds and a hash of the log-sum-exps; then the
median ratio kept / default (lower is faster) and whether every hash is the same.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORK = """
import hashlib, json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from cache.runtime import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
g = torch.Generator().manual_seed(0)
W = torch.randn({vocab}, {d}, generator=g) * 0.02
h = torch.randn({chunks}, 256, {d}, generator=g)
torch.logsumexp(torch.nn.functional.linear(h[0], W), -1)  # warm up
r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
out = [torch.logsumexp(torch.nn.functional.linear(x, W), -1) for x in h]
dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
digest = hashlib.sha256(torch.cat(out).numpy().tobytes()).hexdigest()[:16]
print(json.dumps({{"kept": kept, "seconds": dt, "faults": r1.ru_minflt - r0.ru_minflt,
                  "sys": r1.ru_stime - r0.ru_stime, "hash": digest}}))
"""


def run(keep: bool, args) -> dict:
    code = WORK.format(root=str(ROOT), keep=keep, vocab=args.vocab, d=args.d_model, chunks=args.chunks)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of processes, alternating which goes first")
    ap.add_argument("--chunks", type=int, default=20, help="chunks of 256 positions per process")
    ap.add_argument("--vocab", type=int, default=262144, help="LM head rows (Gemma 3: 262,144)")
    ap.add_argument("--d-model", type=int, default=640, help="LM head columns (Gemma 3 270M: 640)")
    args = ap.parse_args()
    ratios, hashes = [], set()
    for r in range(args.rounds):
        got = {}
        for keep in ((False, True) if r % 2 == 0 else (True, False)):
            got[keep] = run(keep, args)
            x = got[keep]
            print(f"round {r + 1} {'kept   ' if keep else 'default'}: {x['seconds']:.2f} s, "
                  f"{x['faults']:,} minor faults, {x['sys']:.2f} s system (malloc setting applied: {x['kept']})",
                  flush=True)
            hashes.add(x["hash"])
        ratios.append(got[True]["seconds"] / got[False]["seconds"])
    print(f"median kept / default: {statistics.median(ratios):.2f} over {args.rounds} rounds; "
          f"results {'bit-identical' if len(hashes) == 1 else 'DIFFER'}")


if __name__ == "__main__":
    main()
