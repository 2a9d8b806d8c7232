"""Token batches for training, streamed from an activation store (docs/architecture.md).

A *source* is a list of chunks, each read as the masked tokens it holds ([n, D] float32,
no BOS, no padding). `TokenStream` turns a source into an endless, resumable iterator of
[B, D] batches: each epoch permutes the chunk order, reads `buffer_chunks` whole chunks into
a buffer, shuffles the tokens inside it and slices batches, while a background thread
prepares the next buffer. Memory is bounded by two buffers.

Every shuffle is seeded by (seed, stream id, epoch, buffer), so the stream's position is
three integers and a resumed run sees exactly the batches an uninterrupted run would.
Under torchrun each rank reads one share of every buffer's chunks (`rank`, `world`) and yields
the tokens of each batch that come from them: the ranks' batches together are the single
process's batch (trainer/dist.py).
A missing or corrupt chunk stops training with a one-line TrainError naming it (corpus, layer,
contexts): held-out chunks are read once when the data is opened, and a failure in the
prefetch thread is raised on the next batch.
The trainer takes any iterator of [B, D] tensors (the dictionary_learning seam);
`ArraySource` feeds in-memory data through the same stream for tests.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from cache.errors import StoreError
from cache.store import from_storage
from trainer.errors import TrainError


class ChunkSource(Protocol):
    d_model: int

    def __len__(self) -> int: ...

    def read(self, k: int) -> np.ndarray:
        """Masked tokens of chunk k, unscaled: float32 [n_k, D]."""
        ...

    def count(self, k: int) -> int:
        """n_k, without reading the activations (a rank's share of a buffer needs every
        chunk's count and only its own chunks' tokens)."""
        ...

    def read_stored(self, k: int) -> tuple[np.ndarray, str]:
        """The same tokens in their storage dtype, and that dtype's name for `from_storage`
        (bfloat16 stores: uint16 bit patterns, half the bytes to shuffle)."""
        ...


class Piece(NamedTuple):
    chunk: int
    """Store chunk index."""
    start: int
    """First context (absolute index in the corpus)."""
    stop: int
    """One past the last context."""


class StoreSource:
    """Pieces of store chunks of one corpus and layer (a train or a held-out split)."""

    def __init__(self, corpus, layer: int, pieces: Sequence[Piece]):
        self.corpus, self.layer, self.pieces = corpus, layer, list(pieces)
        self.d_model = corpus.d_model

    def __len__(self) -> int:
        return len(self.pieces)

    def read(self, k: int) -> np.ndarray:
        return from_storage(*self.read_stored(k))

    def count(self, k: int) -> int:
        p = self.pieces[k]
        try:
            return int(self.corpus.mask(p.start, p.stop).sum())
        except StoreError as e:
            raise TrainError(str(e)) from None

    def read_stored(self, k: int) -> tuple[np.ndarray, str]:
        p = self.pieces[k]
        c_start, _ = self.corpus.chunk_bounds(p.chunk)
        try:  # a missing or corrupt chunk: one line naming it (cache/chunks.py)
            chunk_NTD = self.corpus.read_chunk_stored(self.layer, p.chunk)
            mask_NT = self.corpus.mask(p.start, p.stop)
        except StoreError as e:
            raise TrainError(str(e)) from None
        return chunk_NTD[p.start - c_start : p.stop - c_start][mask_NT], self.corpus.meta.dtype

    def check(self) -> None:
        """Read every piece once (its chunks exist and decode), so that a bad chunk stops the
        run when it starts rather than when it is reached."""
        for k in range(len(self)):
            self.read_stored(k)


class ArraySource:
    """In-memory tokens [N, D] cut into pseudo-chunks of `chunk_tokens` (tests, benchmarks)."""

    def __init__(self, x_ND: Tensor | np.ndarray, chunk_tokens: int):
        self.x_ND = np.asarray(x_ND, dtype=np.float32)
        self.d_model, self.chunk_tokens = self.x_ND.shape[1], chunk_tokens

    def __len__(self) -> int:
        return math.ceil(len(self.x_ND) / self.chunk_tokens)

    def read(self, k: int) -> np.ndarray:
        return self.x_ND[k * self.chunk_tokens : (k + 1) * self.chunk_tokens]

    def count(self, k: int) -> int:
        return len(self.read(k))

    def read_stored(self, k: int) -> tuple[np.ndarray, str]:
        return self.read(k), "float32"


def split_pieces(bounds: Sequence[tuple[int, int]], eval_frac: float,
                 ) -> tuple[list[Piece], list[Piece]]:
    """Deterministic train / held-out split of a corpus given its chunk bounds.

    Held out: the last round(eval_frac * n_chunks) whole chunks; with too few chunks for
    that, the last ceil(eval_frac * n_contexts) contexts (part of the last chunk).
    """
    n_chunks, n_ctx = len(bounds), bounds[-1][1]
    if n_ctx < 2:
        raise TrainError(f"corpus has {n_ctx} context(s); at least 2 are needed (train + held-out)")
    n_eval_chunks = round(eval_frac * n_chunks)
    if 1 <= n_eval_chunks < n_chunks:
        cut = bounds[n_chunks - n_eval_chunks][0]
    else:
        cut = n_ctx - min(n_ctx - 1, max(1, math.ceil(eval_frac * n_ctx)))
    train, held = [], []
    for i, (a, b) in enumerate(bounds):
        if a < cut:
            train.append(Piece(i, a, min(b, cut)))
        if b > cut:
            held.append(Piece(i, max(a, cut), b))
    return train, held


def shard(source: StoreSource, rank: int, world: int) -> StoreSource:
    """This rank's contiguous share of a source's pieces (the passes over every training
    token after training: each rank reads 1/world of the corpus, in store order)."""
    if world == 1:
        return source
    n = len(source.pieces)
    return StoreSource(source.corpus, source.layer,
                       source.pieces[n * rank // world : n * (rank + 1) // world])


def estimate_scale(source: ChunkSource, n_chunks: int) -> float:
    """s with E||x s||^2 = d on `source` (METHOD §0), from up to n_chunks evenly spaced chunks."""
    ks = np.linspace(0, len(source) - 1, num=min(n_chunks, len(source))).round().astype(int)
    ks = np.unique(ks)
    sq, n = 0.0, 0
    for k in ks:
        x_ND = source.read(int(k)).astype(np.float64)
        sq, n = sq + float((x_ND**2).sum()), n + len(x_ND)
    if n == 0 or sq == 0.0:
        raise TrainError("retain corpus has no usable tokens to estimate the normalisation scale")
    return math.sqrt(source.d_model / (sq / n))


class Buffer(NamedTuple):
    """A shuffle buffer, or this rank's share of one."""

    x_ND: np.ndarray
    """The tokens, in buffer order, in the store's storage dtype."""
    dtype: str
    """That dtype's name (for `from_storage`)."""
    n: int
    """Tokens in the whole buffer, every rank's: batch b is buffer positions [b B, (b + 1) B)."""
    pos_N: np.ndarray | None
    """The buffer position of each row of x_ND (increasing); None: x_ND is the whole buffer."""

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The tokens at buffer positions [start, stop) that this buffer holds."""
        if self.pos_N is None:
            return self.x_ND[start:stop]
        a, b = np.searchsorted(self.pos_N, [start, stop])
        return self.x_ND[a:b]


PREFETCH_NICE = 10
"""Niceness of the prefetch thread (Linux: per thread). The buffer after the current one is
due only when the current one is used up, so the thread can take the CPU time the training
step leaves over instead of competing with torch's threads; if it falls behind, the step
waits on it, its competition stops, and it catches up."""


def _lower_priority() -> None:
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class TokenStream:
    """Endless iterator of shuffled [B, D] float32 batches (scaled by `scale`) from a source.

    Position = (epoch, buffer, batch); `state_dict` / `load_state_dict` save and restore it.
    Tokens left over at the end of a buffer (fewer than B) are skipped for this epoch.
    With world > 1 the batches are this rank's part of the single process's batches (about
    B / world tokens each) and the position is the same on every rank.
    """

    def __init__(self, source: ChunkSource, *, batch_size: int, buffer_chunks: int, seed: int,
                 stream_id: int = 0, scale: float = 1.0, prefetch: bool = True,
                 rank: int = 0, world: int = 1):
        self.source, self.B, self.scale = source, batch_size, scale
        self.seed, self.stream_id, self.rank, self.world = seed, stream_id, rank, world
        self._counts: dict[int, int] = {}
        self.buffer_chunks = max(1, min(buffer_chunks, len(source)))
        self.epoch, self.buffer, self.batch = 0, 0, 0
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="ff-prefetch", initializer=_lower_priority)
                      if prefetch else None)
        self._current: tuple[tuple[int, int], Buffer] | None = None
        self._next: tuple[tuple[int, int], Future | Buffer] | None = None

    # ---- position ------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "buffer": self.buffer, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.buffer, self.batch = state["epoch"], state["buffer"], state["batch"]
        self._current = None

    # ---- buffers -------------------------------------------------------------------

    def _groups(self, epoch: int) -> list[np.ndarray]:
        """This epoch's chunk order, cut into buffers of buffer_chunks chunks; a short last
        group joins the one before it, so no buffer is tiny."""
        rng = np.random.default_rng([self.seed, self.stream_id, epoch])
        order, n = rng.permutation(len(self.source)), self.buffer_chunks
        groups = [order[i : i + n] for i in range(0, len(order), n)]
        if len(groups) > 1 and len(groups[-1]) < self.buffer_chunks:
            groups[-2:] = [np.concatenate(groups[-2:])]
        return groups

    def _load(self, epoch: int, buffer: int) -> Buffer:
        """Read one buffer's chunks and shuffle their tokens -> ([N, D] in the storage dtype,
        dtype name). Runs in the prefetch thread; batches are converted and scaled on the way
        out, so the buffer holds (and the shuffle moves) bfloat16 stores at 2 bytes a value."""
        ks = self._groups(epoch)[buffer]
        if self.world > 1:
            return self._load_share(ks, epoch, buffer)
        parts = [self.source.read_stored(int(k)) for k in ks]
        dtype = parts[0][1]
        n = sum(len(x) for x, _ in parts)
        dest = self._destinations(epoch, buffer, n)
        # buf = concatenate(parts)[perm] in one copy: scatter each part where perm sends it.
        buf_ND = np.empty((n, self.source.d_model), dtype=parts[0][0].dtype)
        start = 0
        for x, _ in parts:
            buf_ND[dest[start : start + len(x)]] = x
            start += len(x)
        return Buffer(buf_ND, dtype, n, None)

    def _destinations(self, epoch: int, buffer: int, n: int) -> np.ndarray:
        """Where the shuffle puts each of the buffer's n tokens, in chunk order: the
        buffer is concatenate(chunks)[perm], so token i goes to position dest[i]."""
        rng = np.random.default_rng([self.seed, self.stream_id, epoch, buffer, 1])
        perm = rng.permutation(n)
        dest = np.empty_like(perm)
        dest[perm] = np.arange(n)
        return dest

    def _load_share(self, ks: np.ndarray, epoch: int, buffer: int) -> Buffer:
        """This rank's share of a buffer: the tokens [lo, hi) of the chunks' concatenation,
        one world-th of it, so the ranks read different chunks (a chunk cut by a boundary is
        read by both), placed where the single-process shuffle puts them. Every rank then
        holds about B / world tokens of each batch, and together exactly the batch."""
        counts = [self._count(int(k)) for k in ks]
        n = sum(counts)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        parts, dtype, a = [], "float32", 0
        for k, c in zip(ks, counts):
            if a < hi and a + c > lo:
                x_ND, dtype = self.source.read_stored(int(k))
                if len(x_ND) != c:
                    raise TrainError(f"chunk {int(k)} holds {len(x_ND)} training tokens, its mask "
                                     f"says {c}; run `ff verify` on the store")
                parts.append(x_ND[max(lo, a) - a : min(hi, a + c) - a])
            a += c
        pos_N = self._destinations(epoch, buffer, n)[lo:hi]
        order = np.argsort(pos_N, kind="stable")
        x_ND = (np.concatenate(parts) if parts else np.empty((0, self.source.d_model), np.float32))
        return Buffer(x_ND[order], dtype, n, pos_N[order])

    def _count(self, k: int) -> int:
        if k not in self._counts:  # a chunk's token count never changes: read its mask once
            self._counts[k] = self.source.count(k)
        return self._counts[k]

    def _after(self, epoch: int, buffer: int) -> tuple[int, int]:
        return (epoch, buffer + 1) if buffer + 1 < len(self._groups(epoch)) else (epoch + 1, 0)

    def _get(self, key: tuple[int, int]) -> Buffer:
        if self._next is not None and self._next[0] == key:
            x = self._next[1]
            return x.result() if isinstance(x, Future) else x
        return self._load(*key)

    def _prefetch(self, key: tuple[int, int]) -> None:
        job = self._pool.submit(self._load, *key) if self._pool else None
        self._next = (key, job) if job else None

    def _raise_prefetch_error(self) -> None:
        """A prefetch that failed (a bad chunk) stops the run now, not when its buffer is due."""
        job = self._next[1] if self._next is not None else None
        if isinstance(job, Future) and job.done() and not job.cancelled() and job.exception():
            raise job.exception()

    # ---- iteration -----------------------------------------------------------------

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        self._raise_prefetch_error()
        empty = 0  # consecutive buffers too small for one batch
        while True:
            key = (self.epoch, self.buffer)
            if self._current is None or self._current[0] != key:
                self._current = (key, self._get(key))
                self._prefetch(self._after(*key))
            buf = self._current[1]
            if (self.batch + 1) * self.B <= buf.n:
                self.batch += 1
                rows = buf.rows((self.batch - 1) * self.B, self.batch * self.B)
                x_BD = from_storage(rows, buf.dtype)
                return torch.from_numpy(np.multiply(x_BD, np.float32(self.scale), dtype=np.float32))
            empty = empty + 1 if buf.n < self.B else 0
            if empty > len(self.source):
                raise TrainError(f"stream buffers hold fewer than one batch ({self.B} tokens); "
                                 "raise buffer_chunks or lower batch_contexts")
            self.epoch, self.buffer = self._after(*key)  # buffer used up: move on
            self.batch = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def iter_eval_batches(source: ChunkSource, *, scale: float, batch_size: int,
                      max_tokens: int) -> Iterator[Tensor]:
    """Held-out tokens in store order, scaled, in batches, at most max_tokens in all."""
    left = max_tokens
    for k in range(len(source)):
        x_ND = torch.from_numpy(source.read(k)[:left] * np.float32(scale))
        left -= len(x_ND)
        yield from x_ND.split(batch_size)
        if left <= 0:
            return


# ---- opening a store for training ------------------------------------------------------


class CorpusData(NamedTuple):
    train: StoreSource
    """Training chunks (and the head of a partly held-out chunk)."""
    held_out: StoreSource
    """Held-out contexts for validation metrics (split_pieces)."""


class TrainingData(NamedTuple):
    retain: CorpusData
    unlearn: CorpusData
    ctx_len: int
    d_model: int
    meta: dict
    """Store metadata for config.json: model, model_hash, tokenizer_hash, layer, d_model,
    ctx_len, dtype, store (and unlearn_store when separate)."""


def open_training_data(store_path: str, layer: int | None, eval_frac: float, *,
                       unlearn_store: str | None = None) -> TrainingData:
    """Open and check the store(s); every user mistake is a one-line TrainError.
    `layer` None: the store's only layer."""
    from cache.errors import StoreError
    from cache.location import public
    from cache.store import open_store

    try:
        r_store = open_store(store_path)
        u_store = r_store if unlearn_store is None else open_store(unlearn_store)
        if layer is None:
            layers = r_store.meta.layers
            if len(layers) != 1:
                raise TrainError(f"store {store_path} holds layers {', '.join(map(str, layers))}; "
                                 "choose one with --layer")
            layer = layers[0]
        for s in {id(r_store): r_store, id(u_store): u_store}.values():
            s.require_complete()
            s.require_layer(layer)
        retain, unlearn = r_store.corpus("retain"), u_store.corpus("unlearn")
    except StoreError as e:
        raise TrainError(str(e)) from None
    a, b = r_store.meta, u_store.meta
    for key in ("model_hash", "d_model", "ctx_len"):
        if getattr(a, key) != getattr(b, key):
            raise TrainError(
                f"retain store {store_path} and unlearn store {unlearn_store} differ in {key} "
                f"({getattr(a, key)} vs {getattr(b, key)}); cache both with the same --model"
            )
    meta = dict(model=a.model, model_hash=a.model_hash, tokenizer_hash=a.tokenizer_hash,
                layer=layer, d_model=a.d_model, ctx_len=a.ctx_len, hook=a.hook, dtype=a.dtype,
                store=public(store_path), unlearn_store=public(unlearn_store or store_path))
    corpora = []
    for c in (retain, unlearn):
        if c.n_contexts < 2:
            raise TrainError(f"the {c.name} corpus has {c.n_contexts} context(s); at least 2 are "
                             "needed (train + held-out): cache more contexts")
        train, held = split_pieces([c.chunk_bounds(i) for i in range(c.n_chunks)], eval_frac)
        corpora.append(CorpusData(StoreSource(c, layer, train), StoreSource(c, layer, held)))
        corpora[-1].held_out.check()  # evaluated at the end: a bad chunk must stop us now
        meta[f"{c.name}_contexts"] = [sum(p.stop - p.start for p in ps) for ps in (train, held)]
    return TrainingData(corpora[0], corpora[1], a.ctx_len, a.d_model, meta)
