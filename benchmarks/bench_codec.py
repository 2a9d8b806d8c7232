"""Lossless codecs for cached activations: bytes per value and decode speed, on a real store.

    python benchmarks/bench_codec.py --store ff-demo/store.zarr --layer 4 --chunks 12

Reads `--chunks` chunks of one layer array (spread over both corpora), takes their stored bytes
(the bf16 bit patterns, or float16/float32 values), and for every candidate Blosc configuration
(compressor, level, byte- or bit-shuffle, block size) compresses them and times the decode with
one Blosc thread, the way the training reader's prefetch thread decodes. Prints one row per
codec: bytes per value, the ratio to the codec ff writes, and decode and encode MB/s of raw
values (encode: one pass, the cost `ff cache`'s writer thread pays). The
codec the store writes (cache/store.py `_codecs`) is marked; the check that training still reads
the store at >= 0.9 of RAM speed is `benchmarks/bench_train.py` on a store written with it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = [
    # (cname, clevel, shuffle, blocksize); shuffle 1 = byte, 2 = bit; blocksize 0 = Blosc's choice
    ("zstd", 1, 1, 0),
    ("zstd", 1, 1, 1 << 18),
    ("zstd", 1, 1, 1 << 20),
    ("zstd", 1, 1, 1 << 21),
    ("zstd", 1, 1, 1 << 22),
    ("zstd", 2, 1, 1 << 20),
    ("zstd", 3, 1, 0),
    ("zstd", 3, 1, 1 << 18),
    ("zstd", 3, 1, 1 << 20),
    ("zstd", 5, 1, 1 << 20),
    ("zstd", 9, 1, 1 << 20),
    ("zstd", 1, 2, 0),
    ("zstd", 3, 2, 1 << 20),
    ("lz4", 5, 1, 0),
    ("lz4hc", 5, 1, 1 << 20),
    ("zlib", 5, 1, 1 << 20),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="an ff cache store (folder)")
    ap.add_argument("--layer", type=int, required=True, help="the layer whose array to read")
    ap.add_argument("--chunks", type=int, default=12, help="chunks to read, spread over both corpora")
    ap.add_argument("--repeat", type=int, default=3, help="decode timings per codec (best kept)")
    args = ap.parse_args()

    import numcodecs.blosc
    from numcodecs import Blosc

    from cache.store import _codecs, open_root

    numcodecs.blosc.set_nthreads(1)
    root = open_root(args.store)
    blocks = []
    for corpus in ("retain", "unlearn"):
        arr = root[corpus][f"layer_{args.layer}"]
        n_chunks = -(-arr.shape[0] // arr.chunks[0])
        want = max(1, args.chunks // 2)
        for i in np.linspace(0, n_chunks - 1, min(want, n_chunks)).astype(int):
            c0 = int(i) * arr.chunks[0]
            blocks.append(np.ascontiguousarray(arr[c0: c0 + arr.chunks[0]]))
    values = sum(b.size for b in blocks)
    raw = sum(b.nbytes for b in blocks)
    own = _codecs(root.attrs["dtype"])[0]
    own_key = (str(own.cname.value), own.clevel, 1 if own.shuffle.value == "shuffle" else 2, own.blocksize)
    print(f"{len(blocks)} chunks of layer {args.layer}, {values:,} values ({raw / 2**20:.1f} MiB raw, "
          f"dtype {root.attrs['dtype']}); one Blosc thread")
    print(f"{'codec':<34} {'bytes/value':>11} {'vs ff':>9} {'decode MB/s':>12} {'encode MB/s':>12}")
    rows = []
    for cname, clevel, shuffle, blocksize in CANDIDATES:
        codec = Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize)
        t = time.perf_counter()
        enc = [codec.encode(b) for b in blocks]
        enc_s = time.perf_counter() - t
        size = sum(len(e) for e in enc)
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            for e in enc:
                codec.decode(e)
            best = min(best, time.perf_counter() - t)
        rows.append(((cname, clevel, shuffle, blocksize), size / values, raw / best / 1e6, raw / enc_s / 1e6))
    base = next((r[1] for r in rows if r[0] == own_key), None)
    for key, bpv, speed, enc_speed in rows:
        cname, clevel, shuffle, blocksize = key
        name = f"{cname} l{clevel} {'byte' if shuffle == 1 else 'bit'}shuffle " + \
               (f"block {blocksize >> 10} KiB" if blocksize else "block auto")
        mark = "  <- ff's codec (cache/store.py)" if key == own_key else ""
        rel = f"{bpv / base:.3f}" if base else "n/a"
        print(f"{name:<34} {bpv:>11.3f} {rel:>9} {speed:>12.0f} {enc_speed:>12.0f}{mark}")


if __name__ == "__main__":
    main()
