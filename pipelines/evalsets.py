"""Evaluation sets with cached clean passes, so that one loaded model serves many runs cheaply.

Per set, computed once: the clean log-probability of every scored target (independent of the
run) and, per layer, the clean residual stream at the output of that block. A setting then
costs: the edit on the cached residuals, and a rerun of the blocks after the layer for the rows
where the edit changed anything (METHOD §7: a row with no selected feature active anywhere is
left bit-identical, so its clean scores are reused as they are), with the LM head only at the
targets at or after the row's first edited position (the model is causal).

Shape suffixes: B rows, T tokens, D d_model, N scored targets.
"""
from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from pipelines.config import EvalConfig
from pipelines.data import McqLayout, load_mcq, mcq_accuracy, mcq_batches, text_batches
from pipelines.errors import EvalError
from pipelines.fastlm import Batch, resid_at, score, text_config
from pipelines.intervene import Intervention


class SetResult(NamedTuple):
    value: float
    """MCQ accuracy, or mean next-token CE loss (nats) for text."""
    rows_rerun: int
    rows: int


class EvalSet:
    def __init__(self, name: str, batches: list[Batch], layout: McqLayout | None = None):
        self.name, self.batches, self.layout = name, batches, layout
        self.clean: list[Tensor] | None = None
        self.resid: dict[int, list[Tensor]] = {}

    @property
    def is_mcq(self) -> bool:
        return self.layout is not None

    @property
    def n_rows(self) -> int:
        return sum(len(b.input_ids_BT) for b in self.batches)

    @property
    def size(self) -> int:
        """Questions (MCQ) or scored tokens (text)."""
        return len(self.layout.answer_Q) if self.is_mcq else sum(len(b.target_N) for b in self.batches)

    def metric(self, logprobs: list[Tensor]) -> float:
        lp_N = torch.cat(logprobs)
        return mcq_accuracy(lp_N, self.layout) if self.is_mcq else float(-lp_N.double().mean())

    def prepare(self, model: Any, layers: int | Sequence[int]) -> None:
        """Clean scores (once) and the clean residual stream at each of `layers` (once per
        layer; all missing layers are captured in one forward)."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        missing = sorted(set(layers) - set(self.resid))
        if self.clean is not None and not missing:
            return
        clean, resid = [], {layer: [] for layer in missing}
        for b in self.batches:
            if self.clean is None:
                lp_N, got = score(model, b, capture=missing)
                clean.append(lp_N)
            else:
                got = resid_at(model, b, missing)
            for layer in missing:
                resid[layer].append(got[layer].cpu())
        if self.clean is None:
            self.clean = clean
        self.resid.update(resid)

    def clean_value(self) -> float:
        assert self.clean is not None, "prepare() first"
        return self.metric(self.clean)

    def logprobs(self, model: Any, iv: Intervention) -> tuple[list[Tensor], int]:
        """Per batch, log p of every target with `iv` applied at its layer -> (list, rows rerun).
        Call prepare(model, iv.layer) first."""
        assert self.clean is not None and iv.layer in self.resid, "prepare() first"
        dev = next(model.parameters()).device
        iv.to(dev)
        out, rerun = [], 0
        for b, clean_N, h_BTD in zip(self.batches, self.clean, self.resid[iv.layer]):
            edited = iv.edit(h_BTD.to(dev), b.editable_BT.to(dev))
            # A target whose position precedes its row's first edit keeps its clean score (causal
            # model); rows with no such target are not rerun at all.
            changed_BT = edited.changed_BT.cpu()
            T = changed_BT.shape[1]
            first_B = torch.where(changed_BT.any(1), changed_BT.long().argmax(1), T)
            rows_R = torch.unique(b.row_N[b.col_N >= first_B[b.row_N]])
            if len(rows_R) == 0:
                out.append(clean_N)
                continue
            sub, keep_N = b.select(rows_R, first_B)
            h_RTD = edited.h_BTD[rows_R.to(dev), : sub.input_ids_BT.shape[1]]
            lp_N, _ = score(model, sub, resume=(iv.layer, h_RTD))
            new_N = clean_N.clone()
            new_N[keep_N] = lp_N
            out.append(new_N)
            rerun += len(rows_R)
        return out, rerun

    def run(self, model: Any, iv: Intervention) -> SetResult:
        """The metric with `iv` applied at its layer (prepare(model, iv.layer) first)."""
        logprobs, rerun = self.logprobs(model, iv)
        return SetResult(self.metric(logprobs), rerun, self.n_rows)

    def activations(self, layer: int) -> list[Tensor]:
        """Clean residuals at `layer` at editable positions (no BOS, no padding), [n_i, D] each."""
        return [h_BTD[b.editable_BT] for b, h_BTD in zip(self.batches, self.resid[layer])]


class EvalData:
    """The four evaluation sets of one (model, data config), plus per-layer CE references."""

    def __init__(self, forget_mcq: EvalSet, retain_mcq: EvalSet, forget_text: EvalSet, retain_text: EvalSet):
        self.forget_mcq, self.retain_mcq = forget_mcq, retain_mcq
        self.forget_text, self.retain_text = forget_text, retain_text
        self.zero_ce: dict[int, float] = {}
        """layer -> retain-text CE with the layer's output zeroed (shared by every run there)."""

    @property
    def sets(self) -> tuple[EvalSet, ...]:
        return self.forget_mcq, self.retain_mcq, self.forget_text, self.retain_text

    def prepare(self, model: Any, layers: int | Sequence[int]) -> None:
        """Clean passes and residual streams at `layers`. Call it once with every layer an
        `ff run` will evaluate, so that one forward per set captures them all."""
        for s in self.sets:
            s.prepare(model, layers)


_MEMO: "weakref.WeakKeyDictionary[Any, dict[tuple, EvalData]]" = weakref.WeakKeyDictionary()


def eval_data(lm: Any, cfg: EvalConfig) -> EvalData:
    """Tokenized evaluation sets for `lm`; memoised per model and data config, so the clean
    passes of one `ff run` are shared by all of its runs and layers."""
    per_model = _MEMO.setdefault(lm.model, {})
    key = (lm.info.weights_hash, lm.info.tokenizer_hash, cfg.data_key())
    if key in per_model:
        return per_model[key]
    tok = lm.tokenizer
    window = getattr(text_config(lm.model), "sliding_window", None)
    sets = []
    for role in ("forget", "retain"):
        qs = load_mcq(getattr(cfg, f"{role}_mcq"), role, limit=cfg.max_questions)
        if not qs:
            raise EvalError(f"{role} MCQ source '{getattr(cfg, f'{role}_mcq')}' holds no questions")
        batches, layout = mcq_batches(tok, qs, template=cfg.mcq_template,
                                      max_batch_tokens=cfg.max_batch_tokens, window=window)
        sets.append(EvalSet(f"{role}_mcq", batches, layout))
    for role in ("forget", "retain"):
        batches = text_batches(tok, getattr(cfg, f"{role}_text"), role, max_tokens=cfg.max_text_tokens,
                               ctx_len=cfg.ctx_len, batch_contexts=cfg.text_batch_contexts)
        sets.append(EvalSet(f"{role}_text", batches))
    data = EvalData(*sets)
    per_model[key] = data
    return data
