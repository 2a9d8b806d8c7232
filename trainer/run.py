"""The run folder (docs/architecture.md): creation, resume checks, atomic writes, metrics log.

```
RUN/config.json           TrainConfig + store metadata (model, model_hash, layer, d_model,
                          scale, method)
RUN/sae.safetensors       written by SAE.save
RUN/features.safetensors  {freq,mean,mean_sq,act,alpha}_{r,u} over every training token, cluster,
                          candidate, eval_mass_r/u (held-out mass per feature)
RUN/gate.safetensors      per selection: its features and each retain training context's max
                          firing share (the sequence gate's calibration, trainer/selection.py)
RUN/clusters.json         tau, gate_r, gate_u per cluster
RUN/metrics.jsonl         one JSON object per logged step
RUN/eval.json             held-out metrics; written last, so its presence marks a finished run
RUN/checkpoints/last.pt   resumable state (atomic: temp file, then rename)
```
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.config import TrainConfig
from trainer.errors import TrainError

RESUME_MAY_CHANGE = {"log_every", "checkpoint_every", "device", "lr"}
"""Options that may differ between a run and its resumption: bookkeeping, and lr so that a
run stopped by a non-finite loss can go on from its last checkpoint with a lower one."""
STORE_KEYS = ("model_hash", "layer", "d_model", "ctx_len")
"""Store metadata that must match when a run is resumed."""


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.sae = self.path / "sae.safetensors"
        self.features = self.path / "features.safetensors"
        self.gate = self.path / "gate.safetensors"
        self.clusters = self.path / "clusters.json"
        self.metrics = self.path / "metrics.jsonl"
        self.eval = self.path / "eval.json"
        self.checkpoint = self.path / "checkpoints" / "last.pt"

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config.read_text())


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: temp file in the same folder, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save of a state made of tensors, dicts, lists, tuples, numbers, strings and
    None only, so that `load_checkpoint` can load it with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> dict[str, Any]:
    """weights_only=True: a checkpoint is data, and loading one must not run code (a run folder
    may come from someone else). A file that fails to load is a one-line TrainError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainError(f"cannot load checkpoint {path}: {first[:200]}; run `ff verify "
                         f"{path.parent.parent}`, or start again with --overwrite") from e


def open_run(out: str | Path, cfg: TrainConfig | None, meta: dict[str, Any], *, resume: bool,
             overwrite: bool, scale: Callable[[], float] | None = None,
             ) -> tuple[RunFolder, TrainConfig, dict[str, Any]]:
    """Create RUN (fresh), or reopen it (resume) -> (folder, config, metadata).

    Fresh: RUN must be missing or empty, or `overwrite` (which deletes an earlier run folder,
    never a folder that is not one). Resume: the saved config wins; a `cfg` passed along
    must agree with it, except for RESUME_MAY_CHANGE. `scale()` computes the normalisation
    scale of a fresh run (a resumed run keeps its saved one).
    """
    run = RunFolder(out)
    if run.path.exists() and not run.path.is_dir():
        raise TrainError(f"{run.path} is a file, not a run folder")
    exists = run.path.exists() and any(run.path.iterdir())
    if resume and run.config.is_file():
        saved = run.read_config()
        return run, _check_resume(run, cfg, saved, meta), saved
    if cfg is None:
        raise TrainError(f"nothing to resume in {run.path} (no config.json); start a new run")
    if exists:
        if resume:
            raise TrainError(f"cannot resume {run.path}: it has no config.json (not a run folder)")
        if not overwrite:
            raise TrainError(f"run folder {run.path} exists; pass --resume to continue it "
                             "or --overwrite to start again")
        if not (run.config.is_file() or (run.path / "checkpoints").is_dir()):
            raise TrainError(f"{run.path} is not empty and not a run folder; refusing to delete it")
        shutil.rmtree(run.path)
    if scale is not None:
        meta = {**meta, "scale": scale()}
    meta = {**meta, "d_sae": cfg.expansion * meta["d_model"]}
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(run.config, {**cfg.to_dict(), **meta, "method": cfg.method})
    return run, cfg, meta


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
                             f"{then[key]!r}; pass the same options or omit them")
    return saved_cfg.replace(**{k: now[k] for k in RESUME_MAY_CHANGE})


class MetricsLog:
    """Appends one JSON line per logged step. On resume, lines past the checkpoint's step are
    dropped first, so a resumed run's log equals an uninterrupted one's."""

    def __init__(self, path: Path, *, keep_until: int):
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= keep_until]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_features(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
