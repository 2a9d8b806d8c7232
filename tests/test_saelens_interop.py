"""An SAE written by `ff export --format saelens` loads in SAELens (sae_lens from PyPI) and
gives the same feature activations and reconstructions as ff on the same model activations."""
from __future__ import annotations

import json

import pytest
import torch
from test_pipelines_helpers import make_run, single_thread  # noqa: F401 (autouse fixture)

from cache.models import load_model
from pipelines.config import Setting
from pipelines.export import export_saelens
from pipelines.intervene import Intervention, load_run

pytestmark = pytest.mark.slow
LAYER = 2


def test_exported_sae_loads_in_saelens_with_identical_features(tiny_model, tmp_path):
    import sae_lens  # a test extra (setup.cfg)

    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, scale=0.21,
                       n_candidates=24, b_enc=-0.05)
    export_saelens(run_dir, tmp_path / "saelens")

    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    assert sae.cfg.d_in == lm.info.d_model and sae.cfg.d_sae == 8 * lm.info.d_model
    assert sae.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"

    # The same inputs: the model's residual stream after block LAYER on real token ids.
    ids = lm.tokenizer("alpha beta gamma delta " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        h_BTD = lm.model(ids, output_hidden_states=True).hidden_states[LAYER + 1].float()

    run = load_run(run_dir)
    with torch.no_grad():
        f_ff = run.sae.encode(h_BTD * run.scale)
        x_hat_ff = run.sae.decode(f_ff) / run.scale
        f_sl = sae.encode(h_BTD)
        x_hat_sl = sae.decode(f_sl)
    assert (f_ff > 0).float().mean() > 0.05  # a real comparison, not of two zero tensors
    torch.testing.assert_close(f_sl, f_ff, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_hat_sl, x_hat_ff, rtol=1e-4, atol=1e-4)

    # The features ff edits at inference (the candidate set) are the same SAELens latents.
    meta = json.loads((tmp_path / "saelens" / "ff_meta.json").read_text())
    iv = Intervention(run, Setting(mode="ablate"))
    assert iv.features.tolist() == meta["candidates"]
    with torch.no_grad():
        torch.testing.assert_close(f_sl[..., meta["candidates"]], iv.selected_acts(h_BTD),
                                   rtol=1e-4, atol=1e-5)
