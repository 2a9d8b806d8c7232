"""The gate's running mean: causal, over every editable token so far or the last `window` of
them, on plain rows or tree-packed ones (a shared prompt, then branches: a branch counts the
prompt and its own earlier tokens only, `seg`), and carried across KV-cached calls.

Shape suffixes: B rows, T positions, W window.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from trainer.gate import GATE_MIN_TOKENS


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
