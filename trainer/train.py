"""`ff train`: train a FeatureForget (or baseline) SAE on one layer of an activation store.

    from trainer.config import TrainConfig
    from trainer.train import train
    summary = train(TrainConfig.preset("demo"), "stores/demo.zarr", 6, "runs/demo-ff")

One linear loop (METHOD §6): phase 1 on retain data with L_recon; at its end importance
passes, clustering, thresholds and candidates; phase 2 with L_total, reclustering every
cfg.recluster_every steps. The baseline runs phase 1 only, on retain and unlearn mixed.
`train_on_streams` is the same loop fed by any iterators of [B, D] tensors.

Under torchrun (trainer/dist.py) every rank runs this loop on its part of each global batch;
k-means runs on rank 0 and its result is broadcast; the passes over every training token after
training are split over the ranks; rank 0 alone writes the run folder (trainer/finish.py: the
statistics, gate calibration and detectors, and the final artifacts).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from trainer.config import TrainConfig
from trainer.dist import SINGLE, Ranks, ranks_from_env
from trainer.errors import NonFiniteLossError, TrainError
from trainer.featureforget import FeatureForget
from trainer.finish import HeldOut, StatsData, finish_run, probe_data, recluster
from trainer.run import MetricsLog, RunFolder, load_checkpoint, open_run, save_checkpoint
from trainer.sae import SAE
from trainer.stats import iter_contexts
from trainer.steps import importance_passes, lr_at, make_optimizer, set_lr, train_step


class RunSummary(NamedTuple):
    out: str
    """The run folder."""
    method: str
    """"featureforget" or "baseline"."""
    steps: int
    """Optimiser steps of the run."""
    d_sae: int
    """Number of SAE features."""
    scale: float
    """Normalisation scale s (METHOD §0): the SAE sees x * s."""
    n_candidates: int
    """|U| for FeatureForget; the size of the SAEBench-selected set for the baseline."""
    eval: dict[str, Any]
    """The content of RUN/eval.json."""
    seconds: float
    """Wall time of this call."""


def train(cfg: TrainConfig | None, store_path: str, layer: int | None, out: str, *,
          unlearn_store: str | None = None, resume: bool = False, overwrite: bool = False,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> RunSummary:
    """Train on `layer` of the store at `store_path` and write the run folder `out`.

    `layer` None: the store's only layer (a TrainError if it holds several).
    `unlearn_store`: take the unlearn corpus from another store built from the same model.
    `resume`: continue `out` from its last checkpoint (cfg may be None: the saved one is used).
    `on_step(step)`: called after every step (after its checkpoint, if one is due).
    Raises TrainError (one line) for anything a user can fix.
    """
    from trainer.data import TokenStream, estimate_scale, iter_eval_batches, open_training_data, shard

    given, folder, ranks = cfg, RunFolder(out), ranks_from_env()
    saved = ranks.from_main(lambda: folder.read_config() if resume and folder.config.is_file()
                            else None)
    if given is None and saved is None:
        raise TrainError(f"nothing to resume in {out} (no config.json); "
                         "pass a config to start a run")
    effective = given or TrainConfig.from_dict(saved)
    eval_frac = effective.eval_frac
    if layer is None and saved is not None:
        layer = saved.get("layer")
    data = open_training_data(store_path, layer, eval_frac, unlearn_store=unlearn_store)
    probe = probe_data(effective, store_path, data.meta, eval_frac, unlearn_store)  # checked before any write
    run, cfg, meta = ranks.from_main(lambda: open_run(
        out, given, data.meta, resume=resume, overwrite=overwrite,
        scale=lambda: estimate_scale(data.retain.train, given.scale_chunks)))
    B = cfg.tokens_per_half_batch(data.ctx_len)
    corpora = (data.retain, data.unlearn)
    streams = [TokenStream(c.train, batch_size=B, buffer_chunks=cfg.buffer_chunks, seed=cfg.seed,
                           stream_id=i, scale=meta["scale"], rank=ranks.rank, world=ranks.world)
               for i, c in enumerate(corpora)]
    held = HeldOut(*(lambda c=c: iter_eval_batches(c.held_out, scale=meta["scale"], batch_size=B,
                                                   max_tokens=cfg.eval_max_tokens)
                     for c in corpora))
    def contexts(c):  # every training context of a corpus; given `ranks`, this rank's share
        return lambda ranks=SINGLE: iter_contexts(shard(c.train, ranks.rank, ranks.world),
                                                  meta["scale"])

    probe_key = (str(store_path), str(unlearn_store), meta.get("model_hash"), eval_frac,
                 meta["layer"] if probe is None else probe.layer, meta["scale"] if probe is None else probe.scale,
                 *(tuple(meta.get(f"{c}_contexts") or ()) for c in ("retain", "unlearn")))
    stats = StatsData(contexts(data.retain), contexts(data.unlearn), contexts(data.retain), probe, probe_key)
    try:
        return run_loop(cfg, run, meta, *streams, held_out=held, progress=progress, on_step=on_step,
                        stats_data=stats, ranks=ranks)
    finally:
        for s in streams:
            s.close()


def train_on_streams(cfg: TrainConfig, retain: Iterator[Tensor], unlearn: Iterator[Tensor], *,
                     d_model: int, out: str | Path, held_out: HeldOut | None = None,
                     meta: dict[str, Any] | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = False,
                     on_step: Callable[[int], None] | None = None) -> RunSummary:
    """The training loop on already-normalised [B, D] batches (the dictionary_learning seam).

    Streams with `state_dict` / `load_state_dict` (TokenStream) resume exactly; plain
    iterators resume from wherever they are. `on_step(step)` runs after each step.
    """
    meta, ranks = {"d_model": d_model, "scale": 1.0, **(meta or {})}, ranks_from_env()
    run, cfg, meta = ranks.from_main(lambda: open_run(out, cfg, meta, resume=resume,
                                                      overwrite=overwrite))
    return run_loop(cfg, run, meta, retain, unlearn, held_out=held_out, progress=progress,
                    on_step=on_step, ranks=ranks)


@dataclass
class Training:
    """Everything a run's future depends on; `checkpoint` / `restore` round-trip it exactly:
    weights, optimiser moments, FeatureForget statistics and clusters, data stream positions,
    dead-feature counters and the partly accumulated metrics interval."""

    sae: SAE
    ff: FeatureForget | None
    opt: torch.optim.Optimizer
    since_fired_F: Tensor
    """Steps since each feature last fired (dead-feature metric)."""
    step: int = 0
    """Steps done."""
    saved: int = 0
    """Step of the last checkpoint."""
    log: dict[str, float] = field(default_factory=dict)

    @classmethod
    def new(cls, cfg: TrainConfig, d_model: int, device: torch.device | None = None) -> "Training":
        dev = torch.device(cfg.device) if device is None else device
        gen = torch.Generator().manual_seed(cfg.seed)
        sae = SAE(d_model, cfg.expansion * d_model, generator=gen).to(dev)
        ff = FeatureForget(sae.d_sae, cfg).to(dev) if cfg.method == "featureforget" else None
        since = torch.zeros(sae.d_sae, dtype=torch.long, device=dev)
        return cls(sae, ff, make_optimizer(cfg, sae, ff), since)

    def checkpoint(self, retain: Iterator[Tensor], unlearn: Iterator[Tensor]) -> dict[str, Any]:
        return {"step": self.step, "sae": self.sae.state_dict(), "opt": self.opt.state_dict(),
                "ff": self.ff.state_dict() if self.ff is not None else None,
                "since_fired": self.since_fired_F, "log": dict(self.log),
                "retain": getattr(retain, "state_dict", lambda: None)(),
                "unlearn": getattr(unlearn, "state_dict", lambda: None)()}

    def restore(self, ck: dict[str, Any], retain: Iterator[Tensor],
                unlearn: Iterator[Tensor]) -> None:
        self.step = self.saved = ck["step"]
        self.log = dict(ck["log"])
        self.sae.load_state_dict(ck["sae"])
        self.opt.load_state_dict(ck["opt"])
        self.since_fired_F.copy_(ck["since_fired"])
        if self.ff is not None:
            self.ff.load_state_dict(ck["ff"])
        for stream, key in ((retain, "retain"), (unlearn, "unlearn")):
            if hasattr(stream, "load_state_dict") and ck[key] is not None:
                stream.load_state_dict(ck[key])


def run_loop(cfg: TrainConfig, run: RunFolder, meta: dict[str, Any], retain: Iterator[Tensor],
             unlearn: Iterator[Tensor], *, held_out: HeldOut | None, progress: bool,
             on_step: Callable[[int], None] | None = None,
             stats_data: StatsData | None = None, ranks: Ranks = SINGLE) -> RunSummary:
    """Phase 1, then phase 2 (METHOD §6), then the run folder's final artifacts. Under torchrun
    `retain` / `unlearn` yield this rank's parts of the global batches; every rank reads the
    checkpoint (the run folder must be on a filesystem they share), rank 0 alone writes."""
    t0 = time.time()
    if ranks.from_main(run.eval.is_file):  # resuming a finished run: nothing left to do
        return _summary(cfg, run, meta, t0, ranks)
    t = Training.new(cfg, meta["d_model"], ranks.device(cfg.device))
    sae, ff, dev, n1, main = t.sae, t.ff, t.sae.W_dec.device, cfg.phase1_steps, ranks.is_main
    if ranks.from_main(run.checkpoint.is_file):
        t.restore(load_checkpoint(run.checkpoint), retain, unlearn)
    else:  # b_dec starts at the retain mean (SAELens, Anthropic 2024): residual streams carry
        with torch.no_grad():  # a large constant offset (most of E||x||^2 on Gemma 3)
            sae.b_dec.copy_(ranks.means({"x": next(retain).to(dev)})[0]["x"])
    metrics = MetricsLog(run.metrics, keep_until=t.step) if main else None
    bar = tqdm(total=cfg.steps, initial=t.step, disable=not (progress and main),
               desc=f"ff train {cfg.method}", unit="step", dynamic_ncols=True)
    for step in range(t.step, cfg.steps):
        phase2 = ff is not None and step >= n1
        if phase2 and step == n1:  # end of phase 1 (METHOD §6)
            importance_passes(sae, ff, retain, unlearn, cfg, ranks=ranks)
            if not all(torch.isfinite(x).all() for x in (ff.alpha_r, ff.alpha_u)):
                raise _non_finite("feature importance", step, t.saved, run)
            recluster(ff, ranks)
        elif phase2 and (step - n1) % cfg.recluster_every == 0:  # METHOD §3
            recluster(ff, ranks)
        lr = lr_at(cfg, step)
        set_lr(t.opt, lr)
        if ff is not None and not phase2:  # phase 1: retain only, a whole step's worth
            x_r, x_u = torch.cat([next(retain), next(retain)]).to(dev), None
        else:
            x_r, x_u = next(retain).to(dev), next(unlearn).to(dev)
        fw = train_step(sae, ff, t.opt, cfg, x_r, x_u, phase2=phase2, ranks=ranks)
        if fw is None:
            raise _non_finite("loss", step, t.saved, run)
        t.step = step + 1
        t.since_fired_F.add_(1).mul_(~fw.metrics.pop("fired_F"))
        fw.metrics["dead_frac"] = (t.since_fired_F >= cfg.dead_steps).float().mean()
        _accumulate(t.log, fw.metrics)
        if t.step % cfg.log_every == 0 or t.step == cfg.steps:
            record = _log_record(t.log, t.step, lr, phase2, ff)
            if main:
                metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", fvu=f"{record['fvu']:.3f}",
                            l0=f"{record['l0']:.1f}", refresh=False)
            t.log = {}
        if t.step % cfg.checkpoint_every == 0 or t.step == cfg.steps:
            if main:  # every rank holds the same state, stream positions included
                save_checkpoint(run.checkpoint, t.checkpoint(retain, unlearn))
            t.saved = t.step
        bar.update(1)
        if on_step is not None:
            on_step(t.step)
    bar.close()
    if main:
        metrics.close()
    finish_run(cfg, run, meta, sae, ff, retain, unlearn, held_out, stats_data, ranks)
    return _summary(cfg, run, meta, t0, ranks)


def _non_finite(what: str, step: int, saved: int, run: RunFolder) -> NonFiniteLossError:
    if not run.checkpoint.is_file():  # stopped before the first checkpoint: nothing to resume
        return NonFiniteLossError(f"the {what} is not finite at step {step}, before the first checkpoint; "
                                  "start again with --overwrite and a lower lr, or check the store for "
                                  "inf values (ff verify)")
    return NonFiniteLossError(f"the {what} is not finite at step {step}; the last good "
                              f"checkpoint (step {saved}) is kept in {run.checkpoint.parent}; "
                              "resume with a lower lr, or check the store for inf values")


def _accumulate(log: dict[str, float], m: dict[str, Tensor]) -> None:
    names = list(m)
    values = torch.stack([m[k].float().cpu() for k in names]).tolist()  # one sync for all
    for k, v in zip(names, values):
        log[k] = log.get(k, 0.0) + v
    log["_n"] = log.get("_n", 0.0) + 1


def _log_record(log: dict[str, float], step: int, lr: float, phase2: bool,
                ff: FeatureForget | None) -> dict[str, Any]:
    n = log.pop("_n")
    record = {"step": step, "phase": 2 if phase2 else 1, "lr": lr}
    record.update({k: v / n for k, v in log.items()})
    if phase2:
        record["n_candidates"] = int(ff.candidate.sum())
        for name, g in zip(("gate_r", "gate_u"), ff.gates()):
            record.update({f"{name}_mean": float(g.mean()), f"{name}_min": float(g.min()),
                           f"{name}_max": float(g.max())})
    return record


def _summary(cfg: TrainConfig, run: RunFolder, meta: dict[str, Any], t0: float,
             ranks: Ranks = SINGLE) -> RunSummary:
    report = ranks.from_main(lambda: json.loads(run.eval.read_text()))
    return RunSummary(str(run.path), cfg.method, cfg.steps, cfg.expansion * meta["d_model"],
                      float(meta["scale"]), int(report.get("candidates", {}).get("n", 0)), report,
                      time.time() - t0)
