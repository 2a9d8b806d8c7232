"""Gate thresholds: a percentile of the scores of retain text, so that the gate opens on about
(100 - percentile)% of it.

The sequence gate's threshold is a percentile, over retain training contexts, of the share of a
context's editable tokens on which a selected feature fires (`calibrate`, for every selection in
`calibration_sets`; Muhamed et al. 2025 use the same sequence-level share). The probe gate's
training calibration is each retain context's highest out-of-fold score (`detector.py`); `ff
eval` calibrates it again on retain dev questions (pipelines/evaluate.py, `calibrate_probe`).

Shape suffixes: B rows, T positions, D d_model, S selected features, C contexts.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from trainer.gate.causal import row_share
from trainer.gate.select import select, set_key


@torch.no_grad()
def calibrate(sae, contexts: Iterable[tuple[Tensor, Tensor]],
              sets: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Per selection in `sets` ({key: indices [S]}), the firing share of every retain context
    -> {key: float32 [n_contexts]}. `contexts` yields (x [B, T, D] normalised, editable
    mask [B, T])."""
    union = torch.unique(torch.cat([s for s in sets.values()] + [torch.zeros(0, dtype=torch.long)]))
    pos = {int(f): i for i, f in enumerate(union.tolist())}
    W_DS = sae.W_enc[:, union].detach()
    b_S = sae.b_enc[union].detach()
    out: dict[str, list[Tensor]] = {k: [] for k in sets}
    for x_BTD, m_BT in contexts:
        f_BTS = torch.relu((x_BTD.to(W_DS.device) - sae.b_dec) @ W_DS + b_S) > 0
        for k, idx in sets.items():
            cols = torch.tensor([pos[int(i)] for i in idx.tolist()], dtype=torch.long)
            fires_BT = f_BTS[..., cols].any(-1) if len(cols) else torch.zeros(m_BT.shape, dtype=torch.bool)
            out[k].append(row_share(fires_BT.cpu(), m_BT))
    return {k: torch.cat(v).numpy().astype(np.float32) if v else np.zeros(0, np.float32)
            for k, v in out.items()}


def threshold_at(share_C: np.ndarray, percentile: float) -> float:
    """The gate threshold: the `percentile` of the retain contexts' firing shares."""
    if len(share_C) == 0:
        raise ValueError("no retain contexts to calibrate the gate on")
    return float(np.percentile(share_C.astype(np.float64), percentile))


GATE_TOP_N = (10, 20, 50, 200)
"""Feature counts whose gate thresholds `ff train` calibrates (with every candidate for
FeatureForget runs)."""
SAEBENCH_THRESHOLDS = (0.001, 0.01)
RATIO_PERCENTILES = (90.0,)
CTX_CAPS = (1.0, 0.05)
"""Context-frequency caps (max_ctx_r) calibrated: none, and 5% of retain contexts."""


def calibration_sets(feats: dict[str, Tensor], method: str) -> dict[str, Tensor]:
    """Every selection whose gate `ff train` calibrates -> {set_key: indices}."""
    out: dict[str, Tensor] = {}
    caps = [c for c in CTX_CAPS if c >= 1.0 or "ctx_r" in feats]
    rules = [("saebench", thr, 90.0) for thr in SAEBENCH_THRESHOLDS]
    rules += [("ratio", thr, p) for p in RATIO_PERCENTILES for thr in SAEBENCH_THRESHOLDS]
    if method == "featureforget":
        rules.append(("candidates", 0.01, 90.0))
    for cap in caps:
        for rule, thr, p in rules:
            for n in GATE_TOP_N + ((None,) if rule == "candidates" else ()):
                kw = dict(freq_threshold=thr, ratio_percentile=p, max_ctx_r=cap)
                out[set_key(rule, n, **kw)] = select(feats, rule, n, **kw)
    return out
