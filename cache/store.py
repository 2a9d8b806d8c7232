"""The activation store: a Zarr v3 group with one subgroup per corpus.

```
STORE/                   attrs: format_version, model, model_hash, tokenizer_hash, ctx_len, layers,
                         hook, d_model, dtype, ff_version, complete, spec, ...
STORE/<corpus>/          attrs: corpus, fingerprint, n_contexts
STORE/<corpus>/tokens    int32 (n_contexts, ctx_len); fill value -1 marks chunks not yet written
STORE/<corpus>/layer_<L> (n_contexts, ctx_len, d_model) in the storage dtype
STORE/<corpus>/digests   uint32 (n_chunks, 1 + n_layers): each chunk's crc32, one row per chunk index
```

Completion is tracked per chunk without shared state: the writer stores every layer chunk
first and the tokens chunk last, and zarr's local store writes each chunk file atomically
(temp file, then rename), as an object store's put is. So a chunk is complete exactly when its
tokens row 0 is not -1. A store is a folder or an fsspec URL (cache/location.py).
Every chunk is written even when it equals the fill value (`write_empty_chunks`), so in a complete
store a chunk missing on disk is damage, and readers say so (cache/chunks.py).
bfloat16 is kept as uint16 bit patterns with the array attribute `logical_dtype: "bfloat16"`.

A chunk's crc32c (the last codec) covers its own bytes, not where it lies: a valid chunk copied
over another (a bad sync, a botched manual fix) would read as data. So the writer also records,
for chunk index i, the crc32 of each array's decoded block (tokens and every layer, in the
columns the `digests` array names) in row i of `digests`, after the layer chunks and before the
tokens chunk; `ff verify` recomputes them and names a chunk whose content belongs elsewhere
(cache/verify.py). Stores written before `digests` existed have none and verify as before.
"""
from __future__ import annotations

import json
import queue
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.core.sync import sync

from .chunks import bad_metadata_files, first_line, read_range, read_rows
from .errors import StoreError
from .location import StoreLocation, is_remote, local_path, normalize, public, store_like, zarr_store

FORMAT_VERSION = 1
HOOK = "resid_post"
CORPORA = ("retain", "unlearn")
_NUMPY_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
_WRITE_ALL = {"write_empty_chunks": True}
DIGESTS = "digests"
"""The per-corpus array of chunk digests (module docstring)."""


def layer_name(layer: int) -> str:
    return f"layer_{layer}"


def chunk_contexts_for(ctx_len: int, d_model: int, dtype: str, target_bytes: int = 4 << 20) -> int:
    """Contexts per chunk: whole contexts, full d_model, about `target_bytes` (a few MiB)."""
    per_ctx = ctx_len * d_model * np.dtype(_NUMPY_DTYPE[dtype]).itemsize
    n = max(1, target_bytes // per_ctx)
    return 1 << (int(n).bit_length() - 1)  # a power of two keeps batches regular


BLOSC_BLOCK = 1 << 20
"""Blosc block size (bytes): 1 MiB blocks give zstd more context than Blosc's default (tens of
KiB at level 1): bf16 activations take 1.41 bytes a value instead of 1.63, and decode about
three times as fast (benchmarks/bench_codec.py, docs/benchmarks.md)."""


def _codecs(dtype: str) -> list:
    # zstd at a low level with byte shuffle on 1 MiB blocks: fast, and better than bitshuffle
    # (which Blosc cannot compress on activations) or higher levels; crc32c last so that a
    # corrupted chunk fails loudly on read. Existing stores keep the codecs their zarr.json names.
    size = np.dtype(_NUMPY_DTYPE[dtype]).itemsize
    return [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle, typesize=size, blocksize=BLOSC_BLOCK),
            Crc32cCodec()]


def to_storage(x, dtype: str) -> np.ndarray:
    """float tensor/array -> numpy array in the storage dtype (bf16 as uint16 bit patterns)."""
    import torch

    t = torch.as_tensor(x)
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16":
        h = t.to(torch.float16)
        if torch.isinf(h).any() and not torch.isinf(t).any():
            peak = float(t.abs().max())
            raise StoreError(
                f"float16 overflow: activations reach {peak:.4g} > 65504; use --set dtype=bfloat16 (or float32)"
            )
        return h.numpy()
    return t.to(torch.float32).numpy()


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored block -> float32 numpy array."""
    if dtype == "bfloat16":
        u = a.astype(np.uint32)
        u <<= 16  # in place: one allocation, not two
        return u.view(np.float32)
    return a.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- writing


def create_store(path: StoreLocation, attrs: dict[str, Any], corpora: dict[str, dict[str, Any]]) -> zarr.Group:
    """Create the group and empty arrays at a folder or URL. `corpora[name]` has n_contexts,
    corpus, fingerprint."""
    # create_group, not open_group(mode="w-"): the folder may already hold the writer's lock file
    return _create(store_like(path, read_only=False), attrs, corpora)


def _create(target, attrs: dict[str, Any], corpora: dict[str, dict[str, Any]]) -> zarr.Group:
    ctx_len, d_model, dtype = attrs["ctx_len"], attrs["d_model"], attrs["dtype"]
    cc = attrs["chunk_contexts"]
    root = zarr.create_group(target, zarr_format=3, attributes={**attrs, "complete": False})
    for name, c in corpora.items():
        n = c["n_contexts"]
        g = root.create_group(name, attributes={k: c[k] for k in ("corpus", "fingerprint", "n_contexts")})
        g.create_array("tokens", shape=(n, ctx_len), chunks=(min(cc, n), ctx_len), dtype="int32",
                       fill_value=-1, compressors=_codecs("float32"))
        for layer in attrs["layers"]:
            g.create_array(layer_name(layer), shape=(n, ctx_len, d_model), chunks=(min(cc, n), ctx_len, d_model),
                           dtype=_NUMPY_DTYPE[dtype], fill_value=0, compressors=_codecs(dtype),
                           attributes={"logical_dtype": dtype, "layer": layer, "hook": HOOK},
                           dimension_names=("context", "position", "d_model"))
        columns = digest_columns(attrs["layers"])
        g.create_array(DIGESTS, shape=(-(-n // min(cc, n)), len(columns)), chunks=(1, len(columns)),
                       dtype="uint32", fill_value=0, compressors=[Crc32cCodec()],
                       attributes={"columns": columns, "digest": "crc32 of the chunk's decoded bytes"})
    return root


def digest_columns(layers) -> list[str]:
    """The columns of a corpus's `digests` array: tokens, then each layer array."""
    return ["tokens", *(layer_name(layer) for layer in layers)]


def chunk_digest(block: np.ndarray) -> int:
    """crc32 of a chunk's decoded values (in their storage dtype), as `digests` records it."""
    return zlib.crc32(np.ascontiguousarray(block).data)


def write_digests(group: zarr.Group, index: int, blocks: dict[str, np.ndarray]) -> None:
    """Row `index` of the group's `digests` (if it has one) from the chunk's blocks by array name."""
    if DIGESTS not in group:
        return  # a store written before digests existed
    arr = group[DIGESTS]
    row = np.array([[chunk_digest(np.asarray(blocks[c], dtype=group[c].dtype)) for c in arr.attrs["columns"]]],
                   dtype=np.uint32)
    arr.with_config(_WRITE_ALL)[index:index + 1] = row


def ensure_store(path: StoreLocation, attrs: dict[str, Any], corpora: dict[str, dict[str, Any]]) -> None:
    """Write the metadata documents (zarr.json) of `create_store` that `path` lacks; leave those
    present as they are. Every shard of a sharded `ff cache` calls this with the same arguments,
    so concurrent calls write identical bytes, each write atomic (a temp file renamed, or an
    object put), and nothing is ever deleted: zarr's own create with overwrite would clear an
    array that another shard is filling. The root goes first, so a store killed half way through
    is still a store, which the next call completes. An existing array of another shape, chunking
    or dtype is a StoreError naming both."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    mem, proto = MemoryStore(), default_buffer_prototype()
    _create(mem, attrs, corpora)

    async def documents() -> dict[str, bytes]:
        return {k: (await mem.get(k, prototype=proto)).to_bytes() async for k in mem.list()}

    docs = sync(documents())
    target = zarr_store(path, read_only=False)
    for key in sorted(docs, key=lambda k: (k.count("/"), k)):  # root, then groups, then arrays
        have = sync(target.get(key, prototype=proto))
        if have is None and key.endswith(f"/{DIGESTS}/zarr.json") and sync(
                target.exists(key.replace(f"/{DIGESTS}/", "/tokens/"))):
            continue  # a store begun before digests existed: its chunks have none to add to
        if have is None:
            sync(target.set(key, proto.buffer.from_bytes(docs[key])))
        elif key.count("/") == 2:  # an array: "retain/layer_8/zarr.json"
            _check_same_array(path, key, json.loads(have.to_bytes()), json.loads(docs[key]))


def _check_same_array(path: StoreLocation, key: str, have: dict[str, Any], want: dict[str, Any]) -> None:
    for field_ in ("shape", "chunk_grid", "data_type"):
        if have.get(field_) != want.get(field_):
            raise StoreError(f"store '{public(path)}' holds {key.removesuffix('/zarr.json')} with "
                             f"{field_} {have.get(field_)}, this run makes {want.get(field_)}: it was "
                             "built with other arguments; use the same arguments, or another --out")


@dataclass
class ChunkWrite:
    corpus: str
    start: int
    layers: dict[int, np.ndarray]  # storage dtype, [n, ctx_len, d_model]
    tokens: np.ndarray  # int32 [n, ctx_len]


class BackgroundWriter:
    """Writes chunks in a background thread behind a bounded queue, so the forward pass
    never waits on compression or disk unless the queue is full."""

    def __init__(self, root: zarr.Group, max_pending: int = 4):
        import numcodecs.blosc

        # One compression thread: the forward pass already uses every core, and Blosc's own
        # threads would compete with it (the writer only has to keep up, not be fast alone).
        numcodecs.blosc.set_nthreads(1)
        self.root = root
        self.q: queue.Queue[ChunkWrite | None] = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ff-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure
            try:
                g = self.root[item.corpus]
                stop = item.start + item.tokens.shape[0]
                for layer, block in item.layers.items():
                    g[layer_name(layer)].with_config(_WRITE_ALL)[item.start:stop] = block
                blocks = {"tokens": item.tokens, **{layer_name(n): b for n, b in item.layers.items()}}
                write_digests(g, item.start // g["tokens"].chunks[0], blocks)
                # last: marks the chunk complete
                g["tokens"].with_config(_WRITE_ALL)[item.start:stop] = item.tokens
            except BaseException as e:  # surfaced to the caller on put()/close()
                self.error = e

    def put(self, item: ChunkWrite) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StoreMeta:
    format_version: int
    model: str
    model_hash: str
    tokenizer_hash: str
    ctx_len: int
    layers: tuple[int, ...]
    hook: str
    d_model: int
    dtype: str
    chunk_contexts: int
    bos_token_id: int | None
    pad_token_id: int | None
    ff_version: str
    complete: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_attrs(cls, a: dict[str, Any]) -> "StoreMeta":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = [k for k in known if k not in a]
        if missing:
            raise StoreError(f"store metadata lacks {', '.join(sorted(missing))}: not an ff store or a newer format")
        kw = {k: a[k] for k in known}
        kw["layers"] = tuple(kw["layers"])
        return cls(**kw, extra={k: v for k, v in a.items() if k not in known})


class CorpusReader:
    """Read access to one corpus of a store: tokens, masks, whole chunks as float32."""

    def __init__(self, group: zarr.Group, meta: StoreMeta, name: str, *, path: str | Path | None = None):
        self.name, self.group, self.meta = name, group, meta
        self.path = path if path is not None else getattr(group.store, "root", "STORE")  # for messages
        self.attrs = dict(group.attrs)
        self.n_contexts = int(self.attrs["n_contexts"])
        self.ctx_len, self.d_model = meta.ctx_len, meta.d_model
        self.chunk_contexts = min(meta.chunk_contexts, self.n_contexts)
        self.n_chunks = -(-self.n_contexts // self.chunk_contexts)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range (0..{self.n_chunks - 1})")
        start = i * self.chunk_contexts
        return start, min(start + self.chunk_contexts, self.n_contexts)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 [n, ctx_len]. In a complete store a missing or corrupt chunk is a StoreError;
        in an incomplete one, chunks not written yet read as -1."""
        stop = self.n_contexts if stop is None else min(stop, self.n_contexts)
        return read_range(self.group["tokens"], self.name, start, stop, store=self.path,
                          must_exist=self.meta.complete)

    def mask(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """True for tokens used in training and metrics: not BOS (position 0), not padding."""
        tok = self.tokens(start, stop)
        m = tok >= 0
        m[:, 0] = False
        if self.meta.pad_token_id is not None and self.meta.pad_token_id != self.meta.bos_token_id:
            m &= tok != self.meta.pad_token_id
        return m

    def completed_chunks(self) -> np.ndarray:
        """Bool [n_chunks]: which chunks were fully written. A tokens chunk that does not decode
        is a StoreError naming it."""
        tokens = self.group["tokens"]
        try:
            first_rows = np.asarray(tokens[:: self.chunk_contexts, 0])
        except Exception:  # find and name the chunk that fails (checksum, Blosc, unreadable)
            for i in range(self.n_chunks):
                start = self.chunk_bounds(i)[0]
                read_rows(tokens, self.name, start, start + 1, store=self.path, must_exist=False)
            raise
        return first_rows >= 0

    def read_chunk(self, layer: int, i: int) -> np.ndarray:
        """Whole chunk `i` of `layer` as float32 [n, ctx_len, d_model]."""
        return from_storage(self.read_chunk_stored(layer, i), self.meta.dtype)

    def read_chunk_stored(self, layer: int, i: int) -> np.ndarray:
        """Whole chunk `i` of `layer` in its storage dtype (uint16 bit patterns for bfloat16);
        `from_storage` converts. Selecting tokens before converting halves the work.
        A missing or corrupt chunk is a StoreError naming it (cache/chunks.py)."""
        name = layer_name(layer)
        if name not in self.group:
            raise StoreError(f"layer {layer} is not in the store (layers: {', '.join(map(str, self.meta.layers))})")
        start, stop = self.chunk_bounds(i)
        return read_rows(self.group[name], self.name, start, stop, store=self.path)


class Store:
    def __init__(self, path: StoreLocation):
        self.path = normalize(path)  # a Path, or the URL of a remote store
        if not has_root(self.path):
            raise StoreError(f"'{path}' is not an activation store (no zarr.json); create one with `ff cache`")
        self.root = open_root(self.path, mode="r")
        self.meta = StoreMeta.from_attrs(dict(self.root.attrs))
        if self.meta.format_version > FORMAT_VERSION:
            raise StoreError(f"store format {self.meta.format_version} is newer than this ff ({FORMAT_VERSION})")
        self.corpora = tuple(c for c in CORPORA if c in self.root)

    def corpus(self, name: str) -> CorpusReader:
        if name not in self.corpora:
            raise StoreError(f"store '{self.path}' has no corpus '{name}' (has: {', '.join(self.corpora)})")
        return CorpusReader(self.root[name], self.meta, name, path=self.path)

    def require_complete(self) -> None:
        if not self.meta.complete:
            raise StoreError(f"store '{self.path}' is incomplete; rerun the same `ff cache` command to finish it")

    def require_layer(self, layer: int) -> None:
        if layer not in self.meta.layers:
            have = ", ".join(map(str, self.meta.layers))
            raise StoreError(f"layer {layer} is not in store '{self.path}' (layers: {have})")


def has_root(path: StoreLocation) -> bool:
    """Whether the location holds a root zarr.json (a local folder or a URL)."""
    if not is_remote(path):
        return (local_path(path) / "zarr.json").is_file()
    zs = zarr_store(path, read_only=True)
    try:
        return bool(sync(zs.exists("zarr.json")))
    except Exception as e:  # no route, refused credentials, no such bucket: the first remote call
        raise StoreError(f"cannot reach store '{public(path)}': {first_line(e)}; check the URL and "
                         "the storage options (endpoint, credentials)") from e


def open_root(path: StoreLocation, mode: str = "r") -> zarr.Group:
    """The store's root group, after checking that its metadata files parse: a damaged one is a
    StoreError naming it (zarr would fail later, with a bare JSON error)."""
    bad = bad_metadata_files(path)
    if bad:
        name, why = bad[0]
        raise StoreError(f"cannot open store '{path}': {name} does not parse ({why}); "
                         f"run `ff verify {path}`; a store with damaged metadata must be rebuilt "
                         "(`ff cache --overwrite`)")
    try:
        return zarr.open_group(store_like(path, read_only=mode == "r"), mode=mode)
    except Exception as e:
        raise StoreError(f"cannot open store '{path}': {first_line(e)}") from e


def open_store(path: StoreLocation) -> Store:
    return Store(path)


def disk_usage(path: StoreLocation, prefix: str = "") -> int:
    """Bytes under `prefix` ("retain/layer_8") of the store, or the whole store."""
    if not is_remote(path):
        return sum(p.stat().st_size for p in (local_path(path) / prefix).rglob("*") if p.is_file())
    zs = zarr_store(path, read_only=True)

    async def total() -> int:  # one listing with sizes (S3: a request per 1000 keys), not a HEAD per key
        found = await zs.fs._find(f"{zs.path}/{prefix}".rstrip("/"), detail=True)
        return int(sum(info.get("size") or 0 for info in found.values()))

    return sync(total())
