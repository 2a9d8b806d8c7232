"""`ff verify RUN`: check a run folder (trainer/run.py) is whole and agrees with itself and
its store; `verify` dispatches a path to this or to the store check (cache/verify.py).

Checks: the files of a finished run are present; config.json, clusters.json, eval.json and
metrics.jsonl parse; the safetensors files read and their shapes match config.json (d_model,
expansion); the checkpoint loads with weights_only=True; and when the store named in
config.json is reachable, its model_hash, d_model, ctx_len and layers agree with the run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cache.chunks import first_line
from cache.errors import FFError
from cache.location import is_remote, normalize
from cache.store import has_root
from cache.verify import Problem, Report, verify_store
from trainer.run import RunFolder, load_checkpoint

FEATURES = ("alpha_r", "alpha_u", "freq_r", "freq_u", "cluster", "candidate")


def verify(path: str | Path) -> Report:
    """A store (zarr.json; a folder or a URL) or a run folder (config.json); anything else is a
    one-line FFError."""
    p = normalize(path)
    if is_remote(p):  # a run folder is local; a URL can only be a store
        if has_root(p):
            return verify_store(p)
        raise FFError(f"'{p}' is not an activation store (no zarr.json)")
    if not p.exists():
        raise FFError(f"'{path}' does not exist")
    if has_root(p):
        return verify_store(p)
    if RunFolder(p).is_run():
        return verify_run(p)
    raise FFError(f"'{path}' is neither an activation store (no zarr.json) nor a run folder "
                  "(no config.json)")


def verify_run(path: str | Path) -> Report:
    run = RunFolder(path)
    report = Report(str(path), "run", checked={"files": 0})
    config = _read_json(run.config, report)
    for name in RunFolder.FILES:
        f = getattr(run, name)
        if not f.is_file():
            hint = "; the run has not finished: resume it with `ff train --resume`"
            detail = "not in the run folder" + (hint if name == "eval" else "")
            report.problems.append(Problem("missing", detail, f.name))
    if config is None:
        return report
    for f in (run.clusters, run.eval):
        if f.is_file():
            _read_json(f, report)
    _check_metrics(run.metrics, report)
    try:
        d_model = int(config["d_model"])
        d_sae = int(config.get("d_sae") or int(config["expansion"]) * d_model)
    except (KeyError, TypeError, ValueError):
        report.problems.append(Problem("metadata", "lacks d_model or expansion", run.config.name))
        return report
    D, F = d_model, d_sae
    sae_shapes = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    _check_tensors(run.sae, sae_shapes, report)
    _check_tensors(run.features, {k: (F,) for k in FEATURES}, report, others=(F,))
    if getattr(run, "gate", None) is not None:  # the sequence gate's file, of newer runs only
        _check_tensors(run.gate, {}, report)
    if run.checkpoint.is_file():
        report.checked["files"] += 1
        try:
            load_checkpoint(run.checkpoint)
        except FFError as e:
            where = str(run.checkpoint.relative_to(run.path))
            report.problems.append(Problem("corrupt", str(e), where))
    for key in dict.fromkeys(k for k in (config.get("store"), config.get("unlearn_store")) if k):
        _check_store(key, config, report)
    return report


def _read_json(path: Path, report: Report) -> Any:
    if not path.is_file():
        return None
    report.checked["files"] += 1
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        report.problems.append(Problem("corrupt", f"does not parse: {first_line(e)}", path.name))
        return None


def _check_metrics(path: Path, report: Report) -> None:
    if not path.is_file():
        return
    report.checked["files"] += 1
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except ValueError as e:
            detail = f"line {n} does not parse: {first_line(e)}"
            report.problems.append(Problem("corrupt", detail, path.name))
            return


def _check_tensors(path: Path, shapes: dict[str, tuple[int, ...]], report: Report, *,
                   others: tuple[int, ...] | None = None) -> None:
    """The safetensors file reads; every tensor in `shapes` is in it with that shape, finite;
    every other tensor has the shape `others` (None: any)."""
    from safetensors import safe_open

    if not path.is_file():
        return
    report.checked["files"] += 1
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or overwritten file: safetensors' own error types
        report.problems.append(Problem("corrupt", f"does not read: {first_line(e)}", path.name))
        return
    if others is not None:
        shapes = {**{k: others for k in tensors}, **shapes}
    for name, shape in shapes.items():
        where = f"{path.name}:{name}"
        t = tensors.get(name)
        if t is None:
            report.problems.append(Problem("missing", "not in the file", where))
        elif tuple(t.shape) != shape:
            report.problems.append(Problem("shape", f"{tuple(t.shape)}, config.json gives {shape} "
                                           "(d_model, d_sae = expansion x d_model)", where))
        elif t.is_floating_point() and not torch.isfinite(t).all():
            report.problems.append(Problem("non-finite", "holds NaN or inf values", where))


def _check_store(store: str, config: dict[str, Any], report: Report) -> None:
    """The store the run names, if reachable: the same model and shapes as the run."""
    from cache.store import open_store

    try:
        meta = open_store(store).meta
    except FFError:
        report.notes.append(f"store '{store}' named in config.json is not reachable from here: "
                            "its identity was not checked")
        return
    where = f"store '{store}'"
    for key in ("model_hash", "d_model", "ctx_len"):
        if key in config and config[key] != getattr(meta, key):
            detail = (f"the store has {key} {getattr(meta, key)}, "
                      f"the run was trained with {config[key]}")
            report.problems.append(Problem("identity", detail, where))
    if config.get("layer") is not None and config["layer"] not in meta.layers:
        detail = (f"the run's layer {config['layer']} is not in the store "
                  f"(layers {list(meta.layers)})")
        report.problems.append(Problem("identity", detail, where))
