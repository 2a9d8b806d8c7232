"""`ff copy SRC DST`: copy a store between any two locations (folders, s3://, gs://, memory://).

The copy moves the raw encoded bytes of every chunk (no decompression and recompression, so it
is fast and the copy is byte-exact), and decodes each chunk on the way with its array's codecs,
crc32c included, so a corrupt source chunk stops the copy naming it. Order, so that a copy killed
at any point is an incomplete store a rerun finishes:

1. the root zarr.json with `complete: false`, then the group and array zarr.json files;
2. chunk by chunk, every layer chunk first and the tokens chunk last (the store's completion
   rule, cache/store.py); a chunk already at DST with equal bytes is skipped (resume);
3. last, the source's root zarr.json as it is (`complete: true`).

A local DST is written as `ff cache` writes one: under the writer lock, each file atomically.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, NamedTuple

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from .chunks import bad_metadata_keys, chunk_key, chunk_ref, first_line, remove_partial_files
from .errors import StoreError
from .location import StoreLocation, normalize, public, zarr_store
from .lock import WriterLock, check_writable, clear_contents, is_vacant
from .store import StoreMeta

_PROTO = default_buffer_prototype()


class CopyResult(NamedTuple):
    src: str
    dst: str
    chunks: int
    """Chunks in the store (every array)."""
    copied: int
    """Chunks written to DST."""
    skipped: int
    """Chunks already at DST with equal bytes."""
    bytes_copied: int
    seconds: float


class _Array(NamedTuple):
    array: zarr.Array
    """The source array (its metadata names the chunk keys)."""
    corpus: str
    decoder: zarr.Array
    """The same array over an in-memory store: each chunk's bytes are put there and decoded."""
    decoder_keys: dict
    """That in-memory store's mapping (key -> Buffer)."""


def copy_store(src: StoreLocation, dst: StoreLocation, *, src_options: dict[str, Any] | None = None,
               dst_options: dict[str, Any] | None = None, overwrite: bool = False,
               progress: bool = True) -> CopyResult:
    """Copy the complete store `src` to `dst`; rerunning after an interruption resumes.
    `*_options`: fsspec storage options (default: those of cache.location.use_storage_options)."""
    t0 = time.perf_counter()
    src, dst = normalize(src), normalize(dst)
    if str(src) == str(dst):
        raise StoreError(f"source and destination are the same store '{public(src)}'")
    s = zarr_store(src, read_only=True, options=src_options)
    root_doc, attrs = _read_source(s, src)
    check_writable(dst)
    with WriterLock(dst, command="ff copy", options=dst_options):  # a flock locally, a lease on s3://
        d = zarr_store(dst, read_only=False, options=dst_options)
        _prepare_destination(d, dst, attrs, overwrite)
        remove_partial_files(dst)
        writes = _Writes(d, root_doc)  # 1. marks DST incomplete before its first change
        meta_keys, arrays = _layout(s)
        writes.put_changed(meta_keys, _all([s.get(k, prototype=_PROTO) for k in meta_keys]))
        done = _copy_chunks(s, writes, src, arrays, progress)  # 2.
        writes.put_changed(["zarr.json"], [_PROTO.buffer.from_bytes(root_doc)])  # 3. last
    return CopyResult(public(src), public(dst), *done, time.perf_counter() - t0)


def _read_source(s, src: StoreLocation) -> tuple[bytes, dict[str, Any]]:
    """The source's root zarr.json bytes and attributes; refuses anything but a complete store."""
    if not sync(s.exists("zarr.json")):
        raise StoreError(f"'{public(src)}' is not an activation store (no zarr.json)")
    bad = bad_metadata_keys(s)
    if bad:
        raise StoreError(f"cannot copy store '{public(src)}': {bad[0][0]} does not parse; "
                         f"run `ff verify {public(src)}`")
    root_doc = _get(s, "zarr.json", src)
    attrs = json.loads(root_doc).get("attributes", {})
    if not StoreMeta.from_attrs(attrs).complete:
        raise StoreError(f"store '{public(src)}' is incomplete; finish it with its `ff cache` "
                         "command before copying it")
    return root_doc, attrs


def _prepare_destination(d, dst: StoreLocation, attrs: dict[str, Any], overwrite: bool) -> None:
    """An empty DST, or a copy of the same store to resume; anything else is refused."""
    doc = sync(d.get("zarr.json", prototype=_PROTO))
    if doc is None:
        if is_vacant(dst, d):
            return
        if not overwrite:
            raise StoreError(f"'{public(dst)}' exists and is not an activation store; "
                             "choose another destination (or --overwrite)")
    elif not overwrite:
        try:
            theirs = dict(json.loads(doc.to_bytes()).get("attributes", {}))
        except ValueError:
            theirs = {}
        if {**theirs, "complete": None} != {**attrs, "complete": None}:
            raise StoreError(f"'{public(dst)}' holds another store; use --overwrite to replace it, "
                             "or another destination")
        return
    clear_contents(dst, d)


class _Writes:
    """Writes to DST of what differs from it; before the first one, DST's root is marked
    incomplete (so a copy onto an equal store changes nothing, not even for a moment)."""

    def __init__(self, d, root_doc: bytes):
        self.d = d
        doc = json.loads(root_doc)
        doc["attributes"]["complete"] = False
        self.incomplete = json.dumps(doc, indent=2).encode()
        self.marked = False

    def put_changed(self, keys: list[str], data: list) -> list[tuple[str, Any]]:
        """Write each key whose DST bytes differ from `data` (Buffers) -> those written."""
        there = _all([self.d.get(k, prototype=_PROTO) for k in keys])
        todo = [(k, buf) for k, buf, old in zip(keys, data, there)
                if old is None or old.to_bytes() != buf.to_bytes()]
        if todo and not self.marked and keys != ["zarr.json"]:
            _put(self.d, "zarr.json", self.incomplete)
            self.marked = True
        _all([self.d.set(k, buf) for k, buf in todo])
        return todo


def _layout(s) -> tuple[list[str], list[_Array]]:
    """The zarr.json keys of the groups and arrays under the root, and every array of every
    group (tokens last within a group), each chunked along contexts only."""
    import warnings

    with warnings.catch_warnings():  # a local store's lock file is no zarr node
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        root = zarr.open_group(s, mode="r")
        groups = {name: root[name] for name in sorted(root.group_keys())}
    meta_keys, out = [], []
    for name, group in groups.items():
        keys = sorted(group.array_keys(), key=lambda k: (k == "tokens", k))
        meta_keys += [f"{name}/zarr.json", *(f"{name}/{k}/zarr.json" for k in keys)]
        for key in keys:
            arr = group[key]
            if any(n != 1 for n in arr.cdata_shape[1:]):
                raise StoreError(f"{arr.path} is chunked along more than contexts: not an ff store")
            mem = {"zarr.json": sync(s.get(f"{arr.path}/zarr.json", prototype=_PROTO))}
            out.append(_Array(arr, name, zarr.open_array(MemoryStore(mem), mode="r"), mem))
    return meta_keys, out


def _copy_chunks(s, writes: _Writes, src: StoreLocation, arrays: list[_Array],
                 progress: bool) -> tuple[int, int, int, int]:
    """Chunk rows in order: for chunk index i of each group, its layer chunks (fetched and
    written concurrently), then its tokens chunk. -> (chunks, copied, skipped, bytes copied)."""
    from tqdm.auto import tqdm

    rows: dict[tuple[str, int], list[_Array]] = {}
    for a in arrays:
        for i in range(a.array.cdata_shape[0]):
            rows.setdefault((a.corpus, i), []).append(a)
    total = sum(len(v) for v in rows.values())
    copied = skipped = n_bytes = 0
    bar = tqdm(total=total, unit="chunk", desc="ff copy", disable=not progress)
    try:
        for (_, i), members in rows.items():
            layers = [a for a in members if a.array.basename != "tokens"]
            tokens = [a for a in members if a.array.basename == "tokens"]
            for part in (layers, tokens):  # tokens last: marks the chunk written (cache/store.py)
                if not part:
                    continue
                keys = [chunk_key(a.array, i) for a in part]
                data = _all([s.get(k, prototype=_PROTO) for k in keys])
                for a, buf in zip(part, data):
                    _check_decodes(a, i, buf, src)
                todo = writes.put_changed(keys, data)
                copied, skipped = copied + len(todo), skipped + len(part) - len(todo)
                n_bytes += sum(len(buf) for _, buf in todo)
                bar.update(len(part))
            bar.set_postfix_str(f"{n_bytes / 2**20:.1f} MiB written")
    finally:
        bar.close()
    return total, copied, skipped, n_bytes


def _check_decodes(a: _Array, i: int, data, src: StoreLocation) -> None:
    """The chunk is there and decodes with its array's codecs (crc32c checksum, Blosc)."""
    ref = chunk_ref(a.corpus, a.array, i)
    if data is None:
        raise StoreError(f"{ref} of store '{public(src)}' is missing; "
                         f"run `ff verify {public(src)}`")
    key = a.array.metadata.encode_chunk_key((i,) + (0,) * (a.array.ndim - 1))
    a.decoder_keys[key] = data
    try:
        a.decoder[ref.start:ref.stop]
    except Exception as e:  # checksum mismatch, Blosc error
        raise StoreError(f"{ref} of store '{public(src)}' is corrupt ({first_line(e)}); "
                         f"run `ff verify {public(src)}`") from e
    finally:
        del a.decoder_keys[key]


def _all(coros) -> list:
    """Run store operations concurrently on zarr's event loop."""
    async def gather() -> list:
        return await asyncio.gather(*coros)

    return sync(gather())


def _get(s, key: str, src: StoreLocation) -> bytes:
    buf = sync(s.get(key, prototype=_PROTO))
    if buf is None:
        raise StoreError(f"{key} of store '{public(src)}' is missing; run `ff verify {public(src)}`")
    return buf.to_bytes()


def _put(d, key: str, data: bytes) -> None:
    sync(d.set(key, _PROTO.buffer.from_bytes(data)))
