"""Configuration of the pipelines stage (METHOD §7, §8): frozen value objects, no torch.

A `Setting` says how to edit the residual stream at the run's layer; a `SweepGrid` expands into
the list of settings that `ff eval` tries for one run; `EvalConfig` holds every knob of
`ff eval`, with two presets ("full", "demo"). All round-trip through `to_dict` / `from_dict`,
so that a result file names the exact setting and data it measured.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pipelines.errors import EvalError

MODES = ("ablate", "clamp", "splice", "zero")
SELECTIONS = ("candidates", "saebench")


@dataclass(frozen=True)
class Setting:
    mode: str = "clamp"
    """"ablate": selected features -> 0; "clamp": selected active features -> -multiplier
    (SAEBench, Farrell et al. 2024); "splice": h -> full SAE reconstruction (no feature edit);
    "zero": h -> 0. The last two are CE-loss references (METHOD §8), not unlearning settings."""

    multiplier: float = 50.0
    """Clamp value m: active selected features are set to -m (mode "clamp" only)."""

    top_n: int | None = None
    """Keep the top n selected features (candidates ranked by alpha_u / alpha_r, SAEBench
    features by freq_u); None keeps every candidate (with "saebench" selection None means 20)."""

    selection: str = "candidates"
    """"candidates": the run's FeatureForget candidate set U (METHOD §4); "saebench": features
    whose retain firing frequency is below `freq_threshold`, ranked by unlearn frequency."""

    freq_threshold: float = 0.01
    """Retain firing-frequency threshold of the "saebench" selection (SAEBench: 0.001, 0.01)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EvalError(f"unknown intervention mode '{self.mode}': use {', '.join(MODES)}")
        if self.selection not in SELECTIONS:
            raise EvalError(f"unknown feature selection '{self.selection}': use {', '.join(SELECTIONS)}")
        if self.top_n is not None and self.top_n < 1:
            raise EvalError(f"top_n must be a positive number of features or None, got {self.top_n}")
        if self.mode == "clamp" and not self.multiplier > 0:
            raise EvalError(f"the clamp multiplier must be positive, got {self.multiplier}")

    @property
    def edits_features(self) -> bool:
        """True for the unlearning modes, which act on a selected feature set."""
        return self.mode in ("ablate", "clamp")

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. "clamp m=50 top20 candidates"."""
        if not self.edits_features:
            return self.mode
        head = f"clamp m={self.multiplier:g}" if self.mode == "clamp" else "ablate"
        n = "all" if self.top_n is None and self.selection == "candidates" else f"top{self.top_n or 20}"
        sel = "candidates" if self.selection == "candidates" else f"saebench freq_r<{self.freq_threshold:g}"
        return f"{head} {n} {sel}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.mode != "clamp":
            d.pop("multiplier")
        if self.selection != "saebench":
            d.pop("freq_threshold")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Setting":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # load leniently (STYLE 3)

    def replace(self, **changes: Any) -> "Setting":
        return replace(self, **changes)


@dataclass(frozen=True)
class SweepGrid:
    multipliers: tuple[float, ...] = (2.0, 5.0, 10.0, 25.0, 50.0)
    """Clamp multipliers m to try. SAEBench uses 25-200 on SAEs of raw Gemma-2 activations;
    ours work on activations normalised to E||x s||^2 = d_model (||x s|| ~ sqrt(d), 25 on
    Gemma 3 270M), where m = 25 already moves h by about its own norm, so the grid starts lower."""

    ablate: bool = True
    """Also try plain ablation (t = 0) at every feature count."""

    top_n: tuple[int | None, ...] = (10, 20, None)
    """Feature counts; None = all FeatureForget candidates (skipped for baseline runs, whose
    SAEBench selection has no natural "all")."""

    freq_thresholds: tuple[float, ...] = (0.001, 0.01)
    """Retain-frequency thresholds of the SAEBench selection (baseline runs; SAEBench values)."""

    def settings(self, method: str) -> list[Setting]:
        """Every setting to evaluate for a run of `method` ("featureforget" | "baseline")."""
        modes = [Setting(mode="clamp", multiplier=float(m)) for m in self.multipliers]
        if self.ablate:
            modes.append(Setting(mode="ablate"))
        out: list[Setting] = []
        if method == "baseline":
            for thr in self.freq_thresholds:
                for n in (n for n in self.top_n if n is not None):
                    out += [s.replace(selection="saebench", freq_threshold=float(thr), top_n=n) for s in modes]
        else:
            for n in self.top_n:
                out += [s.replace(top_n=n) for s in modes]
        if not out:
            raise EvalError(f"the sweep grid gives no settings for a {method} run")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepGrid":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


DEMO_GRID = SweepGrid(multipliers=(2.0, 5.0, 10.0), ablate=True, top_n=(10, 20), freq_thresholds=(0.01,))
"""A small grid for `ff run --preset demo` on CPU: ablation and three clamp values, top 10 / 20."""

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "demo": {"max_questions": 50, "max_text_tokens": 1024, "grid": DEMO_GRID, "sweep_losses": False},
}
"""EvalConfig overrides per preset ("full" = the dataclass defaults)."""


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of `ff eval` (METHOD §8), defaults in one place; the CLI overlays its flags."""

    forget_mcq: str = "demo"
    """Unlearn-domain questions: "demo", a JSONL file, or a dataset id like "cais/wmdp:wmdp-bio"."""

    retain_mcq: str = "demo"
    """Retain-domain questions: "demo", a JSONL file, or e.g. "cais/mmlu:high_school_us_history"."""

    forget_text: str = "demo"
    """Held-out unlearn-domain text (any `cache.corpora` spec; "demo" = unlearn_heldout.txt)."""

    retain_text: str = "demo"
    """Held-out retain-domain text ("demo" = retain_heldout.txt); also used for loss recovered."""

    max_questions: int | None = 100
    """Use the first N questions of each MCQ source (None: all)."""

    max_text_tokens: int = 4096
    """Tokens of held-out text per text source (packed into contexts of ctx_len)."""

    ctx_len: int = 128
    """Context length of the held-out text contexts (BOS included; the training ctx_len)."""

    mcq_template: str = "Question: {question}\nAnswer:"
    """MCQ prompt; each choice is scored as the continuation " " + choice (the demo data's format)."""

    grid: SweepGrid = field(default_factory=SweepGrid)
    """Settings tried per run (METHOD §8 sweep)."""

    retain_ratio: float = 0.99
    """A setting qualifies for "best" if retain MCQ accuracy after >= retain_ratio * before."""

    sweep_losses: bool = True
    """Measure CE loss on held-out text for every setting of the sweep. False: only for the
    best setting (sweep entries then have "after": null), which saves most of the sweep's cost
    on CPU, where the LM head (d_model x vocab) dominates every scored text token."""

    max_batch_tokens: int = 2048
    """Padded tokens per MCQ forward batch (memory / speed trade-off)."""

    text_batch_contexts: int = 16
    """Text contexts per forward batch."""

    @classmethod
    def preset(cls, name: str) -> "EvalConfig":
        if name not in PRESETS:
            raise EvalError(f"unknown eval preset '{name}': use {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def data_key(self) -> tuple:
        """The fields that decide the evaluation data (and so the cached clean passes)."""
        return (self.forget_mcq, self.retain_mcq, self.forget_text, self.retain_text, self.max_questions,
                self.max_text_tokens, self.ctx_len, self.mcq_template, self.max_batch_tokens,
                self.text_batch_contexts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = self.grid.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if isinstance(kw.get("grid"), dict):
            kw["grid"] = SweepGrid.from_dict(kw["grid"])
        return cls(**kw)

    def replace(self, **changes: Any) -> "EvalConfig":
        return replace(self, **changes)
