"""Fast checks of the bundled demo data (cache/demo_data/, built by scripts/make_demo_data.py).

No model is loaded: these only check that the shipped files are present where the installed
package looks for them, well formed, disjoint, and that "unlearn" really is the biology side.
"""
import json
import re
from pathlib import Path

import pytest

import cache

DEMO = Path(cache.__file__).parent / "demo_data"
TEXT_FILES = ["retain.txt", "unlearn.txt", "retain_heldout.txt", "unlearn_heldout.txt"]
MCQ_FILES = ["forget_mcq.jsonl", "retain_mcq.jsonl"]
BIO = re.compile(r"\b(animal|plant|disease|cells?|species|genus|tissue|blood|bird|fish|tree|"
                 r"flower|insect|muscle|bone|infection|medical|organ)s?\b", re.I)


def lines(name):
    return (DEMO / name).read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("name", TEXT_FILES + MCQ_FILES + ["PROVENANCE.md"])
def test_file_exists_and_is_utf8(name):
    path = DEMO / name
    assert path.is_file(), f"missing bundled demo file {path}"
    assert path.read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("name", TEXT_FILES)
def test_text_lines_are_clean_documents(name):
    docs = lines(name)
    assert docs and all(d.strip() == d and d for d in docs), "no blank or padded lines"
    assert not any("_" in d for d in docs), "WordNet underscores must be rendered as spaces"
    assert len(set(docs)) == len(docs), "duplicate documents"


@pytest.mark.parametrize("name", ["retain.txt", "unlearn.txt"])
def test_training_corpora_are_large(name):
    assert (DEMO / name).stat().st_size > 500_000
    assert len(lines(name)) > 500


@pytest.mark.parametrize("name", ["retain_heldout.txt", "unlearn_heldout.txt"])
def test_heldout_corpora_are_reasonable(name):
    assert (DEMO / name).stat().st_size > 60_000


def test_heldout_and_training_lines_are_disjoint():
    train = set(lines("retain.txt")) | set(lines("unlearn.txt"))
    held = set(lines("retain_heldout.txt")) | set(lines("unlearn_heldout.txt"))
    assert not train & held
    assert not set(lines("retain.txt")) & set(lines("unlearn.txt"))


def test_heldout_sentences_never_appear_in_training_text():
    # Entries are held out per synset, so no held-out entry's first sentence is in training.
    train = "\n".join(lines("retain.txt") + lines("unlearn.txt"))
    for name in ("retain_heldout.txt", "unlearn_heldout.txt"):
        first_sentences = [doc.split(". ")[0] + ". " for doc in lines(name)]
        leaked = [s for s in first_sentences if len(s) > 40 and s in train]
        assert len(leaked) <= len(first_sentences) // 20, leaked[:5]


@pytest.mark.parametrize("name", MCQ_FILES)
def test_mcq_format(name):
    rows = [json.loads(line) for line in lines(name)]
    assert len(rows) == 200
    for r in rows:
        assert set(r) == {"question", "choices", "answer"}
        assert isinstance(r["question"], str) and r["question"].strip()
        assert isinstance(r["choices"], list) and len(r["choices"]) == 4
        assert all(isinstance(c, str) and c.strip() and "_" not in c for c in r["choices"])
        assert len({c.lower() for c in r["choices"]}) == 4, r
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < 4
        answer = re.escape(r["choices"][r["answer"]].lower())
        assert not re.search(r"\b" + answer, r["question"].lower()), r
    assert len({r["question"] for r in rows}) == len(rows)
    counts = [sum(r["answer"] == i for r in rows) for i in range(4)]
    assert min(counts) >= 40, f"answer positions unbalanced: {counts}"


def test_mcq_answers_come_from_heldout_text_only():
    train = "\n".join(lines("retain.txt") + lines("unlearn.txt"))
    held = "\n".join(lines("retain_heldout.txt") + lines("unlearn_heldout.txt"))
    for name in MCQ_FILES:
        glosses = [json.loads(x)["question"].split(": ", 1)[1].rstrip("?") for x in lines(name)]
        # (a leading "(anatomy)" label is rephrased in the text, so compare the gloss's end)
        assert all(g[-30:] in held for g in glosses)
        assert sum(g in train for g in glosses) <= 5   # WordNet repeats a few glosses verbatim


def bio_rate(name):
    text = (DEMO / name).read_text(encoding="utf-8")
    return len(BIO.findall(text)) / len(text.split())


def test_unlearn_is_about_biology_and_retain_is_not():
    for bio, general in (("unlearn.txt", "retain.txt"),
                         ("unlearn_heldout.txt", "retain_heldout.txt")):
        assert bio_rate(bio) > 10 * bio_rate(general) + 0.01, (bio_rate(bio), bio_rate(general))
    forget = " ".join(json.loads(x)["question"] for x in lines("forget_mcq.jsonl"))
    retain = " ".join(json.loads(x)["question"] for x in lines("retain_mcq.jsonl"))
    assert len(BIO.findall(forget)) > 5 * len(BIO.findall(retain)) + 10


OOD = {"ood_forget_mcq.jsonl": 170, "ood_retain_mcq.jsonl": 170}
PROSE = ["prose_unlearn_a.txt", "prose_unlearn_b.txt", "prose_retain_a.txt", "prose_retain_b.txt"]


@pytest.mark.parametrize("name, n", OOD.items())
def test_ood_mcq_counts_and_balanced_answers(name, n):
    rows = [json.loads(l) for l in lines(name)]
    assert len(rows) == n >= 150
    counts = [sum(r["answer"] == k for r in rows) for k in range(4)]
    assert max(counts) - min(counts) <= 1, counts
    assert len({r["question"] for r in rows}) == n
    assert not any(r["question"].startswith("Which word means") for r in rows), "another style than training"


def test_ood_prose_is_held_out_from_every_training_line():
    train = set()
    for name in PROSE + ["retain.txt", "unlearn.txt"]:
        train |= {s.strip() for l in lines(name) for s in l.split(". ") if len(s) > 40}
    for name in ("ood_forget_text.txt", "ood_retain_text.txt"):
        paras = lines(name)
        assert len(paras) >= 50
        assert not {s.strip() for p in paras for s in p.split(". ") if len(s) > 40} & train


def test_demo_corpus_interleaves_prose_and_wordnet():
    from cache.corpora import iter_documents, resolve_corpus

    docs = iter_documents(resolve_corpus("demo", "unlearn"))
    first = [next(docs) for _ in range(6)]
    a, b = lines("prose_unlearn_a.txt"), lines("prose_unlearn_b.txt")
    assert first[0] == a[0] + "\n" + a[1] and first[1] == b[0] + "\n" + b[1]  # NAME*2: two paragraphs
    assert first[2] == lines("unlearn.txt")[0] and first[3] == a[2] + "\n" + a[3]
    from cache.errors import CorpusError

    with pytest.raises(CorpusError, match="NAME\\*K"):
        resolve_corpus("demo:unlearn*x", "unlearn")
