"""`ff inspect`: a description of a store, as a dict (for --json) or as text."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .location import public
from .store import _NUMPY_DTYPE, disk_usage, layer_name, open_store


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(path: str | Path) -> dict[str, Any]:
    store = open_store(path)
    m = store.meta
    itemsize = np.dtype(_NUMPY_DTYPE[m.dtype]).itemsize
    corpora, act_disk, act_raw = {}, 0, 0
    for name in store.corpora:
        c = store.corpus(name)
        done = c.completed_chunks()
        raw = c.n_contexts * m.ctx_len * m.d_model * itemsize * len(m.layers)
        disk = sum(disk_usage(path, f"{name}/{layer_name(l)}") for l in m.layers)
        act_raw, act_disk = act_raw + raw, act_disk + disk
        corpora[name] = {
            "spec": c.attrs.get("corpus", {}).get("spec"),
            "contexts": c.n_contexts,
            "tokens": c.n_contexts * m.ctx_len,
            "training_tokens": c.n_contexts * (m.ctx_len - 1),
            "chunks_done": int(done.sum()),
            "chunks": int(c.n_chunks),
            "fingerprint": c.attrs.get("fingerprint"),
        }
    return {
        "path": public(path),
        "complete": m.complete,
        "model": m.model,
        "model_hash": m.model_hash,
        "tokenizer_hash": m.tokenizer_hash,
        "architecture": m.extra.get("architecture"),
        "layers": list(m.layers),
        "hook": m.hook,
        "d_model": m.d_model,
        "ctx_len": m.ctx_len,
        "dtype": m.dtype,
        "chunk_contexts": m.chunk_contexts,
        "corpora": corpora,
        "size_on_disk": disk_usage(path),
        "activation_bytes_uncompressed": act_raw,
        "compression_ratio": round(act_raw / act_disk, 3) if act_disk else None,
        "format_version": m.format_version,
        "ff_version": m.ff_version,
    }


def format_description(d: dict[str, Any]) -> str:
    lines = [
        f"store        {d['path']}",
        f"status       {'complete' if d['complete'] else 'INCOMPLETE (rerun the same ff cache command to resume)'}",
        f"model        {d['model']} ({d['architecture']}, {d['model_hash'][:23]}...)",
        f"layers       {', '.join(map(str, d['layers']))} ({d['hook']}), d_model {d['d_model']}",
        f"contexts     {d['ctx_len']} tokens each, {d['chunk_contexts']} per chunk",
        f"dtype        {d['dtype']}",
    ]
    for name, c in d["corpora"].items():
        lines.append(f"{name:<12} {c['contexts']:,} contexts, {c['tokens']:,} tokens, "
                     f"chunks {c['chunks_done']}/{c['chunks']}  [{c['spec']}]")
    ratio = f"{d['compression_ratio']:.2f}x" if d["compression_ratio"] else "n/a"
    lines.append(f"size         {_fmt_bytes(d['size_on_disk'])} on disk, "
                 f"activations {_fmt_bytes(d['activation_bytes_uncompressed'])} raw, compression {ratio}")
    return "\n".join(lines)
