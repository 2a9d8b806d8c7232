"""Capture residual-stream activations of several layers in one truncated forward pass.

Forward hooks on the requested decoder blocks copy their outputs (`resid_post`, i.e. HF
`hidden_states[l + 1]`); the hook on the deepest block raises `_StopForward`, so no later block
and no LM head runs (on Gemma 3 270M the full forward costs ~5x the forward truncated at
layer 12, most of it the 262k-token unembedding).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from .models import decoder_layers


class _StopForward(Exception):
    pass


@contextmanager
def capture_layers(model: Any, layers: Sequence[int], *, stop: bool = True,
                   detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Context manager; the yielded dict is filled with layer -> [B, T, D] on each forward
    (`detach=False`: the outputs keep their autograd graph, for training the blocks below)."""
    blocks = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            out[layer] = h.detach() if detach else h
            if stop and layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in sorted(set(layers)):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield out
    finally:
        for h in handles:
            h.remove()


def base_model(model: Any) -> Any:
    """The decoder stack without the LM head, when the model exposes it."""
    return getattr(model, "model", model)


def outputs_at(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int], *,
               detach: bool = True) -> dict[int, torch.Tensor]:
    """Run the model up to the deepest of `layers` (no later block, no LM head); return layer ->
    activations [B, T, D], with their autograd graph where `detach` is False."""
    with capture_layers(model, layers, detach=detach) as acts:
        try:
            base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return dict(acts)


@torch.inference_mode()
def forward_layers(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Run the model up to the deepest of `layers`; return layer -> activations [B, T, D]."""
    acts = outputs_at(model, input_ids, attention_mask, layers)
    missing = set(layers) - set(acts)
    if missing:  # pragma: no cover - a model whose blocks we could not hook
        raise RuntimeError(f"layers {sorted(missing)} produced no activations")
    return dict(acts)
