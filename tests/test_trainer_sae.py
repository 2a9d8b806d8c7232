"""The SAE module (METHOD §1): shapes, unit-norm decoder rows, save / from_run."""

import json

import pytest
import torch

from trainer import sae as sae_module
from trainer.sae import SAE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_shapes_and_formula():
    torch.manual_seed(0)
    sae = SAE(8, 32)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x_BD = torch.randn(5, 8)
    f_BF, x_hat_BD = sae(x_BD)
    assert f_BF.shape == (5, 32) and x_hat_BD.shape == (5, 8)
    # METHOD §1: b_dec is subtracted before encoding; ReLU; decoder adds b_dec back.
    expected_f = torch.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(f_BF, expected_f)
    torch.testing.assert_close(x_hat_BD, expected_f @ sae.W_dec + sae.b_dec)
    assert (f_BF >= 0).all()


@pytest.mark.parametrize("active", [0.03, 0.5], ids=["sparse", "dense"])
def test_training_gradients_equal_the_plain_formula(active):
    """encode/decode under autograd take sparse paths while f is sparse; every gradient (the
    parameters', and dL/df seen by the importance) equals the plain dense computation."""
    torch.manual_seed(0)
    sae = SAE(16, 256)
    x_BD = 2 * torch.randn(64, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        pre = (x_BD - sae.b_dec) @ sae.W_enc
        sae.b_enc.fill_(-float(torch.quantile(pre.flatten(), 1 - active)))  # that share fires

    def grads(f_BF, f_dec_BF, x_hat_BD):
        loss = (x_hat_BD - x_BD).pow(2).sum(1).mean() + 0.3 * f_BF.sum(1).mean() + f_BF[:, :7].pow(2).mean()
        params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        return torch.autograd.grad(loss, params + [f_dec_BF])

    f_BF = sae.encode(x_BD)
    f_dec = f_BF.view_as(f_BF)
    got = grads(f_BF, f_dec, sae.decode(f_dec))
    density = float((f_BF > 0).float().mean())
    assert density == pytest.approx(active, rel=0.1)
    assert (density <= sae_module.SPARSE_MAX_DENSITY) == (active < 0.1)  # the path under test
    ref_f = torch.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    ref_dec = ref_f.view_as(ref_f)
    want = grads(ref_f, ref_dec, ref_dec @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(f_BF, ref_f)
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    active = ref_f > 0  # dL/df matters only where f fires (a ReLU feature that is off takes no part)
    torch.testing.assert_close(got[4][active], want[4][active], rtol=1e-4, atol=1e-5)


def test_parallel_gradient_removed():
    torch.manual_seed(0)
    sae = SAE(8, 16)
    sae.W_dec.grad = torch.randn(16, 8)
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel_F = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel_F.abs().max() < 1e-5


def test_decoder_rows_stay_unit_norm_after_steps():
    torch.manual_seed(0)
    sae = SAE(8, 16)
    opt = torch.optim.AdamW(sae.parameters(), lr=0.05)
    for _ in range(20):
        x_BD = torch.randn(64, 8) * 3
        f_BF, x_hat_BD = sae(x_BD)
        loss = (x_hat_BD - x_BD).pow(2).sum(1).mean() + 0.04 * f_BF.sum(1).mean()
        opt.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    norms_F = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms_F, torch.ones(16))


def test_save_and_from_run_round_trip(tmp_path):
    sae = SAE(8, 24, generator=torch.Generator().manual_seed(3))
    sae.save(tmp_path / "sae.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8, "scale": 0.25, "layer": 3}))
    loaded, scale, config = SAE.from_run(tmp_path)
    assert scale == 0.25 and config["layer"] == 3
    assert loaded.W_enc.shape == (8, 24) and loaded.W_dec.shape == (24, 8)  # SAELens layout
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert not (tmp_path / "sae.safetensors.tmp").exists()
