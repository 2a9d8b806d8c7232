"""`ff verify STORE`: read every chunk of every array of a store and report what is wrong.

Checks, per corpus: the metadata agrees with the arrays (n_contexts, shapes, d_model, layers,
dtype, chunking); every chunk is on disk (zarr reads a missing one as fill values without an
error) and decodes (a crc32c mismatch raises); each chunk's content matches the digest written
for its array and index (a valid chunk copied over another is "misplaced"); activations are
finite; tokens lie in [0, vocab_size) when the store records its vocabulary size. Each bad chunk
is named by corpus, array and context range. `Report` is shared with the run-folder check
(trainer/verify.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from .chunks import ChunkRef, bad_metadata_files, chunk_exists, chunk_ref, first_line, partial_files
from .location import local_path, public
from .store import (
    _NUMPY_DTYPE,
    CORPORA,
    DIGESTS,
    Store,
    chunk_digest,
    digest_columns,
    from_storage,
    layer_name,
    open_store,
)


@dataclass(frozen=True)
class Problem:
    kind: str
    """missing, corrupt, misplaced, non-finite, token-range, metadata, incomplete, shape, identity."""
    detail: str
    """What is wrong, in a few words."""
    where: str
    """A chunk ("retain/layer_8 chunk 3 (contexts 12-15)"), an array, a corpus or a file."""
    chunk: dict[str, Any] | None = None
    """corpus, array, index, start, stop of a bad chunk."""

    @classmethod
    def at_chunk(cls, kind: str, detail: str, ref: ChunkRef) -> "Problem":
        return cls(kind, detail, str(ref), ref._asdict())


@dataclass
class Report:
    path: str
    kind: str
    """"store" or "run"."""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things not checked, and why; harmless findings."""
    checked: dict[str, int] = field(default_factory=dict)
    """What was read: arrays, chunks, files."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "checked": self.checked,
                "problems": [{k: v for k, v in asdict(p).items() if v is not None}
                             for p in self.problems],
                "notes": self.notes}

    def format(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.checked.items())
        lines = [f"{self.kind} {self.path}: checked {counts}"]
        lines += [f"BAD  {p.where}: {p.kind}: {p.detail}" for p in self.problems]
        lines += [f"note {n}" for n in self.notes]
        n = len(self.problems)
        lines.append("OK" if self.ok else f"{n} problem{'s' * (n != 1)} found")
        return "\n".join(lines)


REPAIR_HINT = ("rerun the `ff cache` command that built the store with --repair to recompute "
               "the bad chunks")


def verify_store(path: str | Path) -> Report:
    """Check the store at `path` (a folder or URL); raises StoreError (a user error) if it is
    not a store. Missing chunks are found through the zarr store API, locally and remotely."""
    report = Report(public(path), "store", checked={"arrays": 0, "chunks": 0})
    bad_files = bad_metadata_files(path)
    if bad_files:  # nothing else can be read; --repair cannot rebuild metadata
        report.problems += [Problem("corrupt", f"does not parse: {why}; rebuild the store with "
                                    "`ff cache --overwrite`", name) for name, why in bad_files]
        return report
    store = open_store(path)
    vocab = store.meta.extra.get("vocab_size")
    if not vocab:
        report.notes.append("the store does not record its vocabulary size: "
                            "tokens checked for >= 0 only")
    if not store.meta.complete:
        report.problems.append(Problem("incomplete", "rerun the same `ff cache` command to finish "
                                       "the store", "store"))
    for name in CORPORA:
        if name not in store.corpora:
            report.problems.append(Problem("metadata", f"no '{name}' corpus", name))
            continue
        group = store.root[name]
        arrays = _check_corpus_metadata(store, name, group, report.problems)
        done = _written_chunks(group, store.meta.complete)
        digests = _read_digests(store, name, group, done, report)
        for arr in arrays:
            report.checked["arrays"] += 1
            report.checked["chunks"] += arr.cdata_shape[0]
            report.problems += _check_chunks(store, name, arr, done, vocab, digests)
    if any(p.chunk for p in report.problems):
        report.notes.append(REPAIR_HINT)
    leftovers = partial_files(path)
    if leftovers:
        report.notes.append(f"{len(leftovers)} temp file(s) of an interrupted write (e.g. "
                            f"{leftovers[0].relative_to(local_path(path))}); resuming `ff cache` "
                            "removes them")
    return report


def _check_corpus_metadata(store: Store, name: str, group: zarr.Group,
                           out: list[Problem]) -> list[zarr.Array]:
    """Compare the corpus's arrays with the store metadata; -> the arrays fit for a chunk scan."""
    m = store.meta
    try:
        n = int(group.attrs["n_contexts"])
    except (KeyError, TypeError, ValueError):
        out.append(Problem("metadata", "the corpus records no n_contexts", name))
        return []
    want = {"tokens": ((n, m.ctx_len), np.dtype(np.int32))}
    act = np.dtype(_NUMPY_DTYPE[m.dtype])
    want.update({layer_name(l): ((n, m.ctx_len, m.d_model), act) for l in m.layers})
    extra = sorted(set(group.array_keys()) - set(want) - {DIGESTS})
    if extra:
        out.append(Problem("metadata", f"arrays not in the store's layers {list(m.layers)}: "
                           f"{', '.join(extra)}", name))
    fit = []
    for key, (shape, dtype) in want.items():
        where = f"{name}/{key}"
        if key not in group:
            out.append(Problem("metadata", "array missing (the metadata lists it)", where))
            continue
        arr = group[key]
        logical = None if key == "tokens" else m.dtype
        bad = _array_mismatch(arr, shape, dtype, min(m.chunk_contexts, n), logical)
        if bad:
            out.append(Problem("metadata", bad, where))
        else:
            fit.append(arr)
    return fit


def _array_mismatch(arr: zarr.Array, shape: tuple, dtype: np.dtype, chunk: int,
                    logical: str | None) -> str | None:
    """What in `arr` disagrees with the store metadata, or None."""
    if tuple(arr.shape) != shape:
        return f"shape {tuple(arr.shape)}, the metadata says {shape} (n_contexts, ctx_len, d_model)"
    if arr.dtype != dtype:
        return f"dtype {arr.dtype}, the metadata says {dtype}"
    if arr.chunks[0] != chunk or tuple(arr.chunks[1:]) != shape[1:]:
        return f"chunks {tuple(arr.chunks)}, the metadata says {(chunk, *shape[1:])}"
    if logical is not None and arr.attrs.get("logical_dtype", logical) != logical:
        return f"logical dtype {arr.attrs.get('logical_dtype')}, the metadata says {logical}"
    return None


def _written_chunks(group: zarr.Group, complete: bool) -> np.ndarray | None:
    """In an incomplete store, which chunks were written (their tokens chunk is on disk); the
    rest are expected to be missing. None: every chunk must exist."""
    if complete or "tokens" not in group:
        return None
    tokens = group["tokens"]
    return np.array([chunk_exists(tokens, i) for i in range(tokens.cdata_shape[0])])


def _read_digests(store: Store, corpus: str, group: zarr.Group, done: np.ndarray | None,
                  report: Report) -> dict[str, np.ndarray] | None:
    """The digests recorded for each array of the corpus (column name -> uint32 per chunk index;
    a row that is missing or does not decode is reported and left out), or None when the store
    has none: then chunks are checked without them, and a note says so."""
    if DIGESTS not in group:
        if not any("digests" in n for n in report.notes):
            report.notes.append("the store records no chunk digests (written by an older ff): a valid "
                                "chunk copied to another place cannot be detected")
        return None
    arr = group[DIGESTS]
    columns = list(arr.attrs.get("columns", []))
    n_chunks = group["tokens"].cdata_shape[0] if "tokens" in group else 0
    if columns != digest_columns(store.meta.layers) or tuple(arr.shape) != (n_chunks, len(columns)):
        report.problems.append(Problem("metadata", f"shape {tuple(arr.shape)} and columns {columns} do not "
                                       f"match the store's chunks and layers", f"{corpus}/{DIGESTS}"))
        return None
    report.checked["arrays"] += 1
    report.checked["chunks"] += n_chunks
    rows = np.zeros((n_chunks, len(columns)), dtype=np.uint32)
    valid = np.zeros(n_chunks, dtype=bool)
    for i in range(n_chunks):
        if done is not None and not done[i]:
            continue
        ref = ChunkRef(corpus, DIGESTS, i, *chunk_ref(corpus, group["tokens"], i)[3:])
        if not chunk_exists(arr, i):
            report.problems.append(Problem.at_chunk("missing", "the chunk's digests are not on disk", ref))
            continue
        try:
            rows[i] = np.asarray(arr[i])
            valid[i] = True
        except Exception as e:  # checksum mismatch, unreadable file
            report.problems.append(Problem.at_chunk("corrupt", f"does not decode: {first_line(e)}", ref))
    return {c: np.where(valid, rows[:, k].astype(np.int64), -1) for k, c in enumerate(columns)}


def _check_chunks(store: Store, corpus: str, arr: zarr.Array, done: np.ndarray | None,
                  vocab: int | None, digests: dict[str, np.ndarray] | None = None) -> Iterator[Problem]:
    """Every chunk of `arr`: on disk, decodes, matches its digest (when the store records them),
    finite (activations) or in range (tokens). A digest of -1 was not readable (reported)."""
    expected = None if digests is None else digests.get(arr.basename)
    for i in range(arr.cdata_shape[0]):
        ref = chunk_ref(corpus, arr, i)
        if done is not None and not done[i]:
            continue  # not written yet; reported once, as an incomplete store
        if not chunk_exists(arr, i):
            yield Problem.at_chunk("missing", "not on disk (zarr would read fill values)", ref)
            continue
        try:
            block = np.asarray(arr[ref.start:ref.stop])
        except Exception as e:  # checksum mismatch, Blosc error, unreadable file
            yield Problem.at_chunk("corrupt", f"does not decode: {first_line(e)}", ref)
            continue
        if arr.basename == "tokens":
            kind, bad = "token-range", _tokens_out_of_range(block, vocab)
        else:
            kind, bad = "non-finite", _non_finite(block, store.meta.dtype)
        if bad:
            yield Problem.at_chunk(kind, bad, ref)
        elif expected is not None and expected[i] >= 0 and chunk_digest(block) != expected[i]:
            yield Problem.at_chunk("misplaced", "decodes, but its content is not what was written at this "
                                   "array and index (a chunk copied from elsewhere)", ref)


def _tokens_out_of_range(tok: np.ndarray, vocab: int | None) -> str | None:
    hi = vocab if vocab else np.iinfo(np.int32).max
    bad = (tok < 0) | (tok >= hi)
    if not bad.any():
        return None
    span = f"[0, {vocab})" if vocab else ">= 0"
    return f"{int(bad.sum())} token(s) outside {span} (min {int(tok.min())}, max {int(tok.max())})"


def _non_finite(block: np.ndarray, dtype: str) -> str | None:
    x = from_storage(block, dtype)
    n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    if not n_nan and not n_inf:
        return None
    return f"{n_nan} NaN and {n_inf} inf activation value(s)"
