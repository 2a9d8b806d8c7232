"""The end of a training run (`trainer/train.py`): the statistics both methods' feature
selection reads, the gates' calibration and detectors, and the run folder's final artifacts.

Both methods' statistics come from one estimator over the same tokens (trainer/stats.py):
every training token of each corpus. The sequence gate is calibrated on the retain training
contexts, and the probe gate's detectors (trainer/gate/detector.py) are fitted on the training contexts
of the trained layer, or of an earlier one (`TrainConfig.probe_offset`). Under torchrun every rank
measures its share of the tokens; rank 0 evaluates on the held-out tokens and writes the files.
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.config import TrainConfig
from trainer.dist import SINGLE, Ranks
from trainer.errors import TrainError
from trainer.evaluate import evaluate, saebench_select, set_shares
from trainer.featureforget import FeatureForget
from trainer.gate.calibrate import calibrate, calibration_sets
from trainer.gate.detector import Probe, fit_probes
from trainer.gate.store import GateFile
from trainer.run import write_features, write_json
from trainer.sae import SAE
from trainer.stats import corpus_stats, iter_contexts


class StatsData(NamedTuple):
    retain: Callable[..., Iterable[Tensor | tuple[Tensor, Tensor]]]
    """Every training token of the retain corpus: [B, D] normalised batches, or whole contexts
    (x [C, T, D] normalised, editable [C, T]), which also give context frequencies. Called with
    `ranks` (trainer/dist.py): this rank's contiguous share of them."""
    unlearn: Callable[..., Iterable[Tensor | tuple[Tensor, Tensor]]]
    retain_contexts: Callable[..., Iterable[tuple[Tensor, Tensor]]] | None
    """Retain training contexts (x [C, T, D] normalised, editable [C, T]) for the gate."""
    probe: "ProbeData | None" = None
    """The probe's layer when it is not the trained one (TrainConfig.probe_offset)."""
    probe_key: tuple | None = None
    """What the detectors depend on (store, layer, split, scale, context counts): runs of one
    process with the same key (e.g. `ff run`'s methods and seeds) share one fit."""


class ProbeData(NamedTuple):
    layer: int
    scale: float
    """Normalisation scale of that layer (its own, estimated like the trained layer's)."""
    retain: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    unlearn: Callable[[], Iterable[tuple[Tensor, Tensor]]]


class HeldOut(NamedTuple):
    retain: Callable[[], Iterable[Tensor]]
    """Returns a fresh iterable of held-out retain batches [B, D] (normalised)."""
    unlearn: Callable[[], Iterable[Tensor]]


def probe_data(cfg: TrainConfig, store_path: str, meta: dict[str, Any], eval_frac: float,
                unlearn_store: str | None) -> ProbeData | None:
    """The training contexts of the layer the probe reads, when it is not the trained layer."""
    from trainer.data import estimate_scale, open_training_data

    if not cfg.probe_offset:
        return None
    layer = int(meta["layer"]) - cfg.probe_offset
    if layer < 0:
        raise TrainError(f"probe_offset={cfg.probe_offset} points before layer 0 (the run trains layer "
                         f"{meta['layer']})")
    try:
        data = open_training_data(store_path, layer, eval_frac, unlearn_store=unlearn_store)
    except TrainError as e:
        raise TrainError(f"the probe reads layer {layer} (probe_offset={cfg.probe_offset}): {e}") from None
    scale = estimate_scale(data.retain.train, cfg.scale_chunks)
    return ProbeData(layer, scale, lambda: iter_contexts(data.retain.train, scale),
                     lambda: iter_contexts(data.unlearn.train, scale))


def recluster(ff: FeatureForget, ranks: Ranks) -> None:
    """Clusters, tau and U (METHOD §3-§4) from the importance statistics, which are the same
    on every rank: faiss k-means runs on rank 0 and every rank takes its result."""
    if ranks.is_main:
        ff.refresh()
    ranks.broadcast_(ff.cluster, ff.centroids_raw, ff.tau, ff.candidate)


def finish_run(cfg, run, meta, sae, ff, retain, unlearn, held_out, stats_data=None,
            ranks: Ranks = SINGLE) -> None:
    """Final statistics and clusters, held-out evaluation, then the run folder's artifacts.
    Under torchrun every rank measures its share of the training tokens; rank 0 evaluates on
    the held-out tokens and writes the files."""
    sae.eval()
    if ff is not None:
        recluster(ff, ranks)  # clusters, tau and U for the final weights, warm-started
        cluster_F, cand_F = ff.cluster.cpu(), ff.candidate.cpu()
    else:
        cluster_F, cand_F = torch.full((sae.d_sae,), -1, dtype=torch.long), None
    # Both methods' statistics come from one estimator over the same tokens (stats.py):
    # every training token of each corpus, or a few stream batches without a store.
    # Under torchrun each rank measures its share (stream batches: its part of each batch).
    sd = stats_data or StatsData(lambda ranks=SINGLE: islice(retain, cfg.importance_batches),
                                 lambda ranks=SINGLE: islice(unlearn, cfg.importance_batches), None)
    feats: dict[str, Tensor] = {}
    for suffix, batches in (("r", sd.retain), ("u", sd.unlearn)):
        for k, v in _corpus_stats(sae, batches(ranks), cfg.l1, ranks).items():
            feats[f"{k}_{suffix}"] = v
    if ff is not None:  # the running means the candidate rule (METHOD §4) decided on, kept apart
        feats.update({f"train_{k}": getattr(ff, k).float().cpu() for k in ("alpha_r", "alpha_u", "freq_r", "freq_u")})
    if cand_F is None:
        cand_F = saebench_select(feats["freq_r"], feats["freq_u"], cfg.compare_n or 20,
                                 cfg.saebench_retain_freq)
    report, held_mass = {}, {}
    if ranks.is_main:
        held = held_out or HeldOut(lambda: (), lambda: ())
        report, r, u = evaluate(sae, held.retain(), held.unlearn(),
                                candidate_F=cand_F if ff is not None else None,
                                freq_r_F=feats["freq_r"], freq_u_F=feats["freq_u"],
                                retain_threshold=cfg.saebench_retain_freq,
                                extra_sizes=[cfg.compare_n])
        if ff is None:
            report["candidates"] = set_shares("saebench", cand_F, r, u)
        held_mass = {"eval_mass_r": r.mass_F, "eval_mass_u": u.mass_F}
    feats.update({"cluster": cluster_F, "candidate": cand_F, **held_mass})
    shares = None
    if sd.retain_contexts is not None:  # the sequence gate's thresholds (trainer/gate/calibrate.py)
        sets = calibration_sets(feats, cfg.method)
        shares = _calibrate(sae, sd.retain_contexts(ranks), sets, ranks)  # None but on rank 0
    if not ranks.is_main:
        return
    sae.save(run.sae)
    write_features(run.features, feats)
    if shares is not None:
        probe_layer = None if sd.probe is None else (sd.probe.layer, sd.probe.scale)
        GateFile.build({k: (v, torch.from_numpy(shares[k])) for k, v in sets.items()}, fit_run_probes(sd, meta),
                       probe_layer).write(run.path)
    write_json(run.clusters, _clusters_json(ff))
    write_json(run.eval, {"method": cfg.method, "layer": meta.get("layer"), **report})


_PROBE_MEMO: dict[tuple, dict[float | str, Probe]] = {}
"""The detectors fitted in this process, by `StatsData.probe_key` (the fit is deterministic and
does not depend on the SAE, so a run with the same key gets the same detectors without refitting)."""
PROBE_MEMO_SIZE = 4


def fit_run_probes(sd: StatsData, meta: dict[str, Any]) -> dict[float | str, Probe]:
    """The probe gate's detectors on the residual stream, fitted on the training contexts of both
    corpora and calibrated on retain contexts they did not see (trainer/gate/detector.py); reused
    from an earlier run of this process with the same `sd.probe_key`."""
    if sd.probe_key is not None and sd.probe_key in _PROBE_MEMO:
        return _PROBE_MEMO[sd.probe_key]
    n_r, n_u = (int((meta.get(f"{c}_contexts") or [0])[0]) for c in ("retain", "unlearn"))
    retain, unlearn = (sd.retain_contexts, sd.unlearn()) if sd.probe is None else (sd.probe.retain, sd.probe.unlearn())
    out = fit_probes(retain, unlearn, n_retain=max(n_r, 1), n_unlearn=max(n_u, 1), mlp=True)
    if sd.probe_key is not None:
        while len(_PROBE_MEMO) >= PROBE_MEMO_SIZE:
            _PROBE_MEMO.pop(next(iter(_PROBE_MEMO)))
        _PROBE_MEMO[sd.probe_key] = out
    return out


def _corpus_stats(sae: SAE, items: Iterable, l1: float, ranks: Ranks) -> dict[str, Tensor]:
    """corpus_stats (stats.py) over every rank's share of a corpus. Each statistic is a
    mean over tokens (act: over the tokens where the feature fires; ctx: over contexts), so
    the ranks' means are turned back into totals, added up, and divided again."""
    if ranks.world == 1:
        return corpus_stats(sae, items, l1)
    seen = [0, 0]  # tokens, contexts

    def counted():
        for item in items:
            if isinstance(item, (tuple, list)):
                seen[0], seen[1] = seen[0] + int(item[1].sum()), seen[1] + len(item[1])
            else:
                seen[0] += len(item)
            yield item

    s = {k: v.double() for k, v in corpus_stats(sae, counted(), l1).items()}
    tot = {k: s[k] * seen[0] for k in ("freq", "mean", "mean_sq", "alpha")}
    tot["freq"] = tot["freq"].round()  # firing counts
    tot["act"] = s["act"] * tot["freq"]
    tot["ctx"] = s.get("ctx", torch.zeros_like(s["freq"])) * seen[1]
    n = torch.tensor(seen, dtype=torch.float64)
    ranks.sum_(*tot.values(), n)
    n_tok, n_ctx = max(float(n[0]), 1.0), float(n[1])
    out = {"freq": tot["freq"] / n_tok, "mean": tot["mean"] / n_tok,
           "mean_sq": tot["mean_sq"] / n_tok, "act": tot["act"] / tot["freq"].clamp_min(1),
           "alpha": tot["alpha"] / n_tok}
    if n_ctx:
        out["ctx"] = tot["ctx"] / n_ctx
    return {k: v.float() for k, v in out.items()}


def _calibrate(sae: SAE, contexts: Iterable, sets: dict[str, Tensor],
               ranks: Ranks) -> dict[str, np.ndarray] | None:
    """calibrate (gate/calibrate.py) over every rank's contiguous share of the retain contexts ->
    the shares of all of them in store order, on rank 0 (None on the other ranks)."""
    shares = calibrate(sae, contexts, sets)
    if ranks.world == 1:
        return shares
    parts = ranks.gather(shares)
    return None if parts is None else {k: np.concatenate([p[k] for p in parts]) for k in sets}


def _clusters_json(ff: FeatureForget | None) -> dict[str, Any]:
    if ff is None:
        return {"n_clusters": 0, "tau": [], "gate_r": [], "gate_u": [], "size": [],
                "n_candidates": []}
    g_r, g_u = ff.gates()
    n_c = len(ff.tau)
    return {"n_clusters": n_c, "tau": ff.tau.tolist(), "gate_r": g_r.tolist(),
            "gate_u": g_u.tolist(),
            "size": torch.bincount(ff.cluster.cpu(), minlength=n_c).tolist(),
            "n_candidates": torch.bincount(ff.cluster[ff.candidate].cpu(), minlength=n_c).tolist()}
