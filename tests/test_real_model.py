"""Tests on the real embedded Gemma 3 270M (slow: the first run converts the GGUF weights once)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.build import CacheConfig, build_cache
from cache.store import open_store

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    from cache.models import load_model

    return load_model("gemma-3-270m")


def test_embedded_model_info(gemma):
    assert gemma.info.n_layers == 18 and gemma.info.d_model == 640
    assert gemma.info.weights_hash.startswith("sha256:a5fd3b62")
    assert gemma.model.dtype == torch.float32


def test_store_matches_independent_hf_forward(tmp_path, gemma):
    out = tmp_path / "gemma.zarr"
    cfg = CacheConfig(model="gemma-3-270m", contexts=6, unlearn_contexts=4, ctx_len=48, chunk_contexts=4)
    res = build_cache(cfg, out, progress=False, lm=gemma)
    assert res.layers == (3, 8, 13)
    store = open_store(out)
    assert store.meta.complete and store.meta.d_model == 640
    for name in ("retain", "unlearn"):
        c = store.corpus(name)
        ids = torch.from_numpy(c.tokens().astype(np.int64))
        with torch.inference_mode():
            hs = gemma.model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in res.layers:
            got = np.concatenate([c.read_chunk(layer, i) for i in range(c.n_chunks)])
            want = hs[layer + 1].float().numpy()
            # bf16 rounding (rtol 2^-8); the atol covers float32 summation-order noise between
            # the cache's batches and this one forward, which shows on entries near zero
            # (1e-4 on activations whose entries reach hundreds)
            np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-3)
        # BOS activations are outliers (METHOD section 0): that is why the mask drops them.
        x = c.read_chunk(3, 0)
        norms = np.linalg.norm(x, axis=-1)
        assert norms[:, 0].mean() > 3 * np.median(norms[:, 1:])
