"""Streaming token batches (trainer/data.py): split, shuffle buffers, prefetch, resume, scale."""

import os
import threading

import numpy as np
import pytest
import torch

from trainer.data import ArraySource, TokenStream, estimate_scale, iter_eval_batches, split_pieces
from trainer.errors import TrainError


def ids_source(n_tokens: int, chunk_tokens: int, d: int = 4) -> ArraySource:
    """Token t is the row [t, t, ...], so a batch tells which tokens it holds."""
    x = np.repeat(np.arange(n_tokens, dtype=np.float32)[:, None], d, axis=1)
    return ArraySource(x, chunk_tokens)


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def test_split_by_whole_chunks_at_the_end():
    bounds = [(4 * i, 4 * i + 4) for i in range(10)]
    train, held = split_pieces(bounds, 0.2)
    assert [p.chunk for p in held] == [8, 9] and held[0].start == 32
    assert [p.chunk for p in train] == list(range(8)) and train[-1].stop == 32


def test_split_inside_a_chunk_when_too_few_chunks():
    train, held = split_pieces([(0, 8), (8, 10)], 0.2)  # round(0.4) = 0 chunks -> contexts
    assert held == [(1, 8, 10)] and train == [(0, 0, 8)]
    train, held = split_pieces([(0, 10)], 0.05)
    assert train == [(0, 0, 9)] and held == [(0, 9, 10)]
    with pytest.raises(TrainError):
        split_pieces([(0, 1)], 0.05)


def test_one_epoch_sees_every_token_once_and_shuffles():
    stream = TokenStream(ids_source(96, 8), batch_size=8, buffer_chunks=3, seed=0)
    seen = [t for _ in range(12) for t in ids(next(stream))]
    assert sorted(seen) == list(range(96))
    assert seen != list(range(96))
    assert stream.state_dict()["epoch"] == 0
    next(stream)
    assert stream.state_dict()["epoch"] == 1
    stream.close()


def test_stream_is_deterministic_and_streams_differ():
    a = TokenStream(ids_source(200, 16), batch_size=10, buffer_chunks=2, seed=3)
    b = TokenStream(ids_source(200, 16), batch_size=10, buffer_chunks=2, seed=3)
    c = TokenStream(ids_source(200, 16), batch_size=10, buffer_chunks=2, seed=3, stream_id=1)
    xa = [ids(next(a)) for _ in range(30)]
    assert xa == [ids(next(b)) for _ in range(30)]
    assert xa != [ids(next(c)) for _ in range(30)]
    for s in (a, b, c):
        s.close()


def test_resume_from_state_gives_the_same_batches():
    src = ids_source(300, 16)
    a = TokenStream(src, batch_size=7, buffer_chunks=3, seed=1)
    for _ in range(23):
        next(a)
    state = a.state_dict()
    rest = [ids(next(a)) for _ in range(40)]  # crosses buffers and an epoch
    b = TokenStream(src, batch_size=7, buffer_chunks=3, seed=1)
    b.load_state_dict(state)
    assert [ids(next(b)) for _ in range(40)] == rest
    a.close(), b.close()


def test_prefetch_runs_in_a_background_thread():
    calls = []

    class Recording(ArraySource):
        def read(self, k):
            nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            calls.append((threading.current_thread().name, nice))
            return super().read(k)

    src = Recording(np.ones((64, 4), np.float32), 8)
    stream = TokenStream(src, batch_size=8, buffer_chunks=2, seed=0)
    next(stream)
    stream.close()
    prefetched = [nice for name, nice in calls if name.startswith("ff-prefetch")]
    assert prefetched
    # it yields the CPU to the training step's threads (Linux: niceness is per thread)
    assert all(nice > os.getpriority(os.PRIO_PROCESS, 0) for nice in prefetched)


def test_too_small_buffers_are_an_error():
    stream = TokenStream(ids_source(10, 5), batch_size=64, buffer_chunks=1, seed=0)
    with pytest.raises(TrainError, match="fewer than one batch"):
        next(stream)
    stream.close()


def test_scale_normalises_mean_squared_norm_to_d():
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32) * 7.0
    s = estimate_scale(ArraySource(x, 100), n_chunks=5)
    assert np.mean(np.sum((x * s) ** 2, axis=1)) == pytest.approx(16, rel=1e-4)
    stream = TokenStream(ArraySource(x, 100), batch_size=500, buffer_chunks=5, seed=0, scale=s)
    assert next(stream).pow(2).sum(1).mean().item() == pytest.approx(16, rel=1e-4)
    stream.close()


def test_eval_batches_are_capped_and_scaled():
    src = ids_source(50, 20)
    batches = list(iter_eval_batches(src, scale=2.0, batch_size=8, max_tokens=30))
    flat = torch.cat(batches)
    assert len(flat) == 30 and flat[:, 0].tolist() == [2.0 * t for t in range(30)]


class FailingSource(ArraySource):
    """Chunk `bad` fails to read, as a missing or corrupt store chunk does (StoreSource)."""

    def __init__(self, x, chunk_tokens: int, bad: int):
        super().__init__(x, chunk_tokens)
        self.bad = bad

    def read_stored(self, k: int):
        if k == self.bad:
            raise TrainError(f"chunk {k} is corrupt")
        return super().read_stored(k)


def test_a_failed_prefetch_stops_the_stream_at_the_next_batch():
    x = ids_source(400, 100).x_ND
    order = TokenStream(ArraySource(x, 100), batch_size=10, buffer_chunks=1, seed=0)._groups(0)
    second = int(order[1][0])  # the chunk of buffer 1
    stream = TokenStream(FailingSource(x, 100, second), batch_size=10, buffer_chunks=1, seed=0)
    next(stream)  # buffer 0 is fine (10 batches); buffer 1 is being prefetched
    stream._next[1].exception(timeout=30)  # let the prefetch thread fail
    with pytest.raises(TrainError, match=f"chunk {second} is corrupt"):
        next(stream)  # raised now, not after the 9 batches left in buffer 0
    stream.close()
