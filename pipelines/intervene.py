"""Unlearning at inference (METHOD §7): edit the residual stream at the output of block `layer`.

    h <- h - sum_{i in S} (f_i(h) - t_i(h)) * W_dec[i] / scale

`ablate`: t = 0; `clamp`: t = -m * act_u[i] wherever f_i > 0 (act_u: the feature's mean firing
value on unlearn tokens). Everything else, the SAE's reconstruction error included, passes
unchanged, so a token on which no selected feature fires is left exactly as it was. With the
sequence gate (trainer/selection.py) a position is edited only where the share of the row's
tokens so far on which a selected feature fired exceeds the run's retain-calibrated threshold;
the decision at a position depends on it and earlier positions only (causal). A graded gate
(Setting.ramp_percentile) opens lower and scales the clamp: t = -r m act_u, r rising linearly
from 0 at the ramp's start to 1 at the gate's threshold. Only the encoder columns of S are kept
(W_enc[:, S]), so the edit costs d x |S|.
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
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor

from cache.models import decoder_layers
from pipelines.errors import EvalError
from pipelines.config import Setting
from trainer.sae import SAE
from trainer.detector import (CALIBRATION_KEYS, Detector, load_detector, pool_signal, probe_prefix, score_offset,
                              stored_l2s)
from trainer.selection import carry, firing_share, gate_open, select, threshold_at

FEATURE_KEYS = ("alpha_r", "alpha_u", "freq_r", "freq_u", "candidate", "mean_sq_r", "mean_sq_u", "act_u")


class LoadedRun(NamedTuple):
    path: Path
    sae: SAE
    scale: float
    """The SAE works on h * scale (METHOD §0)."""
    config: dict[str, Any]
    features: dict[str, Tensor]
    """features.safetensors: alpha_r, alpha_u, freq_r, freq_u [F] float, candidate [F] bool, ..."""
    layer: int
    method: str
    gate: dict[str, Tensor]
    """gate.safetensors: "<set>/features" and "<set>/share" per calibrated selection."""


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

    path = Path(run_dir)
    for name in ("config.json", "sae.safetensors", "features.safetensors"):
        if not (path / name).is_file():
            raise EvalError(f"{path} has no {name}: not a finished run folder (train it with ff train --out {path})")
    try:
        sae, scale, config = SAE.from_run(path)
    except (ValueError, KeyError) as e:
        raise EvalError(f"cannot load the SAE of {path}: {e}") from e
    feats = load_file(str(path / "features.safetensors"))
    for key in FEATURE_KEYS:
        if key not in feats or feats[key].shape != (sae.d_sae,):
            raise EvalError(f"{path}/features.safetensors: '{key}' is missing or not of shape "
                            f"[{sae.d_sae}] (a run from an older ff: retrain it)")
    gate = load_file(str(path / "gate.safetensors")) if (path / "gate.safetensors").is_file() else {}
    if "layer" not in config:
        raise EvalError(f"{path}/config.json has no 'layer'")
    feats["candidate"] = feats["candidate"].bool()
    method = str(config.get("method", "featureforget"))
    return LoadedRun(path, sae.eval(), scale, config, feats, int(config["layer"]), method, gate)


def select_features(run: LoadedRun, setting: Setting) -> Tensor:
    """The feature set S of a setting, as sorted indices [S] (METHOD §7, trainer/selection.py)."""
    if setting.selection == "candidates" and run.method == "baseline":
        raise EvalError(f"{run.path} is a baseline run: it has no FeatureForget candidates; "
                        "use the saebench or ratio selection")
    try:
        return select(run.features, setting.selection, setting.top_n, freq_threshold=setting.freq_threshold,
                      ratio_percentile=setting.ratio_percentile, max_ctx_r=setting.max_ctx_r)
    except ValueError as e:
        raise EvalError(f"{run.path}: {e}") from None


def probe_problem(run: LoadedRun, l2: float | None = None, kind: str = "linear") -> str | None:
    """Why the run cannot use the probe gate (it has none, or an older one that read SAE
    features, or no detector of `kind` or none fitted with penalty `l2`), or None."""
    w = run.gate.get("probe/w")
    if w is None or w.shape != (run.sae.d_model,):
        return "has no probe gate on the residual stream (a run from an older ff)"
    if kind == "mlp" and f"{probe_prefix(None, kind)}/W" not in run.gate:
        return "has no 'mlp' probe detector (a run from an older ff)"
    if kind != "mlp" and f"{probe_prefix(l2)}/w" not in run.gate:
        have = ", ".join("default" if v is None else f"{v:g}" for v in stored_l2s(run.gate))
        return f"has no probe gate fitted with L2 {l2:g} (it has: {have})"
    return None


def probe_layer(run: LoadedRun) -> tuple[int, float]:
    """(layer, scale) of the residual stream the run's probe reads: `ff train --probe-offset k`
    fits it k blocks before the edited layer (its own normalisation scale); by default the
    edited layer itself."""
    if "probe/layer" in run.gate:
        return int(run.gate["probe/layer"][0]), float(run.gate["probe/scale"][0])
    return run.layer, run.scale


def probe_detector(run: LoadedRun, l2: float | None = None, kind: str = "linear") -> Detector:
    """The run's detector of `kind` (linear: the one fitted with `l2`)."""
    return load_detector(run.gate, probe_prefix(l2, kind))


def probe_calibration(run: LoadedRun, l2: float | None, pool: str, kind: str = "linear") -> Tensor:
    """The highest score of every retain training context [C] (`ff train`'s calibration) under
    the detector of `kind` (linear: fitted with `l2`), pooled as `pool` says."""
    key = f"{probe_prefix(l2, kind)}/{CALIBRATION_KEYS[pool]}"
    if key not in run.gate:
        raise EvalError(f"{run.path} has no training calibration of the '{pool}' probe pooling (a run from an "
                        "older ff): calibrate it on dev prompts (ff eval), or retrain the run")
    return run.gate[key]


def _refuse_window(run: LoadedRun, setting: Setting) -> None:
    """`ff train` calibrates the gates on the mean from the start of each retain context; a
    windowed gate's peaks over a long context lie higher, so that calibration does not carry."""
    if setting.gate_window is not None:
        raise EvalError(f"{run.path}: the training calibration is of the gate's mean from the start, not over a "
                        f"window of {setting.gate_window} tokens: calibrate the windowed gate on dev prompts "
                        "(ff eval --gate-window, --gate-calibration dev) or give its threshold")


def gate_threshold(run: LoadedRun, setting: Setting, features_S: Tensor, *, ramp: bool = False) -> float:
    """The gate's threshold on the running mean of its per-token signal (`ramp`: where the
    setting's ramp starts instead): for the sequence gate, from the calibration of the setting's
    selection; for the probe gate, the calibrated score percentile minus what turns the pooled
    running mean into a score (the bias, for the "mean" pooling; trainer/detector.py)."""
    explicit, percentile = ((setting.ramp_threshold, setting.ramp_percentile) if ramp
                            else (setting.gate_threshold, setting.gate_percentile))
    if setting.gate == "probe":
        if (problem := probe_problem(run, setting.probe_l2, setting.probe_kind)) is not None:
            raise EvalError(f"{run.path} {problem}: retrain it, or use --gate sequence")
        bias = probe_detector(run, setting.probe_l2, setting.probe_kind).b
        score = explicit
        if score is None:
            _refuse_window(run, setting)
            calibration = probe_calibration(run, setting.probe_l2, setting.probe_pool, setting.probe_kind)
            score = threshold_at(calibration.numpy(), percentile)
        return score - score_offset(bias, setting.probe_pool)
    if explicit is not None:
        return explicit
    _refuse_window(run, setting)
    key = setting.set_key
    if f"{key}/share" not in run.gate:
        raise EvalError(f"{run.path} has no gate calibration for selection '{key}' (calibrated: "
                        f"{', '.join(sorted(k.split('/')[0] for k in run.gate if k.endswith('/features'))) or 'none'}); "
                        "use one of those, or --gate none")
    if not torch.equal(run.gate[f"{key}/features"].long().sort().values, features_S):
        raise EvalError(f"{run.path}: the gate of selection '{key}' was calibrated on other features "
                        "than the run's statistics select now; retrain the run")
    return threshold_at(run.gate[f"{key}/share"].numpy(), percentile)


class Intervention:
    """One setting applied to one run; reusable across many forwards and evaluations."""

    def __init__(self, run: LoadedRun, setting: Setting):
        self.layer, self.setting, self.scale = run.layer, setting, run.scale
        self.d_model = run.sae.d_model
        sae = run.sae
        self.features = select_features(run, setting) if setting.edits_features else torch.arange(0)
        gated = setting.edits_features and setting.gate != "none" and len(self.features) > 0
        self.threshold = gate_threshold(run, setting, self.features) if gated else None
        """The gate's threshold on the running mean of `signal`; None: no gate."""
        ramped = gated and setting.ramp_percentile is not None
        self.ramp_from = gate_threshold(run, setting, self.features, ramp=True) if ramped else None
        """Graded gate: where the ramp starts (the gate opens above it, the clamp reaching full
        strength at `threshold`); None: all or nothing at `threshold`."""
        if self.ramp_from is not None and self.ramp_from > self.threshold:
            raise EvalError(f"the graded gate's ramp starts above the gate's threshold ({self.ramp_from:.4g} > "
                            f"{self.threshold:.4g} on the running score): calibrate both on the same prompts "
                            "(ff eval --probe-ramps ... --save)")
        probe = gated and setting.gate == "probe"
        self.detector = probe_detector(run, setting.probe_l2, setting.probe_kind).to("cpu") if probe else None
        """Probe gate: the detector on the normalised residual stream (trainer/detector.py)."""
        self.gate_layer, self.gate_scale = probe_layer(run) if probe else (run.layer, run.scale)
        """The block whose output the gate's signal reads (the probe's layer; else `layer`), and its scale."""
        if self.gate_layer > self.layer:
            raise EvalError(f"{run.path}: the probe reads layer {self.gate_layer}, after the edited layer "
                            f"{self.layer}; it must read the edited layer or an earlier one")
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
        if self.detector is not None:
            self.detector = self.detector.to(device)
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
        strength_BT = self.gate_strength(signal_BT, editable_BT, seg_BT, start)
        open_BT = strength_BT > 0
        active_BTS &= open_BT[..., None]
        # clamp: t = -m act_u where f > 0 (SAEBench), scaled by the graded gate's strength;
        # ablate: t = 0. Elsewhere f - t = 0.
        t_BTS = -self.t_S * active_BTS * strength_BT[..., None]
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
        open_BT = (self.gate_strength(signal_BT, editable_BT, seg_BT, start) > 0) & editable_BT
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
        whether a selected feature fires (sequence gate; h at `layer`), or the probe's x . w,
        pooled as the setting says (probe gate; h at `gate_layer`)."""
        if self.detector is not None:
            scores_BT = self.detector.token_scores(h_BTD.to(self.detector.w.dtype) * self.gate_scale)
            return pool_signal(scores_BT, self.detector.b, self.setting.probe_pool)
        if active_BTS is None:
            active_BTS = self.selected_acts(h_BTD) > 0
        return active_BTS.any(-1).float()

    @property
    def opens_above(self) -> float | None:
        """The running score above which the gate opens (the ramp's start, else `threshold`)."""
        return self.threshold if self.ramp_from is None else self.ramp_from

    def gate(self, signal_BT: Tensor, editable_BT: Tensor, seg_BT: Tensor | None = None,
             start: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """bool [B, T]: where the edit may act (all True without a gate)."""
        return self.gate_strength(signal_BT, editable_BT, seg_BT, start) > 0

    def gate_strength(self, signal_BT: Tensor, editable_BT: Tensor, seg_BT: Tensor | None = None,
                      start: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """float [B, T]: the share of the full clamp applied: 1 where the gate is open (all 1
        without a gate), 0 where it is shut; on a graded gate's ramp, rising linearly from 0 at
        `ramp_from` to 1 at `threshold`."""
        if self.threshold is None:
            return torch.ones(editable_BT.shape, device=editable_BT.device)
        share_BT, seen_BT = firing_share(signal_BT, editable_BT, seg_BT, start, window=self.window)
        if self.ramp_from is None or self.ramp_from == self.threshold:
            return gate_open(share_BT, seen_BT, self.threshold).float()
        part_BT = ((share_BT - self.ramp_from) / (self.threshold - self.ramp_from)).clamp(0.0, 1.0)
        return part_BT * gate_open(share_BT, seen_BT, self.ramp_from)  # 1 above the threshold

    def attach(self, model: Any, *, skip_bos: bool = True) -> "Hooks":
        """Install the edit on `model` (forward hook on block `layer`); call .remove() to undo."""
        blocks = decoder_layers(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if not 0 <= self.layer < len(blocks):
            raise EvalError(f"the run edits layer {self.layer} but the model has {len(blocks)} layers")
        if int(cfg.hidden_size) != self.d_model:
            raise EvalError(f"the run's SAE has d_model {self.d_model} but the model has hidden size "
                            f"{cfg.hidden_size}: it was trained on another model")
        bos = getattr(cfg, "bos_token_id", None) if skip_bos else None
        state: dict[str, Any] = {"editable": None, "counts": None, "gate_h": None}

        def pre_hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            state["editable"] = (ids != bos) if (bos is not None and isinstance(ids, Tensor)) else None
            if not _continues(kwargs):
                state["counts"] = None  # a new sequence: the gate starts counting afresh

        def hook(_module, _inputs, output):
            h_BTD = output[0] if isinstance(output, (tuple, list)) else output
            editable_BT = state["editable"]
            if editable_BT is None or editable_BT.shape != h_BTD.shape[:2]:
                editable_BT = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
            iv = self.to(h_BTD.device)
            start = state["counts"]  # KV-cached generation: the gate's counts so far
            gate_h, state["gate_h"] = state["gate_h"], None
            edited = iv.edit(h_BTD, editable_BT, start=start, gate_h_BTD=gate_h)
            new_BTD = edited.h_BTD
            if iv.threshold is not None:
                state["counts"] = carry(start, edited.signal_BT, editable_BT, window=iv.window)
            return (new_BTD, *output[1:]) if isinstance(output, (tuple, list)) else new_BTD

        def gate_hook(_module, _inputs, output):  # the probe's layer runs first: keep its output
            state["gate_h"] = output[0] if isinstance(output, (tuple, list)) else output

        base = getattr(model, "model", model)
        handles = [base.register_forward_pre_hook(pre_hook, with_kwargs=True)]
        if self.threshold is not None and self.gate_layer != self.layer:
            handles.append(blocks[self.gate_layer].register_forward_hook(gate_hook))
        return Hooks(handles + [blocks[self.layer].register_forward_hook(hook)])

    @contextmanager
    def hooked(self, model: Any, *, skip_bos: bool = True) -> Iterator["Intervention"]:
        hooks = self.attach(model, skip_bos=skip_bos)
        try:
            yield self
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


RESULT_FILE = "unlearning.json"
"""The evaluation's file in a run folder (`ff run`, `ff eval --save`); its `best.setting` is what
`ff generate` and `unlearned` apply by default (`run_setting`)."""


def run_setting(run_dir: str | Path) -> Setting:
    """The best setting that `ff run` / `ff eval --save` found for the run (RUN/unlearning.json,
    chosen on the dev half), else (no file, or no retain-safe setting: with a warning)
    `default_setting` of its method. An unreadable file is an EvalError, not a silent fallback."""
    import json
    import warnings

    run_dir = Path(run_dir)
    res = run_dir / RESULT_FILE
    if res.is_file():
        try:
            result = json.loads(res.read_text())
            if result.get("best"):
                return Setting.from_dict(result["best"]["setting"])
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise EvalError(f"{res} is not an ff eval result ({type(e).__name__}: {e}); "
                            f"rerun ff eval --run {run_dir} --save, or delete it") from None
        warnings.warn(f"{res} holds no chosen setting ({result.get('best_reason') or 'none'}); "
                      "using the method's default setting", stacklevel=2)
    cfg = run_dir / "config.json"
    method = json.loads(cfg.read_text()).get("method", "featureforget") if cfg.is_file() else "featureforget"
    return default_setting(method)


@contextmanager
def unlearned(model: Any, run_dir: str | Path | LoadedRun, setting: Setting | dict | None = None, *,
              skip_bos: bool = True, **changes: Any) -> Iterator[Intervention]:
    """Context manager: `model` with the run's features edited (METHOD §7); clean again on exit.

    `setting`: a Setting, a dict (an eval result's best["setting"]), or None for the run's own
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
