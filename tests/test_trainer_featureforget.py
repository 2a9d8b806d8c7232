"""FeatureForget bookkeeping (METHOD §2-§5): importance, thresholds, candidates, clusters,
gates, ablations."""

import copy
import math

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.featureforget import FeatureForget, candidates, cluster_losses, thresholds
from trainer.sae import SAE
from trainer.steps import make_optimizer, recon_stats, set_lr, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def per_token_importance(sae: SAE, x_BD: torch.Tensor, l1: float):
    """alpha and freq by brute force: autograd of each token's own loss w.r.t. its features."""
    alpha_F, freq_F = torch.zeros(sae.d_sae), torch.zeros(sae.d_sae)
    for x_D in x_BD:
        f_F = sae.encode(x_D[None]).detach()[0].requires_grad_(True)
        loss = (x_D - sae.decode(f_F[None])[0]).pow(2).sum() + l1 * f_F.sum()
        (g_F,) = torch.autograd.grad(loss, f_F)
        # closed form, METHOD §2: dl/df_i = 2 (x_hat - x) . W_dec[i] + l1
        x_hat_D = sae.decode(f_F.detach()[None])[0]
        torch.testing.assert_close(g_F, 2 * sae.W_dec.detach() @ (x_hat_D - x_D).detach() + l1)
        fired_F = f_F.detach() > 0
        alpha_F += g_F.abs() * fired_F
        freq_F += fired_F
    return alpha_F / len(x_BD), freq_F / len(x_BD)


def test_importance_from_training_backward_equals_per_token_gradient():
    torch.manual_seed(0)
    cfg = TrainConfig(expansion=2, n_clusters=2, importance_decay=0.0, l1=0.1, alpha=3.0)
    sae = SAE(8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    ff = FeatureForget(16, cfg)
    ff.cluster.copy_(torch.arange(16) % 2)
    ff.candidate[:5] = True  # non-trivial cluster terms: they must not leak into alpha
    with torch.no_grad():
        ff.s_r.copy_(torch.tensor([0.5, -1.0]))
    before = copy.deepcopy(sae)
    x_r_BD, x_u_BD = torch.randn(7, 8), torch.randn(7, 8) * 2
    opt = make_optimizer(cfg, sae, ff)
    assert train_step(sae, ff, opt, cfg, x_r_BD, x_u_BD, phase2=True) is not None
    for x_BD, alpha, freq in ((x_r_BD, ff.alpha_r, ff.freq_r), (x_u_BD, ff.alpha_u, ff.freq_u)):
        exp_alpha, exp_freq = per_token_importance(before, x_BD, cfg.l1)
        assert exp_alpha.abs().sum() > 0 and (exp_freq < 1).any()
        torch.testing.assert_close(alpha, exp_alpha, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(freq, exp_freq)
    # the importance passes (no optimiser step) give the same numbers
    stats = recon_stats(before, x_r_BD, cfg.l1)
    torch.testing.assert_close(stats.alpha, per_token_importance(before, x_r_BD, cfg.l1)[0],
                               rtol=1e-4, atol=1e-6)


def test_features_that_never_fire_keep_zero_importance():
    sae = SAE(8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[:4] = -1e3  # these can never fire
    stats = recon_stats(sae, torch.randn(32, 8), 0.04)
    assert (stats.alpha[:4] == 0).all() and (stats.freq[:4] == 0).all()
    assert (stats.alpha[4:] > 0).any()


def test_ema_running_mean():
    cfg = TrainConfig(importance_decay=0.9, n_clusters=2)
    ff = FeatureForget(3, cfg)
    from trainer.featureforget import BatchStats

    one = BatchStats(torch.ones(3), torch.ones(3))
    ff.observe(one, one, ema=False)  # plain mean first: exactly the batch
    torch.testing.assert_close(ff.alpha_r, torch.ones(3))
    ff.observe(BatchStats(torch.zeros(3), torch.zeros(3)), one, ema=True)
    torch.testing.assert_close(ff.alpha_r, torch.full((3,), 0.9))
    torch.testing.assert_close(ff.alpha_u, torch.ones(3))


def test_threshold_formula_per_cluster_and_global():
    alpha_r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 0.5])
    cluster = torch.tensor([0, 0, 0, 1, 1, 2])
    tau = thresholds(alpha_r, cluster, 4, 0.9)
    for c, members in enumerate([[1.0, 2.0, 3.0], [10.0, 20.0], [0.5]]):
        expected = 0.9 * np.mean(members) + 0.1 * np.std(members)  # population std
        assert tau[c].item() == pytest.approx(expected, rel=1e-6)
    assert tau[3].item() == 0.0  # empty cluster
    tau_g = thresholds(alpha_r, cluster, 4, 0.9, per_cluster=False)
    expected = 0.9 * alpha_r.numpy().mean() + 0.1 * alpha_r.numpy().std()
    torch.testing.assert_close(tau_g, torch.full((4,), float(expected)))


def test_candidate_selection():
    tau = torch.tensor([1.0, 5.0])
    cluster = torch.tensor([0, 0, 0, 0, 1, 1])
    alpha_r = torch.tensor([0.5, 1.0, 2.0, 0.5, 4.0, 6.0])
    alpha_u = torch.tensor([2.0, 2.0, 3.0, 1.0, 6.0, 9.0])
    # 0: u>tau, r<=tau -> yes; 1: r == tau -> yes; 2: r>tau -> no; 3: u == tau -> no;
    # 4: yes (cluster 1 threshold); 5: r > tau -> no
    expected = torch.tensor([True, True, False, False, True, False])
    assert torch.equal(candidates(alpha_r, alpha_u, tau, cluster), expected)
    # The retain-frequency bound drops feature 0 (fires on 5% of retain tokens) and keeps
    # 1 and 4; max_freq_r 1 is the rule as written.
    freq_r = torch.tensor([0.05, 0.009, 0.0, 0.0, 0.0, 0.0])
    bounded = candidates(alpha_r, alpha_u, tau, cluster, freq_r_F=freq_r, max_freq_r=0.01)
    assert torch.equal(bounded, expected & torch.tensor([False, True, True, True, True, True]))
    unbounded = candidates(alpha_r, alpha_u, tau, cluster, freq_r_F=freq_r, max_freq_r=1.0)
    assert torch.equal(unbounded, expected)


def blob_stats(n_per: int, n_blobs: int, seed: int = 0) -> torch.Tensor:
    """Feature statistics [4, F] in n_blobs well separated groups (in log space)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.tensor([[4.0]] * 4 + [[-4.0]] * 4)
    centres = (torch.eye(4).repeat(2, 1) * signs)[:n_blobs]  # +-4 along each axis
    logs = centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(n_blobs * n_per, 4, generator=g)
    return torch.exp(logs).T.contiguous().float()


def load_stats(ff: FeatureForget, stats_4F: torch.Tensor) -> None:
    for name, row in zip(("alpha_r", "alpha_u", "freq_r", "freq_u"), stats_4F):
        getattr(ff, name).copy_(row)


def test_warm_started_clustering_keeps_cluster_identity():
    cfg = TrainConfig(n_clusters=6)
    stats = blob_stats(20, 6)
    ff = FeatureForget(120, cfg)
    load_stats(ff, stats)
    ff.refresh()
    first = ff.cluster.clone()
    assert len(torch.unique(first)) == 6
    ff.refresh()  # unchanged data
    assert torch.equal(ff.cluster, first)
    # the same features, listed in another order: ids must follow the centroids
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(5))
    load_stats(ff, stats[:, perm] * 1.01)
    ff.refresh()
    assert torch.equal(ff.cluster, first[perm])
    cold = FeatureForget(120, cfg)  # sanity: a cold start labels the permuted data differently
    load_stats(cold, stats[:, perm] * 1.01)
    cold.refresh()
    assert not torch.equal(cold.cluster, first[perm])


def test_cluster_losses_values():
    cluster = torch.tensor([0, 0, 1, 1])
    cand = torch.tensor([True, False, False, False])
    mass_r = torch.tensor([1.0, 3.0, 4.0, 2.0])
    mass_u = torch.tensor([3.0, 1.0, 2.0, 2.0])
    s = torch.zeros(2)
    cl = cluster_losses(mass_r, mass_u, cluster, cand, s, s)
    assert cl.retain_C.tolist() == pytest.approx([1.0 / 10.0, 0.0], rel=1e-5)
    assert cl.unlearn_C.tolist() == pytest.approx([1 - 3.0 / 4.0, 1.0], rel=1e-5)
    # only cluster 0 has candidates; g = 1, s = 0: (1/C) * (0.1 + 0.25)
    assert cl.aux.item() == pytest.approx(0.35 / 2, rel=1e-5)


def test_gates_stay_bounded_and_do_not_collapse():
    cfg = TrainConfig(n_clusters=3, gate_log_max=4.0)
    ff = FeatureForget(6, cfg)
    ff.cluster.copy_(torch.tensor([0, 0, 1, 1, 2, 2]))
    ff.candidate.copy_(torch.tensor([True, False, True, False, False, False]))
    # cluster 0: candidates carry no retain mass (L_retain = 0 -> optimum g_r = inf);
    # cluster 1: L_retain = 0.25 and L_unlearn = 0.5 -> optimum g = 1/L; cluster 2: inactive.
    mass_r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    mass_u = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    opt = torch.optim.Adam([ff.s_r, ff.s_u], lr=0.05)
    for _ in range(2000):
        loss = ff.losses(mass_r, mass_u).aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        ff.clamp_gates_()
    g_r, g_u = ff.gates()
    cap = math.exp(cfg.gate_log_max)
    assert (g_r <= cap * (1 + 1e-6)).all() and (g_u <= cap * (1 + 1e-6)).all()
    assert (g_r >= 1 - 1e-3).all() and (g_u >= 1 - 1e-3).all()  # never collapses to 0
    assert g_r[0].item() == pytest.approx(cap, rel=1e-4)  # held at the bound
    assert g_r[1].item() == pytest.approx(4.0, rel=0.02)
    assert g_u[1].item() == pytest.approx(2.0, rel=0.02)
    assert g_r[2].item() == 1.0 and g_u[2].item() == 1.0  # inactive cluster: untouched


def test_gates_follow_the_schedule_at_their_own_learning_rate():
    cfg = TrainConfig(n_clusters=3, lr=3e-4, gate_lr=3e-2)
    sae, ff = SAE(4, 8), FeatureForget(8, cfg)
    opt = make_optimizer(cfg, sae, ff)
    set_lr(opt, 1.5e-4)  # halfway down the schedule
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(ff.s_r)] == lr_of[id(ff.s_u)] == pytest.approx(1.5e-2)
    assert lr_of[id(sae.W_enc)] == lr_of[id(sae.b_dec)] == pytest.approx(1.5e-4)


def test_ablation_no_clustering_and_no_adaptive_threshold():
    stats = blob_stats(10, 4)
    one = FeatureForget(40, TrainConfig(n_clusters=4, no_clustering=True))
    load_stats(one, stats)
    one.refresh()
    assert (one.cluster == 0).all() and one.tau.shape == (1,)
    glob = FeatureForget(40, TrainConfig(n_clusters=4, no_adaptive_threshold=True))
    load_stats(glob, stats)
    glob.refresh()
    assert len(torch.unique(glob.cluster)) == 4
    expected = thresholds(stats[0], glob.cluster, 4, 0.9, per_cluster=False)
    torch.testing.assert_close(glob.tau, expected)
    torch.testing.assert_close(one.tau, glob.tau[:1])


def test_ablation_no_importance_uses_frequencies():
    cfg = TrainConfig(no_importance=True, no_clustering=True)
    ff = FeatureForget(4, cfg)
    ff.alpha_r.copy_(torch.tensor([0.0, 0.0, 9.0, 9.0]))  # alpha would pick features 0, 1
    ff.alpha_u.copy_(torch.tensor([9.0, 9.0, 0.0, 0.0]))
    ff.freq_r.copy_(torch.tensor([0.5, 0.5, 0.0, 0.0]))   # frequencies pick 2, 3
    ff.freq_u.copy_(torch.tensor([0.0, 0.0, 0.5, 0.5]))
    ff.refresh()
    assert ff.candidate.tolist() == [False, False, True, True]


def test_more_clusters_than_features_is_a_user_error():
    from trainer.errors import TrainError

    with pytest.raises(TrainError, match="n_clusters"):
        FeatureForget(8, TrainConfig(n_clusters=32))
    FeatureForget(8, TrainConfig(n_clusters=32, no_clustering=True))  # one cluster: fine
