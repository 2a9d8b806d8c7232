"""Evaluation sets with cached clean passes, so that one loaded model serves many runs cheaply.

Per set, computed once: the clean log-probability of every scored target (independent of the
run) and, per layer, the clean residual stream at the output of that block. A setting then
costs: the edit on the cached residuals, and a rerun of the blocks after the layer for the rows
where the edit changed anything (METHOD §7: a row with no selected feature active anywhere is
left bit-identical, so its clean scores are reused as they are), from the row's first edited
position on where the clean pass kept the keys and values of those blocks (EvalConfig.
kv_cache_gib; else the whole row), with the LM head only at the targets at or after that
position (the model is causal).
With EvalConfig.reuse false, none of this: every setting runs every row through the whole model,
the reference the reuse is measured against (benchmarks/bench_eval.py --whole).

Shape suffixes: B rows, T tokens, D d_model, N scored targets.
"""
from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from pipelines.config import EvalConfig
from pipelines.data import (
    McqLayout,
    load_mcq,
    mcq_accuracy,
    mcq_batches,
    mcq_correct,
    sample_split,
    text_batches,
    text_spec,
)
from pipelines.errors import EvalError
from pipelines.fastlm import KV, Batch, kv_reuse_ok, resid_at, score, suffix_score, text_config
from pipelines.intervene import Intervention
from pipelines.result import Fluency
from trainer.gate import GATE_MIN_TOKENS
from trainer.gate.causal import firing_share


class SetResult(NamedTuple):
    value: float
    """MCQ accuracy, or mean next-token CE loss (nats) for text."""
    rows_rerun: int
    rows: int
    correct_Q: Tensor | None = None
    """MCQ: bool [Q], whether each question is answered correctly."""


def rerun_rows(b: Batch, changed_BT: Tensor) -> tuple[Tensor, Tensor]:
    """(each row's first changed column [B] (T where none), the rows with a target at or after
    it [R]): the rows an edit must rerun, and from where (the model is causal)."""
    T = changed_BT.shape[1]
    first_B = torch.where(changed_BT.any(1), changed_BT.long().argmax(1), T)
    return first_B, torch.unique(b.row_N[b.col_N >= first_B[b.row_N]])


class EvalSet:
    def __init__(self, name: str, batches: list[Batch], layout: McqLayout | None = None,
                 test_Q: Tensor | None = None, items: list[str] | None = None):
        self.name, self.batches, self.layout = name, batches, layout
        self.test_Q = test_Q
        """MCQ: bool [Q], True for the test half (the sweep picks settings on the dev half)."""
        self.items = items
        """What each question (MCQ) or text row is, for the reports: the question, or the row's
        first words."""
        self.clean: list[Tensor] | None = None
        self.resid: dict[int, list[Tensor]] = {}
        self.kv: list[dict[int, tuple[Tensor, Tensor]]] | None = None
        """Per batch, the clean keys and values of the attention layers after `kv_above`
        ({layer: (K, V) [B, heads, T, head_dim]}), kept by prepare(kv_above=...)."""
        self.kv_above: int | None = None
        self.reuse = True
        """False: `logprobs` runs the whole model over every row (EvalConfig.reuse)."""
        self.tokens_rerun = 0
        """Positions run through the blocks above the edited layer by `logprobs` so far (a count
        for benchmarks)."""

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

    def prepare(self, model: Any, layers: int | Sequence[int], kv_above: int | None = None) -> None:
        """Clean scores (once) and the clean residual stream at each of `layers` (once per
        layer; all missing layers are captured in one forward). `kv_above`: the clean pass also
        keeps the keys and values of the attention layers after this one (`logprobs` then
        reruns a row from its first edited position on, for interventions at or after it)."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        missing = sorted(set(layers) - set(self.resid))
        if self.clean is not None and not missing:
            return
        clean, resid = [], {layer: [] for layer in missing}
        kv: list[dict[int, tuple[Tensor, Tensor]]] = []
        for b in self.batches:
            if self.clean is None:
                rec = None if kv_above is None else KV(record_above=kv_above)
                lp_N, got = score(model, b, capture=missing, kv=rec)
                clean.append(lp_N)
                if rec is not None:
                    kv.append({i: (k.cpu(), v.cpu()) for i, (k, v) in rec.got.items()})
            else:
                got = resid_at(model, b, missing)
            for layer in missing:
                resid[layer].append(got[layer].cpu())
        if self.clean is None:
            self.clean = clean
            if kv_above is not None:
                self.kv, self.kv_above = kv, kv_above
        self.resid.update(resid)

    def clean_value(self) -> float:
        assert self.clean is not None, "prepare() first"
        return self.metric(self.clean)

    def correct(self, logprobs: list[Tensor]) -> Tensor:
        """MCQ: bool [Q] correctness of every question."""
        return mcq_correct(torch.cat(logprobs), self.layout)

    def clean_result(self) -> SetResult:
        assert self.clean is not None, "prepare() first"
        return SetResult(self.metric(self.clean), 0, self.n_rows,
                         self.correct(self.clean) if self.is_mcq else None)

    def row_shares(self, iv: Intervention) -> tuple[Tensor, Tensor]:
        """Per row, on the clean residuals: (share of its prompt/context tokens on which a
        selected feature fires [rows], whether the gate opens anywhere in the row [rows])."""
        shares, opened = [], []
        for b, h_BTD, g_BTD in zip(self.batches, self.resid[iv.layer], self.gate_resid(iv)):
            ed = iv.edit(h_BTD, b.editable_BT, b.seg_BT, gate_h_BTD=g_BTD)
            prompt_BT = b.editable_BT & (b.seg_BT == 0)
            fires_BT = (iv.selected_acts(h_BTD) > 0).any(-1) & prompt_BT
            shares.append(fires_BT.sum(1) / prompt_BT.sum(1).clamp_min(1))
            opened.append((ed.open_BT & b.editable_BT).any(1))
        return torch.cat(shares).float(), torch.cat(opened)

    def gate_resid(self, iv: Intervention) -> list[Tensor | None]:
        """Per batch, the clean output of the block the gate reads where it is not the edited one
        (a probe fitted on an earlier layer; prepare() that layer too), else None."""
        return [None] * len(self.batches) if iv.gate_layer == iv.layer else self._gate_stream(iv)

    def _gate_stream(self, iv: Intervention) -> list[Tensor]:
        """Per batch, the clean output of block `iv.gate_layer` (its signal's input)."""
        if iv.gate_layer not in self.resid:
            raise EvalError(f"{self.name}: the gate reads layer {iv.gate_layer}; prepare() it first")
        return self.resid[iv.gate_layer]

    def gate_peaks(self, iv: Intervention) -> Tensor:
        """Per question (MCQ; over the rows of its choices) or per text row, on the clean
        residuals: the highest running mean of the gate's signal at any position the gate may
        open on (enough editable tokens); -inf where none. The gate opens somewhere in a
        question exactly when its peak exceeds `iv.threshold`."""
        rows, owner, n = [], [], 0
        for b, h_BTD in zip(self.batches, self._gate_stream(iv)):
            share_BT, seen_BT = firing_share(iv.signal(h_BTD), b.editable_BT, b.seg_BT, window=iv.window)
            ok_BT = b.editable_BT & (seen_BT >= GATE_MIN_TOKENS)
            rows.append(torch.where(ok_BT, share_BT, float("-inf")).max(1).values)
            if self.is_mcq:  # every row holds choices of one question
                q_B = torch.full((len(share_BT),), -1, dtype=torch.long)
                q_B[b.row_N] = self.layout.question_N[n: n + len(b.row_N)]
                owner.append(q_B)
                n += len(b.row_N)
        peak = torch.cat(rows)
        if not self.is_mcq:
            return peak
        out_Q = torch.full((len(self.layout.answer_Q),), float("-inf"))
        return out_Q.scatter_reduce(0, torch.cat(owner), peak, reduce="amax")

    def logprobs(self, model: Any, iv: Intervention) -> tuple[list[Tensor], int]:
        """Per batch, log p of every target with `iv` applied at its layer -> (list, rows rerun).
        Call prepare(model, iv.layer) first."""
        assert self.clean is not None and iv.layer in self.resid, "prepare() first"
        dev = next(model.parameters()).device
        iv.to(dev)
        if not self.reuse:
            return self._logprobs_whole(model, iv, dev)
        out, rerun = [], 0
        reuse = self.kv is not None and self.kv_above is not None and self.kv_above <= iv.layer \
            and kv_reuse_ok(model, iv.layer)
        kvs = self.kv if reuse else [{}] * len(self.batches)
        for b, clean_N, h_BTD, g_BTD, kv_b in zip(self.batches, self.clean, self.resid[iv.layer], self.gate_resid(iv),
                                                  kvs):
            edited = iv.edit(h_BTD.to(dev), b.editable_BT.to(dev), b.seg_BT.to(dev),
                             gate_h_BTD=None if g_BTD is None else g_BTD.to(dev))
            # A target whose position precedes its row's first edit keeps its clean score (causal
            # model); rows with no such target are not rerun at all.
            first_B, rows_R = rerun_rows(b, edited.changed_BT.cpu())
            if len(rows_R) == 0:
                out.append(clean_N)
                continue
            sub, keep_N = b.select(rows_R, first_B)
            h_RTD = edited.h_BTD[rows_R.to(dev), : sub.input_ids_BT.shape[1]]
            if reuse:  # only the positions from each row's first edit on
                prefix = {i: (k[rows_R], v[rows_R]) for i, (k, v) in kv_b.items() if i > iv.layer}
                lp_N = suffix_score(model, sub, first_B[rows_R], iv.layer, h_RTD, prefix)
                self.tokens_rerun += int(((sub.seg_BT >= 0).sum(1) - first_B[rows_R]).clamp_min(0).sum())
            else:
                lp_N, _ = score(model, sub, resume=(iv.layer, h_RTD))
                self.tokens_rerun += int((sub.seg_BT >= 0).sum())
            new_N = clean_N.clone()
            new_N[keep_N] = lp_N
            out.append(new_N)
            rerun += len(rows_R)
        return out, rerun

    def _logprobs_whole(self, model: Any, iv: Intervention, dev: torch.device) -> tuple[list[Tensor], int]:
        """`logprobs` without reuse: every row through every block, the edit at its layer (the
        blocks below it run again, the gate reads their output), the LM head at every target."""
        out = []
        for b in self.batches:
            got = resid_at(model, b, sorted({iv.layer, iv.gate_layer}))
            gate_h = None if iv.gate_layer == iv.layer else got[iv.gate_layer].to(dev)
            edited = iv.edit(got[iv.layer].to(dev), b.editable_BT.to(dev), b.seg_BT.to(dev), gate_h_BTD=gate_h)
            out.append(score(model, b, resume=(iv.layer, edited.h_BTD))[0])
            self.tokens_rerun += int((b.seg_BT >= 0).sum())
        return out, self.n_rows

    def run(self, model: Any, iv: Intervention) -> SetResult:
        """The metric with `iv` applied at its layer (prepare(model, iv.layer) first)."""
        logprobs, rerun = self.logprobs(model, iv)
        return SetResult(self.metric(logprobs), rerun, self.n_rows,
                         self.correct(logprobs) if self.is_mcq else None)

    def activations(self, layer: int) -> list[Tensor]:
        """Clean residuals at `layer` at editable positions (no BOS, no padding), [n_i, D] each."""
        return [h_BTD[b.editable_BT] for b, h_BTD in zip(self.batches, self.resid[layer])]


SET_NAMES = ("forget_mcq", "retain_mcq", "forget_text", "retain_text",
             "ood_forget_mcq", "ood_retain_mcq", "ood_forget_text", "ood_retain_text")


Done = dict[str, tuple[Tensor, Tensor]]
"""A setting's fluency measured so far: {text set name: (continuations [P, N], clean-model NLL [P])}."""


class _FluencyJob(NamedTuple):
    """One setting's share of EvalData.fluency_many."""

    iv: Intervention | None
    done: Done
    names: list[str]
    """The text sets measured here, in the order of the rows below."""
    ids_PT: Tensor
    clean_PN: Tensor
    reach_P: Tensor
    """The prompts to decode (edit_reaches); the others keep the clean continuation."""


class EvalData:
    """The evaluation sets of one (model, data config), plus per-layer CE references. The four
    in-distribution sets are always there; the `ood_` ones when the config names them."""

    def __init__(self, sets: dict[str, EvalSet], fluency: dict[str, Tensor] | None = None, kv_budget: float = 0,
                 reuse: bool = True):
        self.by_name = sets
        self.kv_budget = kv_budget
        """Bytes the clean keys and values may take (prepare(kv_above=...))."""
        self.reuse = reuse
        """False: nothing of the clean pass is reused (EvalConfig.reuse; a benchmark's reference)."""
        for s in sets.values():
            s.reuse = reuse
        self.fluency = fluency or {}
        """Prose prompts [P, 1 + FLUENCY_PROMPT_TOKENS] per text set name (pipelines/fluency.py)."""
        self.fluency_ref: dict[str, Any] = {}
        """text set name -> the clean model's continuations (fluency.CleanRef), computed once."""
        self.zero_ce: dict[int, float] = {}
        """layer -> retain-text CE with the layer's output zeroed (shared by every run there)."""

    def __getattr__(self, name: str) -> EvalSet:
        if name in SET_NAMES or "@" in name:
            return self.__dict__["by_name"][name]
        raise AttributeError(name)

    @property
    def formats(self) -> tuple[str, ...]:
        """The prompt formats the question sets are scored in ("plain" first)."""
        extra = dict.fromkeys(n.split("@", 1)[1] for n in self.by_name if "@" in n)
        return ("plain", *extra)

    def has(self, name: str) -> bool:
        return name in self.by_name

    @property
    def sets(self) -> tuple[EvalSet, ...]:
        return tuple(self.by_name.values())

    def fluency_of(self, model: Any, tokenizer: Any, iv: Intervention | None,
                   names: Sequence[str] | None = None, examples: int = 0,
                   done: Done | None = None) -> dict[str, Fluency]:
        """Fluency (pipelines/fluency.py) of `iv`'s greedy continuations of the prose prompts of
        `names` (default: every text set with prompts) -> {name: pipelines.result.Fluency}.
        `done`: {name: (continuations, NLL)} of the same `iv` measured before, used as they
        are; the ones measured here are added to it. See `fluency_many`."""
        return self.fluency_many(model, tokenizer, [iv], [names], examples, [done])[0]

    def fluency_many(self, model: Any, tokenizer: Any, ivs: Sequence[Intervention | None],
                     names: Sequence[Sequence[str] | None] | None = None, examples: int = 0,
                     dones: Sequence[Done | None] | None = None) -> list[dict[str, Fluency]]:
        """`fluency_of` for several settings of one run at once -> one {name: Fluency} per setting,
        each over its own `names` (None: every text set with prompts).

        The clean model's own continuations are decoded once per set. A prompt whose prompt and
        clean continuation a setting leaves untouched keeps the clean continuation
        (`edit_reaches`); the other prompts of every setting and every set in `names` decode as
        one batch (greedy decoding reads every weight once per step, so a wider batch costs less
        per row), each setting editing its own rows (intervene.attach_rows). An edited
        continuation equal to the clean one keeps the clean one's NLL; the changed ones are
        scored per setting. Without reuse (EvalConfig.reuse false) each setting decodes all its
        prompts alone and every continuation is scored."""
        from pipelines.fluency import CleanRef, continuation_nll, distinct_bigrams, greedy, summarize
        from pipelines.intervene import hooked_rows

        names = [[n for n in (ns if ns is not None else list(self.fluency)) if n in self.fluency]
                 for ns in (names if names is not None else [None] * len(ivs))]
        dones = [{} if d is None else d for d in (dones if dones is not None else [None] * len(ivs))]
        todo = [n for n in self.fluency if any(n in ns for ns in names) and n not in self.fluency_ref]
        if todo:  # the clean model's own continuations, once per set
            ids = torch.cat([self.fluency[n] for n in todo])
            cont = greedy(model, ids, FLUENCY_NEW_TOKENS, batch=len(ids))
            nll = continuation_nll(model, ids, cont, batch=len(ids))
            for n, sl in _slices(todo, [len(self.fluency[n]) for n in todo]):
                self.fluency_ref[n] = CleanRef(cont[sl], nll[sl], distinct_bigrams(cont[sl]))
        jobs: list[_FluencyJob] = []
        for iv, ns, done in zip(ivs, names, dones):
            new = [n for n in ns if n not in done]
            if not new:
                continue
            ids = torch.cat([self.fluency[n] for n in new])
            clean_cont = torch.cat([self.fluency_ref[n].cont_PN for n in new])
            if iv is None:
                reach = torch.zeros(len(ids), dtype=torch.bool)
            elif self.reuse:
                reach = edit_reaches(model, iv, ids, clean_cont)
            else:
                reach = torch.ones(len(ids), dtype=torch.bool)
            jobs.append(_FluencyJob(iv, done, new, ids, clean_cont, reach))
        edited = [job.clean_PN.clone() for job in jobs]
        decode = [k for k, job in enumerate(jobs) if bool(job.reach_P.any())]
        for batch in ([decode] if self.reuse and decode else [[k] for k in decode]):
            parts, rows, at = [], [], 0
            for k in batch:
                n = int(jobs[k].reach_P.sum())
                parts.append((jobs[k].iv, slice(at, at + n)))
                rows.append(jobs[k].ids_PT[jobs[k].reach_P])
                at += n
            with hooked_rows(model, parts):
                cont = greedy(model, torch.cat(rows), FLUENCY_NEW_TOKENS, batch=at)
            for k, (_, sl) in zip(batch, parts):
                edited[k][jobs[k].reach_P] = cont[sl]
        for job, cont in zip(jobs, edited):
            nll = torch.cat([self.fluency_ref[n].nll_P for n in job.names])
            if job.iv is not None:
                changed = (cont != job.clean_PN).any(-1) | (not self.reuse)
                if bool(changed.any()):
                    nll = nll.clone()
                    nll[changed] = continuation_nll(model, job.ids_PT[changed], cont[changed], batch=len(job.ids_PT))
            for n, sl in _slices(job.names, [len(self.fluency[n]) for n in job.names]):
                job.done[n] = (cont[sl], nll[sl])
        return [{n: summarize(tokenizer, self.fluency[n], done[n][0], done[n][1], self.fluency_ref[n],
                              examples=examples) for n in ns} for ns, done in zip(names, dones)]

    def prepare(self, model: Any, layers: int | Sequence[int], kv_above: int | None = None) -> None:
        """Clean passes and residual streams at `layers`. Call it once with every layer an
        `ff run` will evaluate, so that one forward per set captures them all. `kv_above`: keep
        the clean keys and values of the attention layers after it (EvalSet.prepare) where they
        fit in `kv_budget` bytes."""
        todo = [s for s in self.sets if s.clean is None]
        if kv_above is not None and todo and (not self.reuse or self.kv_bytes(model, kv_above) > self.kv_budget):
            kv_above = None
        for s in self.sets:
            s.prepare(model, layers, kv_above=kv_above)

    def kv_bytes(self, model: Any, kv_above: int) -> int:
        """Bytes the clean keys and values after layer `kv_above` take for the sets not yet prepared."""
        cfg = text_config(model)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = 2 * heads * head_dim * next(model.parameters()).element_size()
        tokens = sum(b.input_ids_BT.numel() for s in self.sets if s.clean is None for b in s.batches)
        return tokens * per_token * max(cfg.num_hidden_layers - 1 - kv_above, 0)


@torch.inference_mode()
def edit_reaches(model: Any, iv: Intervention, ids_PT: Tensor, cont_PN: Tensor) -> Tensor:
    """bool [P]: the prompts on which `iv` edits some position of the prompt or of the clean
    continuation `cont_PN` (its last token predicts nothing kept). On the others the edited model
    computes what the clean one computes at every position, so its greedy continuation is
    `cont_PN`: the gate decides from the residual at or below the edited layer, which the edit
    cannot reach, and it is causal (trainer/gate/causal.py), so a full forward over the clean
    continuation sees what KV-cached decoding sees."""
    seq_PL = torch.cat([ids_PT, cont_PN[:, :-1]], dim=1)
    P, L = seq_PL.shape
    bos = getattr(text_config(model), "bos_token_id", None)
    editable_PL = seq_PL != bos if bos is not None else torch.ones(P, L, dtype=torch.bool)
    none = torch.zeros(0, dtype=torch.long)
    b = Batch(seq_PL, torch.arange(L).expand(P, L), torch.zeros(P, L, dtype=torch.long), editable_PL, none, none, none)
    resid = resid_at(model, b, sorted({iv.layer, iv.gate_layer}))
    dev = resid[iv.layer].device
    gate_h = resid[iv.gate_layer] if iv.gate_layer != iv.layer else None
    edited = iv.to(dev).edit(resid[iv.layer], editable_PL.to(dev), gate_h_BTD=gate_h)
    return edited.changed_B.cpu()


def _slices(names: Sequence[str], sizes: Sequence[int]) -> list[tuple[str, slice]]:
    """Each name with its rows' slice in the concatenation of groups of `sizes` rows."""
    out, start = [], 0
    for n, k in zip(names, sizes):
        out.append((n, slice(start, start + k)))
        start += k
    return out


def _format_set(tok: Any, name: str, fmt: str, qs: list, test_Q: Tensor, cfg: EvalConfig,
                window: int | None) -> EvalSet:
    """One question set in one prompt format: "plain" scores every question of the sample; the
    others a subset (cfg.format_questions: the first half from the dev half, the rest from the
    test half), each question's prompt built by pipelines/formats.py."""
    from pipelines.formats import prompts

    if fmt != "plain" and cfg.format_questions is not None:
        n = cfg.format_questions
        dev = torch.nonzero(~test_Q).flatten()[: n // 2]
        test = torch.nonzero(test_Q).flatten()[: n - n // 2]
        keep = torch.cat([dev, test]).tolist()
        qs, test_Q = [qs[i] for i in keep], test_Q[keep]
    texts = None if fmt == "plain" else prompts(fmt, [q.question for q in qs], base=cfg.mcq_template)
    batches, layout = mcq_batches(tok, qs, template=cfg.mcq_template, max_batch_tokens=cfg.max_batch_tokens,
                                  window=window, prompts=texts)
    return EvalSet(name, batches, layout, test_Q, [q.question for q in qs])


FLUENCY_PROMPT_TOKENS = 12
"""Tokens of a paragraph's start that make a fluency prompt (after BOS)."""
FLUENCY_NEW_TOKENS = 32
"""Greedy tokens generated per fluency prompt."""


def _fluency_prompts(tok: Any, spec: str, role: str, n: int) -> Tensor:
    """The first tokens of the first `n` paragraphs of a held-out text spec."""
    from itertools import islice

    from cache.corpora import iter_documents, resolve_corpus
    from pipelines.fluency import fluency_prompts

    docs = list(islice(iter_documents(resolve_corpus(text_spec(spec, role), role)), 4 * n))
    return fluency_prompts(tok, docs, n_prompts=n, prompt_tokens=FLUENCY_PROMPT_TOKENS)


ITEM_TOKENS = 16
"""A text row is named in reports by its first this many tokens."""

_MEMO: "weakref.WeakKeyDictionary[Any, dict[tuple, EvalData]]" = weakref.WeakKeyDictionary()


def eval_data(lm: Any, cfg: EvalConfig) -> EvalData:
    """Tokenized evaluation sets for `lm`; memoised per model and data config, so the clean
    passes of one `ff run` are shared by all of its runs and layers. Questions are a seeded
    random sample (cfg.max_questions, cfg.sample_seed), split into dev and test halves."""
    per_model = _MEMO.setdefault(lm.model, {})
    key = (lm.info.weights_hash, lm.info.tokenizer_hash, cfg.data_key())
    if key in per_model:
        return per_model[key]
    tok = lm.tokenizer
    window = getattr(text_config(lm.model), "sliding_window", None)
    sets: dict[str, EvalSet] = {}
    fluency: dict[str, Tensor] = {}
    for prefix in ("", "ood_"):
        for role in ("forget", "retain"):
            spec = getattr(cfg, f"{prefix}{role}_mcq")
            if spec is None:
                continue
            qs, test_Q = sample_split(load_mcq(spec, role), cfg.max_questions, cfg.sample_seed)
            if len(qs) < 2:
                raise EvalError(f"{role} MCQ source '{spec}' holds {len(qs)} question(s); "
                                "at least 2 are needed (dev and test halves)")
            for fmt in cfg.formats:
                name = f"{prefix}{role}_mcq" + ("" if fmt == "plain" else f"@{fmt}")
                sets[name] = _format_set(tok, name, fmt, qs, test_Q, cfg, window)
        for role in ("forget", "retain"):
            spec = getattr(cfg, f"{prefix}{role}_text")
            if spec is None:
                continue
            batches = text_batches(tok, spec, role, max_tokens=cfg.max_text_tokens,
                                   ctx_len=cfg.ctx_len, batch_contexts=cfg.text_batch_contexts)
            heads = [tok.decode(ids[ok][:ITEM_TOKENS]).strip() for b in batches
                     for ids, ok in zip(b.input_ids_BT, b.editable_BT)]
            sets[f"{prefix}{role}_text"] = EvalSet(f"{prefix}{role}_text", batches, items=heads)
            if cfg.fluency_prompts:
                fluency[f"{prefix}{role}_text"] = _fluency_prompts(tok, spec, role, cfg.fluency_prompts)
    data = EvalData(sets, fluency, kv_budget=cfg.kv_cache_gib * 2**30, reuse=cfg.reuse)
    per_model[key] = data
    return data
