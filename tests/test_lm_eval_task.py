"""The lm-evaluation-harness tasks of pipelines/lm_eval_tasks score a model folder as ff does:
the same prompts and continuations, the same per-choice log-likelihoods, the same accuracy.

The model is a tiny random Gemma 3 (tests/conftest.py's shape) with a byte-level tokenizer that
prepends BOS, so that every character of a prompt and of a choice reaches the model and a prompt
that differs from ff's by one space or newline changes the scores."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("lm_eval")

from pipelines.config import EvalConfig  # noqa: E402
from pipelines.data import Question, load_mcq, mcq_batches, mcq_scores  # noqa: E402
from pipelines.lm_eval_tasks import GROUP, TASKS, task_dir  # noqa: E402

LIMIT = 12
"""Questions per task (the first ones, in file order, on both sides)."""
ATOL = 1e-3
"""Per-choice log-likelihood tolerance (float32, different batching); a one-character prompt
change moves them by far more on this model (test_a_changed_prompt_shows)."""
SPECS = {"ff_forget_mcq": ("demo", "forget"), "ff_retain_mcq": ("demo", "retain"),
         "ff_ood_forget_mcq": ("demo-ood", "forget"), "ff_ood_retain_mcq": ("demo-ood", "retain")}


def build_byte_model(folder: Path) -> Path:
    """A tiny random Gemma 3 with a byte-level tokenizer (BOS prepended), saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(("<pad>", "<eos>", "<bos>", "<unk>"))}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    cfg = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"] * 2,
                           max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2, initializer_range=0.3)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    return build_byte_model(tmp_path_factory.mktemp("byte_model"))


@pytest.fixture(scope="module")
def harness(byte_model: Path) -> dict:
    """lm_eval's results for the group of all four tasks, with every sample logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir()), include_defaults=False)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={byte_model},dtype=float32",
                                   tasks=[GROUP], task_manager=tm, limit=LIMIT, log_samples=True,
                                   bootstrap_iters=0, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def ff_model(byte_model: Path):
    from cache.models import load_model

    return load_model(str(byte_model), device="cpu", dtype="float32")


def ff_scores(lm: Any, questions: list[Question],
              template: str = EvalConfig.mcq_template) -> Tensor:
    """ff's summed log-likelihood of every choice [Q, C] (pipelines/data.py, fastlm.py)."""
    from pipelines.fastlm import score, text_config

    window = getattr(text_config(lm.model), "sliding_window", None)
    batches, layout = mcq_batches(lm.tokenizer, questions, template=template,
                                  max_batch_tokens=EvalConfig.max_batch_tokens, window=window)
    return mcq_scores(torch.cat([score(lm.model, b)[0] for b in batches]), layout)


def samples(harness: dict, task: str) -> list[dict]:
    """The task's logged samples in document order."""
    return sorted(harness["samples"][task], key=lambda s: s["doc_id"])


def harness_scores(harness: dict, task: str) -> Tensor:
    """lm_eval's log-likelihood of every choice [Q, C] (-inf where a question has fewer)."""
    rows = [[float(r[0]) for r in s["filtered_resps"]] for s in samples(harness, task)]
    C = max(map(len, rows))
    return torch.tensor([r + [float("-inf")] * (C - len(r)) for r in rows], dtype=torch.float64)


def questions(task: str) -> list[Question]:
    spec, role = SPECS[task]
    return load_mcq(spec, role, limit=LIMIT)


def test_tasks_cover_the_bundled_files():
    assert set(TASKS) == set(SPECS)
    for task in TASKS:
        assert (task_dir() / f"{task}.yaml").is_file()
    assert (task_dir() / f"{GROUP}.yaml").is_file()


@pytest.mark.parametrize("task", TASKS)
def test_same_prompts_and_continuations(harness, task):
    """Every request is ff's prompt and " " + choice, for the same questions and answers."""
    qs = questions(task)
    got = samples(harness, task)
    assert len(got) == len(qs) == LIMIT
    for s, q in zip(got, qs):
        prompt = EvalConfig.mcq_template.format(question=q.question)
        assert [tuple(a) for a in s["arguments"]] == [(prompt, " " + c) for c in q.choices]
        assert s["target"] == q.answer


@pytest.mark.parametrize("task", TASKS)
def test_same_scores_and_accuracy(harness, ff_model, task):
    """Per-choice log-likelihoods agree, hence per-question correctness and `acc`."""
    qs = questions(task)
    ff_QC, lm_QC = ff_scores(ff_model, qs), harness_scores(harness, task)
    assert lm_QC.shape == ff_QC.shape
    assert torch.allclose(lm_QC, ff_QC, atol=ATOL, rtol=0), float((lm_QC - ff_QC).abs().max())
    answer_Q = torch.tensor([q.answer for q in qs])
    ff_correct = (ff_QC.argmax(1) == answer_Q).tolist()
    assert [bool(s["acc"]) for s in samples(harness, task)] == ff_correct
    assert harness["results"][task]["acc,none"] == pytest.approx(sum(ff_correct) / len(qs))


@pytest.mark.parametrize("template", ["Question: {question} Answer:",
                                      "Question: {question}\nAnswer: ",
                                      "Question: {question}\nAnswer:\n",
                                      "Question:{question}\nAnswer:",
                                      "{question}\nAnswer:"])
def test_a_changed_prompt_shows(harness, ff_model, template):
    """Scoring with a prompt one character (or one word) off ff's misses the tolerance."""
    task = "ff_forget_mcq"
    diff = (ff_scores(ff_model, questions(task), template) - harness_scores(harness, task)).abs()
    assert float(diff.max()) > 10 * ATOL
