"""`ff cache --repair`: recompute exactly the chunks that `ff verify` finds bad, and nothing else.

Each bad chunk (missing, corrupt, misplaced, non-finite, tokens out of range) is cleared in every array of
its corpus, tokens first, which makes it "not yet written" (cache/store.py), and the store is
marked incomplete. The ordinary resume of `ff cache` then recomputes exactly those chunks, one
forward pass per chunk as in the first run, so the repaired store equals an uninterrupted one.
A repair killed half way leaves an incomplete store that rerunning `ff cache` finishes.
Damaged metadata (arrays, shapes, zarr.json) cannot be recomputed chunk by chunk: such a
store is refused, pointing to --overwrite.
"""
from __future__ import annotations

from pathlib import Path

import zarr
from zarr.core.sync import sync

from .chunks import ChunkRef, chunk_key
from .errors import StoreError
from .location import store_like
from .verify import verify_store

REPAIRABLE = ("missing", "corrupt", "misplaced", "non-finite", "token-range")
"""Kinds of chunk problems (cache/verify.py) that recomputing the chunk fixes."""


def plan_repair(out: Path, state: str) -> list[ChunkRef]:
    """The bad chunks of the store `out`, one per (corpus, chunk index), found by reading every
    chunk; `state` is build.py's 'resume', 'complete' or 'new'. Damage a repair cannot fix is a
    StoreError."""
    if state == "new":
        raise StoreError(f"nothing to repair: '{out}' is not a store yet; run the same command "
                         "without --repair to build it")
    found: dict[tuple[str, int], ChunkRef] = {}
    for p in verify_store(out).problems:
        if p.kind == "incomplete":  # chunks never written: the resume writes them as well
            continue
        if p.kind not in REPAIRABLE or not p.chunk:
            raise StoreError(f"cannot repair store '{out}': {p.where}: {p.kind}: {p.detail}; "
                             "rebuild it with --overwrite")
        ref = ChunkRef(**p.chunk)
        found.setdefault((ref.corpus, ref.index), ref)
    return [found[k] for k in sorted(found)]


def clear_chunks(out: Path, chunks: list[ChunkRef]) -> list[str]:
    """Mark the store incomplete, then delete each chunk in every array of its corpus, tokens
    first so that it reads as not yet written at once. Only with the writer lock held.
    -> the cleared chunks, described ("retain chunk 3 (contexts 12-15)")."""
    root = zarr.open_group(store_like(out, read_only=False), mode="r+")
    root.attrs["complete"] = False
    for ref in chunks:
        group = root[ref.corpus]
        for name in ["tokens", *sorted(k for k in group.array_keys() if k != "tokens")]:
            arr = group[name]
            sync(arr.store.delete(chunk_key(arr, ref.index)))
    return [f"{r.corpus} chunk {r.index} (contexts {r.start}-{r.stop - 1})" for r in chunks]
