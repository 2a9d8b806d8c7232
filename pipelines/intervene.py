"""Unlearning at inference (METHOD §7): edit the residual stream at the output of block `layer`.

    h <- h - sum_{i in S} (f_i(h) - t_i(h)) * W_dec[i] / scale

`ablate`: t = 0; `clamp`: t = -m * act_u[i] wherever f_i > 0 (act_u: the feature's mean firing
value on unlearn tokens). Everything else, the SAE's reconstruction error included, passes
unchanged, so a token on which no selected feature fires is left exactly as it was. Behind a
gate (trainer/gate/: the sequence gate or the probe gate) a position is edited only where the
gate is open, a decision that depends on it and earlier positions only (causal). Only the
encoder columns of S are kept (W_enc[:, S]), so the edit costs d x |S|.
Two reference modes for CE loss (METHOD §8): `splice` (h <- SAE reconstruction) and `zero`.

BOS positions are never edited: the SAE never saw them in training (METHOD §0) and their
activations are ~10x outliers that the model uses as an attention sink.

    with unlearned(model, "runs/l8"):               # the run's best setting (ff run / ff eval)
        model.generate(...)
    with unlearned(model, "runs/l8", multiplier=50, top_n=20):   # ... with fields changed

Shape suffixes: B batch, T tokens, D d_model, S selected features.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from cache.capture import hidden_of, with_hidden
from cache.chunks import first_line
from cache.errors import FFError
from cache.models import decoder_layers
from pipelines.config import Setting
from pipelines.errors import EvalError
from pipelines.result import EvalResult
from trainer.gate.detector import Detector
from trainer.gate.gate import Gate, GateError, GateSpec
from trainer.gate.select import select
from trainer.gate.store import GateFile
from trainer.run import RunConfig, RunFolder
from trainer.sae import SAE

FEATURE_KEYS = ("alpha_r", "alpha_u", "freq_r", "freq_u", "candidate", "mean_sq_r", "mean_sq_u", "act_u")


class LoadedRun(NamedTuple):
    path: Path
    sae: SAE
    scale: float
    """The SAE works on h * scale (METHOD §0)."""
    config: RunConfig
    """config.json, typed (trainer/run.py)."""
    features: dict[str, Tensor]
    """features.safetensors: alpha_r, alpha_u, freq_r, freq_u [F] float, candidate [F] bool, ..."""
    layer: int
    method: str
    gate: GateFile
    """gate.safetensors: the gates' calibrations and detectors (trainer/gate/store.py)."""


class Edited(NamedTuple):
    h_BTD: Tensor
    changed_BT: Tensor
    """bool [B, T]: positions that were edited (the others are bit-identical)."""
    open_BT: Tensor
    """bool [B, T]: where the gate was open (all True without a gate)."""
    signal_BT: Tensor | None = None
    """The gate's per-token signal (Intervention.signal); None where no features are edited."""

    @property
    def changed_B(self) -> Tensor:
        return self.changed_BT.any(1)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a run folder (docs/architecture.md); a missing or inconsistent file is an EvalError."""
    from safetensors.torch import load_file

    folder = RunFolder(run_dir)
    path = folder.path
    for f in (folder.config, folder.sae, folder.features):
        if not f.is_file():
            raise EvalError(f"{path} has no {f.name}: not a finished run folder (train it with ff train --out {path})")
    try:
        config = folder.run_config()
        sae = SAE.load(folder.sae)
    except (ValueError, KeyError, FFError) as e:
        raise EvalError(f"cannot load the SAE of {path}: {first_line(e)}") from e
    if sae.d_model != config.d_model:
        raise EvalError(f"{path}: sae.safetensors has d_model {sae.d_model} but config.json says {config.d_model}")
    feats = load_file(str(folder.features))
    for key in FEATURE_KEYS:
        if key not in feats or feats[key].shape != (sae.d_sae,):
            raise EvalError(f"{folder.features}: '{key}' is missing or not of shape "
                            f"[{sae.d_sae}] (a run from an older ff: retrain it)")
    gate = GateFile.read(path)
    if config.layer is None:
        raise EvalError(f"{folder.config} has no 'layer'")
    feats["candidate"] = feats["candidate"].bool()
    return LoadedRun(path, sae.eval(), config.scale, config, feats, config.layer, config.train.method, gate)


def select_features(run: LoadedRun, setting: Setting) -> Tensor:
    """The feature set S of a setting, as sorted indices [S] (METHOD §7, trainer/gate/select.py)."""
    if setting.selection == "candidates" and run.method == "baseline":
        raise EvalError(f"{run.path} is a baseline run: it has no FeatureForget candidates; "
                        "use the saebench or ratio selection")
    try:
        return select(run.features, setting.selection, setting.top_n, freq_threshold=setting.freq_threshold,
                      ratio_percentile=setting.ratio_percentile, max_ctx_r=setting.max_ctx_r)
    except ValueError as e:
        raise EvalError(f"{run.path}: {e}") from None


def probe_problem(run: LoadedRun, l2: float | None = None, kind: str = "linear") -> str | None:
    """Why the run cannot use the probe gate (trainer/gate/store.py, `GateFile.probe_problem`), or None."""
    return run.gate.probe_problem(run.sae.d_model, l2, kind)


def probe_layer(run: LoadedRun) -> tuple[int, float]:
    """(layer, scale) of the residual stream the run's probe reads: `ff train --set probe_offset=k`
    fits it k blocks before the edited layer (its own normalisation scale); by default the
    edited layer itself."""
    return run.gate.probe_layer() or (run.layer, run.scale)


def probe_detector(run: LoadedRun, l2: float | None = None, kind: str = "linear") -> Detector:
    """The run's detector of `kind` (linear: the one fitted with `l2`)."""
    return run.gate.detector(l2, kind)


def gate_spec(setting: Setting) -> GateSpec:
    """The gate's part of a setting (trainer/gate/gate.py)."""
    return GateSpec(setting.gate, setting.gate_percentile, setting.gate_threshold, setting.probe_l2,
                    setting.probe_kind, setting.gate_window, setting.set_key)


def make_gate(run: LoadedRun, setting: Setting, features_S: Tensor) -> Gate:
    """The setting's gate over the run, calibrated; a run that cannot gate so is an EvalError."""
    try:
        return Gate(run.gate, gate_spec(setting), features_S, run.layer, run.scale, run.sae.d_model)
    except GateError as e:
        raise EvalError(f"{run.path} {e}") from None


class Intervention:
    """One setting applied to one run; reusable across many forwards and evaluations."""

    def __init__(self, run: LoadedRun, setting: Setting):
        self.layer, self.setting, self.scale = run.layer, setting, run.scale
        self.d_model = run.sae.d_model
        sae = run.sae
        self.features = select_features(run, setting) if setting.edits_features else torch.arange(0)
        gated = setting.edits_features and setting.gate != "none" and len(self.features) > 0
        self.gating = make_gate(run, setting, self.features) if gated else None
        """The setting's gate (trainer/gate/gate.py); None: the edit acts wherever it applies."""
        self.threshold = None if self.gating is None else self.gating.threshold
        """The gate's threshold on the running mean of `signal`; None: no gate."""
        self.detector = None if self.gating is None else self.gating.detector
        """Probe gate: the detector on the normalised residual stream (trainer/gate/detector.py)."""
        self.gate_layer, self.gate_scale = (run.layer, run.scale) if self.gating is None else \
            (self.gating.layer, self.gating.scale)
        """The block whose output the gate's signal reads (the probe's layer; else `layer`), and its scale."""
        self.t_S = (setting.multiplier * run.features["act_u"][self.features].float()
                    if setting.mode == "clamp" else torch.zeros(len(self.features)))
        """Clamp targets -t_S: m times each feature's mean firing value on unlearn tokens."""
        with torch.no_grad():
            self.W_enc_DS = sae.W_enc[:, self.features].detach().clone()
            self.b_enc_S = sae.b_enc[self.features].detach().clone()
            self.W_dec_SD = sae.W_dec[self.features].detach().clone()
            self.b_dec_D = sae.b_dec.detach().clone()
            self.mean_r_S = run.features["mean_r"][self.features].float().clone() \
                if "mean_r" in run.features else torch.zeros(len(self.features))
            # orthonormal basis of the selected decoder directions' span ("project")
            self.Q_DR = torch.linalg.qr(self.W_dec_SD.T.float())[0] \
                if setting.mode == "project" and len(self.features) else torch.zeros(self.d_model, 0)
        self.sae = sae if setting.mode == "splice" else None
        self.window = setting.gate_window
        """The gate's running mean covers the last `window` editable tokens (None: all so far)."""

    @property
    def n_features(self) -> int:
        return len(self.features)

    def to(self, device: Any) -> "Intervention":
        for name in ("W_enc_DS", "b_enc_S", "W_dec_SD", "b_dec_D", "t_S", "mean_r_S", "Q_DR"):
            setattr(self, name, getattr(self, name).to(device))
        if self.gating is not None:
            self.detector = self.gating.to(device).detector
        if self.sae is not None:
            self.sae = self.sae.to(device)
        return self

    @torch.no_grad()
    def selected_acts(self, h_BTD: Tensor) -> Tensor:
        """f_S(h) [B, T, S]: activations of the selected features only."""
        x_BTD = h_BTD.to(self.W_enc_DS.dtype) * self.scale
        return torch.relu((x_BTD - self.b_dec_D) @ self.W_enc_DS + self.b_enc_S)

    @torch.no_grad()
    def edit(self, h_BTD: Tensor, editable_BT: Tensor | None = None, seg_BT: Tensor | None = None,
             start: tuple[Tensor, Tensor] | None = None, gate_h_BTD: Tensor | None = None) -> Edited:
        """Apply the setting to h [B, T, D]; positions where editable_BT is False are kept.
        `seg_BT`: tree-packed rows (the gate counts a branch after the shared prompt only);
        `start`: gate counts carried in from earlier calls on the same rows (KV cache);
        `gate_h_BTD`: the output of block `gate_layer` for the same tokens, where the probe reads
        an earlier layer than the edited one (required then)."""
        if editable_BT is None:
            editable_BT = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
        mode = self.setting.mode
        all_BT = torch.ones_like(editable_BT)
        if mode == "zero":
            return Edited(torch.where(editable_BT[..., None], 0.0, h_BTD).to(h_BTD.dtype), editable_BT, all_BT)
        if mode == "splice":
            x_hat_BTD = self.sae(h_BTD.to(self.b_dec_D.dtype) * self.scale).x_hat / self.scale
            return Edited(torch.where(editable_BT[..., None], x_hat_BTD.to(h_BTD.dtype), h_BTD),
                          editable_BT, all_BT)
        f_BTS = self.selected_acts(h_BTD) * editable_BT[..., None]
        active_BTS = f_BTS > 0
        if mode in ("retain_mean", "project"):
            return self._replace(h_BTD, f_BTS, active_BTS, editable_BT, seg_BT, start, gate_h_BTD)
        signal_BT = self._gate_signal(h_BTD, active_BTS, gate_h_BTD)
        open_BT = self.gate(signal_BT, editable_BT, seg_BT, start)
        active_BTS &= open_BT[..., None]
        # clamp: t = -m act_u where f > 0 (SAEBench); ablate: t = 0. Elsewhere f - t = 0.
        t_BTS = -self.t_S * active_BTS
        delta_BTD = (((f_BTS * active_BTS) - t_BTS) @ self.W_dec_SD) / self.scale
        return Edited(h_BTD - delta_BTD.to(h_BTD.dtype), active_BTS.any(-1), open_BT, signal_BT)

    def _gate_signal(self, h_BTD: Tensor, active_BTS: Tensor, gate_h_BTD: Tensor | None) -> Tensor:
        if self.threshold is not None and self.gate_layer != self.layer:
            if gate_h_BTD is None:
                raise EvalError(f"the probe gate reads layer {self.gate_layer}: pass its output (gate_h_BTD)")
            return self.signal(gate_h_BTD)
        return self.signal(h_BTD, active_BTS)

    def _replace(self, h_BTD: Tensor, f_BTS: Tensor, active_BTS: Tensor, editable_BT: Tensor,
                 seg_BT: Tensor | None, start: Any, gate_h_BTD: Tensor | None) -> Edited:
        """The edits that act on every open position, fired or not: "retain_mean" sets the
        selected features to their mean on retain tokens (f_i -> E_r f_i); "project" removes
        the component of x - b_dec in the span of their decoder directions (the error term's
        share of that span too)."""
        signal_BT = self._gate_signal(h_BTD, active_BTS, gate_h_BTD)
        open_BT = self.gate(signal_BT, editable_BT, seg_BT, start) & editable_BT
        if self.setting.mode == "retain_mean":
            delta_BTD = ((f_BTS - self.mean_r_S) @ self.W_dec_SD) / self.scale
        else:
            x_BTD = h_BTD.to(self.Q_DR.dtype) * self.scale - self.b_dec_D
            delta_BTD = ((x_BTD @ self.Q_DR) @ self.Q_DR.T) / self.scale
        delta_BTD = delta_BTD * open_BT[..., None]
        return Edited(h_BTD - delta_BTD.to(h_BTD.dtype), open_BT, open_BT, signal_BT)

    @torch.no_grad()
    def signal(self, h_BTD: Tensor, active_BTS: Tensor | None = None) -> Tensor:
        """The gate's per-token signal [B, T], whose running mean it compares with the threshold:
        whether a selected feature fires (sequence gate; h at `layer`), or the detector's token
        score (probe gate; h at `gate_layer`)."""
        if self.detector is not None:
            return self.gating.signal(h_BTD)
        if active_BTS is None:
            active_BTS = self.selected_acts(h_BTD) > 0
        return active_BTS.any(-1).float()

    def gate(self, signal_BT: Tensor, editable_BT: Tensor, seg_BT: Tensor | None = None,
             start: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """bool [B, T]: where the edit may act (all True without a gate)."""
        if self.gating is None:
            return torch.ones(editable_BT.shape, dtype=torch.bool, device=editable_BT.device)
        return self.gating.open(signal_BT, editable_BT, seg_BT, start)

    def attach(self, model: Any, *, skip_bos: bool = True) -> "Hooks":
        """Install the edit on `model` (forward hook on block `layer`); call .remove() to undo."""
        return attach_rows(model, [(self, slice(None))], skip_bos=skip_bos)

    @contextmanager
    def hooked(self, model: Any, *, skip_bos: bool = True) -> Iterator["Intervention"]:
        hooks = self.attach(model, skip_bos=skip_bos)
        try:
            yield self
        finally:
            hooks.remove()


def attach_rows(model: Any, parts: Sequence[tuple[Intervention, slice]], *, skip_bos: bool = True) -> "Hooks":
    """Install interventions that edit the same block, each on its own rows of every batch
    (`parts`: (intervention, rows), the rows' slices covering the batch in order), so that one
    forward serves several settings; each keeps its own gate state. Call .remove() to undo."""
    if not parts:
        raise EvalError("no intervention to install")
    layer, d_model = parts[0][0].layer, parts[0][0].d_model
    if any(iv.layer != layer for iv, _ in parts):
        got = sorted({iv.layer for iv, _ in parts})
        raise EvalError(f"interventions installed together must edit one layer, got {got}")
    blocks = decoder_layers(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not 0 <= layer < len(blocks):
        raise EvalError(f"the run edits layer {layer} but the model has {len(blocks)} layers")
    if int(cfg.hidden_size) != d_model:
        raise EvalError(f"the run's SAE has d_model {d_model} but the model has hidden size "
                        f"{cfg.hidden_size}: it was trained on another model")
    bos = getattr(cfg, "bos_token_id", None) if skip_bos else None
    state: dict[str, Any] = {"editable": None, "counts": [None] * len(parts), "gate_h": {}}

    def pre_hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["editable"] = (ids != bos) if (bos is not None and isinstance(ids, Tensor)) else None
        if not _continues(kwargs):
            state["counts"] = [None] * len(parts)  # a new sequence: the gates start counting afresh

    def hook(_module, _inputs, output):
        h_BTD = hidden_of(output)
        editable_BT = state["editable"]
        if editable_BT is None or editable_BT.shape != h_BTD.shape[:2]:
            editable_BT = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
        gate_h, state["gate_h"] = state["gate_h"], {}
        if len(parts) > 1 and parts[-1][1].stop != len(h_BTD):
            raise EvalError(f"the batch has {len(h_BTD)} rows but the settings installed on it cover "
                            f"{parts[-1][1].stop}")
        out = []
        for g, (iv, rows) in enumerate(parts):
            iv = iv.to(h_BTD.device)
            start = state["counts"][g]  # KV-cached generation: the gate's counts so far
            gh = gate_h.get(iv.gate_layer) if iv.gate_layer != layer else None
            edited = iv.edit(h_BTD[rows], editable_BT[rows], start=start, gate_h_BTD=None if gh is None else gh[rows])
            if iv.gating is not None:
                state["counts"][g] = iv.gating.carry(start, edited.signal_BT, editable_BT[rows])
            out.append(edited.h_BTD)
        return with_hidden(output, out[0] if len(out) == 1 else torch.cat(out))

    def gate_hook(gate_layer: int):
        def keep(_module, _inputs, output):  # the probe's layer runs first: keep its output
            state["gate_h"][gate_layer] = hidden_of(output)
        return keep

    base = getattr(model, "model", model)
    handles = [base.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for gl in sorted({iv.gate_layer for iv, _ in parts if iv.threshold is not None and iv.gate_layer != layer}):
        handles.append(blocks[gl].register_forward_hook(gate_hook(gl)))
    return Hooks(handles + [blocks[layer].register_forward_hook(hook)])


@contextmanager
def hooked_rows(model: Any, parts: Sequence[tuple[Intervention, slice]], *, skip_bos: bool = True) -> Iterator[None]:
    """`attach_rows` for the duration of a `with` block."""
    hooks = attach_rows(model, parts, skip_bos=skip_bos)
    try:
        yield
    finally:
        hooks.remove()


def _continues(kwargs: dict[str, Any]) -> bool:
    """Whether a forward continues a KV-cached sequence (its first position is not 0)."""
    for key in ("cache_position", "position_ids"):
        pos = kwargs.get(key)
        if isinstance(pos, Tensor) and pos.numel():
            return int(pos.reshape(-1)[0]) > 0
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return bool(cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0)


class Hooks:
    """The handles installed by `Intervention.attach`; `remove()` restores the clean model."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def default_setting(method: str) -> Setting:
    """A gated clamp (m = 10) of the top 20 candidates (FeatureForget) or SAEBench features (baseline)."""
    if method == "baseline":
        return Setting(mode="clamp", multiplier=10.0, top_n=20, selection="saebench", gate="sequence")
    return Setting(mode="clamp", multiplier=10.0, top_n=20, gate="sequence")


def run_setting(run_dir: str | Path) -> Setting:
    """The best setting that `ff run` / `ff eval --save` found for the run (RUN/unlearning.json,
    chosen on the dev half), else (no file, or no retain-safe setting: with a warning)
    `default_setting` of its method. An unreadable file is an EvalError, not a silent fallback."""
    import warnings

    run = RunFolder(run_dir)
    if run.result.is_file():
        result = EvalResult.load(run.result)
        if result.best:
            return Setting.from_dict(result.best.setting)
        warnings.warn(f"{run.result} holds no chosen setting ({result.best_reason or 'none'}); "
                      "using the method's default setting", stacklevel=2)
    method = run.read_config().get("method", "featureforget") if run.is_run() else "featureforget"
    return default_setting(method)


def chosen_setting(run_dir: str | Path) -> Setting:
    """The setting `ff run` / `ff eval --save` chose for the run (RUN/unlearning.json); a run
    without one is an EvalError (what ships must be what was measured)."""
    res = RunFolder(run_dir).result
    try:
        result = EvalResult.load(res)
    except FileNotFoundError:
        raise EvalError(f"{run_dir} has no {res.name}: evaluate it first (ff eval --run {run_dir} --save)") from None
    if not result.best:
        raise EvalError(f"{res} holds no chosen setting ({result.best_reason or 'none'}): nothing measured to export")
    return Setting.from_dict(result.best.setting)


@contextmanager
def unlearned(model: Any, run_dir: str | Path | LoadedRun, setting: Setting | dict | None = None, *,
              skip_bos: bool = True, **changes: Any) -> Iterator[Intervention]:
    """Context manager: `model` with the run's features edited (METHOD §7); clean again on exit.

    `setting`: a Setting, a dict (an eval result's best.setting (pipelines/result.py)), or None for the run's own
    best (`run_setting`: the one `ff run` / `ff eval` chose on the dev half, gate and threshold
    included, else `default_setting`). Keyword arguments change fields of it (`Setting.changed`),
    e.g. `unlearned(model, run, multiplier=50)` or `unlearned(model, run, gate="none")`.
    The gate keeps its counts across KV-cached forwards of one sequence (generate).
    """
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir)
    if setting is None:
        setting = run_setting(run.path)
    elif isinstance(setting, dict):
        setting = Setting.from_dict(setting)
    setting = setting.changed(**changes)
    with Intervention(run, setting).hooked(model, skip_bos=skip_bos) as iv:
        yield iv
