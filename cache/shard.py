"""Sharded caching: `ff cache --shard I/N` computes and writes only its share of a store.

The chunks of both corpora form one global list, retain's then unlearn's, and chunk `k` belongs
to shard `k % N`: a deterministic, disjoint, chunk-aligned split that spreads both corpora over
every shard. Each shard computes its chunks exactly as one process would (one forward per chunk,
the same batches), so the store the N shards fill is equal in every array to a single-process
one. Any shard may create the store's metadata (`cache.store.ensure_store`: identical documents
from every shard, written only where missing). The store is marked complete by whichever shard
finds every chunk present after writing its own, or by `ff cache --finalize`.

Under torchrun, RANK and WORLD_SIZE give the shard and LOCAL_RANK the GPU; torch.distributed is
not initialised: the shards never talk to each other, only to the store. Each shard records
itself as `STORE/.ff-shards/I-of-N` (on a local store that file is its lock, cache/lock.py), so
that --finalize can name the shard that owns a missing chunk. docs/scaling.md, "Sharded caching".
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import zarr
from zarr.core.sync import sync

from .chunks import chunk_key, partial_files
from .errors import FFError, StoreError
from .location import StoreLocation, is_remote, local_path, normalize, public, store_like, zarr_store
from .lock import SHARD_DIR
from .store import CORPORA, Store, has_root, open_store

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_CHUNK_FILE = re.compile(r"^([^/]+)/[^/]+/c/(\d+)/")  # retain/layer_8/c/3/0/0.<uuid>.partial


class ShardError(FFError):
    """A malformed --shard, or a torchrun environment that does not give one."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`: the chunks k with k % count == index."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """Its file under STORE/.ff-shards/: '3-of-8'."""
        return f"{self.index}-of-{self.count}"

    def owns(self, k: int) -> bool:
        return k % self.count == self.index

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = _SPEC.match(text)
        if not m or not 0 <= int(m[1]) < int(m[2]):
            raise ShardError(f"--shard takes I/N with 0 <= I < N (shard I of N, 0-based), such as "
                             f"0/8; got '{text}'")
        return cls(int(m[1]), int(m[2]))


def shard_from_env(environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard torchrun gives this process (RANK of WORLD_SIZE); None outside torchrun or with
    one process."""
    rank, world = environ.get("RANK"), environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    if not (rank.isdigit() and world.isdigit()) or not 0 <= int(rank) < int(world):
        raise ShardError(f"RANK={rank!r} and WORLD_SIZE={world!r} (set by torchrun) do not give a "
                         "shard: expected integers with 0 <= RANK < WORLD_SIZE")
    return Shard(int(rank), int(world)) if int(world) > 1 else None


def shard_device(device: str, environ: Mapping[str, str] = os.environ) -> str:
    """Under torchrun each process takes its own GPU: `auto` or `cuda` becomes cuda:LOCAL_RANK
    (`auto` on a machine without CUDA, and any explicit device, stay as they are)."""
    local = environ.get("LOCAL_RANK")
    if local is None or device not in {"auto", "cuda"}:
        return device
    import torch

    if not torch.cuda.is_available():
        return device  # auto -> cpu; cuda -> pick_device's own error
    n = torch.cuda.device_count()
    if not local.isdigit() or int(local) >= n:
        raise ShardError(f"LOCAL_RANK={local!r} but this machine has {n} CUDA device(s); start at "
                         f"most {n} processes per node (torchrun --nproc-per-node {n})")
    return f"cuda:{int(local)}"


class GlobalChunk(NamedTuple):
    """Chunk `index` of `corpus`, number `k` of the store's global chunk list."""

    k: int
    corpus: str
    index: int
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.corpus} chunk {self.index} (contexts {self.start}-{self.stop - 1})"


def global_chunks(store: Store) -> list[GlobalChunk]:
    """Every chunk of the store: retain's in order, then unlearn's."""
    found: list[GlobalChunk] = []
    for name in CORPORA:
        reader = store.corpus(name)
        for i in range(reader.n_chunks):
            found.append(GlobalChunk(len(found), name, i, *reader.chunk_bounds(i)))
    return found


def missing_chunks(out: StoreLocation) -> tuple[list[GlobalChunk], int]:
    """(the chunks of which some array's chunk is not in the store, how many chunks in all),
    from the existence of every chunk key of every array, through the zarr store API."""
    store = open_store(out)
    chunks = global_chunks(store)
    keys = [[chunk_key(store.root[c.corpus][a], c.index) for a in store.root[c.corpus].array_keys()]
            for c in chunks]
    zs = zarr_store(out, read_only=True)

    async def present() -> list[bool]:
        flat = [k for row in keys for k in row]
        found = []
        for i in range(0, len(flat), 256):  # bounded concurrency (an HTTP HEAD each on S3)
            found += await asyncio.gather(*(zs.exists(k) for k in flat[i:i + 256]))
        return found

    there = iter(sync(present()))
    missing = [c for c, row in zip(chunks, keys) if not all([next(there) for _ in row])]
    return missing, len(chunks)


def record_shard(out: StoreLocation, shard: Shard) -> None:
    """Leave `STORE/.ff-shards/I-of-N` on a remote store (a local shard's lock file is there
    already): --finalize learns N from it."""
    if not is_remote(out):
        return
    from zarr.core.buffer import default_buffer_prototype

    doc = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "shard": str(shard)})
    zs = zarr_store(out, read_only=False)
    sync(zs.set(f"{SHARD_DIR}/{shard.name}", default_buffer_prototype().buffer.from_bytes(doc.encode())))


def recorded_counts(out: StoreLocation) -> list[int]:
    """The shard counts N of the shards that have written to the store, from STORE/.ff-shards."""
    if is_remote(out):
        zs = zarr_store(out, read_only=True)

        async def names() -> list[str]:
            return [k async for k in zs.list_dir(SHARD_DIR)]

        found = sync(names())
    else:
        folder = local_path(out) / SHARD_DIR
        found = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted({int(m[1]) for n in found if (m := re.match(r"^\d+-of-(\d+)$", n))})


def remove_own_partial_files(out: StoreLocation, shard: Shard, chunks: list[GlobalChunk]) -> int:
    """Delete the temp files a killed write left in this shard's chunks, and no others: the
    other shards may be writing theirs right now (cache/chunks.py, PARTIAL_FILE)."""
    mine = {(c.corpus, c.index) for c in chunks if shard.owns(c.k)}
    root, n = local_path(out), 0
    for p in partial_files(out):
        m = _CHUNK_FILE.match(p.relative_to(root).as_posix())
        if m and (m[1], int(m[2])) in mine:
            p.unlink(missing_ok=True)
            n += 1
    return n


def mark_complete(out: StoreLocation) -> None:
    """Set the root attribute `complete` (rewrites the root zarr.json atomically; marking an
    already complete store again writes the same bytes)."""
    zarr.open_group(store_like(out, read_only=False), mode="r+").attrs["complete"] = True


def complete_if_done(out: StoreLocation) -> int:
    """Mark the store complete if every chunk is present -> how many chunks are still missing."""
    missing, _ = missing_chunks(out)
    if not missing:
        mark_complete(out)
    return len(missing)


class Finalized(NamedTuple):
    path: str
    already: bool
    """The store was marked complete before."""
    chunks: int
    """Chunks checked."""


def finalize(out: StoreLocation) -> Finalized:
    """`ff cache --finalize`: mark the store complete if every chunk of every array is present;
    otherwise a StoreError naming how many are missing, the first one and the shard to rerun."""
    out = normalize(out)
    if not has_root(out):
        raise StoreError(f"'{public(out)}' is not an activation store (no zarr.json); start the "
                         "`ff cache --shard I/N` processes first")
    if open_store(out).meta.complete:
        return Finalized(public(out), True, 0)
    missing, total = missing_chunks(out)
    if missing:
        raise StoreError(_missing_message(out, missing, total))
    mark_complete(out)
    return Finalized(public(out), False, total)


def _missing_message(out: StoreLocation, missing: list[GlobalChunk], total: int) -> str:
    first = missing[0]
    counts = recorded_counts(out)
    if counts:
        owners = sorted({(c.k % n, n) for n in counts for c in missing}, key=lambda s: (s[1], s[0]))
        shown = ", ".join(f"{i}/{n}" for i, n in owners[:8]) + (", ..." if len(owners) > 8 else "")
        todo = (f"rerun `ff cache --shard {first.k % counts[-1]}/{counts[-1]}` with the same "
                f"arguments (shards owning missing chunks: {shown})")
    else:
        todo = "rerun the `ff cache` command that builds it, with the same arguments"
    return (f"store '{public(out)}' is not complete: {len(missing)} of {total} chunks are missing, "
            f"the first {first} (chunk {first.k} of the store's {total}); {todo}, then "
            "--finalize again")
