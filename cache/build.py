"""The `ff cache` job: run the model once over both corpora and fill the activation store.

Resumable: chunks already written are skipped, so an interrupted run (Ctrl-C, kill -9)
rerun with the same arguments continues and ends with the same store as an uninterrupted run.
A resume must also compute the same way (weights, revision, compute dtype, device kind), and
one writer at a time holds the store's lock (cache/lock.py; local stores only). `repair=True`
first clears the chunks that `ff verify` finds bad (cache/repair.py), so the resume recomputes
exactly those. `shard` computes only that shard's chunks, concurrently with the other shards
(cache/shard.py). `out` is a folder or an fsspec URL (cache/location.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from . import __version__
from .chunks import remove_partial_files
from .config import STORE_DTYPES, CacheConfig  # noqa: F401  (CacheConfig: the public name here too)
from .corpora import pack, resolve_corpus
from .errors import StoreError
from .location import StoreLocation, normalize, store_like
from .lock import WriterLock, check_unlocked, check_writable, clear_contents, is_vacant
from .repair import clear_chunks, plan_repair
from .shard import Shard, complete_if_done, global_chunks, record_shard, remove_own_partial_files
from .store import (
    CORPORA,
    FORMAT_VERSION,
    HOOK,
    BackgroundWriter,
    ChunkWrite,
    chunk_contexts_for,
    ensure_store,
    has_root,
    open_root,
    open_store,
    to_storage,
)

PAPER_LAYERS = (5, 12, 19)  # of Gemma-2-2B's 26 blocks
_PAPER_DEPTH = 26
RESUME_MUST_MATCH = {  # store attribute -> (what it is, what to do about a mismatch)
    "model_hash": ("model weights hash", "the model changed; use --overwrite to rebuild"),
    "model_revision": ("model revision", "pin that revision with --model ID@REV, or --overwrite"),
    "compute_dtype": ("compute dtype", "rerun with --model-dtype {old}, or --overwrite"),
    "device_kind": ("device kind", "rerun with --device {old}, or --overwrite"),
}
"""How the stored chunks were computed: chunks added by a resume computed otherwise would not
match the others. Stores written before an attribute was recorded are not checked on it."""


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's layers 5/12/19 of 26, scaled to a model with `n_layers` blocks."""
    if n_layers >= _PAPER_DEPTH:
        return PAPER_LAYERS
    return tuple(sorted({min(n_layers - 1, round(l * n_layers / _PAPER_DEPTH)) for l in PAPER_LAYERS}))


@dataclass
class CacheResult:
    path: str
    skipped: bool
    tokens_done: int
    seconds: float
    layers: tuple[int, ...] = field(default_factory=tuple)
    forward_seconds: float = 0.0  # the forward + write loop alone, without model loading
    repaired: tuple[str, ...] = ()  # chunks --repair recomputed: "retain chunk 3 (contexts 12-15)"
    missing: int = 0  # a shard's run: chunks of other shards not written yet (0: store complete)


def _spec_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} in the store, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


_SHARD_TODO = "give every shard the store's arguments, or use another --out"
"""What a shard started with other arguments than its store's should do (not --overwrite: the
other shards are filling the store)."""


def _check_existing(out: StoreLocation, spec: dict[str, Any], overwrite: bool,
                    todo: str = "use --overwrite or another path") -> str:
    """'new', 'resume', 'complete' or 'overwrite' for the location `out`."""
    if not has_root(out):
        if is_vacant(out):
            return "new"
        if not has_root(out):  # not just created by a shard between the two looks
            raise StoreError(f"'{out}' exists and is not an activation store; choose another path")
    if overwrite:
        return "overwrite"
    attrs = dict(open_root(out).attrs)
    diff = _spec_diff(attrs.get("spec", {}), spec)
    if diff:
        raise StoreError(f"store '{out}' was built with other arguments ({diff}); {todo}")
    return "complete" if attrs.get("complete") else "resume"


def build_cache(cfg: CacheConfig, out: StoreLocation, *, overwrite: bool = False, repair: bool = False,
                progress: bool = True, batch_contexts: int | None = None, lm=None,
                shard: Shard | None = None) -> CacheResult:
    """Fill (or finish) the store at `out`; a complete store with the same spec is a no-op.

    `repair`: recompute the chunks `ff verify` finds bad (missing, corrupt, non-finite, tokens
    out of range) and any not yet written; a healthy complete store is a no-op.
    `lm` is an already loaded `cache.models.LoadedModel` for `cfg.model`, to skip loading it again.
    `shard`: write only that shard's chunks; the store is marked complete once every chunk is
    there, by whichever shard sees that first (`missing` in the result: chunks still to come).
    """
    out = normalize(out)  # a Path, or the URL of a remote store
    t0 = time.perf_counter()
    spec = cfg.spec()
    if repair and overwrite:
        raise StoreError("use --repair or --overwrite, not both")
    if shard is not None and (repair or overwrite):
        raise StoreError(f"--shard cannot be combined with --{'repair' if repair else 'overwrite'}: "
                         "shards share the store; run it without --shard in one process")
    todo = _SHARD_TODO if shard is not None else "use --overwrite or another path"
    state = _check_existing(out, spec, overwrite, todo)
    damaged = plan_repair(out, state) if repair else []
    if state == "complete" and not damaged:
        return CacheResult(str(out), True, 0, 0.0, tuple(open_store(out).meta.layers))
    check_writable(out)  # a read-only store and a second writer are refused before a model loads
    check_unlocked(out, shard)
    lm, layers, specs, sizes, packed = _load_inputs(cfg, lm)

    with WriterLock(out, shard) as lock:
        state = _check_existing(out, spec, overwrite, todo)  # again, now that no other writer can change it
        if state == "complete" and not damaged:
            return CacheResult(str(out), True, 0, 0.0, tuple(open_store(out).meta.layers))
        if state == "overwrite":
            clear_contents(out)  # keeps the lock file we hold
        if state != "complete":  # a new store's metadata, or what a killed creation left out
            if shard is not None:
                record_shard(out, shard)
            ensure_store(out, _store_attrs(cfg, lm, layers, packed),
                         {n: {"n_contexts": sizes[n], "corpus": specs[n].to_dict(),
                              "fingerprint": packed[n].fingerprint} for n in CORPORA})
        repaired = _before_writing(out, state, spec, _run_attrs(lm), packed, damaged, shard, lm.info)
        t1 = time.perf_counter()
        done = _run_forward(lm, out, packed, layers, cfg.dtype, progress, batch_contexts, shard, lock.check)
        missing = 0
        if shard is None:  # last, after every chunk is on disk
            zarr.open_group(store_like(out, read_only=False), mode="r+").attrs["complete"] = True
        else:
            missing = complete_if_done(out)
    t2 = time.perf_counter()
    return CacheResult(str(out), False, done, t2 - t0, layers, forward_seconds=t2 - t1,
                       repaired=repaired, missing=missing)


def _before_writing(out: StoreLocation, state: str, spec: dict[str, Any], now: dict[str, Any], packed,
                    damaged, shard: Shard | None, lm_info=None) -> tuple[str, ...]:
    """Refuse chunks that would be computed otherwise than those stored, clean the temp files of
    killed writes, clear the chunks to repair -> those cleared. A shard checks even a store it
    found new: another shard may have created it meanwhile, perhaps with other arguments; and it
    cleans only its own chunks' temp files, as the others may be writing theirs."""
    if shard is not None:
        _check_existing(out, spec, False, _SHARD_TODO)
        _check_resume(out, now, packed, lm_info)
        remove_own_partial_files(out, shard, global_chunks(open_store(out)))
        return ()
    if state not in {"resume", "complete"}:  # "complete" only when repairing
        return ()
    _check_resume(out, now, packed, lm_info)
    remove_partial_files(out)
    return tuple(clear_chunks(out, damaged)) if damaged else ()


def _load_inputs(cfg: CacheConfig, lm):
    """-> (model, layers, corpus specs, contexts per corpus, packed corpora)."""
    from .models import load_model  # heavy imports only when there is work to do

    specs = {"retain": resolve_corpus(cfg.retain, "retain", text_field=cfg.text_field),
             "unlearn": resolve_corpus(cfg.unlearn, "unlearn", text_field=cfg.text_field)}
    lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    n_layers = lm.info.n_layers
    layers = tuple(sorted(set(cfg.layers))) if cfg.layers else default_layers(n_layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise StoreError(f"layer {bad[0]} is out of range: model '{cfg.model}' has {n_layers} layers "
                         f"(0..{n_layers - 1})")
    sizes = {"retain": cfg.contexts, "unlearn": cfg.unlearn_contexts or cfg.contexts}
    packed = {name: pack(specs[name], lm.tokenizer, n_contexts=sizes[name], ctx_len=cfg.ctx_len) for name in CORPORA}
    return lm, layers, specs, sizes, packed


def _store_attrs(cfg: CacheConfig, lm, layers: tuple[int, ...], packed) -> dict[str, Any]:
    """The root attributes of a new store (README, "The store")."""
    d_model = lm.info.d_model
    return {
        "format_version": FORMAT_VERSION, "model": cfg.model, **_run_attrs(lm),
        "tokenizer_hash": lm.info.tokenizer_hash, "architecture": lm.info.architecture,
        "n_model_layers": lm.info.n_layers, "ctx_len": cfg.ctx_len, "layers": list(layers), "hook": HOOK,
        "d_model": d_model, "dtype": cfg.dtype,
        "chunk_contexts": cfg.chunk_contexts or chunk_contexts_for(cfg.ctx_len, d_model, cfg.dtype),
        "bos_token_id": int(packed["retain"].tokens[0, 0]), "pad_token_id": lm.tokenizer.pad_token_id,
        "ff_version": __version__, "spec": cfg.spec(),
    }


def _run_attrs(lm) -> dict[str, Any]:
    """How this run computes activations (RESUME_MUST_MATCH), and the vocabulary size that
    `ff verify` checks tokens against."""
    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    return {"model_hash": lm.info.weights_hash, "model_revision": getattr(config, "_commit_hash", None),
            "compute_dtype": str(lm.dtype).removeprefix("torch."),
            "device_kind": str(lm.device).split(":")[0], "vocab_size": int(vocab) if vocab else None}


def _check_resume(out: StoreLocation, now: dict[str, Any], packed, lm_info=None) -> None:
    """Refuse to add chunks computed otherwise than the stored ones, naming both values.
    `lm_info` (cache.models.ModelInfo) also recognises a model hash recorded by an older ff."""
    stored = dict(open_root(out).attrs)
    for key, (what, todo) in RESUME_MUST_MATCH.items():
        if key == "model_hash" and lm_info is not None and lm_info.matches(stored.get(key)):
            continue  # the same weights, recorded with the fingerprint of an older ff
        if key in stored and stored[key] != now[key]:
            raise StoreError(f"cannot resume store '{out}': it was written with {what} {stored[key]}, "
                             f"this run has {now[key]}; {todo.format(old=stored[key])}")
    store = open_store(out)
    for name in CORPORA:
        if store.corpus(name).attrs["fingerprint"] != packed[name].fingerprint:
            raise StoreError(f"the {name} corpus now tokenizes differently than in store '{out}'; use --overwrite")


def _run_forward(lm, out: StoreLocation, packed, layers, dtype: str, progress: bool, batch_contexts: int | None,
                 shard: Shard | None = None, still_ours=lambda: None) -> int:
    import torch
    from tqdm.auto import tqdm

    from .capture import forward_layers

    store = open_store(out)
    root = zarr.open_group(store_like(out, read_only=False), mode="r+")
    done_chunks = {name: store.corpus(name).completed_chunks() for name in CORPORA}
    todo = [(c.corpus, c.start, c.stop) for c in global_chunks(store)
            if not done_chunks[c.corpus][c.index] and (shard is None or shard.owns(c.k))]
    total = sum(stop - start for _, start, stop in todo) * store.meta.ctx_len
    writer = BackgroundWriter(root)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"ff cache {shard or ''}".strip(),
               disable=not progress, smoothing=0.1)
    done = 0
    try:
        for name, start, stop in todo:
            still_ours()  # an object store's lease lost: stop before writing another chunk
            toks = packed[name].tokens[start:stop]
            acts: dict[int, list[np.ndarray]] = {l: [] for l in layers}
            step = batch_contexts or (stop - start)  # one forward per chunk by default
            for s in range(0, stop - start, step):
                ids = torch.from_numpy(toks[s:s + step].astype(np.int64)).to(lm.device)
                got = forward_layers(lm.model, ids, torch.ones_like(ids), layers)
                for l in layers:
                    acts[l].append(to_storage(got[l].float().cpu(), dtype))
            writer.put(ChunkWrite(name, start, {l: np.concatenate(v) for l, v in acts.items()}, toks))
            n = (stop - start) * store.meta.ctx_len
            done += n
            bar.update(n)
            bar.set_postfix_str(name)
    finally:
        bar.close()
        writer.close()  # let queued chunks land even on Ctrl-C: less to redo on resume
    return done
