"""One optimiser step, the importance passes and the learning-rate schedule (METHOD §1, §2,
§5, §6). Small named functions that the loop in train.py calls in order.

Every step sees the same number of tokens: phase 1 two retain half-batches, phase 2 and the
baseline one retain and one unlearn half-batch, stacked into one forward pass.

Shape suffixes: B tokens, D d_model, F d_sae.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from trainer.config import TrainConfig
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


def step_loss(sae: SAE, ff: FeatureForget | None, cfg: TrainConfig, x_r_BD: Tensor,
              x_u_BD: Tensor | None, *, phase2: bool) -> Forward:
    """Forward pass and loss. x_u_BD None: phase 1, L_recon on a whole step of retain tokens.
    Baseline: L_recon over retain and unlearn halves together. Phase 2 (METHOD §5):
    L_recon(retain) + L_recon(unlearn) + a * gated cluster term."""
    n = len(x_r_BD)
    x_BD = x_r_BD if x_u_BD is None else torch.cat([x_r_BD, x_u_BD])
    f_BF = sae.encode(x_BD)
    # A view is its own autograd node: its .grad is dL/df along the decoder path only,
    # i.e. from ||x - x_hat||^2, free of the L1 and cluster terms that also use f (§2).
    f_dec_BF = f_BF.view_as(f_BF)
    if phase2:
        f_dec_BF.retain_grad()
    err_B = (sae.decode(f_dec_BF) - x_BD).pow(2).sum(1)
    mass_r_F = f_BF[:n].mean(0)  # m_D(S) = sum_{i in S} mass_D[i]
    m = {"mse_r": err_B[:n].mean()}
    if x_u_BD is None:
        m["l1"] = cfg.l1 * mass_r_F.sum()
        loss = m["mse_r"] + m["l1"]
    else:
        mass_u_F = f_BF[n:].mean(0)
        m["mse_u"] = err_B[n:].mean()
        if phase2:
            cl = ff.losses(mass_r_F, mass_u_F)
            m["l1"] = cfg.l1 * (mass_r_F.sum() + mass_u_F.sum())
            loss = m["mse_r"] + m["mse_u"] + m["l1"] + cfg.alpha * cl.aux
            m.update(_cluster_metrics(ff, cl, mass_u_F.detach()))
        else:
            m["l1"] = cfg.l1 * (n * mass_r_F.sum() + len(x_u_BD) * mass_u_F.sum()) / len(x_BD)
            loss = err_B.mean() + m["l1"]
    m["loss"] = loss.detach()
    return Forward(loss, m, x_BD, f_BF, f_dec_BF, err_B, n)


def _cluster_metrics(ff: FeatureForget, cl: ClusterLosses, mass_u_F: Tensor) -> dict[str, Tensor]:
    active_C = torch.bincount(ff.cluster[ff.candidate], minlength=len(ff.tau)) > 0
    unlearn_C = cl.unlearn_C.detach()
    unlearn = unlearn_C[active_C].mean() if active_C.any() else unlearn_C.new_tensor(1.0)
    return {"aux": cl.aux.detach(),
            "L_retain": cl.retain_C.detach().sum(),  # = retain mass share of all candidates
            "L_unlearn": unlearn,  # mean over clusters with candidates
            "unlearn_share": (mass_u_F * ff.candidate).sum() / (mass_u_F.sum() + 1e-6)}


def train_step(sae: SAE, ff: FeatureForget | None, opt: torch.optim.Optimizer, cfg: TrainConfig,
               x_r_BD: Tensor, x_u_BD: Tensor | None, *, phase2: bool) -> Forward | None:
    """Forward, backward, step and bookkeeping -> Forward, or None if the loss is not finite
    (then nothing has changed: the caller stops the run)."""
    fw = step_loss(sae, ff, cfg, x_r_BD, x_u_BD, phase2=phase2)
    if not torch.isfinite(fw.loss):
        return None
    opt.zero_grad(set_to_none=True)
    fw.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    if ff is not None:
        ff.clamp_gates_()
    with torch.no_grad():
        fired_BF = fw.f_BF > 0
        if phase2:  # importance from this same backward (METHOD §2)
            n, g_BF = fw.n, fw.f_dec_BF.grad
            ff.observe(batch_stats(fw.f_BF[:n], g_BF[:n], cfg.l1, fired_BF[:n]),
                       batch_stats(fw.f_BF[n:], g_BF[n:], cfg.l1, fired_BF[n:]), ema=True)
        fw.metrics["l0"] = fired_BF.sum() / len(fw.x_BD)
        total_var = (fw.x_BD - fw.x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        fw.metrics["fvu"] = fw.err_B.sum() / total_var
        fw.metrics["fired_F"] = fired_BF.any(0)
    return fw


def recon_stats(sae: SAE, x_BD: Tensor, l1: float) -> BatchStats:
    """Importance and frequency of one batch without touching the parameters' gradients."""
    with torch.no_grad():
        f_BF = sae.encode(x_BD)
    f_BF.requires_grad_(True)
    mse = (sae.decode(f_BF) - x_BD).pow(2).sum(1).mean()
    (g_BF,) = torch.autograd.grad(mse, f_BF)
    return batch_stats(f_BF.detach(), g_BF, l1)


def importance_passes(sae: SAE, ff: FeatureForget, retain: Iterator[Tensor],
                      unlearn: Iterator[Tensor], cfg: TrainConfig) -> None:
    """Forward + backward over cfg.importance_batches retain and unlearn batches, no optimiser
    step: a plain mean of alpha and freq to start from (end of phase 1, METHOD §6)."""
    dev = sae.W_dec.device
    ff.n_seen.zero_()
    for _ in range(cfg.importance_batches):
        r = recon_stats(sae, next(retain).to(dev), cfg.l1)
        u = recon_stats(sae, next(unlearn).to(dev), cfg.l1)
        ff.observe(r, u, ema=False)
