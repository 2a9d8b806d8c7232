"""Evaluation data (METHOD §8): multiple-choice files and held-out text, tokenized into `Batch`es.

MCQ spec: `demo` (the bundled held-out file for the role), a JSONL file with one
`{"question", "choices", "answer"}` object per line, or a Hugging Face dataset
`ID[:CONFIG][@SPLIT]` (default split "test") with the same fields, e.g. `cais/wmdp:wmdp-bio`
or `cais/mmlu:college_biology`. Text spec: anything `cache.corpora` accepts (`demo` means the
held-out demo file of the role), packed into BOS-prefixed contexts like the training data.

Prompt format (the one the demo data was checked with, scripts/make_demo_data.py): the prompt
`Question: {question}\\nAnswer:` with the tokenizer's special tokens (BOS), each choice scored as
the continuation `" " + choice` by its summed log-likelihood.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cache.corpora import DEMO_DIR, pack, resolve_corpus
from cache.errors import CorpusError
from pipelines.errors import EvalError
from pipelines.fastlm import Batch

DEMO_MCQ = {"forget": "forget_mcq.jsonl", "retain": "retain_mcq.jsonl"}
DEMO_TEXT = {"forget": "unlearn_heldout", "retain": "retain_heldout"}
OOD_MCQ = {"forget": "ood_forget_mcq.jsonl", "retain": "ood_retain_mcq.jsonl"}
OOD_TEXT = {"forget": "ood_forget_text", "retain": "ood_retain_text"}


def sample_split(questions: list[Question], n: int | None, seed: int) -> tuple[list[Question], Tensor]:
    """A seeded random sample of n questions (all when None), and a bool [n] mask: True for the
    test half, False for the dev half (the first half of the permutation is dev)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(questions), generator=g)
    if n is not None:
        order = order[:n]
    test_Q = torch.zeros(len(order), dtype=torch.bool)
    test_Q[len(order) // 2:] = True
    return [questions[i] for i in order.tolist()], test_Q


class Question(NamedTuple):
    question: str
    choices: list[str]
    answer: int


class McqLayout(NamedTuple):
    """Which question and choice each scored target belongs to, over all batches in order."""

    question_N: Tensor
    choice_N: Tensor
    answer_Q: Tensor
    n_choices_Q: Tensor


def _check_row(row: Any, where: str) -> Question:
    if not isinstance(row, dict) or not {"question", "choices", "answer"} <= set(row):
        raise EvalError(f"{where}: expected an object with 'question', 'choices' and 'answer'")
    q, choices, ans = row["question"], row["choices"], row["answer"]
    if not isinstance(q, str) or not q.strip():
        raise EvalError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                      for c in choices):
        raise EvalError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise EvalError(f"{where}: 'answer' must be an integer index into 'choices' (0..{len(choices) - 1})")
    return Question(q, list(choices), ans)


def _load_jsonl(path: Path, limit: int | None) -> list[Question]:
    out: list[Question] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(out) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                out.append(_check_row(row, f"{path}:{n}"))
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read MCQ file '{path}': {e}") from e
    return out


def _load_hub(spec: str, limit: int | None) -> list[Question]:
    rest, _, split = spec.partition("@")
    ds_id, _, config = rest.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(ds_id, config or None, split=split or "test")
    except Exception as e:  # datasets raises many types (offline, not found, gated, bad config)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvalError(f"cannot load MCQ dataset '{spec}': {first}") from e
    # cais/wmdp and cais/mmlu rows are already {"question", "choices", "answer": int}.
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    return [_check_row({k: r.get(k) for k in ("question", "choices", "answer")}, f"{spec} row {i}")
            for i, r in enumerate(rows)]


def load_mcq(spec: str, role: str, *, limit: int | None = None) -> list[Question]:
    """The first `limit` questions of an MCQ spec; `role` ("forget" | "retain") picks the demo
    file ("demo", or "demo-ood" for the out-of-distribution set). A comma-separated list of
    specs is read in order and concatenated (e.g. several MMLU subjects)."""
    if "," in spec:
        out: list[Question] = []
        for part in (p.strip() for p in spec.split(",")):
            if part:
                out += load_mcq(part, role, limit=None)
        return out if limit is None else out[:limit]
    if spec in ("demo", "demo-ood"):
        return _load_jsonl(DEMO_DIR / (DEMO_MCQ if spec == "demo" else OOD_MCQ)[role], limit)
    p = Path(spec).expanduser()
    if p.is_file():
        return _load_jsonl(p, limit)
    if spec.endswith((".jsonl", ".json")) or spec.startswith((".", "/", "~")):
        raise EvalError(f"MCQ file '{spec}' does not exist")
    if "/" not in spec.partition(":")[0]:
        raise EvalError(f"unknown MCQ source '{spec}': not a file, 'demo', or a dataset id ID[:CONFIG][@SPLIT]")
    return _load_hub(spec, limit)


def _tree(prompt: list[int], conts: list[list[int]]) -> tuple[list[int], list[int], list[int], list]:
    """Pack prompt + every continuation -> ids, positions, seg ids, [(col, target, choice)]."""
    ids, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    scored = []
    for k, c in enumerate(conts):
        prev = len(prompt) - 1  # the prompt's last output predicts each continuation's first token
        for t, tok in enumerate(c):
            scored.append((prev, tok, k))
            prev = len(ids)
            ids.append(tok)
            pos.append(len(prompt) + t)
            seg.append(k + 1)
    return ids, pos, seg, scored


def _collate(items: list[tuple], pad_id: int, bos_id: int | None) -> Batch:
    T = max(len(it[0]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    rows, cols, tgts = [], [], []
    for r, (i, p, s, scored) in enumerate(items):
        ids[r, :len(i)], pos[r, :len(p)], seg[r, :len(s)] = torch.tensor(i), torch.tensor(p), torch.tensor(s)
        for col, tok, *_ in scored:
            rows.append(r), cols.append(col), tgts.append(tok)
    editable = (seg >= 0) & ((ids != bos_id) if bos_id is not None else True)
    return Batch(ids, pos, seg, editable, torch.tensor(rows, dtype=torch.long),
                 torch.tensor(cols, dtype=torch.long), torch.tensor(tgts, dtype=torch.long))


def mcq_batches(tokenizer: Any, questions: list[Question], *, template: str, max_batch_tokens: int,
                window: int | None, prompts: list[str] | None = None) -> tuple[list[Batch], McqLayout]:
    """Tree-pack each question (prompt once, every choice after it), sort by length to limit
    padding, and cut into batches of at most `max_batch_tokens` padded tokens. `prompts`: each
    question's whole prompt (a prompt format, pipelines/formats.py) instead of `template`'s."""
    if prompts is not None and len(prompts) != len(questions):
        raise ValueError(f"{len(prompts)} prompts for {len(questions)} questions")
    trees = []  # (length, ids, pos, seg, [(col, target, choice, question)])
    for qi, q in enumerate(questions):
        text = template.format(question=q.question) if prompts is None else prompts[qi]
        prompt = tokenizer(text)["input_ids"]
        conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in q.choices]
        groups = [conts] if not window or len(prompt) + sum(map(len, conts)) <= window else [[c] for c in conts]
        offset = 0  # a question longer than the sliding window: one row per choice instead
        for g in groups:
            ids, pos, seg, scored = _tree(prompt, g)
            trees.append((len(ids), ids, pos, seg, [(c, t, k + offset, qi) for c, t, k in scored]))
            offset += len(g)
    trees.sort(key=lambda t: t[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, q_N, c_N, cur = [], [], [], []
    for tr in trees + [None]:
        if cur and (tr is None or (len(cur) + 1) * tr[0] > max_batch_tokens):
            batches.append(_collate([t[1:] for t in cur], pad, tokenizer.bos_token_id))
            for t in cur:
                q_N += [s[3] for s in t[4]]
                c_N += [s[2] for s in t[4]]
            cur = []
        if tr is not None:
            cur.append(tr)
    layout = McqLayout(torch.tensor(q_N, dtype=torch.long), torch.tensor(c_N, dtype=torch.long),
                       torch.tensor([q.answer for q in questions]),
                       torch.tensor([len(q.choices) for q in questions]))
    return batches, layout


def mcq_scores(logprob_N: Tensor, layout: McqLayout) -> Tensor:
    """Summed log-likelihood of every choice [Q, C] (-inf where a question has fewer choices)."""
    Q, C = len(layout.answer_Q), int(layout.n_choices_Q.max())
    score_QC = torch.zeros(Q * C, dtype=torch.float64)
    score_QC.index_add_(0, layout.question_N * C + layout.choice_N, logprob_N.double())
    score_QC = score_QC.view(Q, C)
    score_QC[torch.arange(C)[None, :] >= layout.n_choices_Q[:, None]] = float("-inf")
    return score_QC


def mcq_correct(logprob_N: Tensor, layout: McqLayout) -> Tensor:
    """bool [Q]: whether each question's highest summed-log-likelihood choice is the answer."""
    return mcq_scores(logprob_N, layout).argmax(1) == layout.answer_Q


def mcq_accuracy(logprob_N: Tensor, layout: McqLayout) -> float:
    """Share of questions whose highest summed-log-likelihood choice is the answer."""
    return float(mcq_correct(logprob_N, layout).double().mean())


def text_spec(spec: str, role: str) -> str:
    """A held-out text spec as `cache.corpora` reads it: "demo" / "demo-ood" name the role's file."""
    return {"demo": f"demo:{DEMO_TEXT[role]}", "demo-ood": f"demo:{OOD_TEXT[role]}"}.get(spec, spec)


def text_batches(tokenizer: Any, spec: str, role: str, *, max_tokens: int, ctx_len: int,
                 batch_contexts: int) -> list[Batch]:
    """Held-out text packed into BOS-prefixed contexts of ctx_len; every next token is scored."""
    spec = text_spec(spec, role)
    n = max(1, max_tokens // (ctx_len - 1))
    try:
        tokens = torch.from_numpy(pack(resolve_corpus(spec, role), tokenizer, n_contexts=n,
                                       ctx_len=ctx_len).tokens).long()
    except CorpusError as e:
        raise EvalError(f"{role} text: {e} (lower max_text_tokens: --set max_text_tokens=N)") from e
    bos = tokenizer.bos_token_id
    out = []
    for s in range(0, len(tokens), batch_contexts):
        ids = tokens[s:s + batch_contexts]
        B, T = ids.shape
        rows, cols = torch.meshgrid(torch.arange(B), torch.arange(T - 1), indexing="ij")
        out.append(Batch(ids, torch.arange(T).expand(B, T).clone(), torch.zeros_like(ids),
                         ids != bos if bos is not None else torch.ones_like(ids, dtype=torch.bool),
                         rows.flatten(), cols.flatten(), ids[:, 1:].flatten()))
    return out
