"""Fast scoring with an HF causal LM on CPU: log-probabilities of chosen next tokens only.

Three savings, each checked against the plain HF forward by `verify_fast_path` (and tests):

1. The LM head (640 x 262k on Gemma 3 270M, more FLOPs than all 18 blocks together) runs only
   at the positions we score, not at every position.
2. Resume at the intervention layer: the clean residual stream at the output of block `layer`
   is the same for every setting, so it is computed once per dataset; each setting edits it and
   reruns only the blocks after `layer`. Blocks 0..layer are temporarily replaced by stand-ins
   (`_Skip`, `_Inject`) inside the model's own forward, so HF still builds position embeddings
   and masks exactly as usual.
3. Tree packing for multiple-choice questions: one row holds the prompt once and every choice
   after it; each choice attends to the prompt and to itself only, with the positions it would
   have alone (`seg` ids below), so the prompt is not recomputed per choice.
4. Rerun from the first edit: a row's outputs before its first edited position are the clean
   ones (the model is causal), and so are the keys and values of every attention layer there.
   The clean pass keeps those of the layers after the edited one (`KV`); a setting then runs
   those layers only from each row's first edited position on (`suffix_score`), its queries
   attending to the kept prefix (benchmarks/bench_eval.py counts the tokens either way).

Shape suffixes: B rows, T tokens, D d_model, N scored targets, V vocabulary.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from cache.capture import StopForward, capture_layers, returns_tuple
from cache.models import decoder_layers
from pipelines.errors import EvalError


class Batch(NamedTuple):
    input_ids_BT: Tensor
    position_ids_BT: Tensor
    seg_BT: Tensor
    """-1 padding, 0 shared prefix (prompt, or a whole text context), k > 0 branch k (choice k-1);
    a token attends to earlier tokens of its own segment and of segment 0."""
    editable_BT: Tensor
    """Positions the intervention may edit: real tokens except BOS."""
    row_N: Tensor
    col_N: Tensor
    """The output at (row, col) predicts target_N."""
    target_N: Tensor

    def select(self, rows_R: Tensor, first_col_B: Tensor | None = None) -> tuple["Batch", Tensor]:
        """Rows `rows_R` only, trimmed to their length, scoring only targets at columns
        >= first_col_B[row] (outputs before a row's first edit are unchanged: causality)
        -> (batch, keep_N mask over this batch's targets)."""
        keep_N = torch.isin(self.row_N, rows_R)
        if first_col_B is not None:
            keep_N &= self.col_N >= first_col_B[self.row_N]
        new_row = torch.full((len(self.input_ids_BT),), -1, dtype=torch.long)
        new_row[rows_R] = torch.arange(len(rows_R))
        seg = self.seg_BT[rows_R]
        T = int((seg >= 0).long().cumsum(1).argmax(1).max()) + 1 if len(rows_R) else 0
        b = Batch(self.input_ids_BT[rows_R, :T], self.position_ids_BT[rows_R, :T], seg[:, :T],
                  self.editable_BT[rows_R, :T], new_row[self.row_N[keep_N]], self.col_N[keep_N],
                  self.target_N[keep_N])
        return b, keep_N


def text_config(model: Any) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def attention_masks(model: Any, b: Batch) -> Tensor | dict[str, Tensor]:
    """Prepared 4D masks [B, 1, T, T] in the format of the model's attention implementation;
    a dict per layer type for models that have one (Gemma 2/3: full and sliding)."""
    T = b.seg_BT.shape[1]
    col_BT = torch.arange(T).expand(len(b.seg_BT), T)
    return _masks(model, col_BT, b.seg_BT, b.position_ids_BT, col_BT, b.seg_BT, b.position_ids_BT)


def _masks(model: Any, qcol_BQ: Tensor, qseg_BQ: Tensor, qpos_BQ: Tensor, kcol_BK: Tensor, kseg_BK: Tensor,
           kpos_BK: Tensor) -> Tensor | dict[str, Tensor]:
    """Masks [B, 1, Q, K] for queries and keys given by their column in the packed row (causal
    order), segment (-1: none) and position id: a query sees the keys at or before its column
    of segment 0 and of its own segment (and, on sliding layers, within the window)."""
    cfg = text_config(model)
    ok_BQK = (kcol_BK[:, None, :] <= qcol_BQ[:, :, None]) & (kseg_BK[:, None, :] >= 0) & (
        (kseg_BK[:, None, :] == 0) | (kseg_BK[:, None, :] == qseg_BQ[:, :, None]))
    # a padding query attends to its own key (no NaN); keys follow the queries' columns there
    ok_BQK |= (kcol_BK[:, None, :] == qcol_BQ[:, :, None]) & (qseg_BQ < 0)[:, :, None]
    window = getattr(cfg, "sliding_window", None)
    dist_BQK = qpos_BQ[:, :, None] - kpos_BK[:, None, :]
    sliding_BQK = ok_BQK & (dist_BQK < window) if window else ok_BQK
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    dtype = next(model.parameters()).dtype

    def fmt(m_BQK: Tensor) -> Tensor:
        if impl == "sdpa":
            return m_BQK[:, None]
        if impl == "eager":
            return torch.zeros(m_BQK.shape, dtype=dtype).masked_fill(~m_BQK, torch.finfo(dtype).min)[:, None]
        raise EvalError(f"evaluation needs attn_implementation 'sdpa' or 'eager', the model uses '{impl}'")

    types = getattr(cfg, "layer_types", None)
    if not types:
        return fmt(sliding_BQK if window else ok_BQK)
    by_type = {"full_attention": ok_BQK, "sliding_attention": sliding_BQK}
    unknown = set(types) - set(by_type)
    if unknown:
        raise EvalError(f"evaluation does not support attention layer types {sorted(unknown)}")
    return {t: fmt(by_type[t]) for t in set(types)}


class _Skip(nn.Module):
    """Stand-in for a block before the resume layer: passes its input through, computes nothing."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class _Inject(_Skip):
    """Stand-in for the resume block itself: returns the (edited) residual stream given to it."""

    def __init__(self, h_BTD: Tensor, as_tuple: bool):
        super().__init__(as_tuple)
        self.h_BTD = h_BTD

    def forward(self, hidden_states, *args, **kwargs):
        return (self.h_BTD,) if self.as_tuple else self.h_BTD


@contextmanager
def _resumed(model: Any, layer: int, h_BTD: Tensor) -> Iterator[None]:
    blocks = decoder_layers(model)
    saved = [blocks[i] for i in range(layer + 1)]
    as_tuple = returns_tuple(model)
    try:
        for i in range(layer):
            blocks[i] = _Skip(as_tuple)
        blocks[layer] = _Inject(h_BTD, as_tuple)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


class KV:
    """Stands in for transformers' cache object for one forward (duck-typed: attention layers
    call `update`). Records the keys and values of the layers above `record_above` (the clean
    pass), or puts a stored prefix's keys and values before the new ones (`prefix`: {attention
    layer: (K, V) [B, heads, P, head_dim]}; a rerun from the first edited position)."""

    def __init__(self, *, record_above: int | None = None, prefix: dict[int, tuple[Tensor, Tensor]] | None = None):
        self.record_above, self.prefix = record_above, prefix or {}
        self.got: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.record_above is not None and layer_idx > self.record_above:
            self.got[layer_idx] = (key.detach(), value.detach())
        if layer_idx in self.prefix:
            k, v = self.prefix[layer_idx]
            return torch.cat([k.to(key), key], dim=2), torch.cat([v.to(value), value], dim=2)
        return key, value

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0


_CACHE_KW: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def cache_kw(base: Any) -> str:
    """The name of `base.forward`'s cache argument: `cache` in transformers 5 (the old name
    is deprecated there), `past_key_values` in 4.x."""
    if base not in _CACHE_KW:
        import inspect
        _CACHE_KW[base] = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return _CACHE_KW[base]


@torch.inference_mode()
def final_hidden(model: Any, b: Batch, *, capture: Sequence[int] = (), stop: bool = False,
                 resume: tuple[int, Tensor] | None = None, kv: KV | None = None,
                 masks: Tensor | dict[str, Tensor] | None = None) -> tuple[Tensor | None, dict[int, Tensor]]:
    """Run the decoder stack -> (final normed hidden [B, T, D], or None when `stop` ends the
    forward at the deepest captured block; {layer: resid [B, T, D]} for the `capture` layers).
    `resume=(layer, h)` starts from h at the output of block `layer`; `kv` records or prepends
    keys and values (KV); `masks` replaces the masks built from `b` (attention_masks)."""
    base = getattr(model, "model", model)
    dev = next(model.parameters()).device
    masks = attention_masks(model, b) if masks is None else masks
    masks = {k: v.to(dev) for k, v in masks.items()} if isinstance(masks, dict) else masks.to(dev)
    kwargs = dict(input_ids=b.input_ids_BT.to(dev), attention_mask=masks,
                  position_ids=b.position_ids_BT.to(dev), use_cache=False)
    if kv is not None:
        kwargs[cache_kw(base)] = kv
    out = None
    with capture_layers(model, capture, stop=stop) as got:
        try:
            if resume is not None:
                with _resumed(model, resume[0], resume[1].to(dev)):
                    out = base(**kwargs).last_hidden_state
            else:
                out = base(**kwargs).last_hidden_state
        except StopForward:
            pass
    return out, dict(got)


def suffix_score(model: Any, b: Batch, start_B: Tensor, layer: int, h_BTD: Tensor,
                 prefix: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
    """log p of every target of `b` [N] (each at a column >= its row's `start_B`), running the
    blocks after `layer` only from column start_B[row] on: `h_BTD` is the (edited) residual
    stream at the output of block `layer`, `prefix` the clean keys and values of every attention
    layer after it for the same rows ({layer: (K, V) [B, heads, >= max start, head_dim]}).
    Columns before a row's start are unchanged by an edit that starts there (the model is
    causal), so their keys and values are the clean ones; the scores equal a rerun of the whole
    rows (`score(model, b, resume=...)`) up to float rounding."""
    B, T = b.seg_BT.shape
    len_B = torch.where(b.seg_BT >= 0, torch.arange(1, T + 1), 0).max(1).values
    U = max(int((len_B - start_B).max()), 1)
    col_BU = start_B[:, None] + torch.arange(U)
    valid_BU = col_BU < len_B[:, None]
    idx_BU = col_BU.clamp(max=T - 1)
    seg_BU = torch.where(valid_BU, b.seg_BT.gather(1, idx_BU), -1)
    pos_BU = b.position_ids_BT.gather(1, idx_BU)
    P = int(start_B.max())
    pre_col_BP = torch.arange(P).expand(B, P)
    pre_seg_BP = torch.where(pre_col_BP < start_B[:, None], b.seg_BT[:, :P], -1)
    masks = _masks(model, col_BU, seg_BU, pos_BU, torch.cat([pre_col_BP, col_BU], 1),
                   torch.cat([pre_seg_BP, seg_BU], 1), torch.cat([b.position_ids_BT[:, :P], pos_BU], 1))
    sub = Batch(b.input_ids_BT.gather(1, idx_BU), pos_BU, seg_BU, valid_BU, b.row_N,
                b.col_N - start_B[b.row_N], b.target_N)
    h_BUD = h_BTD.gather(1, idx_BU.to(h_BTD.device)[..., None].expand(B, U, h_BTD.shape[-1]))
    kv = KV(prefix={i: (k[:, :, :P], v[:, :, :P]) for i, (k, v) in prefix.items()})
    hidden_BUD, _ = final_hidden(model, sub, resume=(layer, h_BUD), kv=kv, masks=masks)
    return head_logprobs(model, hidden_BUD, sub)


@torch.inference_mode()
def head_logprobs(model: Any, hidden_BTD: Tensor, b: Batch, *, chunk: int = 256) -> Tensor:
    """log p(target_N | prefix) [N] float32, running the LM head only at the scored positions
    (each distinct position once, in chunks of `chunk` rows of V logits)."""
    head = model.get_output_embeddings()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    dev, (T, D) = hidden_BTD.device, hidden_BTD.shape[1:]
    pos_U, inv_N = torch.unique((b.row_N * T + b.col_N).to(dev), return_inverse=True)
    h_UD = hidden_BTD.reshape(-1, D)[pos_U]
    tgt_N = b.target_N.to(dev)
    lse_U = torch.empty(len(pos_U), dtype=torch.float32, device=dev)
    out_N = torch.empty(len(tgt_N), dtype=torch.float32, device=dev)
    for s in range(0, len(pos_U), chunk):
        logits_UV = head(h_UD[s:s + chunk]).float()
        if cap is not None:  # Gemma 2 final logit soft-capping, as in the HF forward
            logits_UV = torch.tanh(logits_UV / cap) * cap
        lse_U[s:s + chunk] = torch.logsumexp(logits_UV, dim=-1)
        sel_N = (inv_N >= s) & (inv_N < s + chunk)
        out_N[sel_N] = logits_UV[inv_N[sel_N] - s, tgt_N[sel_N]]
    return (out_N - lse_U[inv_N]).cpu()


def score(model: Any, b: Batch, *, capture: Sequence[int] = (), resume: tuple[int, Tensor] | None = None,
          kv: KV | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """-> (log p of every target [N], {layer: resid [B, T, D]} for the `capture` layers)."""
    hidden_BTD, resid = final_hidden(model, b, capture=capture, resume=resume, kv=kv)
    return head_logprobs(model, hidden_BTD, b), resid


def resid_at(model: Any, b: Batch, layers: Sequence[int]) -> dict[int, Tensor]:
    """The residual stream at the output of blocks `layers`, stopping the forward at the deepest."""
    return final_hidden(model, b, capture=layers, stop=True)[1]


_VERIFIED: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()
"""model -> layers at which the fast path was checked against the plain forward."""


@torch.inference_mode()
def verify_fast_path(model: Any, layer: int) -> None:
    """Once per (model, layer): check tree packing, the partial LM head and resuming at `layer`
    against the plain HF forward on a tiny batch; an EvalError if this model is not supported."""
    if layer in _VERIFIED.get(model, ()):
        return
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt, branches = torch.randint(4, vocab, (6,), generator=g), [torch.randint(4, vocab, (n,), generator=g)
                                                                   for n in (2, 3)]
    ids = torch.cat([prompt, *branches])[None]
    pos = torch.cat([torch.arange(6)] + [6 + torch.arange(len(c)) for c in branches])[None]
    seg = torch.cat([torch.zeros(6, dtype=torch.long)] + [torch.full((len(c),), k + 1) for k, c in
                                                          enumerate(branches)])[None]
    cols = torch.tensor([5, 6, 5, 8, 9])  # prompt end -> b1[0], b1[0] -> b1[1], prompt end -> b2[0], ...
    tgts = torch.tensor([branches[0][0], branches[0][1], branches[1][0], branches[1][1], branches[1][2]])
    b = Batch(ids, pos, seg, torch.ones_like(ids, dtype=torch.bool), torch.zeros(5, dtype=torch.long), cols, tgts)
    lp_N, resid = score(model, b, capture=[layer])
    resumed_N, _ = score(model, b, resume=(layer, resid[layer]))
    dev = next(model.parameters()).device
    ref = []
    for c, n in ((branches[0], 2), (branches[1], 3)):
        logp = model(torch.cat([prompt, c])[None].to(dev)).logits[0].float().log_softmax(-1).cpu()
        ref += [logp[5 + t, c[t]] for t in range(n)]
    ref_N = torch.stack(ref)
    tol = 2e-3 if next(model.parameters()).dtype == torch.float32 else 0.15
    for name, got in (("tree-packed partial-head scoring", lp_N), ("resuming at the layer", resumed_N)):
        err = float((got - ref_N).abs().max())
        if not err <= tol:
            raise EvalError(f"fast evaluation path '{name}' does not match the plain forward of "
                            f"{type(model).__name__} (max |diff| {err:.3g}); this model is not supported")
    _VERIFIED.setdefault(model, set()).add(layer)
    try:  # the rerun from the first edited position: where a model does not take it, rows rerun whole
        kv = KV(record_above=layer)
        score(model, b, kv=kv)
        ok = len(kv.got) == len(decoder_layers(model)) - layer - 1
        for start in (3, 7):  # in the prompt; in the first branch, before the second
            keep_N = b.col_N >= start
            sub = Batch(ids, pos, seg, b.editable_BT, b.row_N[keep_N], b.col_N[keep_N], b.target_N[keep_N])
            got_N = suffix_score(model, sub, torch.tensor([start]), layer, resid[layer], kv.got)
            ok = ok and float((got_N - ref_N[keep_N]).abs().max()) <= tol
    except Exception:  # an attention layer that does not go through the cache object's update
        ok = False
    if ok:
        _KV_OK.setdefault(model, set()).add(layer)


_KV_OK: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()
"""model -> layers after which the clean keys and values were checked to serve a rerun."""


def kv_reuse_ok(model: Any, layer: int) -> bool:
    """Whether verify_fast_path(model, layer) found the rerun from the first edited position exact."""
    return layer in _KV_OK.get(model, ())
