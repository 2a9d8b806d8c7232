"""Feature statistics, measured once by `ff train` and stored in the run's features.safetensors.

Statistics (METHOD §2, §7) are measured the same way for every method: one pass over every
training token of each corpus after training, with the final weights. Per feature and corpus
(suffix `_r` retain, `_u` unlearn): `freq` (share of tokens where f > 0), `mean` (E f),
`mean_sq` (E f^2), `act` (E[f | f > 0], the feature's typical firing value) and `alpha`
(E |dL_recon/df| over tokens where f fires, METHOD §2, eq. 5). The rules that select features
from them live with the gate, in `trainer/gate/select.py`: both are read at inference time.

Shape suffixes: B rows/tokens, T positions, D d_model, F d_sae.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

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
