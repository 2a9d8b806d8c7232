"""The gate: where the unlearning edit may act. Everything about it lives in this package, with
the selection rules that say which features the edit acts on (`select.py`): inference reads
both, and nothing else from trainer/ but the SAE and its run folder.

A gate reads a per-token *signal*, averages it causally over the editable tokens so far (or the
last `window` of them) and opens where that running mean exceeds a *threshold*, once the row has
`GATE_MIN_TOKENS` editable tokens. Two signals:

- the **sequence gate**: whether any selected SAE feature fires on the token (the share of
  firing tokens, Muhamed et al. 2025), calibrated per selection on the retain training contexts;
- the **probe gate**: a topic detector's token score on the residual stream of the edited layer
  or an earlier one (a linear probe, or a small network: `detector.py`), whose running mean plus
  the detector's bias is the log-odds that the text is unlearn text.

Modules, one concern each:

- `causal.py`: the running mean, from the start or over a window, on plain or tree-packed rows,
  and what KV-cached generation carries from one call to the next (`GateCarry`);
- `detector.py`: fitting the probe gate's detectors (`ff train`, from the store);
- `calibrate.py`: thresholds as percentiles of retain scores; the sequence gate's calibration;
- `store.py`: the run's `gate.safetensors`, written and read through `GateFile` only;
- `gate.py`: `Gate`, a calibrated gate for one setting (`GateSpec`): its threshold, signal and
  where it is open; `pipelines/intervene.py` applies the edit where it says;
- `select.py`: the selection rules (candidates, saebench, ratio), from the run's statistics.

This module imports no torch, so the configuration can name the detector kinds cheaply.
"""

GATE_MIN_TOKENS = 8
"""The gate stays shut until a row has this many editable tokens: a share over a few tokens is
too noisy to call a topic: one firing prompt token such as "means:" at position 5 gives a
share of 0.2 by itself, above most thresholds, and opened the gate on every question."""

PROBE_KINDS = ("linear", "mlp")
"""Detector kinds of the probe gate (detector.py): `ff train` fits one "mlp" detector beside the
linear ones."""
