"""Held-out evaluation of a trained SAE (METHOD §8, SAE quality) and the activation-mass
diagnostic: which share of each corpus's activation mass a feature set carries.

For FeatureForget the set is the candidate set U; for comparison, both methods also report
sets chosen the SAEBench way (METHOD §7: retain firing frequency below a threshold, ranked
by unlearn firing frequency), at a few sizes and at |U|. features.safetensors keeps the
per-feature held-out masses, so the report can compute any other set's shares later.

Shape suffixes: B tokens, D d_model, F d_sae.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor

from trainer.sae import SAE

SAEBENCH_SIZES = (10, 20, 50, 100, 200, 500, 1000)
"""Default sizes of SAEBench-selected sets in eval.json (SAEBench uses 10 and 20)."""


class CorpusEval(NamedTuple):
    tokens: int
    mse: float
    """mean over tokens of ||x - x_hat||^2, in normalised units (as in L_recon)."""
    fvu: float
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    l0: float
    """Mean number of active features per token."""
    mass_F: Tensor
    """Sum over tokens of f_i: activation mass per feature [F]."""
    fired_F: Tensor
    """Whether each feature fired on any token [F] bool."""


@torch.no_grad()
def eval_corpus(sae: SAE, batches: Iterable[Tensor]) -> CorpusEval:
    dev = sae.W_dec.device
    n, err, l0 = 0, 0.0, 0.0
    sum_D = torch.zeros(sae.d_model, dtype=torch.float64)
    sq = 0.0
    mass_F = torch.zeros(sae.d_sae, dtype=torch.float64, device=dev)
    fired_F = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
    for x_BD in batches:
        x_BD = x_BD.to(dev)
        f_BF, x_hat_BD = sae(x_BD)
        n += len(x_BD)
        err += float((x_hat_BD - x_BD).pow(2).sum())
        sum_D += x_BD.sum(0).double().cpu()
        sq += float(x_BD.double().pow(2).sum())
        active_BF = f_BF > 0
        l0 += float(active_BF.sum())
        fired_F |= active_BF.any(0)
        mass_F += f_BF.sum(0).double()
    mass_F, fired_F = mass_F.float().cpu(), fired_F.cpu()
    if n == 0:
        return CorpusEval(0, float("nan"), float("nan"), float("nan"), mass_F, fired_F)
    total_var = sq - float(sum_D.pow(2).sum()) / n
    return CorpusEval(n, err / n, err / max(total_var, 1e-12), l0 / n, mass_F, fired_F)


def saebench_select(freq_r_F: Tensor, freq_u_F: Tensor, n: int, retain_threshold: float) -> Tensor:
    """Features with freq_r < retain_threshold, the n with the highest freq_u -> bool [F].
    Features that never fire on unlearn data are never selected, so the set may be smaller."""
    score_F = torch.where((freq_r_F < retain_threshold) & (freq_u_F > 0), freq_u_F, -1.0)
    top = torch.argsort(score_F, descending=True, stable=True)[:n]
    mask_F = torch.zeros_like(freq_r_F, dtype=torch.bool)
    mask_F[top[score_F[top] >= 0]] = True
    return mask_F


def mass_share(mass_F: Tensor, mask_F: Tensor) -> float:
    """Share of the activation mass carried by the features in mask_F."""
    total = float(mass_F.sum())
    return float(mass_F[mask_F].sum()) / total if total > 0 else 0.0


def set_shares(name: str, mask_F: Tensor, r: CorpusEval, u: CorpusEval) -> dict[str, Any]:
    return {"set": name, "n": int(mask_F.sum()),
            "unlearn_mass_share": mass_share(u.mass_F, mask_F),
            "retain_mass_share": mass_share(r.mass_F, mask_F)}


def evaluate(sae: SAE, retain: Iterable[Tensor], unlearn: Iterable[Tensor], *,
             candidate_F: Tensor | None, freq_r_F: Tensor, freq_u_F: Tensor,
             retain_threshold: float, extra_sizes: Iterable[int] = (),
             ) -> tuple[dict[str, Any], CorpusEval, CorpusEval]:
    """-> (eval.json content, retain CorpusEval, unlearn CorpusEval)."""
    r, u = eval_corpus(sae, retain), eval_corpus(sae, unlearn)
    report: dict[str, Any] = {}
    for name, c in (("retain", r), ("unlearn", u)):
        report[name] = {"tokens": c.tokens, "mse": c.mse, "fvu": c.fvu, "l0": c.l0,
                        "dead_frac": 1.0 - float(c.fired_F.float().mean())}
    report["dead_frac"] = 1.0 - float((r.fired_F | u.fired_F).float().mean())
    sizes = set(SAEBENCH_SIZES) | {int(n) for n in extra_sizes if n > 0}
    if candidate_F is not None:
        report["candidates"] = set_shares("candidates", candidate_F, r, u)
        sizes.add(int(candidate_F.sum()))
    report["saebench"] = {
        "retain_freq_threshold": retain_threshold,
        "sets": [set_shares(f"saebench_top{n}",
                            saebench_select(freq_r_F, freq_u_F, n, retain_threshold), r, u)
                 for n in sorted(s for s in sizes if s > 0)],
    }
    return report, r, u
