"""Capture residual-stream activations of several layers in one truncated forward pass.

The one early-stop forward of ff (`ff cache`, the evaluation's clean passes in
pipelines/fastlm.py, `ff bake`): forward hooks on the requested decoder blocks copy their
outputs (`resid_post`, i.e. HF `hidden_states[l + 1]`); the hook on the deepest block raises
`StopForward`, so no later block and no LM head runs (on Gemma 3 270M the full forward costs
~5x the forward truncated at layer 12, most of it the 262k-token unembedding). Block outputs
are unpacked and repacked here only (`hidden_of`, `with_hidden`); the exported folder's modeling
code (pipelines/hf_modeling.py) keeps its own two lines, as it may not import ff.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from .models import decoder_layers


class StopForward(Exception):
    """Raised by the deepest capturing hook to end a forward early; caught by whoever ran it."""


def hidden_of(output: Any) -> torch.Tensor:
    """A decoder block's output -> its hidden states (blocks return a tensor, or a tuple whose
    first item it is in older transformers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, h: torch.Tensor) -> Any:
    """A decoder block's output with its hidden states replaced by `h`, in the same form."""
    return (h, *output[1:]) if isinstance(output, (tuple, list)) else h


_RETURNS_TUPLE: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def returns_tuple(model: Any) -> bool:
    """Whether `model`'s decoder blocks returned tuples in the last forward captured (False before any)."""
    return _RETURNS_TUPLE.get(model, False)


@contextmanager
def capture_layers(model: Any, layers: Sequence[int], *, stop: bool = True,
                   detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Context manager; the yielded dict is filled with layer -> [B, T, D] on each forward
    (`detach=False`: the outputs keep their autograd graph, for training the blocks below).
    With `stop`, the deepest layer's hook raises StopForward: the forward's caller catches it."""
    blocks = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    handles = []
    if not layers:
        yield out
        return
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            _RETURNS_TUPLE[model] = isinstance(output, (tuple, list))
            h = hidden_of(output)
            out[layer] = h.detach() if detach else h
            if stop and layer == deepest:
                raise StopForward

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
        except StopForward:
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
