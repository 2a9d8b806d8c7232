"""Process-wide settings that make the tensor work of every stage cheaper.

`keep_freed_memory`: glibc's malloc hands every block above 32 MiB straight back to the kernel
when it is freed, and the next one of the same size is mapped and zeroed again, page by page.
The LM head's chunk of logits (256 positions x 262,144 vocabulary entries, 268 MB) is such a
block, made and freed hundreds of times per evaluation: about 65,000 page faults each time.
Keeping freed blocks in the heap, the same computation takes about 0.84 of the time on the
2-core machine, with bit-identical results (benchmarks/bench_malloc.py). `ff` calls it when it
starts; set FF_KEEP_FREED_MEMORY=0 to leave malloc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
"""Blocks of 1 GiB and more are still mapped and unmapped one by one."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free memory at the top of the heap is returned to the kernel above 2 GiB (the largest value mallopt takes)."""


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks below 1 GiB for reuse instead of unmapping them
    (mallopt). Returns whether the setting took effect: False on a C library without mallopt
    (macOS, musl) or when FF_KEEP_FREED_MEMORY=0; nothing else changes then."""
    if os.environ.get("FF_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
