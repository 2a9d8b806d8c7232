"""`ff run`: cache, train (both methods, each layer), evaluate and report in one go.

Every stage leaves its artifact in the output folder and is skipped when that artifact is
already complete, so an interrupted `ff run` picks up where it stopped:

```
OUT/store.zarr                         the activation store (ff cache)
OUT/runs/layer_<L>/<variant>/          run folders (ff train); eval.json marks a finished run
OUT/runs/layer_<L>/<variant>/unlearning.json   the evaluation (ff eval --json)
OUT/report/                            report.md, report.json, fig_*.png
```
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cache.build import CacheConfig, build_cache
from cache.store import open_store
from pipelines.result import EvalResult
from trainer.run import RunFolder


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    flags: dict[str, bool] = field(default_factory=dict)


BASE_VARIANTS = (Variant("featureforget", "featureforget"), Variant("baseline", "baseline"))
ABLATIONS = (  # paper section 6.2
    Variant("ff-no-importance", "featureforget", {"no_importance": True}),
    Variant("ff-no-adaptive-threshold", "featureforget", {"no_adaptive_threshold": True}),
    Variant("ff-no-clustering", "featureforget", {"no_clustering": True}),
)


PAPER_RETAIN_MCQ = ",".join(f"cais/mmlu:{s}@test" for s in (
    "high_school_us_history", "college_computer_science", "high_school_geography", "human_aging"))
"""SAEBench's retain subjects; questions are sampled across all four (EvalConfig.max_questions)."""


@dataclass(frozen=True)
class Preset:
    """Everything `ff run --preset NAME` sets."""

    cache: CacheConfig
    train_preset: str
    eval_preset: str
    """EvalConfig preset ("demo": small sweep and question counts for CPU; "full")."""
    eval: dict[str, Any] = field(default_factory=dict)
    """EvalConfig overrides on top of the preset (files and sizes)."""
    probe_offset: int = 0
    """The probe gate reads the layer this many blocks before each trained layer
    (TrainConfig.probe_offset); `ff run` caches those layers too, and trains the others only."""
    note: str = ""


PRESETS: dict[str, Preset] = {
    # The embedded Gemma 3 270M and the bundled corpora, one layer (docs/benchmarks.md: time).
    "demo": Preset(
        # layer 4: chosen on the dev halves over layers 3 and 4 (docs/method.md, "Layer choice");
        # its probe reads layer 3, which detects the forget questions better (docs/method.md)
        cache=CacheConfig(model="gemma-3-270m", layers=(4,), retain="demo", unlearn="demo", contexts=1536,
                          ctx_len=128),
        train_preset="demo",
        eval_preset="demo",
        probe_offset=1,
        note="embedded Gemma 3 270M, bundled demo corpora and held-out evaluation files",
    ),
    # The paper's setting: needs a GPU and Hugging Face access (gemma-2-2b and the WMDP bio
    # forget corpus are gated: accept their terms and `huggingface-cli login` first).
    "paper": Preset(
        cache=CacheConfig(model="google/gemma-2-2b", layers=(5, 12, 19), retain="monology/pile-uncopyrighted",
                          unlearn="cais/wmdp-bio-forget-corpus", contexts=2048, ctx_len=128),
        train_preset="paper",
        eval_preset="full",
        eval={"forget_mcq": "cais/wmdp:wmdp-bio@test", "retain_mcq": PAPER_RETAIN_MCQ, "max_questions": 200,
              "ood_forget_mcq": None, "ood_retain_mcq": None, "ood_forget_text": None, "ood_retain_text": None},
        note="Gemma-2-2B, layers 5/12/19, Pile-uncopyrighted vs WMDP-bio; GPU and HF access required",
    ),
}


def _train_one(store: Path, layer: int, run_dir: Path, variant: Variant, train_preset: str,
               compare_n: int, progress: bool, seed: int = 0, probe_offset: int = 0):
    from trainer.config import TrainConfig
    from trainer.train import train

    if RunFolder(run_dir).is_finished():
        return None  # finished earlier
    resume = RunFolder(run_dir).has_checkpoint()
    cfg = TrainConfig.preset(train_preset).replace(method=variant.method, compare_n=compare_n, seed=seed,
                                                   probe_offset=probe_offset, **variant.flags)
    return train(None if resume else cfg, str(store), layer, str(run_dir), resume=resume,
                 overwrite=not resume, progress=progress)


def _n_candidates(run_dir: Path) -> int:
    from safetensors.numpy import load_file

    return int(load_file(str(RunFolder(run_dir).features))["candidate"].sum())


def run_dir_of(out: Path, layer: int, variant: str, seed: int) -> Path:
    """OUT/runs/layer_<L>/<variant>[-seed<k>]: seed 0 keeps the plain name."""
    return out / "runs" / f"layer_{layer}" / (variant if seed == 0 else f"{variant}-seed{seed}")


def run_all(preset_name: str, out: str | Path, *, ablations: bool = False, seeds: int = 1, progress: bool = True,
            cache_overrides: dict[str, Any] | None = None, eval_overrides: dict[str, Any] | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Run every stage of `preset_name` into `out` (`seeds` training seeds per method and layer);
    return the report folder."""
    from cache.models import load_model
    from pipelines.evaluate import EvalConfig, evaluate_run, save_result
    from pipelines.report import write_report

    preset = PRESETS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_cfg = replace(preset.cache, **(cache_overrides or {}))
    layers = tuple(cache_cfg.layers)  # trained; the probe's layers are cached as well
    if preset.probe_offset:
        if min(layers) - preset.probe_offset < 0:
            from trainer.errors import TrainError

            raise TrainError(f"preset '{preset_name}' gates each layer with a probe {preset.probe_offset} block(s) "
                             f"earlier: train layers >= {preset.probe_offset} (got {min(layers)})")
        cache_cfg = replace(cache_cfg, layers=tuple(sorted({*layers, *(l - preset.probe_offset for l in layers)})))
    t0 = time.perf_counter()
    lm = None

    def at() -> str:
        s = int(time.perf_counter() - t0)
        return f" (at {s // 60}:{s % 60:02d})"

    def model():
        nonlocal lm
        if lm is None:
            log(f"loading {cache_cfg.model} ...")
            lm = load_model(cache_cfg.model, device=cache_cfg.device, dtype=cache_cfg.model_dtype)
        return lm

    store_path = out / "store.zarr"
    log(f"[1/4] cache -> {store_path}{at()}")
    complete = (store_path / "zarr.json").is_file() and open_store(store_path).meta.complete
    build_cache(cache_cfg, store_path, progress=progress, lm=None if complete else model())

    variants = BASE_VARIANTS + (ABLATIONS if ablations else ())
    runs: dict[str, dict[int, list[Path]]] = {v.name: {} for v in variants}
    log(f"[2/4] train {len(variants)} variants x {len(layers)} layers x {seeds} seed(s){at()}")
    for layer in layers:
        for seed in range(seeds):
            ff_dir = run_dir_of(out, layer, "featureforget", seed)
            for v in variants:
                run_dir = run_dir_of(out, layer, v.name, seed)
                # the baseline's feature set is sized like the FeatureForget candidate set
                compare_n = _n_candidates(ff_dir) if v.method == "baseline" else 0
                log(f"  layer {layer} {v.name} seed {seed}")
                _train_one(store_path, layer, run_dir, v, preset.train_preset, compare_n, progress, seed,
                           preset.probe_offset)
                runs[v.name].setdefault(layer, []).append(run_dir)

    ecfg = EvalConfig.preset(preset.eval_preset).replace(**{**preset.eval, **(eval_overrides or {})})
    seeded: dict[str, dict[int, list[EvalResult]]] = {v.name: {} for v in variants}
    log(f"[3/4] evaluate{at()}")
    for name, by_layer in runs.items():
        for layer, run_dirs in by_layer.items():
            for run_dir in run_dirs:
                res_file = RunFolder(run_dir).result
                if not res_file.is_file():
                    log(f"  layer {layer} {run_dir.name}")
                    save_result(run_dir, evaluate_run(run_dir, model(), ecfg, progress=progress))
                seeded[name].setdefault(layer, []).append(EvalResult.load(res_file))

    log(f"[4/4] report{at()}")
    results = {name: {l: rs[0] for l, rs in by.items()} for name, by in seeded.items()}
    header = {"preset": preset_name, "model": cache_cfg.model, "store": str(store_path), "layers": list(layers),
              "variants": [v.name for v in variants], "seeds": seeds, "note": preset.note,
              "seconds": round(time.perf_counter() - t0, 1)}
    report_dir = out / "report"
    write_report(report_dir, results, {n: {l: ds[0] for l, ds in by.items()} for n, by in runs.items()}, header,
                 seeds=seeded if seeds > 1 else None)
    return report_dir
