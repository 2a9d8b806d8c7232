"""FeatureForget's feature bookkeeping and objective (METHOD §2-§5).

- importance alpha_D[i] = E_{x in D} |dL_recon/df_i(x)| on tokens where f_i fires (§2),
  read from the training backward pass, and firing frequencies freq_D[i];
- k-means over standardised log importance vectors, warm-started (§3);
- adaptive thresholds tau_c and unlearn candidates U_c (§4);
- per-cluster losses and uncertainty-weighted learned gates (§5).

Running means: a plain mean over the importance passes that end phase 1, then an EMA with
decay `cfg.importance_decay` per phase-2 step. Everything per cluster is a scatter
(`index_add`, `bincount`), never a Python loop over clusters.

Shape suffixes: B tokens, F d_sae, C clusters, K importance-vector columns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from trainer.config import TrainConfig
from trainer.errors import TrainError

LOG_EPS = 1e-8
"""Added before the log in importance vectors; features that never fire sit at log(1e-8)."""
MASS_EPS = 1e-6
"""Added to activation-mass denominators in the cluster losses (METHOD §5)."""


class BatchStats(NamedTuple):
    alpha: Tensor
    """Importance of each feature on this batch [F]."""
    freq: Tensor
    """Fraction of this batch's tokens on which each feature fires [F]."""


class ClusterLosses(NamedTuple):
    aux: Tensor
    """(1/C) sum_c active_c [g_r L_retain^c + s_r^c + g_u L_unlearn^c + s_u^c] (scalar)."""
    retain_C: Tensor
    """L_retain^c = m_r(U_c) / m_r(all) [C]."""
    unlearn_C: Tensor
    """L_unlearn^c = 1 - m_u(U_c) / m_u(c) [C]."""


def batch_stats(f_BF: Tensor, dldf_dec_BF: Tensor, l1: float,
                fired_BF: Tensor | None = None, *, n: int | None = None) -> BatchStats:
    """Importance and firing frequency of one dataset's batch (METHOD §2).

    `dldf_dec_BF` is the gradient that reached the decoder input from a loss holding
    `mean_b ||x_b - x_hat_b||^2`, i.e. 2 (x_hat_b - x_b) W_dec^T / B. The per-token derivative
    of l_b = ||x_b - x_hat_b||^2 + l1 * sum_i f_bi is then B * dldf_dec + l1, so
        alpha[i] = mean_b |B dldf_dec[b, i] + l1| 1[f_bi > 0]
                 = sum_b |dldf_dec[b, i] + l1 / B| 1[f_bi > 0].
    It counts only where f_i > 0 (a ReLU feature that does not fire takes no part), so
    features that never fire keep importance 0, and alpha mixes how often and how much a
    feature matters. `fired_BF` (f_BF > 0) may be passed in when already computed.
    `n` is B when these rows are one rank's part of a global batch of B tokens (trainer/dist.py):
    the results are then this rank's parts of the sums, to be added up over the ranks.
    """
    n = f_BF.shape[0] if n is None else n
    fired_BF = f_BF > 0 if fired_BF is None else fired_BF
    alpha_F = dldf_dec_BF.add(l1 / n).abs_().mul_(fired_BF).sum(0)  # 4 passes, one buffer
    return BatchStats(alpha_F, fired_BF.sum(0).float().div_(n))


def importance_vectors(cols: list[Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised log importance vectors [F, K] for k-means (METHOD §3), with the column
    means and stds used, so centroids can be stored in raw log space."""
    v_FK = torch.stack([torch.log(c.double() + LOG_EPS) for c in cols], dim=1).cpu().numpy()
    mean_K, std_K = v_FK.mean(0), v_FK.std(0).clip(min=1e-6)
    return ((v_FK - mean_K) / std_K).astype(np.float32), mean_K, std_K


def kmeans(
    v_FK: np.ndarray, k: int, *, niter: int, seed: int, init_CK: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means -> (assignment [F] int64, centroids [C, K]). With `init_CK` the run is
    warm-started from those centroids, so cluster c keeps its identity (METHOD §3)."""
    import faiss

    # No subsampling: F points in K <= 4 dims is cheap, and a subsample would move the
    # fixed point that a warm start relies on. Cold starts use k-means++ seeding.
    km = faiss.Kmeans(v_FK.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=1 << 30,
                      min_points_per_centroid=1,
                      init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
    km.train(v_FK, init_centroids=None if init_CK is None else init_CK.astype(np.float32))
    _, assign_F1 = km.index.search(v_FK, 1)
    return assign_F1[:, 0].astype(np.int64), km.centroids.copy()


def thresholds(score_r_F: Tensor, cluster_F: Tensor, n_clusters: int, beta: float,
               *, per_cluster: bool = True) -> Tensor:
    """tau_c = beta * mean_{i in c} score_r + (1 - beta) * std_{i in c} score_r (eq. 6),
    population std. per_cluster=False is the no-adaptive-threshold ablation: one tau from all
    features, repeated for every cluster. Empty clusters get tau 0."""
    if not per_cluster:
        tau = beta * score_r_F.mean() + (1 - beta) * score_r_F.std(correction=0)
        return tau.expand(n_clusters).clone()
    count_C = torch.bincount(cluster_F, minlength=n_clusters).to(score_r_F.dtype)
    sum_C = torch.zeros(n_clusters, dtype=score_r_F.dtype).index_add_(0, cluster_F, score_r_F)
    sq_C = torch.zeros(n_clusters, dtype=score_r_F.dtype).index_add_(0, cluster_F, score_r_F**2)
    mean_C = sum_C / count_C.clamp_min(1)
    std_C = (sq_C / count_C.clamp_min(1) - mean_C**2).clamp_min(0).sqrt()
    return beta * mean_C + (1 - beta) * std_C


def candidates(score_r_F: Tensor, score_u_F: Tensor, tau_C: Tensor, cluster_F: Tensor, *,
               freq_r_F: Tensor | None = None, max_freq_r: float = 1.0) -> Tensor:
    """U_c = {i in c : score_u[i] > tau_c and score_r[i] <= tau_c} (METHOD §4) -> bool [F],
    further restricted to features with freq_r[i] < max_freq_r when freq_r_F is given.

    The cluster-relative test alone admits dense, general features: in a cluster of features
    that fire on a third of all tokens, one whose alpha_u is a little above the cluster's
    retain mean passes, and a handful of those carry most of the set's retain mass. The
    retain-frequency bound keeps U to features that are rare on retain data (docs/method.md
    has the measurements)."""
    tau_F = tau_C[cluster_F]
    mask_F = (score_u_F > tau_F) & (score_r_F <= tau_F)
    if freq_r_F is not None and max_freq_r < 1.0:
        mask_F &= freq_r_F < max_freq_r
    return mask_F


def cluster_losses(mass_r_F: Tensor, mass_u_F: Tensor, cluster_F: Tensor, cand_F: Tensor,
                   s_r_C: Tensor, s_u_C: Tensor) -> ClusterLosses:
    """Per-cluster objectives and the uncertainty-weighted gate term (METHOD §5).

    `mass_D_F` = mean over the batch's tokens of f_i, so m_D(S) = sum_{i in S} mass_D[i].
    Gates g = exp(-s) and -log g = s (Kendall et al. 2018). Clusters without candidates have
    constant losses (L_retain = 0, L_unlearn = 1) that give the SAE no gradient; they are
    masked out so that their gates do not drift.
    """
    n_clusters = s_r_C.shape[0]
    cand = cand_F.to(mass_r_F.dtype)
    zeros_C = mass_r_F.new_zeros(n_clusters)
    mr_cand_C = zeros_C.index_add(0, cluster_F, mass_r_F * cand)
    mu_cand_C = zeros_C.index_add(0, cluster_F, mass_u_F * cand)
    mu_C = zeros_C.index_add(0, cluster_F, mass_u_F)
    retain_C = mr_cand_C / (mass_r_F.sum() + MASS_EPS)
    unlearn_C = 1 - mu_cand_C / (mu_C + MASS_EPS)
    active_C = (torch.bincount(cluster_F[cand_F], minlength=n_clusters) > 0).to(mass_r_F.dtype)
    per_C = torch.exp(-s_r_C) * retain_C + s_r_C + torch.exp(-s_u_C) * unlearn_C + s_u_C
    return ClusterLosses((active_C * per_C).sum() / n_clusters, retain_C, unlearn_C)


class FeatureForget(nn.Module):
    """Running statistics, clusters, thresholds, candidates (buffers) and gates (parameters).

    All state is in `state_dict()`, so a checkpoint restores it exactly.
    """

    def __init__(self, d_sae: int, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        n_c, n_k = cfg.clusters, 2 if cfg.no_importance else 4
        if d_sae < n_c:
            raise TrainError(f"the SAE has {d_sae} features, fewer than n_clusters={n_c}; "
                             "raise expansion or lower n_clusters")
        for name in ("alpha_r", "alpha_u", "freq_r", "freq_u"):
            self.register_buffer(name, torch.zeros(d_sae))
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.long))  # plain-mean count
        self.register_buffer("cluster", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("candidate", torch.zeros(d_sae, dtype=torch.bool))
        self.register_buffer("tau", torch.zeros(n_c))
        nan_CK = torch.full((n_c, n_k), float("nan"), dtype=torch.float64)
        self.register_buffer("centroids_raw", nan_CK)  # in log space; NaN: not clustered yet
        # g = exp(-s); s = 0 -> g = 1 (METHOD §5).
        self.s_r = nn.Parameter(torch.zeros(n_c))
        self.s_u = nn.Parameter(torch.zeros(n_c))

    # ---- §2: running importance and frequency ---------------------------------------

    @torch.no_grad()
    def observe(self, r: BatchStats, u: BatchStats, *, ema: bool) -> None:
        """Fold one batch into the running means: a plain mean (importance passes) or an EMA
        with decay cfg.importance_decay (phase 2)."""
        self.n_seen += 1
        w = 1 - self.cfg.importance_decay if ema else 1.0 / float(self.n_seen)
        for name, new in (("alpha_r", r.alpha), ("alpha_u", u.alpha),
                          ("freq_r", r.freq), ("freq_u", u.freq)):
            getattr(self, name).lerp_(new.to(self.alpha_r.device), w)

    def scores(self) -> tuple[Tensor, Tensor]:
        """What thresholds compare: alpha, or freq under the no_importance ablation."""
        if self.cfg.no_importance:
            return self.freq_r, self.freq_u
        return self.alpha_r, self.alpha_u

    # ---- §3, §4: clusters, thresholds, candidates ------------------------------------

    @torch.no_grad()
    def refresh(self) -> None:
        """Recluster (warm-started), then recompute tau and the candidate set."""
        cfg = self.cfg
        score_r, score_u = (t.float().cpu() for t in self.scores())
        if cfg.clusters > 1:
            cols = [score_r, score_u] + ([] if cfg.no_importance else [self.freq_r, self.freq_u])
            v_FK, mean_K, std_K = importance_vectors([c.cpu() for c in cols])
            init = self.centroids_raw.cpu().numpy()
            init_CK = None if np.isnan(init).any() else (init - mean_K) / std_K
            assign_F, cent_CK = kmeans(v_FK, cfg.clusters, niter=cfg.kmeans_niter,
                                       seed=cfg.seed, init_CK=init_CK)
            self.cluster.copy_(torch.from_numpy(assign_F))
            self.centroids_raw.copy_(torch.from_numpy(cent_CK * std_K + mean_K))
        cluster = self.cluster.cpu()
        tau_C = thresholds(score_r, cluster, cfg.clusters, cfg.beta,
                           per_cluster=not cfg.no_adaptive_threshold)
        self.tau.copy_(tau_C)
        self.candidate.copy_(candidates(score_r, score_u, tau_C, cluster,
                                        freq_r_F=self.freq_r.float().cpu(),
                                        max_freq_r=cfg.candidate_max_freq_r))

    # ---- §5: objective and gates -----------------------------------------------------

    def losses(self, mass_r_F: Tensor, mass_u_F: Tensor) -> ClusterLosses:
        return cluster_losses(mass_r_F, mass_u_F, self.cluster, self.candidate, self.s_r, self.s_u)

    def gates(self) -> tuple[Tensor, Tensor]:
        """(g_r, g_u) = (exp(-s_r), exp(-s_u)), each [C]."""
        return torch.exp(-self.s_r.detach()), torch.exp(-self.s_u.detach())

    @torch.no_grad()
    def clamp_gates_(self) -> None:
        """Project s back into [-gate_log_max, gate_log_max] after each step (cfg docstring)."""
        m = self.cfg.gate_log_max
        self.s_r.clamp_(-m, m)
        self.s_u.clamp_(-m, m)
