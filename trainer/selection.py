"""Feature statistics, feature selection and the sequence gate: one module that `ff train`
(which measures and stores) and the intervention in `pipelines/` (which selects and gates) share.

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

The sequence gate (`gate_open`) is causal: at position t it compares the share of the
editable tokens up to t on which any selected feature fires with a threshold. The threshold
is a percentile, over retain training contexts, of that share over the whole context
(`calibrate`; Muhamed et al. 2025 use the same sequence-level share). Tree-packed rows
(prompt, then branches) count a branch's tokens after the shared prompt only (`seg`).

Shape suffixes: B rows/tokens, T positions, D d_model, F d_sae, S selected features.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

RULES = ("candidates", "saebench", "ratio")
STATS = ("freq", "mean", "mean_sq", "act", "alpha")
GATE_MIN_TOKENS = 8
"""The gate stays shut until a row has this many editable tokens: a share over a few tokens is
too noisy to call a topic: one firing prompt token such as "means:" at position 5 gives a
share of 0.2 by itself, above most thresholds, and opened the gate on every question."""


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


# ---- the sequence gate ---------------------------------------------------------------


def prefix_counts(x_BT: Tensor, seg_BT: Tensor | None = None) -> Tensor:
    """Causal running sums of x along T. With tree-packed rows (seg 0 = shared prompt, k > 0 =
    branch k, -1 padding; the prompt comes first), a branch token counts the whole prompt and
    the earlier tokens of its own branch only."""
    x_BT = x_BT.to(torch.float32)
    if seg_BT is None or not bool((seg_BT > 0).any()):
        return x_BT.cumsum(1)
    seg_BT = seg_BT.to(x_BT.device)
    prompt_BT = x_BT * (seg_BT == 0)
    out_BT = prompt_BT.cumsum(1)
    base_B1 = prompt_BT.sum(1, keepdim=True)
    for k in torch.unique(seg_BT[seg_BT > 0]).tolist():
        m_BT = seg_BT == k
        out_BT = torch.where(m_BT, base_B1 + (x_BT * m_BT).cumsum(1), out_BT)
    return out_BT


def firing_share(fires_BT: Tensor, editable_BT: Tensor, seg_BT: Tensor | None = None,
                 start: "GateCarry | tuple[Tensor, Tensor] | None" = None,
                 window: int | None = None) -> tuple[Tensor, Tensor]:
    """(mean of the per-token signal over the editable tokens so far, or over the last `window`
    of them; editable tokens so far), each [B, T]. `start`: what earlier calls on the same rows
    carried in (KV-cached generation of one sequence; `carry` makes it). The count of tokens
    seen (for `GATE_MIN_TOKENS`) always runs from the start."""
    e_BT = editable_BT.to(torch.float32)
    x_BT = fires_BT.to(torch.float32) * e_BT
    if window is None:
        fired_BT = prefix_counts(x_BT, seg_BT)
        seen_BT = prefix_counts(e_BT, seg_BT)
        if start is not None:
            fired_BT, seen_BT = fired_BT + start[0], seen_BT + start[1]
        return fired_BT / seen_BT.clamp_min(1), seen_BT
    if window < 1:
        raise ValueError(f"the gate's window must be at least 1 token, got {window}")
    if start is None:
        summed_BT, count_BT, seen_BT = _windowed(x_BT, e_BT, seg_BT, window)
        return summed_BT / count_BT.clamp_min(1), seen_BT
    if not isinstance(start, GateCarry) or start.tail_BW is None:
        raise ValueError("a windowed gate needs the carried tail of its signal (carry(..., window=W))")
    if seg_BT is not None:
        raise ValueError("carried gate counts apply to plain rows only")
    W0 = start.tail_BW.shape[1]  # the carried last `window` editable signals come first
    summed_BT, count_BT, seen_BT = (v[:, W0:] for v in _windowed(*_after_tail(start, x_BT, e_BT), None, window))
    return summed_BT / count_BT.clamp_min(1), seen_BT - start.tail_mask_BW.sum(1, keepdim=True).to(seen_BT) + start[1]


def _after_tail(start: "GateCarry", x_BT: Tensor, e_BT: Tensor) -> tuple[Tensor, Tensor]:
    """x and editable, each with a windowed gate's carried tail put before them."""
    return torch.cat([start.tail_BW.to(x_BT), x_BT], 1), torch.cat([start.tail_mask_BW.to(e_BT), e_BT], 1)


def _windowed(x_BT: Tensor, e_BT: Tensor, seg_BT: Tensor | None, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sum of x over the last `window` editable tokens up to each position, how many there
    are, editable tokens so far), tree-packed rows as in `prefix_counts` (a branch's window
    reaches into the prompt)."""
    P_BT, E_BT = prefix_counts(x_BT, seg_BT), prefix_counts(e_BT, seg_BT)
    before_BT = (E_BT - window).clamp_min(0)  # editable tokens that fell out of the window

    def lookup(valid_BT: Tensor) -> Tensor:
        # P just after the `before`-th editable token of the sequence made of the valid positions
        key_BT = torch.where(valid_BT, E_BT, torch.full_like(E_BT, -1.0)).cummax(1).values.contiguous()
        j_BT = torch.searchsorted(key_BT, before_BT.contiguous()).clamp_max(x_BT.shape[1] - 1)
        return torch.where(before_BT > 0, P_BT.gather(1, j_BT), torch.zeros_like(P_BT))

    if seg_BT is None or not bool((seg_BT > 0).any()):
        out_BT = lookup(torch.ones_like(e_BT, dtype=torch.bool))
    else:
        seg_BT = seg_BT.to(x_BT.device)
        out_BT = lookup(seg_BT == 0)
        for k in torch.unique(seg_BT[seg_BT > 0]).tolist():
            out_BT = torch.where(seg_BT == k, lookup((seg_BT == 0) | (seg_BT == k)), out_BT)
    return P_BT - out_BT, E_BT - before_BT, E_BT


class GateCarry(NamedTuple):
    """What a gate carries from one KV-cached call to the next, per row: the sum of its signal
    over the editable tokens so far, their count, and for a windowed gate the last `window`
    editable signals (right-aligned) with their mask."""
    fired_B1: Tensor
    seen_B1: Tensor
    tail_BW: Tensor | None = None
    tail_mask_BW: Tensor | None = None


def carry(start: "GateCarry | None", signal_BT: Tensor, editable_BT: Tensor,
          window: int | None = None) -> GateCarry:
    """The gate's carry after one more call on the same rows (`start`: before it)."""
    e_BT = editable_BT.to(torch.float32)
    x_BT = signal_BT.to(torch.float32) * e_BT
    fired_B1, seen_B1 = x_BT.sum(1, keepdim=True), e_BT.sum(1, keepdim=True)
    if start is not None:
        fired_B1, seen_B1 = fired_B1 + start.fired_B1, seen_B1 + start.seen_B1
    if window is None:
        return GateCarry(fired_B1, seen_B1)
    if start is not None and start.tail_BW is not None:
        x_BT, e_BT = _after_tail(start, x_BT, e_BT)
    from_end_BT = e_BT.flip(1).cumsum(1).flip(1)  # editable tokens from here to the end
    keep_BT = e_BT.bool() & (from_end_BT <= window)
    col_BT = torch.where(keep_BT, window - from_end_BT, torch.full_like(from_end_BT, window)).long()
    tail = torch.zeros(len(x_BT), window + 1, dtype=x_BT.dtype, device=x_BT.device)
    mask = torch.zeros(len(x_BT), window + 1, dtype=torch.bool, device=x_BT.device)
    tail.scatter_(1, col_BT, torch.where(keep_BT, x_BT, torch.zeros_like(x_BT)))
    mask.scatter_(1, col_BT, keep_BT)
    return GateCarry(fired_B1, seen_B1, tail[:, :window], mask[:, :window])


def gate_open(share_BT: Tensor, seen_BT: Tensor, threshold: float,
              min_tokens: int = GATE_MIN_TOKENS) -> Tensor:
    """bool [B, T]: where the gate is open (strictly above the threshold, enough tokens)."""
    return (share_BT > threshold) & (seen_BT >= min_tokens)


def row_share(fires_BT: Tensor, editable_BT: Tensor) -> Tensor:
    """The share of a row's editable tokens on which a selected feature fires [B]."""
    e_BT = editable_BT.to(torch.float32)
    return (fires_BT.to(torch.float32) * e_BT).sum(1) / e_BT.sum(1).clamp_min(1)


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


def iter_contexts(source, scale: float) -> Iterator[tuple[Tensor, Tensor]]:
    """(x [C, T, D] * scale, editable [C, T]) per piece of a store source (trainer/data.py)."""
    from cache.store import from_storage

    corpus = source.corpus
    for p in source.pieces:
        c_start, _ = corpus.chunk_bounds(p.chunk)
        raw = corpus.read_chunk_stored(source.layer, p.chunk)[p.start - c_start: p.stop - c_start]
        x = torch.from_numpy(from_storage(raw, corpus.meta.dtype)) * scale
        yield x, torch.from_numpy(corpus.mask(p.start, p.stop))


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
