"""Fluency of an edited model: does it still speak the language once the edit is installed?

For each setting, greedy continuations of prose prompts are scored by the CLEAN model (mean
negative log-likelihood per token, as in the perplexity-of-generations checks of unlearning
papers) and by their distinct-bigram ratio (repetition loops lower it), next to the same numbers
for the clean model's own continuations.

    from pipelines.fluency import clean_reference, fluency_prompts, measure_fluency
    ids_PT = fluency_prompts(tok, paragraphs, n_prompts=64, prompt_tokens=16)
    ref = clean_reference(model, tok, ids_PT, n_new=32)          # once per sweep
    for iv in interventions:
        print(measure_fluency(model, tok, ids_PT, lambda: iv.hooked(model), clean_cont=ref).to_dict())

Shape suffixes: P prompts, B a batch of prompts, T prompt tokens, N new tokens.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, NamedTuple

import torch
from torch import Tensor

from pipelines.errors import EvalError
from pipelines.fastlm import cache_kw
from pipelines.result import Example, Fluency


class CleanRef(NamedTuple):
    """The clean side of a fluency measurement, independent of the setting: compute it once."""

    cont_PN: Tensor
    nll_P: Tensor
    distinct_P: Tensor


def fluency_prompts(tokenizer: Any, paragraphs: list[str], *, n_prompts: int, prompt_tokens: int) -> Tensor:
    """int64 [P, 1 + prompt_tokens]: BOS (if the tokenizer has one) and the first `prompt_tokens`
    tokens of the first `n_prompts` paragraphs long enough to have one more. Equal lengths by
    construction, so prompts batch without padding, which would change what an edit sees."""
    if n_prompts < 1 or prompt_tokens < 1:
        raise EvalError(f"fluency needs n_prompts >= 1 and prompt_tokens >= 1, got {n_prompts} and {prompt_tokens}")
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if bos is not None else []
    rows: list[list[int]] = []
    for text in paragraphs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > prompt_tokens:
            rows.append(head + list(ids[:prompt_tokens]))
            if len(rows) == n_prompts:
                break
    if not rows:
        raise EvalError(f"no paragraph of the {len(paragraphs)} given has more than {prompt_tokens} tokens: "
                        "give longer paragraphs or a smaller prompt length")
    return torch.tensor(rows, dtype=torch.int64)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _greedy_rows(model: Any, ids_BT: Tensor, n_new: int) -> Tensor:
    """[B, n_new]: one batch, KV-cached. Positions are passed explicitly so that the
    intervention's hooks see each step as the continuation of a sequence (intervene._continues)."""
    T, dev, kw = ids_BT.shape[1], ids_BT.device, cache_kw(model)
    out = model(input_ids=ids_BT, position_ids=torch.arange(T, device=dev)[None], use_cache=True,
                logits_to_keep=1)
    new_BN = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for t in range(T, T + n_new - 1):
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        out = model(input_ids=new_BN[-1], position_ids=torch.tensor([[t]], device=dev), use_cache=True,
                    logits_to_keep=1, **{kw: cache})
        new_BN.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(new_BN, dim=1)


@torch.inference_mode()
def greedy(model: Any, ids_PT: Tensor, n_new: int, *, batch: int = 16) -> Tensor:
    """int64 [P, n_new]: argmax continuations of `model` as it is (hooks included). Never stops at
    EOS: a fixed length gives every prompt the same number of scored tokens."""
    if n_new < 1:
        raise EvalError(f"fluency needs at least 1 new token, got {n_new}")
    dev = _device(model)
    parts = [_greedy_rows(model, ids_PT[i:i + batch].to(dev), n_new) for i in range(0, len(ids_PT), batch)]
    return torch.cat(parts).cpu()


@torch.inference_mode()
def continuation_nll(model: Any, ids_PT: Tensor, cont_PN: Tensor, *, batch: int = 16) -> Tensor:
    """float32 [P]: mean NLL (nats/token) of cont given prompt under `model` as it is, by teacher
    forcing over cat(prompt, cont). The LM head runs only at the positions that predict cont,
    a chunk of them at a time (a 262k vocabulary times every position would dominate memory)."""
    from pipelines.fastlm import Batch, head_logprobs

    T, N, dev = ids_PT.shape[1], cont_PN.shape[1], _device(model)
    base = getattr(model, "model", model)
    out_P = []
    for i in range(0, len(ids_PT), batch):
        seq_BL = torch.cat([ids_PT[i:i + batch], cont_PN[i:i + batch]], dim=1)
        B, L = seq_BL.shape
        hidden_BLD = base(input_ids=seq_BL.to(dev), position_ids=torch.arange(L, device=dev)[None],
                          use_cache=False).last_hidden_state
        rows = torch.arange(B).repeat_interleave(N)
        cols = (T - 1 + torch.arange(N)).repeat(B)
        b = Batch(seq_BL, torch.arange(L).expand(B, L), torch.zeros(B, L, dtype=torch.long),
                  torch.ones(B, L, dtype=torch.bool), rows, cols, cont_PN[i:i + batch].reshape(-1))
        out_P.append(-head_logprobs(model, hidden_BLD, b).view(B, N).mean(-1))
    return torch.cat(out_P).cpu()


def distinct_bigrams(cont_PN: Tensor) -> Tensor:
    """float32 [P]: unique token bigrams / bigrams per row; 1.0 where a row has no bigram."""
    N = cont_PN.shape[1]
    if N < 2:
        return torch.ones(len(cont_PN))
    ratios = [len(set(zip(row[:-1], row[1:]))) / (N - 1) for row in cont_PN.tolist()]
    return torch.tensor(ratios, dtype=torch.float32)


def clean_reference(model: Any, tokenizer: Any, ids_PT: Tensor, n_new: int = 32, *, batch: int = 16) -> CleanRef:
    """The clean model's continuations, their NLL and distinct ratio (`tokenizer` is unused; it
    keeps the call parallel to `measure_fluency`)."""
    cont_PN = greedy(model, ids_PT, n_new, batch=batch)
    return CleanRef(cont_PN, continuation_nll(model, ids_PT, cont_PN, batch=batch), distinct_bigrams(cont_PN))


def _examples(tokenizer: Any, ids_PT: Tensor, clean_PN: Tensor, edited_PN: Tensor, k: int) -> list[Example]:
    """Up to k decoded triples, changed prompts first (an unchanged pair shows nothing). Special
    tokens stay in the continuations: an EOS in mid-text is part of what the model said."""
    changed_P = (clean_PN != edited_PN).any(-1)
    order = sorted(range(len(ids_PT)), key=lambda p: not bool(changed_P[p]))[:max(k, 0)]
    return [Example.build(prompt=tokenizer.decode(ids_PT[p], skip_special_tokens=True),
                          clean=tokenizer.decode(clean_PN[p], skip_special_tokens=False),
                          edited=tokenizer.decode(edited_PN[p], skip_special_tokens=False)) for p in order]


def measure_fluency(model: Any, tokenizer: Any, ids_PT: Tensor, edit: Callable[[], ContextManager[Any]] | None,
                    *, n_new: int = 32, clean_cont: CleanRef | Tensor | None = None, examples: int = 3,
                    batch: int = 16) -> Fluency:
    """Fluency of `model` with `edit()` installed (None: the clean model) on `ids_PT`. The edited
    continuations are scored by the clean model, outside the edit: an edit that makes the model
    rate its own babble highly must not hide the babble. `clean_cont`: a CleanRef (or the clean
    continuations alone) reused across settings; None computes it here."""
    if isinstance(clean_cont, Tensor):
        clean_cont = CleanRef(clean_cont, continuation_nll(model, ids_PT, clean_cont, batch=batch),
                              distinct_bigrams(clean_cont))
    ref = clean_cont if clean_cont is not None else clean_reference(model, tokenizer, ids_PT, n_new, batch=batch)
    if tuple(ref.cont_PN.shape) != (len(ids_PT), n_new):
        raise EvalError(f"the clean continuations are {tuple(ref.cont_PN.shape)} but the prompts and n_new "
                        f"ask for {(len(ids_PT), n_new)}: compute clean_reference with the same prompts and n_new")
    if edit is None:
        edited_PN = ref.cont_PN
    else:
        with edit():
            edited_PN = greedy(model, ids_PT, n_new, batch=batch)
    nll_P = continuation_nll(model, ids_PT, edited_PN, batch=batch)
    return summarize(tokenizer, ids_PT, edited_PN, nll_P, ref, examples=examples)


def summarize(tokenizer: Any, ids_PT: Tensor, edited_PN: Tensor, nll_P: Tensor, ref: CleanRef, *,
              examples: int = 3) -> Fluency:
    """The Fluency (pipelines/result.py) of edited continuations whose clean-model NLL is `nll_P`,
    against `ref`."""
    n_new = edited_PN.shape[1]
    return Fluency.build(nll=nll_P.mean().item(), nll_clean=ref.nll_P.mean().item(),
                         distinct=distinct_bigrams(edited_PN).mean().item(),
                         distinct_clean=ref.distinct_P.mean().item(),
                         changed=(edited_PN != ref.cont_PN).any(-1).float().mean().item(),
                         n_prompts=len(ids_PT), n_new=n_new,
                         examples=_examples(tokenizer, ids_PT, ref.cont_PN, edited_PN, examples))
