"""One optimiser step, the importance passes and the learning-rate schedule (METHOD §1, §2,
§5, §6). Small named functions that the loop in train.py calls in order.

Every step sees the same number of tokens: phase 1 two retain half-batches, phase 2 and the
baseline one retain and one unlearn half-batch, stacked into one forward pass. Under torchrun
each rank passes its part of the global batch and `ranks` (trainer/dist.py) makes every mean
a mean over the global batch, so the loss, gradients and statistics are the single process's.

Shape suffixes: B tokens, D d_model, F d_sae.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from trainer.config import TrainConfig
from trainer.dist import SINGLE, Ranks
from trainer.featureforget import BatchStats, ClusterLosses, FeatureForget, batch_stats
from trainer.sae import SAE


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to min_lr_frac * lr (METHOD §6)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(cfg: TrainConfig, sae: SAE, ff: FeatureForget | None) -> torch.optim.AdamW:
    """AdamW; weight decay (if any) on the two weight matrices only, never biases or gates."""
    groups = [{"params": [sae.W_enc, sae.W_dec], "weight_decay": cfg.weight_decay},
              {"params": [sae.b_enc, sae.b_dec], "weight_decay": 0.0}]
    if ff is not None:
        groups.append({"params": [ff.s_r, ff.s_u], "weight_decay": 0.0,
                       "lr_scale": cfg.gate_lr / cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr for the SAE; the gates follow it scaled to cfg.gate_lr."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Forward(NamedTuple):
    loss: Tensor
    metrics: dict[str, Tensor]
    x_BD: Tensor
    f_BF: Tensor
    f_dec_BF: Tensor
    """A view of f_BF feeding the decoder; in phase 2 its .grad is kept (see step_loss)."""
    err_B: Tensor
    """||x - x_hat||^2 per token."""
    n: int
    """Rows [:n] are retain tokens; the rest unlearn tokens (baseline, phase 2)."""
    counts: tuple[int, int]
    """Retain and unlearn tokens of the global batch (one process: n and len(x_BD) - n)."""


def step_loss(sae: SAE, ff: FeatureForget | None, cfg: TrainConfig, x_r_BD: Tensor,
              x_u_BD: Tensor | None, *, phase2: bool, ranks: Ranks = SINGLE) -> Forward:
    """Forward pass and loss. x_u_BD None: phase 1, L_recon on a whole step of retain tokens.
    Baseline: L_recon over retain and unlearn halves together. Phase 2 (METHOD §5):
    L_recon(retain) + L_recon(unlearn) + a * gated cluster term. Every term is built from
    batch means (`ranks.means`), so under torchrun the loss is the global batch's, the
    cluster ratios included (their masses are summed over ranks before they are divided)."""
    n = len(x_r_BD)
    x_BD = x_r_BD if x_u_BD is None else torch.cat([x_r_BD, x_u_BD])
    f_BF = sae.encode(x_BD)
    # A view is its own autograd node: its .grad is dL/df along the decoder path only,
    # i.e. from ||x - x_hat||^2, free of the L1 and cluster terms that also use f (§2).
    f_dec_BF = f_BF.view_as(f_BF)
    if phase2:
        f_dec_BF.retain_grad()
    err_B = (sae.decode(f_dec_BF) - x_BD).pow(2).sum(1)
    rows = {"err_r": err_B[:n], "mass_r": f_BF[:n]}
    if x_u_BD is not None:
        rows.update(err_u=err_B[n:], mass_u=f_BF[n:])
        if not phase2:
            rows["err"] = err_B  # the baseline's L_recon: one mean over both halves
    mean, count = ranks.means(rows)
    mass_r_F = mean["mass_r"]  # m_D(S) = sum_{i in S} mass_D[i]
    m = {"mse_r": mean["err_r"]}
    if x_u_BD is None:
        m["l1"] = cfg.l1 * mass_r_F.sum()
        loss = m["mse_r"] + m["l1"]
    else:
        mass_u_F = mean["mass_u"]
        m["mse_u"] = mean["err_u"]
        if phase2:
            cl = ff.losses(mass_r_F, mass_u_F)
            m["l1"] = cfg.l1 * (mass_r_F.sum() + mass_u_F.sum())
            loss = m["mse_r"] + m["mse_u"] + m["l1"] + cfg.alpha * cl.aux
            m.update(_cluster_metrics(ff, cl, mass_u_F.detach()))
        else:
            n_r, n_u = count["err_r"], count["err_u"]
            m["l1"] = cfg.l1 * (n_r * mass_r_F.sum() + n_u * mass_u_F.sum()) / (n_r + n_u)
            loss = mean["err"] + m["l1"]
    m["loss"] = loss.detach()
    return Forward(loss, m, x_BD, f_BF, f_dec_BF, err_B, n,
                   (count["err_r"], count.get("err_u", 0)))


def _cluster_metrics(ff: FeatureForget, cl: ClusterLosses, mass_u_F: Tensor) -> dict[str, Tensor]:
    active_C = torch.bincount(ff.cluster[ff.candidate], minlength=len(ff.tau)) > 0
    unlearn_C = cl.unlearn_C.detach()
    unlearn = unlearn_C[active_C].mean() if active_C.any() else unlearn_C.new_tensor(1.0)
    return {"aux": cl.aux.detach(),
            "L_retain": cl.retain_C.detach().sum(),  # = retain mass share of all candidates
            "L_unlearn": unlearn,  # mean over clusters with candidates
            "unlearn_share": (mass_u_F * ff.candidate).sum() / (mass_u_F.sum() + 1e-6)}


def train_step(sae: SAE, ff: FeatureForget | None, opt: torch.optim.Optimizer, cfg: TrainConfig,
               x_r_BD: Tensor, x_u_BD: Tensor | None, *, phase2: bool,
               ranks: Ranks = SINGLE) -> Forward | None:
    """Forward, backward, step and bookkeeping -> Forward, or None if the loss is not finite
    (then nothing has changed: the caller stops the run; under torchrun every rank sees the
    same global loss, so all of them stop)."""
    fw = step_loss(sae, ff, cfg, x_r_BD, x_u_BD, phase2=phase2, ranks=ranks)
    if not torch.isfinite(fw.loss):
        return None
    opt.zero_grad(set_to_none=True)
    fw.loss.backward()
    # the summed gradient, before the projection and the step (METHOD §1); the gates' terms are
    # computed whole on every rank
    ranks.sum_grads_(sae.parameters(), replicated=(ff.s_r, ff.s_u) if ff is not None else ())
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    if ff is not None:
        ff.clamp_gates_()
    with torch.no_grad():
        fired_BF = fw.f_BF > 0
        if phase2:  # importance from this same backward (METHOD §2)
            (n, g_BF), (n_r, n_u) = (fw.n, fw.f_dec_BF.grad), fw.counts
            ff.observe(global_stats(fw.f_BF[:n], g_BF[:n], cfg.l1, fired_BF[:n], n_r, ranks),
                       global_stats(fw.f_BF[n:], g_BF[n:], cfg.l1, fired_BF[n:], n_u, ranks),
                       ema=True)
        fw.metrics.update(activity(fw, fired_BF, ranks))
    return fw


def global_stats(f_BF: Tensor, dldf_dec_BF: Tensor, l1: float, fired_BF: Tensor, n: int,
                 ranks: Ranks = SINGLE) -> BatchStats:
    """batch_stats of a global batch of n tokens from this rank's rows of it: alpha summed over
    the ranks, freq from the summed firing counts (so it is the single process's to the bit)."""
    stats = batch_stats(f_BF, dldf_dec_BF, l1, fired_BF, n=n)
    if ranks.world == 1:
        return stats
    count_F = fired_BF.sum(0).float()
    ranks.sum_(stats.alpha, count_F)
    return BatchStats(stats.alpha, count_F.div_(n))


def activity(fw: Forward, fired_BF: Tensor, ranks: Ranks = SINGLE) -> dict[str, Tensor]:
    """l0, fvu and which features fired, over the global batch."""
    x_BD = fw.x_BD
    if ranks.world == 1:
        total_var = (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        return {"l0": fired_BF.sum() / len(x_BD), "fvu": fw.err_B.sum() / total_var,
                "fired_F": fired_BF.any(0)}
    # one pass of sums (sum x, sum x^2 in float64) instead of the two-pass variance
    x_BD = x_BD.double()
    tot = torch.stack([x_BD.new_tensor(float(len(x_BD))), fired_BF.sum().double(),
                       fw.err_B.sum().double(), x_BD.pow(2).sum()])
    sum_D, fired_F = x_BD.sum(0), fired_BF.any(0).double()
    ranks.sum_(tot, sum_D, fired_F)
    n, fired, err, sq = tot.unbind()
    total_var = (sq - sum_D.pow(2).sum() / n).clamp_min(1e-12)
    return {"l0": (fired / n).float(), "fvu": (err / total_var).float(), "fired_F": fired_F > 0}


def recon_stats(sae: SAE, x_BD: Tensor, l1: float, ranks: Ranks = SINGLE) -> BatchStats:
    """Importance and frequency of one (global) batch without touching the parameters'
    gradients."""
    with torch.no_grad():
        f_BF = sae.encode(x_BD)
    f_BF.requires_grad_(True)
    mean, count = ranks.means({"err": (sae.decode(f_BF) - x_BD).pow(2).sum(1)})
    (g_BF,) = torch.autograd.grad(mean["err"], f_BF)
    f_BF = f_BF.detach()
    return global_stats(f_BF, g_BF, l1, f_BF > 0, count["err"], ranks)


def importance_passes(sae: SAE, ff: FeatureForget, retain: Iterator[Tensor],
                      unlearn: Iterator[Tensor], cfg: TrainConfig, *,
                      ranks: Ranks = SINGLE) -> None:
    """Forward + backward over cfg.importance_batches retain and unlearn batches, no optimiser
    step: a plain mean of alpha and freq to start from (end of phase 1, METHOD §6)."""
    dev = sae.W_dec.device
    ff.n_seen.zero_()
    for _ in range(cfg.importance_batches):
        r = recon_stats(sae, next(retain).to(dev), cfg.l1, ranks)
        u = recon_stats(sae, next(unlearn).to(dev), cfg.l1, ranks)
        ff.observe(r, u, ema=False)
