"""Fluency of an edited model (pipelines/fluency.py) on the tiny random model: greedy decoding and
NLL against brute force, distinct bigrams by hand, and known edits (a large push, a no-op)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from conftest import WORDS
from test_pipelines_helpers import single_thread  # noqa: F401 (autouse fixture)

from pipelines.errors import EvalError
from pipelines.fluency import (
    CleanRef,
    clean_reference,
    continuation_nll,
    distinct_bigrams,
    fluency_prompts,
    greedy,
    measure_fluency,
)
from pipelines.intervene import _continues

N_NEW = 12  # 9 prompt tokens + 12 > the tiny model's sliding window of 16: the cache must handle it


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def _paragraphs(n: int, length: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def prompts(model_tok) -> torch.Tensor:
    return fluency_prompts(model_tok[1], _paragraphs(5, 12), n_prompts=5, prompt_tokens=8)


@contextmanager
def _block_hook(model, fn) -> Iterator[None]:
    """Forward hook on decoder block 1 that maps its hidden state through `fn`."""
    def hook(_module, _inputs, output):
        if isinstance(output, (tuple, list)):
            return (fn(output[0]), *output[1:])
        return fn(output)
    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_distinct_bigrams_by_hand():
    cont = torch.tensor([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 7, 7]])
    torch.testing.assert_close(distinct_bigrams(cont), torch.tensor([2 / 5, 1.0, 1 / 5]))
    assert distinct_bigrams(torch.tensor([[5], [6]])).tolist() == [1.0, 1.0]  # no bigram


def test_prompts_equal_length_bos_first_short_ones_skipped(model_tok):
    tok = model_tok[1]
    paragraphs = ["the cell gene", "a b c d e f", "plant animal city river music game",
                  "river music game law", "king queen money bank school teacher student"]
    ids = fluency_prompts(tok, paragraphs, n_prompts=2, prompt_tokens=4)
    # "a b c d e f": b..f are unknown words, still tokens; the 3- and 4-token paragraphs are skipped
    expected = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"][:4] for p in paragraphs[1:3]]
    assert ids.dtype == torch.int64 and ids.tolist() == expected
    assert fluency_prompts(tok, paragraphs, n_prompts=9, prompt_tokens=4).shape == (3, 5)
    with pytest.raises(EvalError, match="longer paragraphs"):
        fluency_prompts(tok, paragraphs[:1] + paragraphs[3:4], n_prompts=2, prompt_tokens=4)


def test_greedy_matches_recomputing_without_a_cache(model_tok, prompts):
    model = model_tok[0]
    seq = prompts.clone()
    with torch.no_grad():
        for _ in range(N_NEW):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    got = greedy(model, prompts, N_NEW, batch=2)  # 5 prompts in batches of 2, 2, 1
    assert got.shape == (len(prompts), N_NEW)
    assert torch.equal(got, seq[:, prompts.shape[1]:])


def test_greedy_steps_are_seen_as_continuations_by_the_hooks(model_tok, prompts):
    """The intervention resets its gate on a forward that does not continue a sequence."""
    model, seen = model_tok[0], []
    handle = model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(_continues(kw)), with_kwargs=True)
    try:
        greedy(model, prompts, 4, batch=3)
    finally:
        handle.remove()
    assert seen == [False, True, True, True] * 2


def test_continuation_nll_matches_full_log_softmax(model_tok, prompts):
    model = model_tok[0]
    g = torch.Generator().manual_seed(1)
    cont = torch.randint(model.config.vocab_size, (len(prompts), N_NEW), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.cat([prompts, cont], 1)).logits.float(), -1)
    T = prompts.shape[1]
    expected = torch.stack([-sum(logp[p, T - 1 + j, cont[p, j]] for j in range(N_NEW)) / N_NEW
                            for p in range(len(prompts))])
    torch.testing.assert_close(continuation_nll(model, prompts, cont, batch=2), expected)


def test_clean_model_and_a_no_op_edit_change_nothing(model_tok, prompts):
    model, tok = model_tok
    for edit in (None, lambda: _block_hook(model, lambda h: h)):
        fl = measure_fluency(model, tok, prompts, edit, n_new=N_NEW)
        assert fl.changed == 0.0 and fl.nll == fl.nll_clean and fl.distinct == fl.distinct_clean
        assert all(e.clean == e.edited for e in fl.examples)


def test_a_large_push_changes_continuations_and_raises_clean_nll(model_tok, prompts):
    model, tok = model_tok
    push_D = 50.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ref = clean_reference(model, tok, prompts, N_NEW)
    fl = measure_fluency(model, tok, prompts, lambda: _block_hook(model, lambda h: h + push_D),
                         n_new=N_NEW, clean_cont=ref, examples=2)
    assert fl.changed > 0 and fl.nll > fl.nll_clean
    assert fl.nll_clean == pytest.approx(ref.nll_P.mean().item())
    assert len(fl.examples) == 2 and fl.examples[0].clean != fl.examples[0].edited  # changed ones first
    assert torch.equal(greedy(model, prompts, N_NEW), ref.cont_PN), "the hook must be gone afterwards"
    d = json.loads(json.dumps(fl.to_dict()))
    assert d["nll"] == fl.nll and d["n_new"] == N_NEW and set(d["examples"][0]) == {"prompt", "clean", "edited"}


def test_reused_clean_side_gives_the_same_result_and_must_match(model_tok, prompts):
    model, tok = model_tok
    ref = clean_reference(model, tok, prompts, N_NEW)
    assert isinstance(ref, CleanRef)
    edit = lambda: _block_hook(model, lambda h: -h)  # noqa: E731
    fresh = measure_fluency(model, tok, prompts, edit, n_new=N_NEW)
    assert measure_fluency(model, tok, prompts, edit, n_new=N_NEW, clean_cont=ref) == fresh
    assert measure_fluency(model, tok, prompts, edit, n_new=N_NEW, clean_cont=ref.cont_PN) == fresh
    with pytest.raises(EvalError, match="same prompts and n_new"):
        measure_fluency(model, tok, prompts, edit, n_new=N_NEW + 1, clean_cont=ref)


def test_changed_counts_prompts_and_examples_show_changed_ones_first(model_tok, prompts):
    """An edit that pushes only prompt 3's row changes exactly that prompt (rows never mix)."""
    model, tok = model_tok
    push_D = 50.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))

    def push_row_3(h):
        h = h.clone()
        h[3] += push_D
        return h
    fl = measure_fluency(model, tok, prompts, lambda: _block_hook(model, push_row_3), n_new=N_NEW, examples=2)
    assert fl.changed == pytest.approx(1 / len(prompts))
    assert fl.examples[0].prompt == tok.decode(prompts[3], skip_special_tokens=True)
    assert fl.examples[0].clean != fl.examples[0].edited and fl.examples[1].clean == fl.examples[1].edited
