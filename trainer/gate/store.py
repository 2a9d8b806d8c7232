"""A run's `gate.safetensors`: everything `ff train` calibrates and fits for the gates, written
and read through `GateFile` only (no other code knows its keys).

Keys:

- `<selection>/features`, `<selection>/share`: per selection `ff train` calibrates
  (calibrate.py, `calibration_sets`), its feature indices and every retain training context's
  firing share (the sequence gate's calibration);
- `probe/...`, `probe@<l2>/...`, `probe@mlp/...`: the probe gate's detectors (detector.py): the
  default linear one, the other L2 penalties, the network; each with `w`, `b` (and `W`, `c` for
  the network) and `max`, every retain training context's highest out-of-fold score;
- `probe/layer`, `probe/scale`: the block whose output the detectors read and its scale, where
  that is not the trained layer (`ff train --set probe_offset=K`).

Shape suffixes: C contexts, S selected features.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from trainer.gate.detector import PROBE_L2, Detector, Probe
from trainer.run import RunFolder

CALIBRATION_KEY = "max"
"""The key (after a detector's prefix) of its retain calibration."""


def probe_prefix(l2: float | None, kind: str = "linear") -> str:
    """The key prefix of the detector of `kind` (linear: the one fitted with penalty `l2`, None
    the default)."""
    if kind == "mlp":
        return "probe@mlp"
    return "probe" if l2 is None or l2 == PROBE_L2 else f"probe@{l2:g}"


class GateFile(Mapping):
    """The tensors of a run's gate.safetensors, with what the gates ask of them. Read-only as a
    mapping (tests and tools may look at raw keys); built by `build`, saved by `write`."""

    def __init__(self, tensors: Mapping[str, Tensor] | None = None):
        self._t = dict(tensors or {})

    # ---- mapping ----
    def __getitem__(self, key: str) -> Tensor:
        return self._t[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    # ---- on disk ----
    @classmethod
    def read(cls, run_dir: str | Path) -> "GateFile":
        """The run folder's gate file (empty where the run has none: a run from an older ff)."""
        from safetensors.torch import load_file

        path = RunFolder(run_dir).gate
        return cls(load_file(str(path)) if path.is_file() else {})

    def write(self, run_dir: str | Path) -> Path:
        """Save into the run folder; an interrupted write leaves the previous file whole."""
        from trainer.run import write_features

        path = RunFolder(run_dir).gate
        write_features(path, self._t)
        return path

    @classmethod
    def build(cls, selections: Mapping[str, tuple[Tensor, Tensor]], probes: Mapping[float | str, Probe],
              probe_layer: tuple[int, float] | None = None) -> "GateFile":
        """From the sequence gate's calibration ({selection: (features [S], retain shares [C])}),
        the fitted detectors ({l2 or "mlp": Probe}) and the detectors' layer and scale where they
        read another block than the trained one."""
        t: dict[str, Tensor] = {}
        for key, (features, share) in selections.items():
            t[f"{key}/features"], t[f"{key}/share"] = features, share
        for name, probe in probes.items():
            prefix = probe_prefix(None, "mlp") if name == "mlp" else probe_prefix(float(name))
            det = probe.detector
            t.update({f"{prefix}/w": det.w.float(), f"{prefix}/b": torch.tensor([det.b], dtype=torch.float32),
                      f"{prefix}/{CALIBRATION_KEY}": probe.retain_max_C.float()})
            if det.W_HD is not None:
                t.update({f"{prefix}/W": det.W_HD.float(), f"{prefix}/c": det.c_H.float()})
        if probe_layer is not None:
            t.update({"probe/layer": torch.tensor([probe_layer[0]], dtype=torch.int64),
                      "probe/scale": torch.tensor([probe_layer[1]], dtype=torch.float32)})
        return cls(t)

    # ---- the sequence gate ----
    def selections(self) -> list[str]:
        """The selections whose sequence gate is calibrated."""
        return sorted(k[: -len("/features")] for k in self._t if k.endswith("/features"))

    def shares(self, key: str) -> tuple[Tensor, Tensor] | None:
        """(features [S], retain shares [C]) of the selection `key`, or None."""
        if f"{key}/share" not in self._t:
            return None
        return self._t[f"{key}/features"].long(), self._t[f"{key}/share"]

    # ---- the probe gate ----
    def l2s(self) -> list[float | None]:
        """The linear detectors held: None (the default) first, then the other penalties from the
        strongest down."""
        others = sorted((float(k[len("probe@"):-len("/w")]) for k in self._t
                         if k.startswith("probe@") and k.endswith("/w") and k != "probe@mlp/w"), reverse=True)
        return ([None] if "probe/w" in self._t else []) + others

    def detectors(self) -> list[tuple[str, float | None]]:
        """(kind, l2) of every detector held: the linear ones (`l2s`), then the "mlp" one."""
        return [("linear", l2) for l2 in self.l2s()] + ([("mlp", None)] if "probe@mlp/W" in self._t else [])

    def probe_problem(self, d_model: int, l2: float | None = None, kind: str = "linear") -> str | None:
        """Why the probe gate cannot be used (no detector on the residual stream, an older one
        that read SAE features, none of `kind` or penalty `l2`), phrased to follow the run's path;
        or None."""
        w = self._t.get("probe/w")
        if w is None or w.shape != (d_model,):
            return "has no probe gate on the residual stream (a run from an older ff)"
        if kind == "mlp" and f"{probe_prefix(None, kind)}/W" not in self._t:
            return "has no 'mlp' probe detector (a run from an older ff)"
        if kind != "mlp" and f"{probe_prefix(l2)}/w" not in self._t:
            have = ", ".join("default" if v is None else f"{v:g}" for v in self.l2s())
            return f"has no probe gate fitted with L2 {l2:g} (it has: {have})"
        return None

    def detector(self, l2: float | None = None, kind: str = "linear") -> Detector:
        """The detector of `kind` (linear: fitted with `l2`)."""
        key = probe_prefix(l2, kind)
        W = self._t.get(f"{key}/W")
        return Detector(self._t[f"{key}/w"].float(), float(self._t[f"{key}/b"][0]),
                        None if W is None else W.float(), None if W is None else self._t[f"{key}/c"].float())

    def calibration(self, l2: float | None = None, kind: str = "linear") -> Tensor | None:
        """Every retain training context's highest score under that detector [C], or None."""
        return self._t.get(f"{probe_prefix(l2, kind)}/{CALIBRATION_KEY}")

    def probe_layer(self) -> tuple[int, float] | None:
        """(layer, scale) the detectors read where that is not the trained layer, else None."""
        if "probe/layer" not in self._t:
            return None
        return int(self._t["probe/layer"][0]), float(self._t["probe/scale"][0])
