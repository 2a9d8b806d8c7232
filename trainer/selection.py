"""Feature statistics and feature selection: one module that `ff train` (which measures and
stores) and the intervention in `pipelines/` (which selects) share. The gates that decide where
a selection is edited live in `trainer/gate/`.

Statistics (METHOD §2, §7) are measured the same way for every method: one pass over every
training token of each corpus after training, with the final weights. Per feature and corpus
(suffix `_r` retain, `_u` unlearn): `freq` (share of tokens where f > 0), `mean` (E f),
`mean_sq` (E f^2), `act` (E[f | f > 0], the feature's typical firing value) and `alpha`
(E |dL_recon/df| over tokens where f fires, METHOD §2, eq. 5).

Selection rules (`select`):
- "candidates": the FeatureForget candidate set U (METHOD §4), ranked by alpha_u / alpha_r;
- "saebench": freq_r below a threshold, ranked by freq_u (SAEBench, METHOD §7);
- "ratio": among features rare on retain tokens (freq_r below the threshold), those whose
  forget score (mean squared activation on unlearn tokens) is at or above a percentile of
  their forget scores, ranked by forget / retain score (the feature selection of
  sequence-gated SAE unlearning, Muhamed et al. 2025, with the retain-frequency cap: without
  it the rule picks features that fire on every token, only more strongly on unlearn text,
  and a gate that counts firing tokens cannot use those).

Shape suffixes: B rows/tokens, T positions, D d_model, F d_sae, S selected features.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

RULES = ("candidates", "saebench", "ratio")
STATS = ("freq", "mean", "mean_sq", "act", "alpha")

# ---- statistics ----------------------------------------------------------------------


@torch.no_grad()
def corpus_stats(sae, batches: Iterable[Tensor | tuple[Tensor, Tensor]], l1: float) -> dict[str, Tensor]:
    """STATS of one corpus -> {name: [F]}, over every [B, D] batch of normalised activations, or
    every (x [C, T, D], editable [C, T]) block of whole contexts; the latter also gives `ctx`,
    the share of contexts in which the feature fires at least once."""
    dev = sae.W_dec.device
    F = sae.d_sae
    acc = {k: torch.zeros(F, dtype=torch.float64, device=dev) for k in ("cnt", "sum", "sq", "alpha", "ctx")}
    n = n_ctx = 0
    for item in batches:
        if isinstance(item, (tuple, list)):
            x_CTD, m_CT = item
            x_BD = x_CTD[m_CT].to(dev, torch.float32)
            ctx_C = torch.repeat_interleave(torch.arange(len(m_CT)), m_CT.sum(1)).to(dev)
        else:
            x_BD, ctx_C = item.to(dev, torch.float32), None
        f_BF = sae.encode(x_BD)
        fired_BF = f_BF > 0
        # dL_recon/df for l = ||x - x_hat||^2 + l1 * sum f (per token, METHOD §1-§2)
        g_BF = 2 * (sae.decode(f_BF) - x_BD) @ sae.W_dec.T + l1
        acc["cnt"] += fired_BF.sum(0)
        acc["sum"] += f_BF.sum(0)
        acc["sq"] += f_BF.pow(2).sum(0)
        acc["alpha"] += (g_BF.abs() * fired_BF).sum(0)
        n += len(x_BD)
        if ctx_C is not None:
            per_ctx = torch.zeros(len(m_CT), F, dtype=torch.float32, device=dev).index_add_(0, ctx_C, fired_BF.float())
            acc["ctx"] += (per_ctx > 0).sum(0)
            n_ctx += len(m_CT)
    n = max(n, 1)
    out = {"freq": acc["cnt"] / n, "mean": acc["sum"] / n, "mean_sq": acc["sq"] / n,
           "act": acc["sum"] / acc["cnt"].clamp_min(1), "alpha": acc["alpha"] / n}
    if n_ctx:
        out["ctx"] = acc["ctx"] / n_ctx
    return {k: v.float().cpu() for k, v in out.items()}


# ---- selection -----------------------------------------------------------------------


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


# ---- reading the store -----------------------------------------------------------


def iter_contexts(source, scale: float) -> Iterator[tuple[Tensor, Tensor]]:
    """(x [C, T, D] * scale, editable [C, T]) per piece of a store source (trainer/data.py)."""
    from cache.store import from_storage

    corpus = source.corpus
    for p in source.pieces:
        c_start, _ = corpus.chunk_bounds(p.chunk)
        raw = corpus.read_chunk_stored(source.layer, p.chunk)[p.start - c_start: p.stop - c_start]
        x = torch.from_numpy(from_storage(raw, corpus.meta.dtype)) * scale
        yield x, torch.from_numpy(corpus.mask(p.start, p.stop))
