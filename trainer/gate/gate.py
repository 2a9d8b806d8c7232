"""`Gate`: one setting's gate over one run, calibrated: its per-token signal, its threshold on the
signal's running mean, and where it is open.

    gate = Gate(GateFile.read(run_dir), GateSpec("probe", 99.0, window=16), features_S, layer, scale)
    signal_BT = gate.signal(h_BTD)                        # h: the output of block `gate.layer`
    open_BT = gate.open(signal_BT, editable_BT)           # causal
    carried = gate.carry(None, signal_BT, editable_BT)    # for the next KV-cached call

The threshold comes from the spec's explicit one, else from the run's training calibration at
the spec's percentile (calibrate.py, detector.py); `ff eval` calibrates the probe gate on retain
dev questions instead and passes the result as the explicit threshold. A probe gate's explicit
threshold is a detector score (log-odds); the gate compares the running mean of the token
scores with it less the detector's bias.

Shape suffixes: B rows, T positions, D d_model, S selected features.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from trainer.gate.calibrate import threshold_at
from trainer.gate.causal import GateCarry, carry, firing_share, gate_open
from trainer.gate.detector import Detector
from trainer.gate.store import GateFile

KINDS = ("sequence", "probe")


class GateError(ValueError):
    """The run cannot gate as asked; the message follows the run's path ("RUN has no ...")."""


class GateSpec(NamedTuple):
    """What a setting asks of the gate (pipelines/config.py's Setting holds the same fields)."""
    kind: str
    """"sequence" (the share of tokens on which a selected feature fires) or "probe" (a detector)."""
    percentile: float
    """The threshold: this percentile of the retain calibration (unless `threshold` is given)."""
    threshold: float | None = None
    """An explicit threshold: on the firing share (sequence) or on the detector's score (probe)."""
    probe_l2: float | None = None
    """Probe gate: which linear detector, by its L2 penalty (None: the default)."""
    probe_kind: str = "linear"
    """Probe gate: "linear" or "mlp" (detector.py)."""
    window: int | None = None
    """Average over the last `window` editable tokens (None: every token so far)."""
    selection: str = ""
    """Sequence gate: the selection's key, whose calibration it reads."""


class Gate:
    """A calibrated gate (module docstring)."""

    def __init__(self, file: GateFile, spec: GateSpec, features_S: Tensor, layer: int, scale: float, d_model: int):
        if spec.kind not in KINDS:
            raise ValueError(f"unknown gate '{spec.kind}': use {', '.join(KINDS)}")
        self.spec, self.window = spec, spec.window
        self.detector: Detector | None = None
        """Probe gate: the detector on the normalised residual stream."""
        self.layer, self.scale = layer, scale
        """The block whose output the signal reads (the probe's layer for the probe gate), and its scale."""
        if spec.kind == "probe":
            if (problem := file.probe_problem(d_model, spec.probe_l2, spec.probe_kind)) is not None:
                raise GateError(f"{problem}: retrain it, or use the sequence gate (--set gate=sequence)")
            self.detector = file.detector(spec.probe_l2, spec.probe_kind).to("cpu")
            self.layer, self.scale = file.probe_layer() or (layer, scale)
            if self.layer > layer:
                raise GateError(f"has a probe that reads layer {self.layer}, after the edited layer {layer}; it "
                                "must read the edited layer or an earlier one")
        self.threshold = self._threshold(file, features_S)
        """On the running mean of `signal`."""

    def _threshold(self, file: GateFile, features_S: Tensor) -> float:
        spec = self.spec
        if spec.kind == "probe":
            assert self.detector is not None
            score = spec.threshold
            if score is None:
                self._refuse_window()
                calibration = file.calibration(spec.probe_l2, spec.probe_kind)
                if calibration is None:
                    raise GateError("has no training calibration of its probe gate (a run from an older ff): "
                                    "calibrate it on dev prompts (ff eval), or retrain the run")
                score = threshold_at(calibration.numpy(), spec.percentile)
            return score - self.detector.b
        if spec.threshold is not None:
            return spec.threshold
        self._refuse_window()
        got = file.shares(spec.selection)
        if got is None:
            raise GateError(f"has no gate calibration for selection '{spec.selection}' (calibrated: "
                            f"{', '.join(file.selections()) or 'none'}); use one of those, or no gate "
                            "(--set gate=none)")
        features, share = got
        if not torch.equal(features.sort().values, features_S):
            raise GateError(f"calibrated the gate of selection '{spec.selection}' on other features than the "
                            "run's statistics select now; retrain the run")
        return threshold_at(share.numpy(), spec.percentile)

    def _refuse_window(self) -> None:
        """`ff train` calibrates the gates on the mean from the start of each retain context; a
        windowed gate's peaks over a long context lie higher, so that calibration does not carry."""
        if self.window is not None:
            raise GateError(f"has a training calibration of the gate's mean from the start, not over a window of "
                            f"{self.window} tokens: calibrate the windowed gate on dev prompts (ff eval "
                            "gate_window, gate_calibration dev) or give its threshold")

    def to(self, device: Any) -> "Gate":
        if self.detector is not None:
            self.detector = self.detector.to(device)
        return self

    @torch.no_grad()
    def signal(self, h_BTD: Tensor | None = None, active_BTS: Tensor | None = None) -> Tensor:
        """The per-token signal [B, T]: the detector's token score of h (the output of block
        `layer`; probe gate), or whether a selected feature fires (`active_BTS`; sequence gate)."""
        if self.detector is not None:
            if h_BTD is None:
                raise ValueError(f"the probe gate reads layer {self.layer}: pass its output")
            return self.detector.token_scores(h_BTD.to(self.detector.w.dtype) * self.scale)
        if active_BTS is None:
            raise ValueError("the sequence gate reads which selected features fire: pass active_BTS")
        return active_BTS.any(-1).float()

    def open(self, signal_BT: Tensor, editable_BT: Tensor, seg_BT: Tensor | None = None,
             start: GateCarry | tuple[Tensor, Tensor] | None = None) -> Tensor:
        """bool [B, T]: where the running mean of the signal is above the threshold (causal).
        `seg_BT`: tree-packed rows; `start`: what earlier KV-cached calls carried (`carry`)."""
        share_BT, seen_BT = firing_share(signal_BT, editable_BT, seg_BT, start, window=self.window)
        return gate_open(share_BT, seen_BT, self.threshold)

    def carry(self, start: GateCarry | None, signal_BT: Tensor, editable_BT: Tensor) -> GateCarry:
        """What the next KV-cached call on the same rows starts from."""
        return carry(start, signal_BT, editable_BT, window=self.window)
