"""The run folder (docs/architecture.md): creation, resume checks, atomic writes, metrics log.

```
RUN/config.json           TrainConfig + store metadata (model, model_hash, layer, d_model,
                          scale, method)
RUN/sae.safetensors       written by SAE.save
RUN/features.safetensors  {freq,mean,mean_sq,act,alpha}_{r,u} over every training token, cluster,
                          candidate, eval_mass_r/u (held-out mass per feature); FeatureForget runs also
                          train_{alpha,freq}_{r,u}, the running means the candidate rule used
RUN/gate.safetensors      per selection: its features and each retain training context's
                          firing share (the sequence gate's calibration, trainer/gate/calibrate.py);
                          probe/{w,b,max}: the probe gate's detector (trainer/gate/detector.py)
RUN/clusters.json         tau, gate_r, gate_u per cluster
RUN/metrics.jsonl         one JSON object per logged step
RUN/eval.json             held-out metrics; written last, so its presence marks a finished run
RUN/checkpoints/last.pt   resumable state (atomic: temp file, then rename)
```
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from cache.atomic import atomic_write
from trainer.config import TrainConfig
from trainer.errors import TrainError

RESUME_MAY_CHANGE = ("steps", "lr", "log_every", "checkpoint_every", "device")
"""The options that may differ between a run and its resumption; a resume refuses any other
change, naming it. `steps` extends a run, even a finished one (it may only grow; the phase-1
boundary stays where it was, so the extra steps are phase-2 steps, and the cosine schedule
stretches over the new total); `lr` lets a run stopped by a non-finite loss go on from its last
checkpoint with a lower one (the gates keep their lr's ratio to it, as in the checkpoint's
optimiser); the rest is bookkeeping. config.json records the options in effect and, under
`resumed_with`, each resume's changes."""
STORE_KEYS = ("model_hash", "layer", "d_model", "ctx_len")
"""Store metadata that must match when a run is resumed."""

RUN_FORMAT = 1
"""The version of config.json ff writes (its "format" key); files without one are version 1."""


@dataclass(frozen=True)
class RunConfig:
    """RUN/config.json, typed: the training configuration and what the run was trained on. On
    disk it is one flat JSON object (TrainConfig's fields, then these), read only through
    `RunFolder.run_config`; a file from a newer ff is refused in one line."""

    train: TrainConfig
    d_model: int
    """Width of the residual stream the SAE reads."""
    d_sae: int
    """Number of SAE features."""
    scale: float
    """Activations are multiplied by this before the SAE (METHOD §0)."""
    layer: int | None = None
    """The block whose output the SAE reads (None only for runs trained from streams in Python)."""
    model: str | None = None
    """The model spec the store was cached from."""
    model_hash: str | None = None
    """Its weights' hash: an evaluation refuses another model."""
    tokenizer_hash: str | None = None
    ctx_len: int | None = None
    hook: str | None = None
    dtype: str | None = None
    store: str | None = None
    unlearn_store: str | None = None
    retain_contexts: tuple[int, ...] | None = None
    """(training, held-out) contexts of the retain corpus."""
    unlearn_contexts: tuple[int, ...] | None = None
    resumed_with: tuple[dict[str, Any], ...] = ()
    """Each resume's changed options: {field: [before, after]}."""
    format: int = RUN_FORMAT

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> "RunConfig":
        version = d.get("format", 1)
        if not isinstance(version, int) or version > RUN_FORMAT:
            raise TrainError(f"{where} has format {version!r}, newer than this ff reads ({RUN_FORMAT}): "
                             "update ff (pip install -U featureforget)")
        missing = [k for k in ("d_model", "scale") if k not in d]
        if missing:
            raise TrainError(f"{where} lacks {', '.join(missing)}: not a run's config (run `ff verify` on it)")
        train = TrainConfig.from_dict(d)
        meta = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("train", "format")}
        for k in ("retain_contexts", "unlearn_contexts", "resumed_with"):
            if isinstance(meta.get(k), list):
                meta[k] = tuple(meta[k])
        meta.setdefault("d_sae", train.expansion * int(d["d_model"]))
        return cls(train=train, format=version, **meta)

    def to_dict(self) -> dict[str, Any]:
        d = {**self.train.to_dict(), **{f.name: getattr(self, f.name) for f in fields(self)
                                        if f.name not in ("train", "resumed_with")}}
        if self.resumed_with:
            d["resumed_with"] = list(self.resumed_with)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class RunFolder:
    """A run folder's files, named here only: every module reads and writes them through this."""

    FILES = ("config", "sae", "features", "clusters", "metrics", "eval")
    """The files every finished run has (`gate` and `result` come with newer runs and ff eval)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.sae = self.path / "sae.safetensors"
        self.features = self.path / "features.safetensors"
        self.gate = self.path / "gate.safetensors"
        self.clusters = self.path / "clusters.json"
        self.metrics = self.path / "metrics.jsonl"
        self.eval = self.path / "eval.json"
        """Held-out metrics; written last, so its presence marks a finished run."""
        self.checkpoints = self.path / "checkpoints"
        self.checkpoint = self.checkpoints / "last.pt"
        self.result = self.path / "unlearning.json"
        """`ff eval --save` / `ff run`: the evaluation, whose chosen setting ff generate, ff export,
        ff bake and the Python API apply by default (pipelines/intervene.py)."""

    def is_run(self) -> bool:
        """Whether the folder has a config.json (a run, finished or not)."""
        return self.config.is_file()

    def is_finished(self) -> bool:
        return self.eval.is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def run_config(self) -> RunConfig:
        """config.json as a RunConfig (TrainError in one line if it cannot be read)."""
        return RunConfig.from_dict(self.read_config(), str(self.config))

    def read_config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.config.read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes
            raise TrainError(f"cannot read {self.config} ({_first_line(e)}); run `ff verify "
                             f"{self.path}`, or start again with --overwrite") from e
        if not isinstance(config, dict):
            raise TrainError(f"{self.config} is not a JSON object; run `ff verify {self.path}`, "
                             "or start again with --overwrite")
        return config


def write_json(path: Path, obj: Any) -> None:
    """Crash-safe JSON write (cache/atomic.py)."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save of a state made of tensors, dicts, lists, tuples, numbers, strings and
    None only, so that `load_checkpoint` can load it with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialised first, so that a full disk is an OSError naming the file
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())  # a kill mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> dict[str, Any]:
    """weights_only=True: a checkpoint is data, and loading one must not run code (a run folder
    may come from someone else). A file that fails to load is a one-line TrainError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"cannot load checkpoint {path}: {_first_line(e)}; run `ff verify "
                         f"{path.parent.parent}`, or start again with --overwrite") from e


def _first_line(e: BaseException, limit: int = 100) -> str:
    """The first sentence of an error's message, for a one-line error of our own."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit] + "..."


def open_run(out: str | Path, cfg: TrainConfig | None, meta: dict[str, Any], *, resume: bool,
             overwrite: bool, scale: Callable[[], float] | None = None,
             ) -> tuple[RunFolder, TrainConfig, dict[str, Any]]:
    """Create RUN (fresh), or reopen it (resume) -> (folder, config, metadata).

    Fresh: RUN must be missing or empty, or `overwrite` (which deletes an earlier run folder,
    never a folder that is not one). Resume: the saved config wins; a `cfg` passed along
    must agree with it, except for RESUME_MAY_CHANGE, whose new values are written to
    config.json (more steps reopen a finished run). `scale()` computes the normalisation
    scale of a fresh run (a resumed run keeps its saved one).
    """
    run = RunFolder(out)
    if run.path.exists() and not run.path.is_dir():
        raise TrainError(f"{run.path} is a file, not a run folder")
    exists = run.path.exists() and any(run.path.iterdir())
    if resume and run.config.is_file():
        saved = run.read_config()
        then, cfg = TrainConfig.from_dict(saved), _check_resume(run, cfg, saved, meta)
        if run.eval.is_file() and cfg.steps == then.steps:  # the loop only reads its files back
            _check_finished(run, then, cfg)
            return run, cfg, saved
        if run.eval.is_file():  # a finished run extended: it goes on from its final checkpoint
            if not run.checkpoint.is_file():
                raise TrainError(f"cannot extend {run.path}: its final checkpoint "
                                 f"{run.checkpoint} is missing; train a new run with more steps")
            run.eval.unlink()  # no longer finished; its other files are rewritten at the new end
        return run, cfg, _record_changes(run, saved, cfg)
    if cfg is None:
        raise TrainError(f"nothing to resume in {run.path} (no config.json); start a new run")
    if exists:
        if resume:
            raise TrainError(f"cannot resume {run.path}: it has no config.json (not a run folder)")
        if not overwrite:
            raise TrainError(f"run folder {run.path} exists; pass --resume to continue it "
                             "or --overwrite to start again")
        if not (run.config.is_file() or run.checkpoints.is_dir()):
            raise TrainError(f"{run.path} is not empty and not a run folder; refusing to delete it")
        shutil.rmtree(run.path)
    if scale is not None:
        meta = {**meta, "scale": scale()}
    meta = {**meta, "d_sae": cfg.expansion * meta["d_model"]}
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(run.config, {**cfg.to_dict(), **meta, "method": cfg.method, "format": RUN_FORMAT})
    return run, cfg, meta


def resume_config(out: str | Path, given: dict[str, Any], *,
                  base: TrainConfig | None = None) -> TrainConfig | None:
    """The config to resume the run folder `out` with, from the options `given` on the command
    line: its saved config (or `base`, e.g. the preset named again) with `given` applied; the
    options in RESUME_MAY_CHANGE keep their saved values unless given. open_run then refuses
    any other difference from the saved config. None: `out` has no config.json to resume."""
    run = RunFolder(out)
    if not run.config.is_file():
        return None
    saved = TrainConfig.from_dict(run.read_config())
    # phase1_frac is no CLI option, but a resume that adds steps adjusts it (_check_resume)
    keep = [k for k in (*RESUME_MAY_CHANGE, "phase1_frac") if k not in given]
    return (base or saved).replace(**given).replace(**{k: getattr(saved, k) for k in keep})


def _check_resume(run: RunFolder, cfg: TrainConfig | None, saved: dict, meta: dict) -> TrainConfig:
    saved_cfg = TrainConfig.from_dict(saved)
    for key in STORE_KEYS:
        if key in meta and key in saved and meta[key] != saved[key]:
            raise TrainError(f"cannot resume {run.path}: it was trained with {key}={saved[key]}, "
                             f"the store gives {key}={meta[key]}")
    if cfg is None:
        return saved_cfg
    now, then = cfg.to_dict(), saved_cfg.to_dict()
    for key in then:
        if key not in RESUME_MAY_CHANGE and now[key] != then[key]:
            raise TrainError(f"cannot resume {run.path} with {key}={now[key]!r}: the run used "
                             f"{then[key]!r}; only {', '.join(RESUME_MAY_CHANGE)} may change on "
                             "resume")
    new = saved_cfg.replace(**{k: now[k] for k in RESUME_MAY_CHANGE})
    if new.steps == saved_cfg.steps:
        return new
    if new.steps < saved_cfg.steps:
        raise TrainError(f"cannot resume {run.path} with steps={new.steps}: the run has "
                         f"steps={saved_cfg.steps}, and steps may only grow on resume")
    if new.method == "baseline":  # one phase only
        return new
    # the phase-1 boundary stays at its step: the extra steps are phase-2 steps
    return new.replace(phase1_frac=saved_cfg.phase1_steps / new.steps)


def _record_changes(run: RunFolder, saved: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """Rewrite config.json with the options in effect after a resume that changed some, and
    list the changes under `resumed_with` -> the updated config."""
    old = TrainConfig.from_dict(saved).to_dict()
    changed = {k: [old[k], v] for k, v in cfg.to_dict().items() if v != old[k]}
    if not changed:
        return saved
    updated = {**saved, **cfg.to_dict(), "resumed_with": [*saved.get("resumed_with", []), changed]}
    write_json(run.config, updated)
    return updated


def _check_finished(run: RunFolder, saved: TrainConfig, cfg: TrainConfig) -> None:
    """Resuming a finished run reads its files back: they must read, and a new lr (which would
    train nothing) is refused."""
    from safetensors import safe_open

    if cfg.lr != saved.lr:
        raise TrainError(f"run {run.path} is finished: lr={cfg.lr!r} would train nothing; pass "
                         f"--set steps=N with N above {saved.steps} to train on with it")
    for f in (run.sae, run.features, run.eval):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            else:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        st.get_tensor(k)
        except Exception as e:  # missing, truncated, overwritten: safetensors' own error types
            redo = (f"to rebuild its files from the final checkpoint, delete {run.eval} and resume"
                    if run.checkpoint.is_file() else "start again with --overwrite")
            raise TrainError(f"run {run.path} is finished but {f.name} does not read "
                             f"({_first_line(e)}); {redo}") from e


class MetricsLog:
    """Appends one JSON line per logged step. On resume, lines past the checkpoint's step are
    dropped first, so a resumed run's log equals an uninterrupted one's."""

    def __init__(self, path: Path, *, keep_until: int):
        kept = [ln for ln, step in _read_metrics(path) if step <= keep_until]
        atomic_write(path, "".join(ln + "\n" for ln in kept))
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _read_metrics(path: Path) -> list[tuple[str, int]]:
    """(line, step) per record of metrics.jsonl. A last line that does not parse was torn by a
    kill mid-write: it is dropped, as it is past the last checkpoint; any other is a TrainError."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    last = max((n for n, ln in enumerate(lines) if ln.strip()), default=-1)
    records = []
    for n, ln in enumerate(lines):
        try:
            if ln.strip():
                records.append((ln, int(json.loads(ln)["step"])))
        except (ValueError, KeyError, TypeError) as e:
            if n == last:
                break
            raise TrainError(f"{path} line {n + 1} is not a metrics record ({_first_line(e)}); "
                             "delete that line and resume again") from e
    return records


def write_features(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
