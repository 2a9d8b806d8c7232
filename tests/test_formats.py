"""Prompt formats (pipelines/formats.py) and their bundled pools: fast, offline, no model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cache.corpora import DEMO_DIR
from pipelines import formats
from pipelines.errors import EvalError
from pipelines.formats import (
    BASE,
    DEFAULT_FORMATS,
    FORMAT_HELP,
    FORMATS,
    INSTRUCT_HEADER,
    biology_paragraphs,
    build_prompt,
    general_paragraphs,
    general_questions,
    parse_formats,
    prompts,
)

QUESTION = "Which word means: any long ditch cut in the ground?"
EVALUATED_MCQ = ("forget_mcq.jsonl", "retain_mcq.jsonl", "ood_forget_mcq.jsonl",
                 "ood_retain_mcq.jsonl")
# Words that would put biology into a general pool (whole words, plurals included).
BIO_WORDS = ("cell", "gene", "genetic", "dna", "protein", "virus", "bacteria", "bacterium",
             "enzyme", "blood", "animal", "plant", "species", "organ", "organism", "disease",
             "tissue", "muscle", "brain", "heart", "bone", "medicine", "medical", "hormone",
             "evolution", "biology")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _evaluated_questions() -> list[str]:
    out = []
    for name in EVALUATED_MCQ:
        with open(DEMO_DIR / name, encoding="utf-8") as f:
            out += [json.loads(line)["question"] for line in f if line.strip()]
    return out


def _sample(n: int = 40) -> list[str]:
    return _evaluated_questions()[::17][:n]


# ---- the formats, part by part ---------------------------------------------------------------

def test_names_order_and_help():
    assert FORMATS == ("plain", "instruct", "kshot2", "kshot5", "preamble", "dialogue", "after_bio")
    assert DEFAULT_FORMATS == FORMATS
    assert list(FORMAT_HELP) == list(FORMATS)
    assert all(h and "\n" not in h for h in FORMAT_HELP.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_prompt_ends_with_the_line_the_choices_continue(fmt):
    p = build_prompt(fmt, QUESTION)
    last = p.split("\n")[-1]
    assert last == ("Assistant:" if fmt == "dialogue" else "Answer:")
    assert QUESTION in p and not p.endswith(" ")


def test_plain_and_instruct():
    body = f"Question: {QUESTION}\nAnswer:"
    assert build_prompt("plain", QUESTION) == body
    assert build_prompt("instruct", QUESTION) == INSTRUCT_HEADER + body
    assert INSTRUCT_HEADER == "The following are multiple choice questions (with answers).\n\n"


@pytest.mark.parametrize("k", [2, 5])
def test_kshot_has_k_distinct_worked_pool_examples(k):
    answer_of = {q.question: q.answer for q in general_questions()}
    blocks = build_prompt(f"kshot{k}", QUESTION).split("\n\n")
    assert len(blocks) == k + 1
    assert blocks[-1] == f"Question: {QUESTION}\nAnswer:"
    seen = []
    for block in blocks[:-1]:
        m = re.fullmatch(r"Question: (.+)\nAnswer: (.+)", block)
        assert m, block
        assert answer_of[m.group(1)] == m.group(2)
        seen.append(m.group(1))
    assert len(set(seen)) == k


def test_kshot_follows_a_custom_template_and_never_shows_the_question_itself():
    own = general_questions()[0]
    for q in [own.question] + _sample(10):
        p = build_prompt("kshot5", q, base="Q: {question}\nA:")
        assert p.count("Q: ") == 6 and p.endswith(f"Q: {q}\nA:")
        assert p.count(q) == 1


@pytest.mark.parametrize("fmt,pool", [("preamble", general_paragraphs),
                                      ("after_bio", biology_paragraphs)])
def test_preamble_is_one_pool_paragraph(fmt, pool):
    para, rest = build_prompt(fmt, QUESTION).split("\n\n")
    assert para in pool()
    assert rest == f"Question: {QUESTION}\nAnswer:"


def test_dialogue_structure():
    answer_of = {q.question: q.answer for q in general_questions()}
    p = build_prompt("dialogue", QUESTION)
    m = re.fullmatch(r"User: (.+)\nAssistant: The answer is (.+)\.\n\nUser: (.+)\nAssistant:", p)
    assert m, p
    assert answer_of[m.group(1)] == m.group(2)
    assert m.group(3) == QUESTION


# ---- determinism ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_depends_on_the_question_only(fmt):
    qs = _sample(20)
    forward = prompts(fmt, qs)
    assert forward == [build_prompt(fmt, q) for q in qs]
    assert prompts(fmt, qs[::-1]) == forward[::-1]
    assert prompts(fmt, qs[5:9]) == forward[5:9]
    formats.general_questions.cache_clear()
    formats.general_paragraphs.cache_clear()
    formats.biology_paragraphs.cache_clear()
    assert prompts(fmt, qs) == forward


def test_same_prompts_in_a_fresh_process_with_another_hash_seed():
    """Selection must not use Python's salted hash(): a fresh process gives the same prompts."""
    qs = _sample(10)
    code = ("import json, sys; from pipelines.formats import FORMATS, prompts; "
            "qs = json.load(sys.stdin); print(json.dumps({f: prompts(f, qs) for f in FORMATS}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(qs), capture_output=True,
                         text=True, check=True, env=env, cwd=Path(__file__).parents[1]).stdout
    assert json.loads(out) == {f: prompts(f, qs) for f in FORMATS}


@pytest.mark.parametrize("fmt,min_distinct", [("kshot2", 38), ("kshot5", 39), ("dialogue", 25),
                                               ("preamble", 12), ("after_bio", 12)])
def test_different_questions_get_different_prefixes(fmt, min_distinct):
    qs = _sample(40)
    assert len(qs) == 40
    prefixes = {p.rsplit("\n\n", 1)[0] for p in prompts(fmt, qs)}
    assert len(prefixes) >= min_distinct


# ---- the pools --------------------------------------------------------------------------------

def test_pool_sizes_and_shapes():
    qa = general_questions()
    assert len(qa) >= 48
    assert len({_norm(q.question) for q in qa}) == len(qa)
    with open(formats.DATA_DIR / formats.QA_FILE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        assert set(row) == {"question", "choices", "answer"}
        assert len(row["choices"]) == 4 and len({_norm(c) for c in row["choices"]}) == 4
        assert isinstance(row["answer"], int) and 0 <= row["answer"] < 4


@pytest.mark.parametrize("pool", [general_paragraphs, biology_paragraphs])
def test_paragraphs_are_50_to_100_words(pool):
    paras = pool()
    assert len(paras) >= 24
    assert len(set(paras)) == len(paras)
    for p in paras:
        assert 50 <= len(p.split()) <= 100, p[:60]


def test_general_pools_hold_no_biology_words():
    texts = [q.question + " " + q.answer for q in general_questions()] + list(general_paragraphs())
    pattern = re.compile(r"\b(" + "|".join(BIO_WORDS) + r")s?\b")
    hits = [(m.group(0), t[:50]) for t in texts for m in [pattern.search(t.lower())] if m]
    assert hits == []


def test_pool_questions_are_not_evaluated_questions():
    evaluated = {_norm(q) for q in _evaluated_questions()}
    assert len(evaluated) > 700
    assert [q.question for q in general_questions() if _norm(q.question) in evaluated] == []


def test_pool_paragraphs_share_no_8_word_run_with_the_demo_texts():
    texts = sorted(DEMO_DIR.glob("*.txt"))
    assert len(texts) >= 10
    demo_runs: set[tuple[str, ...]] = set()
    for path in texts:
        for line in path.read_text(encoding="utf-8").splitlines():
            demo_runs |= _runs(line)
    shared = [(p[:40], " ".join(sorted(_runs(p) & demo_runs)[0]))
              for p in general_paragraphs() + biology_paragraphs() if _runs(p) & demo_runs]
    assert shared == []


# ---- options ----------------------------------------------------------------------------------

def test_parse_formats():
    assert parse_formats("all") == FORMATS
    assert parse_formats(" kshot5, plain ,kshot5,plain") == ("kshot5", "plain")
    rest = tuple(f for f in FORMATS if f != "dialogue")
    assert parse_formats("dialogue,all") == ("dialogue",) + rest


@pytest.mark.parametrize("spec", ["", " , ", "plain,kshot3", "Plain"])
def test_parse_formats_errors_are_one_line_naming_the_valid_ones(spec):
    with pytest.raises(EvalError) as e:
        parse_formats(spec)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in FORMATS) and "all" in msg


def test_bad_format_or_template_is_an_eval_error():
    with pytest.raises(EvalError, match="unknown prompt format 'kshot3'"):
        build_prompt("kshot3", QUESTION)
    with pytest.raises(EvalError, match="unknown prompt format"):
        prompts("nope", [QUESTION])
    for base in ("Question: ?\nAnswer:", "Q: {question} {other}\nA:", "{question} {question}"):
        for fmt in FORMATS:
            with pytest.raises(EvalError, match="template"):
                build_prompt(fmt, QUESTION, base=base)
    assert build_prompt("plain", QUESTION, base=BASE.replace("Answer", "A")).endswith("\nA:")
