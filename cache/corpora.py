"""Corpora: resolve `--retain` / `--unlearn` specs, tokenize, and pack fixed-length contexts.

A spec is one of:
- `demo`: the bundled demo corpus for the role (general text for retain, biology for unlearn):
  written prose and WordNet-derived text, interleaved (`DEMO_MIX`, see demo_data/PROVENANCE.md);
  `demo:NAME` picks `cache/demo_data/NAME.txt` explicitly, and `demo:A+B+C` interleaves the
  named files one document at a time (A, B, C, A, B, C, ...; a file that runs out is skipped);
- a local file: `.txt` (one document per line), `.jsonl` (a text field), `.parquet` (a text column);
- a local folder of such files (read in sorted name order);
- a Hugging Face dataset id, `ID[:CONFIG][@SPLIT]`, e.g. `monology/pile-uncopyrighted@train`
  (streamed, so only the documents needed are read).

Packing (deterministic): documents are tokenized without special tokens, each followed by EOS,
concatenated, and cut into contexts of `ctx_len` tokens whose first token is BOS.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import CorpusError

DEMO_DIR = Path(__file__).parent / "demo_data"
_SUFFIXES = {".txt", ".jsonl", ".parquet"}
DEMO_MIX = {
    "unlearn": "prose_unlearn_a*2+prose_unlearn_b*2+unlearn",
    "retain": "prose_retain_a*2+prose_retain_b*2+retain",
}
"""What `demo` means per role: natural prose written for the project (topic features that
transfer beyond one template) interleaved with the WordNet-derived text (docs/method.md).
`NAME*k` joins k consecutive lines of NAME with a newline into one document, so that newlines
occur in both corpora alike: the files hold one paragraph per line, and a corpus without a
single newline leaves the SAE's features undefined on the newline of a question prompt."""


@dataclass(frozen=True)
class CorpusSpec:
    """A resolved corpus spec; `to_dict()` is what the store records and compares."""

    spec: str
    kind: str  # "demo" | "file" | "folder" | "hub"
    location: str  # path, or hub dataset id
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackedCorpus:
    spec: CorpusSpec
    tokens: np.ndarray  # int32 [n_contexts, ctx_len]
    fingerprint: str  # sha256 of the packed token ids
    n_available: int  # tokens read (may exceed what was packed)


def resolve_corpus(spec: str, role: str, *, text_field: str = "text") -> CorpusSpec:
    if spec == "demo" or spec.startswith("demo:"):
        parts = (DEMO_MIX.get(role, role) if spec == "demo" else spec.split(":", 1)[1]).split("+")
        located = []
        for part in parts:
            name, _, k = part.partition("*")
            path = DEMO_DIR / f"{name}.txt"
            if not path.is_file():
                have = sorted(p.stem for p in DEMO_DIR.glob("*.txt"))
                raise CorpusError(f"no bundled demo corpus '{name}' (available: {', '.join(have)})")
            if k and not (k.isdigit() and int(k) >= 1):
                raise CorpusError(f"demo corpus part '{part}': expected NAME or NAME*K with K >= 1")
            located.append(f"{path}*{k}" if k else str(path))
        return CorpusSpec(spec, "demo", "+".join(located), text_field=text_field)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix not in _SUFFIXES:
            raise CorpusError(f"corpus file '{spec}' has unsupported type '{p.suffix}' (use .txt, .jsonl, .parquet)")
        return CorpusSpec(spec, "file", str(p.resolve()), text_field=text_field)
    if p.is_dir():
        if not any(q.suffix in _SUFFIXES for q in p.iterdir()):
            raise CorpusError(f"corpus folder '{spec}' holds no .txt, .jsonl or .parquet files")
        return CorpusSpec(spec, "folder", str(p.resolve()), text_field=text_field)
    if spec.startswith((".", "/", "~")) or spec.endswith(tuple(_SUFFIXES)):
        raise CorpusError(f"corpus file '{spec}' does not exist")
    rest, _, split = spec.partition("@")
    ds_id, _, config = rest.partition(":")
    if not ds_id or ds_id.count("/") > 1:
        raise CorpusError(f"unknown corpus '{spec}': not a file, folder, 'demo', or a dataset id ID[:CONFIG][@SPLIT]")
    return CorpusSpec(spec, "hub", ds_id, config=config or None, split=split or "train", text_field=text_field)


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise CorpusError(f"{path}:{n}: not a JSON object with a '{text_field}' field") from e
                    if not isinstance(text, str):  # null or a number: the tokenizer would fail far away
                        raise CorpusError(f"{path}:{n}: the '{text_field}' field is "
                                          f"{json.dumps(text)[:40]}, not a string")
                    yield text
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(table.column_names)})")
            yield from (t for t in table.column(text_field).to_pylist() if t)
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read corpus file '{path}': {e.__class__.__name__}: {e}") from e


def _joined(path: Path, k: int, text_field: str) -> Iterator[str]:
    """Documents of k consecutive lines joined by newlines (the last one may be shorter)."""
    it = _read_file(path, text_field)
    while group := [doc for _, doc in zip(range(k), it)]:
        yield "\n".join(group)


def _interleave(parts: list[str], text_field: str) -> Iterator[str]:
    """One document from each part (`PATH` or `PATH*K`) in turn; a part that runs out drops out."""
    its = []
    for part in parts:
        path, _, k = part.partition("*")
        its.append(_joined(Path(path), int(k), text_field) if k else _read_file(Path(path), text_field))
    while its:
        alive = []
        for it in its:
            doc = next(it, None)
            if doc is not None:
                alive.append(it)
                yield doc
        its = alive


def iter_documents(cs: CorpusSpec) -> Iterator[str]:
    if cs.kind == "demo":
        yield from _interleave(cs.location.split("+"), cs.text_field)
    elif cs.kind == "file":
        yield from _read_file(Path(cs.location), cs.text_field)
    elif cs.kind == "folder":
        for p in sorted(Path(cs.location).iterdir()):
            if p.suffix in _SUFFIXES:
                yield from _read_file(p, cs.text_field)
    else:
        yield from _iter_hub(cs)


def _iter_hub(cs: CorpusSpec) -> Iterator[str]:
    try:
        import datasets

        ds = datasets.load_dataset(cs.location, cs.config, split=cs.split, streaming=True)
        for row in ds:
            text = row.get(cs.text_field)
            if text is None:
                raise CorpusError(f"dataset '{cs.location}' has no field '{cs.text_field}' (fields: {', '.join(row)})")
            if text:
                yield text
    except CorpusError:
        raise
    except Exception as e:  # datasets raises many types (offline, not found, gated, bad config)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorpusError(f"cannot load dataset '{cs.spec}': {first}") from e


def pack(cs: CorpusSpec, tokenizer: Any, *, n_contexts: int, ctx_len: int, batch_docs: int = 256) -> PackedCorpus:
    """Tokenize documents in order and pack them into `n_contexts` BOS-prefixed contexts."""
    if ctx_len < 2:
        raise CorpusError(f"ctx_len must be at least 2, got {ctx_len}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    body = ctx_len - 1
    need = n_contexts * body
    stream = np.empty(need, dtype=np.int32)
    have = 0

    def flush(docs: list[str]) -> None:
        nonlocal have
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            if eos is not None:
                ids = ids + [eos]
            take = min(len(ids), need - have)
            stream[have:have + take] = ids[:take]
            have += take
            if have >= need:
                return

    docs: list[str] = []
    for doc in iter_documents(cs):
        docs.append(doc)
        if len(docs) == batch_docs:
            flush(docs)
            docs = []
            if have >= need:
                break
    if docs and have < need:
        flush(docs)
    if have < need:
        raise CorpusError(
            f"corpus '{cs.spec}' has {have} tokens; {n_contexts} contexts of {ctx_len} need {need} "
            f"(at most {have // body} contexts fit)"
        )
    tokens = np.empty((n_contexts, ctx_len), dtype=np.int32)
    tokens[:, 0] = bos
    tokens[:, 1:] = stream.reshape(n_contexts, body)
    h = hashlib.sha256(f"{tokens.shape}".encode())  # the token ids alone: stable across machines
    h.update(tokens.tobytes())
    return PackedCorpus(cs, tokens, "sha256:" + h.hexdigest(), have)
