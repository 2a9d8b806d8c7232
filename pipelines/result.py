"""The evaluation result, typed: what `ff eval` writes to RUN/unlearning.json and `--json` prints.

    from pipelines.result import EvalResult
    res = EvalResult.load("runs/ff_l8/unlearning.json")
    res.best.test.unlearning_score, res.best.test.ci95, res.best.formats["kshot2"].test
    res.best_by_gate["probe"].best.gate.threshold, res.sweep[0].label

Every object here is a frozen dataclass read from the JSON by its field annotations
(`from_dict`) and written back by `to_dict`, which returns the same JSON it was read from, key
order included: a key the file did not have stays absent (a sweep entry has no test half, a
static setting no gate; `has` tells), and readers see None for it. `EvalResult.format`
versions the layout; a file from a newer ff is refused in one line, and a file without the
field (written before it existed, same layout) reads as format 1. The schema, field by field,
is docs/architecture.md "The evaluation result".

pipelines/evaluate.py and pipelines/artifact.py build results from these records (`build`,
`updated`); everything that reads a result (the report, the CLI, export, generation's choice of
setting, and pipelines/scoring.py's rules that choose a setting) reads their fields.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import EvalError

RESULT_FORMAT = 1
"""The layout of unlearning.json that this version writes and reads."""


class _Record:
    """from_dict / to_dict by field annotation, keeping the source's keys and their order."""

    source_keys: tuple[str, ...] | None
    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = _data_fields(cls)
        kw = {n: _parse(hints[n], d[n]) for n in names if n in d}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**kw, source_keys=tuple(d), extra=extra)

    @classmethod
    def build(cls, **fields: Any) -> Any:
        """A record with the fields given, written by `to_dict` in this order; the others stay
        absent from the JSON (None to readers)."""
        return cls(**fields, source_keys=tuple(fields))

    def updated(self, **changes: Any) -> Any:
        """A copy with `changes`: a field the JSON had keeps its place, a new one comes last."""
        keys = self.source_keys if self.source_keys is not None else _data_fields(type(self))
        return dataclasses.replace(self, **changes, source_keys=(*keys, *(k for k in changes if k not in keys)))

    def has(self, name: str) -> bool:
        """Whether the key is in the JSON (a None field may be an explicit null or absent)."""
        return self.source_keys is None or name in self.source_keys

    def to_dict(self) -> dict[str, Any]:
        names = _data_fields(type(self))
        keys = names if self.source_keys is None else self.source_keys
        out = {k: _dump(getattr(self, k)) if k in names else self.extra[k] for k in keys}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


def _data_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("source_keys", "extra"))


def _parse(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _parse(next(a for a in args if a is not type(None)), v)
    if isinstance(tp, type) and issubclass(tp, _Record):
        return tp.from_dict(v)
    if origin is dict and args and isinstance(v, dict):
        return {k: _parse(args[1], x) for k, x in v.items()}
    if origin is list and args and isinstance(v, list):
        return [_parse(args[0], x) for x in v]
    return v


def _dump(v: Any) -> Any:
    if isinstance(v, _Record):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dump(x) for x in v]
    return v


def _record(cls: type) -> type:
    """A frozen dataclass whose fields all default to None, plus where it was read from
    (`source_keys`, not compared) and the keys this version does not know (`extra`)."""
    own = dict(cls.__dict__.get("__annotations__", {}))
    cls.__annotations__ = {**own, "source_keys": "tuple[str, ...] | None", "extra": "dict[str, Any]"}
    for name in own:
        if name not in cls.__dict__:
            setattr(cls, name, None)
    cls.source_keys = field(default=None, repr=False, compare=False)
    cls.extra = field(default_factory=dict, repr=False, compare=False)
    return dataclass(frozen=True)(cls)


@_record
class Pair(_Record):
    """A measurement on the clean model and with the edit."""
    before: float | None
    after: float | None


@_record
class Answers(_Record):
    """Per-question correctness as strings of 0/1 in file order (pipelines/scoring.py `bits`)."""
    before: str
    after: str


@_record
class Half(_Record):
    """One half (dev or test) of a question set (pipelines/scoring.py `half`)."""
    questions: int
    forget_mcq: Pair
    retain_mcq: Pair
    unlearning_score: float | None
    """1 - forget accuracy after / before."""
    correct_subset_score: float | None
    """The score on the questions the clean model answers correctly (SAEBench's protocol)."""
    ci95: list[float] | None
    """The score's 95% bootstrap interval over questions (test halves of chosen settings)."""
    forget_correct: Answers | None
    """Each forget question's correctness, for paired comparisons (where ci95 is)."""


@_record
class Halves(_Record):
    """A prompt format's dev and test halves."""
    dev: Half
    test: Half


@_record
class MinScores(_Record):
    """The unlearning score's minimum over prompt formats, per half."""
    dev: float | None
    test: float | None


@_record
class LostItem(_Record):
    index: int
    half: str
    item: str | None
    gate_margin: float | None
    """How far the gate's peak rose above its threshold on the question; None without a gate."""


@_record
class Lost(_Record):
    """The retain questions an edit turned from right to wrong: how many, and the first few."""
    count: int
    items: list[LostItem]


@_record
class OpenedRow(_Record):
    """A held-out retain passage the gate opened on."""
    row: int
    item: str | None
    gate_margin: float


@_record
class Example(_Record):
    prompt: str
    clean: str
    edited: str


@_record
class Fluency(_Record):
    """Greedy continuations of prose prompts under the edit (pipelines/fluency.py)."""
    nll: float
    """The clean model's mean NLL (nats/token) of the edited continuations."""
    nll_clean: float
    """The same of its own continuations."""
    distinct: float
    """Mean over prompts of the edited continuation's distinct-bigram ratio (repetition lowers it)."""
    distinct_clean: float
    changed: float
    """Share of prompts whose continuation the edit changed in any token."""
    n_prompts: int | None
    n_new: int | None
    examples: list[Example] | None


@_record
class SplitSide(_Record):
    questions: int
    before: float
    after: float


@_record
class Split(_Record):
    """The forget test questions on which the gate opened or stayed shut (pipelines/scoring.py
    `gate_split`), and the score's ceiling under that gate."""
    opened: SplitSide
    shut: SplitSide
    ceiling: float | None


@_record
class Detection(_Record):
    """Topic detection: AUROC of forget against retain rows, text and questions, in and out of
    distribution (the gate's signal, or the selected features' firing share)."""
    n_features: int | None
    auroc_text: float | None
    auroc_mcq: float | None
    auroc_text_ood: float | None
    auroc_mcq_ood: float | None

    def pair(self, ood: bool = False) -> tuple[float | None, float | None]:
        """(text AUROC, MCQ AUROC), in or out of distribution."""
        return (self.auroc_text_ood, self.auroc_mcq_ood) if ood else (self.auroc_text, self.auroc_mcq)


@_record
class Gate(_Record):
    """A chosen setting's gate: its threshold, how often it opens, and how well it detects."""
    mode: str
    percentile: float | None
    threshold: float | None
    open_rate_retain: float | None
    open_rate_forget: float | None
    open_rate_ood_retain: float | None
    open_rate_ood_forget: float | None
    open_rate_questions: dict[str, float]
    forget_split: Split | None
    detection: Detection | None


@_record
class Part(_Record):
    """An entry's out-of-distribution side (`Entry.ood`): the same fields as the entry's own."""
    forget_mcq: Pair
    retain_mcq: Pair
    forget_loss: Pair | None
    retain_loss: Pair | None
    dev: Half | None
    test: Half | None
    retain_lost: Lost | None
    retain_text_opened: list[OpenedRow] | None
    formats: dict[str, Halves] | None
    """Every prompt format besides plain (pipelines/formats.py): its halves."""
    formats_min: MinScores | None
    fluency: dict[str, Fluency] | None
    """Per prose set ("forget" in a sweep entry; "forget_text", "ood_retain_text", ... chosen)."""
    unlearning_score: float | None
    """The test half's score for a chosen entry, the whole file's for a sweep entry and for a
    model folder's sides (`ff eval --model`)."""

    def by_format(self) -> list[tuple[str, Halves]]:
        """("plain", this part's own halves), then every other format's."""
        own = Halves(dev=self.dev, test=self.test)
        return [("plain", own), *(self.formats or {}).items()]


@_record
class Entry(Part):
    """One setting of the sweep, or a chosen one measured in full (test intervals, gate, fluency);
    its in-distribution measurements are the fields of `Part`."""
    setting: dict[str, Any]
    """pipelines.config.Setting.to_dict()."""
    label: str
    n_features: int
    ood: Part | None
    rows_rerun: int | None
    seconds: float | None
    gate: Gate | None
    selection: Detection | None

    @property
    def gate_mode(self) -> str:
        """The setting's gate: "none" (static), "sequence" or "probe"."""
        return self.setting.get("gate", "none")


@_record
class Choice(_Record):
    """The chosen setting under one gate, or None with the reason."""
    best: Entry | None
    reason: str | None


@_record
class SaeQuality(_Record):
    fvu: float
    mse: float
    l0: float
    tokens: int
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    loss_recovered: float | None


@_record
class EvalResult(_Record):
    """`ff eval --run`: one run folder's evaluation (RUN/unlearning.json)."""
    format: int
    run: str
    layer: int
    method: str
    model: str
    best: Entry | None
    """The setting chosen on the in-distribution dev halves."""
    best_reason: str | None
    best_ood: Entry | None
    """The setting chosen on the out-of-distribution dev halves."""
    best_ood_reason: str | None
    best_by_gate: dict[str, Choice]
    clean: dict[str, float]
    sweep: list[Entry]
    selection: dict[str, Detection]
    sae: SaeQuality
    data: dict[str, int]
    """Questions or rows per evaluated set."""
    config: dict[str, Any]
    """pipelines.config.EvalConfig.to_dict()."""
    seconds: float
    cpu_seconds: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        version = d.get("format", 1) if isinstance(d, dict) else None
        if isinstance(version, int) and version > RESULT_FORMAT:
            raise EvalError(f"the evaluation result has format {version}, newer than this ff reads "
                            f"({RESULT_FORMAT}): upgrade ff, or rerun ff eval")
        return super().from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read RUN/unlearning.json; anything but an ff eval result is an EvalError in one line."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise EvalError(f"{path} is not an ff eval result ({type(e).__name__}: {e}); rerun ff eval "
                            "--save, or delete it") from None

    def retain_bounds(self) -> tuple[float, float]:
        """The bounds the settings were chosen under: (retain MCQ ratio of clean, retain CE rise)."""
        cfg = self.config or {}
        return cfg.get("retain_ratio", 0.99), cfg.get("max_retain_ce_rise", 0.01)

    def chosen(self, gate: str) -> Entry | None:
        """The setting chosen under `gate` ("none", "sequence", "probe"), or None."""
        choice = (self.best_by_gate or {}).get(gate)
        return choice.best if choice else None


@_record
class ModelEvalResult(_Record):
    """`ff eval --model`: a model folder as it is, against its base model."""
    model: str
    base: str
    best: Entry
    config: dict[str, Any]
    seconds: float
