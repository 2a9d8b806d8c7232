"""`CacheConfig`: the arguments of `ff cache`, one frozen dataclass (no heavy imports, so that the
command line is generated from it cheaply: cache/options.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import StoreError

STORE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class CacheConfig:
    """Arguments of `ff cache`; `spec()` is what a store records and a rerun must match."""

    model: str = "gemma-3-270m"
    """Hugging Face id (google/gemma-2-2b is the paper's), local HF folder, .gguf file, or the
    embedded 'gemma-3-270m'."""
    layers: tuple[int, ...] | None = field(default=None, metadata={"aliases": {"auto": None}})
    """Decoder blocks to capture (output of block l = HF hidden_states[l+1]); none: the paper's
    5,12,19 of 26 scaled to the model's depth (3,8,13 on Gemma 3 270M)."""
    retain: str = "demo"
    """Retain corpus: 'demo' (bundled), a .txt/.jsonl/.parquet file, a folder of them, or a dataset
    id ID[:CONFIG][@SPLIT] such as monology/pile-uncopyrighted (cache.corpora)."""
    unlearn: str = "demo"
    """Unlearn corpus, same forms as `retain` ('demo' is the bundled biology corpus; the paper uses
    the WMDP-bio corpus)."""
    contexts: int = 2048
    """Retain contexts to cache (paper: 2048)."""
    unlearn_contexts: int | None = None
    """Unlearn contexts; None: same as `contexts`."""
    ctx_len: int = 128
    """Tokens per context, BOS included (paper: 128)."""
    dtype: str = "bfloat16"
    """Storage dtype: bfloat16 (uint16 bit patterns), float16 or float32."""
    chunk_contexts: int | None = None
    """Contexts per stored chunk; None: whole contexts filling about 4 MiB."""
    text_field: str = "text"
    """Field holding the text in .jsonl / .parquet / hub datasets."""
    model_dtype: str | None = field(default=None, metadata={"aliases": {"auto": None}})
    """Compute dtype; none (auto): float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def __post_init__(self) -> None:
        small = [f"{k}={getattr(self, k)}" for k, least in (("contexts", 1), ("unlearn_contexts", 1), ("ctx_len", 2),
                                                             ("chunk_contexts", 1))
                 if getattr(self, k) is not None and getattr(self, k) < least]
        if small:
            raise StoreError(f"too small: {', '.join(small)} (contexts and chunk_contexts >= 1, ctx_len >= 2)")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise StoreError(f"layers must be non-negative block numbers, got {self.layers}")
        if self.dtype not in STORE_DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got '{self.dtype}'")
        if self.model_dtype not in (None, *STORE_DTYPES):
            raise StoreError(f"model_dtype must be none (auto) or one of {', '.join(STORE_DTYPES)}, "
                             f"got '{self.model_dtype}'")

    def replace(self, **changes: Any) -> "CacheConfig":
        return replace(self, **changes)

    def spec(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("model_dtype", "device"):  # how it ran, not what it made
            d.pop(k)
        d["layers"] = list(self.layers) if self.layers is not None else "auto"
        d["unlearn_contexts"] = self.unlearn_contexts or self.contexts
        return d
