"""Which features the edit acts on: the selection rules, read from the statistics `ff train`
stores in the run's features.safetensors (trainer/stats.py). The gate (this package) decides
where the selection is edited; `ff train` calibrates the sequence gate per selection and the
intervention (pipelines/intervene.py) selects, so both read the rules from here.

Rules (`select`, METHOD §7):
- "candidates": the FeatureForget candidate set U (METHOD §4), ranked by alpha_u / alpha_r;
- "saebench": freq_r below a threshold, ranked by freq_u (SAEBench);
- "ratio": among features rare on retain tokens (freq_r below the threshold), those whose
  forget score (mean squared activation on unlearn tokens) is at or above a percentile of
  their forget scores, ranked by forget / retain score (the feature selection of
  sequence-gated SAE unlearning, Muhamed et al. 2025, with the retain-frequency cap: without
  it the rule picks features that fire on every token, only more strongly on unlearn text,
  and a gate that counts firing tokens cannot use those).

Shape suffixes: F d_sae, S selected features.
"""

from __future__ import annotations

import torch
from torch import Tensor

RULES = ("candidates", "saebench", "ratio")


def set_key(rule: str, top_n: int | None, *, freq_threshold: float = 0.01,
            ratio_percentile: float = 90.0, max_ctx_r: float = 1.0) -> str:
    """The name of a selection, e.g. "candidates_top10", "saebench0.01_top20", "ratio90_0.01_top20",
    with "_ctx0.05" appended under a context-frequency cap."""
    n = "all" if top_n is None else f"top{top_n}"
    cap = "" if max_ctx_r >= 1.0 else f"_ctx{max_ctx_r:g}"
    if rule == "saebench":
        return f"saebench{freq_threshold:g}_{n}{cap}"
    if rule == "ratio":
        return f"ratio{ratio_percentile:g}_{freq_threshold:g}_{n}{cap}"
    return f"candidates_{n}{cap}"


def select(feats: dict[str, Tensor], rule: str, top_n: int | None, *, freq_threshold: float = 0.01,
           ratio_percentile: float = 90.0, max_ctx_r: float = 1.0) -> Tensor:
    """The selected features as sorted indices [S] (METHOD §7). `feats` holds the run's
    features.safetensors (freq_r, ..., and `candidate` for FeatureForget runs). `max_ctx_r` < 1
    first drops features that fire in at least that share of retain training contexts (`ctx_r`):
    a feature that fires once in most contexts (a prompt or formatting token) is rare per token
    but tells nothing about the topic, and a sequence gate that counts it opens everywhere."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule '{rule}': use {', '.join(RULES)}")
    keep_F = torch.ones(len(feats["freq_r"]), dtype=torch.bool)
    if max_ctx_r < 1.0:
        if "ctx_r" not in feats:
            raise ValueError("the run has no context frequencies (ctx_r): retrain it with this ff")
        keep_F = feats["ctx_r"] < max_ctx_r
    if rule == "candidates":
        if "candidate" not in feats:
            raise ValueError("the run has no FeatureForget candidate set (a baseline run?)")
        ok_F = feats["candidate"].bool()
        score_F = feats["alpha_u"].double() / (feats["alpha_r"].double() + 1e-12)
    elif rule == "saebench":
        ok_F = (feats["freq_r"] < freq_threshold) & (feats["freq_u"] > 0)
        score_F = feats["freq_u"].double()
        top_n = 20 if top_n is None else top_n
    else:
        forget_F, retain_F = feats["mean_sq_u"].double(), feats["mean_sq_r"].double()
        ok_F = (forget_F > 0) & (feats["freq_r"] < freq_threshold) & keep_F
        if not bool(ok_F.any()):
            return torch.zeros(0, dtype=torch.long)
        ok_F &= forget_F >= torch.quantile(forget_F[ok_F], ratio_percentile / 100.0)
        score_F = forget_F / (retain_F + 1e-12)
        top_n = 20 if top_n is None else top_n
    idx_S = (ok_F & keep_F).nonzero().flatten()
    order = torch.argsort(score_F[idx_S], descending=True, stable=True)
    if top_n is not None:
        order = order[:top_n]
    return idx_S[order].sort().values
