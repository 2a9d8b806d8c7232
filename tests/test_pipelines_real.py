"""The fast evaluation path on the real embedded Gemma 3 270M (sliding + full attention layers,
tied 262k-token LM head): it must match the plain HF forward."""
from __future__ import annotations

import pytest
import torch

from cache.models import load_model
from pipelines.config import EvalConfig
from pipelines.data import load_mcq, mcq_batches, mcq_scores
from pipelines.fastlm import score, verify_fast_path


@pytest.mark.real_model
def test_fast_path_matches_hf_on_gemma3_270m():
    lm = load_model("gemma-3-270m", device="cpu")
    for layer in (3, 8):
        verify_fast_path(lm.model, layer)
    qs = load_mcq("demo", "forget", limit=3)
    template = EvalConfig().mcq_template
    batches, layout = mcq_batches(lm.tokenizer, qs, template=template, max_batch_tokens=4096,
                                  window=lm.model.config.sliding_window)
    assert len(batches) == 1 and batches[0].input_ids_BT[0, 0] == lm.tokenizer.bos_token_id
    lp_N, resid = score(lm.model, batches[0], capture=[8])
    resumed_N, _ = score(lm.model, batches[0], resume=(8, resid[8]))
    fast = mcq_scores(lp_N, layout)
    ref = torch.zeros_like(fast)
    with torch.no_grad():
        for qi, q in enumerate(qs):
            prompt = lm.tokenizer(template.format(question=q.question))["input_ids"]
            for ci, c in enumerate(q.choices):
                cont = lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                logp = lm.model(torch.tensor([prompt + cont])).logits[0].float().log_softmax(-1)
                ref[qi, ci] = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont))
    torch.testing.assert_close(fast, ref, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(resumed_N, lp_N, atol=1e-4, rtol=1e-5)
