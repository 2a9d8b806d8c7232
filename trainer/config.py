"""TrainConfig: every knob of `ff train`, with its default in one place (STYLE habit 2).

Two presets: `paper` (the paper's numbers, METHOD §6) and `demo` (sized so that one run on the
embedded Gemma 3 270M stores, d_model 640, finishes in a few minutes on 2 CPU cores).
The CLI overlays its flags with `cfg.replace(**flags)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from trainer.errors import TrainError

METHODS = ("featureforget", "baseline")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "featureforget"
    """"featureforget" (phase 1 + phase 2 with the dual objective) or "baseline" (a plain SAE:
    L_recon only, on retain and unlearn batches mixed, for the same number of steps; METHOD §6)."""

    expansion: int = 32
    """d_sae = expansion * d_model (paper: 32)."""

    n_clusters: int = 32
    """Number of k-means clusters over feature importance vectors (METHOD §3; paper: 32)."""

    l1: float = 0.04
    """Sparsity coefficient lambda in L_recon (METHOD §1; paper: 0.04)."""

    beta: float = 0.9
    """tau_c = beta * mean + (1 - beta) * std of alpha_r within cluster c (METHOD §4)."""

    candidate_max_freq_r: float = 0.01
    """Unlearn candidates must also fire on fewer than this fraction of retain tokens
    (1: no bound, METHOD §4 as written). 0.01 is SAEBench's retain-frequency threshold; it
    keeps dense general features out of U (docs/method.md, "Candidate rule")."""

    alpha: float = 1.0
    """Weight `a` of the gated per-cluster objectives in L_total (METHOD §5; paper eq. 2)."""

    lr: float = 3e-4
    """Peak AdamW learning rate (paper: 3e-4)."""

    warmup: int = 1000
    """Linear warm-up steps before the cosine decay (paper: 1000)."""

    min_lr_frac: float = 0.0
    """The cosine schedule decays to min_lr_frac * lr at the last step."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay on W_enc / W_dec; 0 as in SAELens, the L1 term already
    regularises. Biases and gates are never decayed."""

    batch_contexts: int = 32
    """Contexts per optimiser step (paper: 32). Each step sees batch_contexts * (ctx_len - 1)
    tokens: phase 1 draws them all from retain; phase 2 and the baseline draw half from each
    corpus, so every step of every method costs the same."""

    steps: int = 10_000
    """Total optimiser steps, phase 1 and phase 2 together."""

    phase1_frac: float = 0.5
    """Fraction of `steps` spent in phase 1 (retain only, L_recon only; METHOD §6)."""

    importance_batches: int = 8
    """Importance passes (forward + backward, no optimiser step) over this many retain and
    unlearn batches at the end of phase 1, to seed alpha and freq (METHOD §6)."""

    importance_decay: float = 0.99
    """Running mean of alpha and freq in phase 2: EMA with this decay per step (METHOD §2);
    0.99 averages over about the last 100 steps, one recluster period."""

    recluster_every: int = 100
    """Recompute clusters, tau and candidates every this many phase-2 steps (paper: 100)."""

    kmeans_niter: int = 100
    """faiss k-means iterations (it stops early once assignments are stable)."""

    gate_lr: float = 3e-2
    """Peak AdamW learning rate of the gate parameters s (same schedule as lr). Gates must
    reach their balance g = 1/L within a recluster period or two; at the SAE's lr they move
    by less than 0.1 in a few hundred steps and stay at 1."""

    gate_log_max: float = 4.0
    """Gates g = exp(-s) are kept in [exp(-gate_log_max), exp(gate_log_max)]: s is clamped
    after each step, because the uncertainty-weighting optimum g = 1/L grows without bound
    when a cluster's loss reaches 0 (METHOD §5)."""

    buffer_chunks: int = 32
    """Store chunks read into one shuffle buffer; tokens are shuffled within a buffer. Memory
    holds two buffers (current + prefetched); a short last group of an epoch joins the one
    before it, so a buffer holds at most 2 * buffer_chunks - 1 chunks."""

    scale_chunks: int = 4
    """Retain chunks read to estimate the normalisation scale s (METHOD §0)."""

    eval_frac: float = 0.05
    """Fraction of each corpus's contexts held out for validation, taken as whole chunks at
    the end of the corpus (fewer than one chunk: the last contexts). Independent of seed."""

    eval_max_tokens: int = 200_000
    """Cap on held-out tokens per corpus used by the final evaluation."""

    dead_steps: int = 1000
    """A feature that has not fired for this many steps counts as dead in training logs."""

    saebench_retain_freq: float = 0.01
    """SAEBench selection (METHOD §7): features with retain firing frequency below this,
    ranked by unlearn firing frequency. Used for the mass-share diagnostic in eval.json."""

    compare_n: int = 0
    """Also report SAEBench-selected sets of this size in eval.json (e.g. the FeatureForget
    run's candidate count, for the baseline run); 0 = only the default sizes."""

    seed: int = 0
    """Seeds the SAE initialisation, data order and k-means."""

    log_every: int = 50
    """Append a line to metrics.jsonl every this many steps (averages over the interval)."""

    checkpoint_every: int = 500
    """Write RUN/checkpoints/last.pt every this many steps (atomic: temp file, then rename)."""

    device: str = "cpu"
    """torch device for the SAE ("cpu", "cuda", ...); data streams stay on the CPU."""

    no_importance: bool = False
    """Ablation (paper 6.2): firing frequencies freq_r / freq_u replace alpha_r / alpha_u in
    clustering, thresholds and candidate selection (alpha is still measured and saved)."""

    no_adaptive_threshold: bool = False
    """Ablation: one global tau (eq. 6 over all features) replaces the per-cluster tau_c;
    clusters, per-cluster losses and gates are kept."""

    no_clustering: bool = False
    """Ablation: a single cluster (no k-means), so one tau and one pair of gates."""

    probe_offset: int = 0
    """The probe gate's detector (trainer/gate/detector.py) reads the residual stream this many blocks
    before the edited layer (0: the edited layer). The store must hold that layer too. A layer
    that detects the topic better than the edited one can gate the edit there; the gate's
    decision at a position still depends on that position and earlier ones only."""

    # ---- derived helpers -------------------------------------------------------------

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batch_contexts < 2 or self.batch_contexts % 2:
            raise TrainError(f"batch_contexts must be even and >= 2, got {self.batch_contexts}")
        if not 0.0 < self.phase1_frac < 1.0 and self.method == "featureforget":
            raise TrainError(f"phase1_frac must be in (0, 1), got {self.phase1_frac}")
        positive = ("steps", "expansion", "n_clusters", "recluster_every", "log_every",
                    "checkpoint_every", "buffer_chunks", "scale_chunks", "importance_batches")
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if bad:
            raise TrainError(f"these options must be positive: {', '.join(bad)}")
        not_positive = [f"{k}={getattr(self, k)}" for k in ("lr", "gate_lr") if not getattr(self, k) > 0]
        if not_positive:  # 0 or nan would divide by zero in the schedule
            raise TrainError(f"learning rates must be > 0, got {', '.join(not_positive)}")
        if not 0.0 <= self.candidate_max_freq_r <= 1.0:
            raise TrainError(f"candidate_max_freq_r must be in [0, 1], got {self.candidate_max_freq_r}")
        if self.warmup < 0:
            raise TrainError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.importance_decay < 1.0:
            raise TrainError(f"importance_decay must be in [0, 1), got {self.importance_decay}")
        if self.probe_offset < 0:
            raise TrainError(f"probe_offset must be >= 0 (blocks before the edited layer), got {self.probe_offset}")
        if not 0.0 < self.eval_frac < 1.0:
            raise TrainError(f"eval_frac must be in (0, 1), got {self.eval_frac}")

    @property
    def phase1_steps(self) -> int:
        """Steps of phase 1; the baseline has only phase 1, so all its steps."""
        if self.method == "baseline":
            return self.steps
        return max(1, min(self.steps - 1, round(self.steps * self.phase1_frac)))

    @property
    def clusters(self) -> int:
        """Effective number of clusters (1 under the no_clustering ablation)."""
        return 1 if self.no_clustering else self.n_clusters

    def tokens_per_half_batch(self, ctx_len: int) -> int:
        """Tokens in one stream batch: half a step (BOS excluded, so ctx_len - 1 per context)."""
        return self.batch_contexts // 2 * (ctx_len - 1)

    # ---- (de)serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring keys that are not fields (config.json also holds store
        metadata, and old runs may hold retired fields: load leniently, STYLE habit 3)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed; unknown names are a TrainError (CLI overlays)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TrainError(f"unknown training option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "TrainConfig":
        """"paper" or "demo" (see PRESETS)."""
        if name not in PRESETS:
            raise TrainError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's numbers (sec. 5): expansion 32, 32 clusters, lambda 0.04, beta 0.9,
    # AdamW 3e-4, 1000 warm-up steps, 32 contexts x 128 tokens. The paper gives no step
    # count; 10k steps is 20 epochs of its 2048-context retain corpus.
    "paper": {},
    # Gemma 3 270M (d_model 640) on 2 CPU cores: d_sae 2560 and 1016-token steps, 500 steps
    # per run so that `ff run --preset demo` (2 methods x 3 layers) takes about 14 minutes
    # (docs/benchmarks.md).
    # Warm-up, recluster period, EMA window and dead window are scaled down with the step
    # count. l1: on activations normalised to E||x||^2 = d, the paper's 0.04 leaves the SAE
    # dense (L0 > 1000 of 2560 at layer 6); 2.0 gives L0 ~ 27 and held-out FVU ~ 0.4.
    "demo": dict(
        expansion=4,
        l1=2.0,
        batch_contexts=8,
        steps=500,
        warmup=50,
        recluster_every=50,
        importance_decay=0.95,
        importance_batches=4,
        dead_steps=200,
        log_every=10,
        checkpoint_every=100,
        buffer_chunks=16,
        eval_max_tokens=50_000,
    ),
}
