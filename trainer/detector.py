"""The topic detector behind the probe gate: a logistic regression on the residual stream.

The sequence gate of `trainer/selection.py` counts the tokens on which any *selected* feature
fires. On short prompts (a question is 10-30 tokens) that count is too coarse to tell the
topics apart: the features chosen to be edited are chosen for what they *carry*, not for how
well they *detect*. The probe gate reads the layer's whole (normalised) residual stream:

    xbar_t  = (1 / n_t) sum_{s <= t} x_s           mean of the editable tokens so far  [D]
    score_t = w . xbar_t + b                        log-odds that the sequence is unlearn text

Because the score is linear in the running mean it is causal and cheap: a token contributes
the scalar `x_s . w` once, and the gate keeps a running sum, exactly like the firing share of
the sequence gate (KV-cached generation carries the two sums). An earlier version read the
SAE's feature firing instead; on the demo the residual stream detects the topic better, on
question prompts and on prose (docs/method.md, "The probe gate"). Both methods' runs at one layer
thus share one kind of detector, and their comparison is about the features they edit.

Pooling (`PROBE_POOLS`): "mean" is the score above. "positive" averages each token's evidence
*for* the topic only, `mean_{s <= t} max(w . x_s + b, 0)`: tokens that look like retain text (a
question's template, function words) no longer cancel the few that name the topic, so a short
prompt with two topical words among ten scores higher, while retain text, whose tokens carry
little positive evidence, stays low. Equally causal and cheap (one running sum of a scalar).

Training (`ff train`, from the store, no LLM): examples are windows of the training contexts
of both corpora, labelled unlearn = 1 and retain = 0: per context and per length in
`PROBE_LENGTHS`, the prefix and `PROBE_STARTS` windows at seeded random starts (so that a short
prompt, which starts at its first token, looks like data the probe has seen wherever a topic
begins), and the whole context. The dimensions are standardised and the weights
L2-regularised (full-batch L-BFGS, balanced classes). Calibration: the threshold is a
percentile, over retain training contexts, of the context's highest score at any position with
at least `GATE_MIN_TOKENS` editable tokens, scored by a probe that did not see the context (two
folds, cross-fitted), so that at the 95th percentile the gate opens somewhere in about 5% of
unseen retain contexts. The stored probe averages the two folds' weights.

Shape suffixes: C contexts, T positions, D d_model, N examples.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.selection import GATE_MIN_TOKENS, firing_share

Contexts = Iterable[tuple[Tensor, Tensor]]
"""(x [C, T, D] normalised, editable [C, T]) per piece of a corpus."""

PROBE_LENGTHS = (8, 12, 16, 24, 32, 48, 64, 96)
"""Window lengths (editable tokens) of the training examples, besides the whole context."""
PROBE_STARTS = 3
"""Windows per length and context at random starts, besides the prefix."""
PROBE_L2 = 1e-1
"""L2 penalty on the standardised weights (mean logistic loss + PROBE_L2 * ||w||^2) of the
run's default probe (gate.safetensors keys "probe/...")."""
PROBE_L2S = (PROBE_L2, 1e-2, 1e-3)
"""Penalties `ff train` fits a probe for (the others under "probe@<l2>/..."): which detects
prompts best depends on the layer and the data, so `ff eval` chooses on the dev questions."""
PROBE_POOLS = ("mean", "positive")
"""How the gate pools the per-token scores over the tokens so far (module docstring)."""
CALIBRATION_KEYS = {"mean": "max", "positive": "max_pos"}
"""Per pooling, the gate.safetensors key (after the probe's prefix) of its retain calibration."""
PROBE_MAX_CONTEXTS = 2048
"""At most this many contexts per corpus feed the probe (evenly spaced); the rest add little."""


class Probe(NamedTuple):
    w_D: Tensor
    """Weights on the running mean of the normalised residual stream."""
    b: float
    """Bias (log-odds)."""
    retain_max_C: Tensor
    """Per retain training context: its highest out-of-fold score (the gate's calibration)."""
    retain_max_pos_C: Tensor
    """The same for the "positive" pooling."""


def _kept(contexts: Contexts, keep_every: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(x [T, D] float32, editable [T]) of every `keep_every`-th context, in reading order."""
    c = 0
    for x_CTD, m_CT in contexts:
        for x_TD, m_T in zip(x_CTD, m_CT):
            c += 1
            if (c - 1) % keep_every == 0:
                yield x_TD.float(), m_T.bool()


@torch.no_grad()
def _windows(contexts: Contexts, keep_every: int, lengths: tuple[int, ...], starts: int,
             g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(window means [N, D], context index [N]) of the kept contexts."""
    means, ctx_ids = [], []
    for c, (x_TD, m_T) in enumerate(_kept(contexts, keep_every)):
        cum_TD = torch.cat([x_TD.new_zeros(1, x_TD.shape[1]), (x_TD * m_T[:, None]).cumsum(0)])
        seen_T = torch.cat([torch.zeros(1), m_T.float().cumsum(0)])
        n, T = float(seen_T[-1]), len(m_T)
        if n == 0:
            continue
        for L in lengths:
            if L >= T:
                continue
            for s in [0, *torch.randint(1, T - L + 1, (starts,), generator=g).tolist()]:
                k = float(seen_T[s + L] - seen_T[s])
                if k >= min(L, GATE_MIN_TOKENS) // 2:  # windows over mostly padding add nothing
                    means.append((cum_TD[s + L] - cum_TD[s]) / k)
                    ctx_ids.append(c)
        means.append(cum_TD[-1] / n)
        ctx_ids.append(c)
    D = means[0].shape[0] if means else 0
    return (torch.stack(means) if means else torch.zeros(0, D)), torch.tensor(ctx_ids, dtype=torch.long)


def _fit(x_NF: Tensor, y_N: Tensor, l2: float) -> tuple[Tensor, float]:
    """Logistic regression on standardised features -> (w in raw units [F], b)."""
    mu_F, sd_F = x_NF.mean(0), x_NF.std(0)
    live_F = sd_F > 0
    z_NF = (x_NF - mu_F) / torch.where(live_F, sd_F, torch.ones_like(sd_F))
    z_NF[:, ~live_F] = 0
    w_F = torch.zeros(x_NF.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w_F, b], max_iter=200, history_size=20, line_search_fn="strong_wolfe")
    pos = float(y_N.mean())
    weight_N = torch.where(y_N > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))  # balanced

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z_NF @ w_F + b, y_N, weight=weight_N)
        loss = loss + l2 * w_F.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw_F = torch.where(live_F, w_F.detach() / torch.where(live_F, sd_F, torch.ones_like(sd_F)), 0.0)
    return w_raw_F, float(b.detach() - (w_raw_F * mu_F).sum())


def pool_signal(scores_BT: Tensor, b: float, pool: str) -> Tensor:
    """The per-token signal whose running mean the gate pools ([B, T]) from the tokens' x . w:
    x . w itself ("mean": the running mean plus b is the score), or the positive part of each
    token's log-odds, max(x . w + b, 0) ("positive": the running mean is the score)."""
    if pool == "mean":
        return scores_BT
    if pool == "positive":
        return torch.relu(scores_BT + b)
    raise ValueError(f"unknown probe pooling '{pool}': use {', '.join(PROBE_POOLS)}")


def score_offset(b: float, pool: str) -> float:
    """What turns the running mean of `pool_signal` into the detector's score."""
    return b if pool == "mean" else 0.0


@torch.no_grad()
def max_score(x_TD: Tensor, m_T: Tensor, w_D: Tensor, b: float, min_tokens: int = GATE_MIN_TOKENS,
              pool: str = "mean") -> Tensor:
    """A context's highest causal score at any position with >= min_tokens editable tokens (a
    shorter context: its whole-context score; none editable: -inf), pooled as `pool` says."""
    if not bool(m_T.any()):
        return torch.tensor(float("-inf"))
    signal_1T = pool_signal(token_scores(x_TD, w_D)[None], b, pool)
    share_1T, seen_1T = firing_share(signal_1T, m_T[None])  # the gate's running mean
    ok_T = (seen_1T[0] >= min(min_tokens, float(seen_1T[0, -1]))) & m_T
    return share_1T[0][ok_T].max() + score_offset(b, pool)


def fit_probe(retain: Callable[[], Contexts], unlearn: Contexts, *, n_retain: int, n_unlearn: int,
              lengths: tuple[int, ...] = PROBE_LENGTHS, starts: int = PROBE_STARTS,
              l2: float = PROBE_L2, max_contexts: int = PROBE_MAX_CONTEXTS, seed: int = 0) -> Probe:
    """Fit the detector on the contexts of each corpus (`retain()` is read twice: to fit, then
    to calibrate; `n_*`: how many contexts each yields) and calibrate it on retain contexts."""
    return fit_probes(retain, unlearn, n_retain=n_retain, n_unlearn=n_unlearn, lengths=lengths, starts=starts,
                      l2s=(l2,), max_contexts=max_contexts, seed=seed)[l2]


def fit_probes(retain: Callable[[], Contexts], unlearn: Contexts, *, n_retain: int, n_unlearn: int,
               lengths: tuple[int, ...] = PROBE_LENGTHS, starts: int = PROBE_STARTS,
               l2s: tuple[float, ...] = PROBE_L2S, max_contexts: int = PROBE_MAX_CONTEXTS,
               seed: int = 0) -> dict[float, Probe]:
    """`fit_probe` for each L2 penalty in `l2s`, on the same windows and calibration pass."""
    keep_r, keep_u = max(1, -(-n_retain // max_contexts)), max(1, -(-n_unlearn // max_contexts))
    g = torch.Generator().manual_seed(seed)
    x_r, ctx_r = _windows(retain(), keep_r, lengths, starts, g)
    x_u, ctx_u = _windows(unlearn, keep_u, lengths, starts, g)
    if len(x_r) == 0 or len(x_u) == 0:
        raise ValueError("the probe needs contexts with editable tokens in both corpora")
    x_ND = torch.cat([x_r, x_u])
    y_N = torch.cat([torch.zeros(len(x_r)), torch.ones(len(x_u))])
    fold_N = torch.cat([ctx_r % 2, ctx_u % 2])
    del x_r, x_u
    fits = {l2: [_fit(x_ND[fold_N != k], y_N[fold_N != k], l2) for k in (0, 1)] for l2 in l2s}
    # cross-fitting: each retain context is scored by the probe that did not see it
    oof: dict[tuple[float, str], list[Tensor]] = {(l2, pool): [] for l2 in l2s for pool in PROBE_POOLS}
    for c, (x_TD, m_T) in enumerate(_kept(retain(), keep_r)):
        for l2, pool in oof:
            oof[l2, pool].append(max_score(x_TD, m_T, *fits[l2][c % 2], pool=pool))

    def stacked(l2: float, pool: str) -> Tensor:
        return torch.stack(oof[l2, pool]) if oof[l2, pool] else torch.zeros(0)

    return {l2: Probe(torch.stack([w for w, _ in fits[l2]]).mean(0), float(np.mean([b for _, b in fits[l2]])),
                      stacked(l2, "mean"), stacked(l2, "positive")) for l2 in l2s}


def probe_prefix(l2: float | None) -> str:
    """The gate.safetensors key prefix of the probe fitted with penalty `l2` (None: the default)."""
    return "probe" if l2 is None or l2 == PROBE_L2 else f"probe@{l2:g}"


def stored_l2s(gate: dict[str, Tensor]) -> list[float | None]:
    """The probe variants a run's gate.safetensors holds: None (the default) first, then the
    other penalties from the strongest down."""
    others = sorted((float(k[len("probe@"):-len("/w")]) for k in gate if k.startswith("probe@") and k.endswith("/w")),
                    reverse=True)
    return ([None] if "probe/w" in gate else []) + others


def token_scores(x_BTD: Tensor, w_D: Tensor) -> Tensor:
    """Each token's contribution x . w  [B, T] (the gate averages it over the prefix)."""
    return x_BTD.to(w_D.dtype) @ w_D
