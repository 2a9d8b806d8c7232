"""Chunk-level integrity of a store: where a chunk lives, whether it is on disk, reading it
with errors that name it, the temp files an interrupted write leaves behind, and the metadata
files (zarr.json) that must parse before zarr is asked to open anything.

zarr returns the fill value for a chunk that is not on disk, so a deleted chunk would read as
zeros (activations) or -1 (tokens) without any error: readers check that it exists first. A
corrupted chunk fails its crc32c checksum on decode; the error is re-raised naming the chunk.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr
from zarr.core.sync import sync

from .errors import StoreError
from .location import is_remote, local_path, zarr_store

PARTIAL_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")
"""zarr >= 3.1.3's LocalStore writes each file to `<name>.<uuid4 hex>.partial` and then renames
it (zarr/storage/_local.py, `_atomic_write`), so a kill mid-write leaves such a file behind."""


class ChunkRef(NamedTuple):
    """One chunk of one array: chunks hold whole contexts (and all positions and d_model)."""

    corpus: str
    array: str
    index: int
    start: int
    """First context of the chunk."""
    stop: int
    """One past its last context."""

    def __str__(self) -> str:
        where = f"{self.corpus}/{self.array} chunk {self.index}"
        return f"{where} (contexts {self.start}-{self.stop - 1})"


def chunk_ref(corpus: str, arr: zarr.Array, i: int) -> ChunkRef:
    cc, n = arr.chunks[0], arr.shape[0]
    return ChunkRef(corpus, arr.basename, i, i * cc, min((i + 1) * cc, n))


def chunk_key(arr: zarr.Array, i: int) -> str:
    """Store key of chunk `i` along the context axis."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"


def chunk_exists(arr: zarr.Array, i: int) -> bool:
    return bool(sync(arr.store.exists(chunk_key(arr, i))))


def first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def read_rows(arr: zarr.Array, corpus: str, start: int, stop: int, *, store: str | Path,
              must_exist: bool = True) -> np.ndarray:
    """Contexts [start, stop) of `arr`, within one chunk. A missing chunk (when `must_exist`) or
    one that fails to decode is a StoreError naming it and pointing to `ff verify`."""
    ref = chunk_ref(corpus, arr, start // arr.chunks[0])
    if must_exist and not chunk_exists(arr, ref.index):
        raise StoreError(f"{ref} of store '{store}' is missing (zarr would read it as fill "
                         f"values); run `ff verify {store}`")
    try:
        return np.asarray(arr[start:stop])
    except Exception as e:  # checksum mismatch, Blosc error, unreadable file
        raise StoreError(f"{ref} of store '{store}' is corrupt ({first_line(e)}); "
                         f"run `ff verify {store}`") from e


def read_range(arr: zarr.Array, corpus: str, start: int, stop: int, *, store: str | Path,
               must_exist: bool = True) -> np.ndarray:
    """Contexts [start, stop) of `arr`, chunk by chunk, so that an error names its chunk."""
    cc = arr.chunks[0]
    parts = [read_rows(arr, corpus, max(start, i * cc), min(stop, (i + 1) * cc), store=store,
                       must_exist=must_exist)
             for i in range(start // cc, -(-stop // cc))]
    if not parts:
        return np.asarray(arr[start:stop])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def partial_files(path: str | Path) -> list[Path]:
    """Temp files of writes that never finished (killed mid-write), under the store `path`.
    None on a remote store: an object store's put is atomic and leaves no temp object."""
    if is_remote(path):
        return []
    found = local_path(path).rglob("*.partial")
    return sorted(p for p in found if PARTIAL_FILE.search(p.name) and p.is_file())


def remove_partial_files(path: str | Path) -> int:
    """Delete leftover temp files (only call with the writer lock held) -> how many."""
    files = partial_files(path)
    for p in files:
        p.unlink(missing_ok=True)
    return len(files)


def bad_metadata_files(path: str | Path) -> list[tuple[str, str]]:
    """(file relative to the store, why) for each zarr.json of the store's root, groups and
    arrays that does not parse as a JSON object. zarr reads these lazily and fails with a bare
    JSONDecodeError far from the cause; reading them first lets the error name the file.
    Remote stores are read through the zarr store API."""
    if is_remote(path):
        return bad_metadata_keys(zarr_store(path, read_only=True))
    root = local_path(path)
    found = []
    for f in [root / "zarr.json", *sorted(root.glob("*/zarr.json")),
              *sorted(root.glob("*/*/zarr.json"))]:
        try:
            if not isinstance(json.loads(f.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            found.append((str(f.relative_to(root)), first_line(e)))
    return found


def bad_metadata_keys(store) -> list[tuple[str, str]]:
    """`bad_metadata_files` through the zarr store API (remote stores, or any zarr Store
    object): the zarr.json of the root, of each child and of each grandchild."""
    from zarr.core.buffer import default_buffer_prototype

    async def scan() -> list[tuple[str, str]]:
        keys = ["zarr.json"]
        for child in sorted([k async for k in store.list_dir("")]):
            if child != "zarr.json":
                keys.append(f"{child}/zarr.json")
                keys += sorted([f"{child}/{k}/zarr.json" async for k in store.list_dir(child)
                                if k != "zarr.json"])
        found = []
        for key in keys:
            buf = await store.get(key, prototype=default_buffer_prototype())
            if buf is None:
                continue
            try:
                if not isinstance(json.loads(buf.to_bytes().decode("utf-8")), dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                found.append((key, first_line(e)))
        return found

    return sync(scan())
