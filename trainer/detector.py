"""The topic detector behind the probe gate: a logistic regression over SAE feature firing.

The sequence gate of `trainer/selection.py` counts the tokens on which any *selected* feature
fires. On short prompts (a question is 10-30 tokens) that count is too coarse to tell the
topics apart: the 20 features chosen to be edited are chosen for what they *carry*, not for
how well they *detect*. The probe gate reads every feature instead:

    p_t    = (1 / n_t) sum_{s <= t} 1[f(x_s) > 0]      share of the tokens so far on which each
                                                        feature fired  [F]   (n_t editable tokens)
    score_t = w . p_t + b                               log-odds that the sequence is unlearn text

Because the score is linear in the running share it is causal and cheap: a token contributes
the scalar `1[f(x_s) > 0] . w` once, and the gate keeps a running sum, exactly like the firing
share of the sequence gate (KV-cached generation carries the two sums).

Training (`ff train`, from the store, no LLM): examples are prefixes of the training contexts
of both corpora, of several lengths (`PROBE_LENGTHS`, so that short prompts look like data the
probe has seen), labelled unlearn = 1 and retain = 0; features are standardised and the
weights L2-regularised (full-batch L-BFGS). Calibration: the threshold is a percentile, over
retain training contexts, of the context's highest score at any position with at least
`GATE_MIN_TOKENS` editable tokens, scored by a probe that did not see the context (two folds,
cross-fitted), so that at the 95th percentile the gate opens somewhere in about 5% of unseen
retain contexts. The stored probe averages the two folds' weights.

Shape suffixes: C contexts, T positions, D d_model, F d_sae, N examples.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.selection import GATE_MIN_TOKENS

PROBE_LENGTHS = (8, 12, 16, 24, 32, 48, 64, 96, 127)
"""Prefix lengths (editable tokens) of the training examples: one example per length per context,
and one for the whole context."""
PROBE_L2 = 1e-2
"""L2 penalty on the standardised weights (mean logistic loss + PROBE_L2 * ||w||^2)."""
PROBE_MAX_CONTEXTS = 4096
"""At most this many contexts per corpus feed the probe (evenly spaced); the rest add little."""


class Probe(NamedTuple):
    w_F: Tensor
    """Weights on the running firing share of each feature (raw share units)."""
    b: float
    """Bias (log-odds)."""
    retain_max_C: Tensor
    """Per retain training context: its highest out-of-fold score (the gate's calibration)."""


class _Prefixes(NamedTuple):
    share_NF: Tensor
    """Firing share of each feature over the prefix, float32 [N, F]."""
    context_N: Tensor
    """Which context (0..C-1 in reading order) each example comes from."""
    fired_CTF: list[Tensor]
    """Per context: cumulative firing counts [T', F] and editable counts [T'] (for calibration)."""


@torch.no_grad()
def _prefixes(sae, contexts: Iterable[tuple[Tensor, Tensor]], keep_every: int,
              lengths: tuple[int, ...], keep_cum: bool) -> _Prefixes:
    shares, ctx_ids, cums = [], [], []
    c = 0
    dev = sae.W_dec.device
    for x_CTD, m_CT in contexts:
        for x_TD, m_T in zip(x_CTD, m_CT):
            c += 1
            if (c - 1) % keep_every:
                continue
            m_T = m_T.to(dev)
            fired_TF = (sae.encode(x_TD.to(dev, torch.float32)) > 0) & m_T[:, None]
            cum_TF = fired_TF.float().cumsum(0)
            seen_T = m_T.float().cumsum(0)
            n = int(seen_T[-1]) if len(seen_T) else 0
            for L in sorted({L for L in lengths if L < n} | ({n} if n else set())):  # and the whole context
                at = int((seen_T == L).nonzero()[0])
                shares.append(cum_TF[at] / L)
                ctx_ids.append(len(cums) if keep_cum else c - 1)
            if keep_cum:
                cums.append((cum_TF.cpu(), seen_T.cpu()))
    F = sae.d_sae
    share_NF = torch.stack(shares).cpu() if shares else torch.zeros(0, F)
    return _Prefixes(share_NF, torch.tensor(ctx_ids, dtype=torch.long), cums)


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


def _max_scores(cums: list[tuple[Tensor, Tensor]], w_F: Tensor, b: float,
                min_tokens: int = GATE_MIN_TOKENS) -> Tensor:
    """Per context, the highest causal score at any position with >= min_tokens editable tokens
    (a context with fewer: its whole-context score)."""
    out = []
    for cum_TF, seen_T in cums:
        s_T = (cum_TF @ w_F) / seen_T.clamp_min(1) + b
        ok_T = seen_T >= min(min_tokens, float(seen_T.max()) if len(seen_T) else 0.0)  # short: the whole context
        out.append(s_T[ok_T & (seen_T > 0)].max() if bool((ok_T & (seen_T > 0)).any()) else torch.tensor(float("-inf")))
    return torch.stack(out) if out else torch.zeros(0)


def fit_probe(sae, retain: Iterable[tuple[Tensor, Tensor]], unlearn: Iterable[tuple[Tensor, Tensor]], *,
              n_retain: int, n_unlearn: int, lengths: tuple[int, ...] = PROBE_LENGTHS,
              l2: float = PROBE_L2, max_contexts: int = PROBE_MAX_CONTEXTS) -> Probe:
    """Fit the detector on (x [C, T, D] normalised, editable [C, T]) contexts of each corpus
    (`n_*`: how many contexts each iterable yields) and calibrate it on retain contexts."""
    r = _prefixes(sae, retain, max(1, -(-n_retain // max_contexts)), lengths, keep_cum=True)
    u = _prefixes(sae, unlearn, max(1, -(-n_unlearn // max_contexts)), lengths, keep_cum=False)
    if len(r.share_NF) == 0 or len(u.share_NF) == 0:
        raise ValueError("the probe needs contexts with editable tokens in both corpora")
    x_NF = torch.cat([r.share_NF, u.share_NF])
    y_N = torch.cat([torch.zeros(len(r.share_NF)), torch.ones(len(u.share_NF))])
    fold_N = torch.cat([r.context_N % 2, u.context_N % 2])
    ws, bs = [], []
    oof_C = torch.full((len(r.fired_CTF),), float("-inf"))
    for k in (0, 1):  # cross-fitting: each retain context is scored by the probe that did not see it
        train_N = fold_N != k
        w_F, b = _fit(x_NF[train_N], y_N[train_N], l2)
        ws.append(w_F)
        bs.append(b)
        held = [i for i in range(len(r.fired_CTF)) if i % 2 == k]
        oof_C[held] = _max_scores([r.fired_CTF[i] for i in held], w_F, b)
    return Probe(torch.stack(ws).mean(0), float(np.mean(bs)), oof_C)


def token_scores(fired_BTF: Tensor, w_F: Tensor) -> Tensor:
    """Each token's contribution 1[f > 0] . w  [B, T] (the gate averages it over the prefix)."""
    return fired_BTF.to(w_F.dtype) @ w_F
