"""The sparse autoencoder (METHOD §1, paper eq. 1 and 4). Imports only torch (STYLE 1).

    f(x)  = ReLU(W_enc (x - b_dec) + b_enc)
    x_hat = W_dec f + b_dec                    decoder directions kept at unit norm

Weights follow the SAELens convention: W_enc [d_model, d_sae], W_dec [d_sae, d_model], so a
decoder direction is a row `W_dec_FD[i]`. The SAE works on normalised activations `x * scale`
(METHOD §0); `scale` lives in the run's config.json and `SAE.from_run` returns it.

Shape suffixes: B tokens, D d_model, F d_sae.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPARSE_MAX_DENSITY = 0.05
"""Training takes the sparse paths below while at most this fraction of f is non-zero (the
demo's SAEs run at 1-2% once past the first steps); above it, dense matmuls are faster."""


class _Encode(torch.autograd.Function):
    """f = ReLU((x - b_dec) W_enc + b_enc), with a backward that only touches the active
    entries of f. A ReLU passes no gradient where f = 0, so

        dW_enc = (x - b_dec)^T G,   db_enc = sum_b G,   db_dec = -W_enc db_enc

    with G = dL/df masked to the active entries: a sparse [B, F] matrix at 1-2% density, which
    turns the B x D x F weight-gradient matmul into a sparse one. Dense when f is not sparse."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor) -> Tensor:
        xc_BD = x_BD - b_dec_D
        f_BF = torch.relu(torch.addmm(b_enc_F, xc_BD, W_enc_DF))
        ctx.save_for_backward(xc_BD, W_enc_DF, f_BF)
        return f_BF

    @staticmethod
    def backward(ctx, grad_BF: Tensor):
        xc_BD, W_enc_DF, f_BF = ctx.saved_tensors
        G_BF = None
        if (active := sparse_entries(f_BF)) is not None:
            rows, cols = active
            g = grad_BF[rows, cols]
            G_FB = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, f_BF.shape[::-1],
                                           check_invariants=False)
            dW_enc_DF = torch.sparse.mm(G_FB, xc_BD).T
            db_enc_F = torch.zeros_like(f_BF[0]).index_add_(0, cols, g)
        else:
            G_BF = grad_BF * (f_BF > 0)
            dW_enc_DF = xc_BD.T @ G_BF
            db_enc_F = G_BF.sum(0)
        db_dec_D = -(W_enc_DF @ db_enc_F)
        dx_BD = None
        if ctx.needs_input_grad[0]:
            G_BF = grad_BF * (f_BF > 0) if G_BF is None else G_BF
            dx_BD = G_BF @ W_enc_DF.T
            db_dec_D = -dx_BD.sum(0)
        return dx_BD, dW_enc_DF, db_enc_F, db_dec_D


def sparse_entries(f_BF: Tensor) -> tuple[Tensor, Tensor] | None:
    """(rows, cols) of the non-zero entries of f [B, F], row-major, when at most
    SPARSE_MAX_DENSITY of f is non-zero; None when f is dense enough for dense matmuls."""
    if int(torch.count_nonzero(f_BF)) > SPARSE_MAX_DENSITY * f_BF.numel():
        return None
    return f_BF.nonzero(as_tuple=True)


def _decode_sparse(f_BF: Tensor, rows: Tensor, cols: Tensor, W_dec_FD: Tensor) -> Tensor:
    """f W_dec as a weighted sum of the active rows of W_dec (embedding_bag, as in sparsify):
    forward and both gradients cost O(active entries x D) instead of O(B x F x D).
    `rows` must be sorted (as `sparse_entries` returns them)."""
    offsets_B = torch.searchsorted(rows, torch.arange(f_BF.shape[0], device=f_BF.device))
    return F.embedding_bag(cols, W_dec_FD, offsets_B, mode="sum", per_sample_weights=f_BF[rows, cols])


class ForwardOutput(NamedTuple):
    f: Tensor
    """Feature activations [B, F], non-negative."""
    x_hat: Tensor
    """Reconstruction [B, D]."""


class LoadedSAE(NamedTuple):
    sae: "SAE"
    """The module, on CPU, in eval mode."""
    scale: float
    """Multiply raw activations by this before `encode`; divide `decode` output by it."""
    config: dict[str, Any]
    """The run's config.json: TrainConfig fields plus store metadata (model, layer, ...)."""


class SAE(nn.Module):
    def __init__(self, d_model: int, d_sae: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self.d_model, self.d_sae = d_model, d_sae
        # Tied initialisation (dictionary_learning, Anthropic 2024): random unit decoder rows,
        # encoder = decoder transpose, scaled by 2 d / F: with about half of F random features
        # active, W_dec^T diag(active) W_dec ~ F / (2 d) I, so x_hat ~ x from the first step
        # instead of overshooting F / 2d times. Biases start at zero.
        W_dec_FD = torch.randn(d_sae, d_model, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec_FD.T * min(1.0, 2 * d_model / d_sae))  # [D, F]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # [F]
        self.W_dec = nn.Parameter(W_dec_FD)  # [F, D]
        self.b_dec = nn.Parameter(torch.zeros(d_model))  # [D]

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations [B, F]; b_dec is subtracted first (METHOD §1)."""
        return (x_BD - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.W_enc.requires_grad:
            return _Encode.apply(x_BD, self.W_enc, self.b_enc, self.b_dec)
        return torch.relu(self.pre_acts(x_BD))

    def decode(self, f_BF: Tensor) -> Tensor:
        if torch.is_grad_enabled() and f_BF.requires_grad and f_BF.dim() == 2:
            if (active := sparse_entries(f_BF)) is not None:
                return _decode_sparse(f_BF, *active, self.W_dec) + self.b_dec
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> ForwardOutput:
        f_BF = self.encode(x_BD)
        return ForwardOutput(f_BF, self.decode(f_BF))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Renormalise decoder rows after each optimiser step (METHOD §1)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the gradient component along each unit decoder row before the step,
        so the step moves directions rather than norms (METHOD §1; SAELens / sparsify)."""
        if self.W_dec.grad is None:
            return
        W_FD, G_FD = self.W_dec, self.W_dec.grad
        parallel_F = (W_FD * G_FD).sum(dim=1, keepdim=True)
        G_FD.sub_(parallel_F * W_FD)

    def save(self, path: str | Path) -> None:
        """Write sae.safetensors (W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D])."""
        from safetensors.torch import save

        from cache.atomic import atomic_write

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path, save(tensors))  # a reader never sees half a file; a full disk is an OSError

    @classmethod
    def load(cls, path: str | Path) -> "SAE":
        """Read an sae.safetensors file; shapes come from the tensors themselves."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        d_model, d_sae = tensors["W_enc"].shape
        sae = cls(d_model, d_sae)
        sae.load_state_dict(tensors)
        return sae.eval()

    @classmethod
    def from_run(cls, run_dir: str | Path) -> LoadedSAE:
        """Load RUN/sae.safetensors and RUN/config.json -> (sae, scale, config)."""
        from trainer.run import RunFolder  # the run folder's names live there

        run = RunFolder(run_dir)
        run_dir, config = run.path, json.loads(run.config.read_text())
        sae = cls.load(run.sae)
        if sae.d_model != config.get("d_model", sae.d_model):
            raise ValueError(
                f"{run_dir}: sae.safetensors has d_model {sae.d_model} "
                f"but config.json says {config['d_model']}"
            )
        return LoadedSAE(sae, float(config["scale"]), config)
