"""Prompt formats for MCQ scoring: the same question asked the ways people ask it.

Unlearning that holds only in the one prompt it was evaluated in has not unlearned much, so the
evaluation scores each question set in several formats. This module owns the formats: their
names, their pools (`format_data/`, see its PROVENANCE.md) and the prompt each one builds. It
imports no torch, so the CLI can list the formats in its help text instantly.

Every format's prompt ends with the line the choices continue (`...Answer:` or `Assistant:`):
each choice is still scored as the continuation `" " + choice`, in every format.

A question's pool items (k-shot examples, paragraph, dialogue turn) are chosen from the hash of
`"{format}|{question}"` alone (rendezvous hashing: rank the pool by sha256 of key and index), so a
question gets the same prompt in any order, sample or process, on any Python version, and
different questions get different examples.

    from pipelines.formats import parse_formats, prompts
    for fmt in parse_formats("plain,kshot5"):
        texts = prompts(fmt, [q.question for q in questions])
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from pipelines.errors import EvalError

BASE = "Question: {question}\nAnswer:"
"""The evaluation's template (pipelines/data.py); the tokenizer adds BOS in front."""

INSTRUCT_HEADER = "The following are multiple choice questions (with answers).\n\n"
"""The MMLU harness's instruction line, without its "about <subject>" (our sets mix subjects)."""

DATA_DIR = Path(__file__).parent / "format_data"
QA_FILE = "general_qa.jsonl"
GENERAL_PROSE_FILE = "general_prose.txt"
BIOLOGY_PROSE_FILE = "biology_prose.txt"


class PoolQuestion(NamedTuple):
    """A worked example: a general-knowledge question and the text of its correct choice."""

    question: str
    answer: str


def _read_lines(name: str) -> list[str]:
    path = DATA_DIR / name
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read the prompt-format pool '{path}' (reinstall the package): "
                        f"{e}") from e


def _pool_question(line: str, where: str) -> PoolQuestion:
    try:
        row = json.loads(line)
        q, choices, ans = row["question"], row["choices"], row["answer"]
        return PoolQuestion(q.strip(), choices[ans].strip())
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise EvalError(f"{where}: expected {{'question', 'choices', 'answer'}} ({e!r})") from e


@functools.lru_cache(maxsize=None)
def general_questions() -> tuple[PoolQuestion, ...]:
    """The worked examples of `kshot*` and `dialogue` (general knowledge, no biology)."""
    return tuple(_pool_question(line, f"{DATA_DIR / QA_FILE}:{n}")
                 for n, line in enumerate(_read_lines(QA_FILE), 1) if line)


@functools.lru_cache(maxsize=None)
def general_paragraphs() -> tuple[str, ...]:
    """The paragraphs of `preamble` (general prose, 50-100 words, no biology)."""
    return tuple(line for line in _read_lines(GENERAL_PROSE_FILE) if line)


@functools.lru_cache(maxsize=None)
def biology_paragraphs() -> tuple[str, ...]:
    """The paragraphs of `after_bio` (biology prose, 50-100 words)."""
    return tuple(line for line in _read_lines(BIOLOGY_PROSE_FILE) if line)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _ranked(n: int, key: str) -> list[int]:
    """Indices 0..n-1 in an order fixed by `key` alone: rendezvous hashing. Unlike a seeded
    `random.Random`, it cannot change with the Python version, and it never uses `hash()`."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}|{i}".encode()).digest())


def _pick_questions(fmt: str, question: str, k: int) -> list[PoolQuestion]:
    """k distinct pool questions for this question; never the question itself (a user's own
    MCQ file may hold a pool question, and its answer must not be given away)."""
    pool = general_questions()
    own = _norm(question)
    order = _ranked(len(pool), f"{fmt}|{question}")
    picked = [pool[i] for i in order if _norm(pool[i].question) != own]
    if len(picked) < k:
        raise EvalError(f"the pool {QA_FILE} holds {len(picked)} usable questions, {fmt} needs {k}")
    return picked[:k]


def _pick_paragraph(fmt: str, question: str, pool: tuple[str, ...]) -> str:
    return pool[_ranked(len(pool), f"{fmt}|{question}")[0]]


def fill(base: str, question: str) -> str:
    """The template with the question in; a template that does not take `{question}` exactly
    once (and nothing else) is a user error, the same rule as `mcq_template`."""
    try:
        probe = base.format(question="\0")
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(f"the prompt template may name {{question}} only (braces as {{{{ }}}}): "
                        f"{e!r} in {base!r}") from None
    if probe.count("\0") != 1:
        raise EvalError(f"the prompt template must hold {{question}} exactly once, got {base!r}")
    return base.format(question=question)


# A builder gets (format name, question, base template) and returns the whole prompt.
Builder = Callable[[str, str, str], str]


def _plain(fmt: str, question: str, base: str) -> str:
    return fill(base, question)


def _instruct(fmt: str, question: str, base: str) -> str:
    return INSTRUCT_HEADER + fill(base, question)


def _kshot(k: int) -> Builder:
    """Few-shot as in the MMLU / WMDP harnesses: each worked example in the evaluated template,
    answered with its correct choice's text, so the shots read exactly like the question."""
    def build(fmt: str, question: str, base: str) -> str:
        shots = "".join(f"{fill(base, ex.question)} {ex.answer}\n\n"
                        for ex in _pick_questions(fmt, question, k))
        return shots + fill(base, question)
    return build


def _preamble(pool: Callable[[], tuple[str, ...]]) -> Builder:
    def build(fmt: str, question: str, base: str) -> str:
        return _pick_paragraph(fmt, question, pool()) + "\n\n" + fill(base, question)
    return build


def _dialogue(fmt: str, question: str, base: str) -> str:
    """A two-turn chat; the evaluated question is the second user turn, asked bare (the chat
    replaces the template, which is still checked so a bad one fails in every format alike)."""
    fill(base, question)
    ex = _pick_questions(fmt, question, 1)[0]
    return (f"User: {ex.question}\nAssistant: The answer is {ex.answer}.\n\n"
            f"User: {question}\nAssistant:")


class Format(NamedTuple):
    """A format: its one-line help (the CLI lists it) and its prompt builder."""

    help: str
    build: Builder


_FORMATS: dict[str, Format] = {
    "plain": Format("the template alone: Question: ...\\nAnswer:", _plain),
    "instruct": Format("an MMLU-style instruction line, then the template", _instruct),
    "kshot2": Format("2 worked general-knowledge questions, then the template", _kshot(2)),
    "kshot5": Format("5 worked general-knowledge questions, then the template", _kshot(5)),
    "preamble": Format("a general prose paragraph, then the template",
                       _preamble(general_paragraphs)),
    "dialogue": Format("a User/Assistant chat: one general turn answered, then the question",
                       _dialogue),
    "after_bio": Format("a biology prose paragraph, then the template",
                        _preamble(biology_paragraphs)),
}

FORMATS: tuple[str, ...] = tuple(_FORMATS)
DEFAULT_FORMATS: tuple[str, ...] = FORMATS
FORMAT_HELP: dict[str, str] = {name: f.help for name, f in _FORMATS.items()}


def _valid_names() -> str:
    return ", ".join(FORMATS) + " or all"


def parse_formats(spec: str) -> tuple[str, ...]:
    """Comma-separated format names ("all" for every one), duplicates dropped, order kept."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise EvalError(f"no prompt format given; name one or more of {_valid_names()}")
    out: list[str] = []
    for name in names:
        if name != "all" and name not in _FORMATS:
            raise EvalError(f"unknown prompt format '{name}'; valid: {_valid_names()}")
        out += FORMATS if name == "all" else [name]
    return tuple(dict.fromkeys(out))


def _format(fmt: str) -> Format:
    if fmt not in _FORMATS:
        raise EvalError(f"unknown prompt format '{fmt}'; valid: {', '.join(FORMATS)}")
    return _FORMATS[fmt]


def build_prompt(fmt: str, question: str, *, base: str = BASE) -> str:
    """The whole prompt of one question in one format (BOS not included: the tokenizer adds it)."""
    return _format(fmt).build(fmt, question, base)


def prompts(fmt: str, questions: Sequence[str], *, base: str = BASE) -> list[str]:
    """The prompts of a question list, in order; each depends on its own question only."""
    build = _format(fmt).build
    fill(base, "")
    return [build(fmt, q, base) for q in questions]
