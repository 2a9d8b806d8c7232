"""`ff`: the FeatureForget command line. It only wires the stages together:

    ff cache    model -> Zarr activation store          (cache/)
    ff inspect  describe a store
    ff train    store -> SAE run folder                  (trainer/, never loads the LLM)
    ff eval     run folder -> unlearning metrics         (pipelines/)
    ff generate run folder + prompt -> text with and without the intervention
    ff export   run folder -> SAELens format
    ff run      cache, train, eval and report in one go

Heavy imports (torch, transformers) happen inside the commands so `ff --help` is instant.
"""
from __future__ import annotations

import json
import sys

import click


def _user_errors() -> tuple[type[BaseException], ...]:
    from cache.errors import FFError

    errors: list[type[BaseException]] = [FFError]
    try:
        from trainer.errors import TrainError

        errors.append(TrainError)
    except ImportError:
        pass
    return tuple(errors)


class FFGroup(click.Group):
    """Turns errors a user can cause into one readable line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


def parse_layers(value: str | None) -> tuple[int, ...] | None:
    if value is None or value == "auto":
        return None
    try:
        layers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 5,12,19, got '{value}'")
    if not layers or any(l < 0 for l in layers):
        raise click.BadParameter(f"expected non-negative layer numbers, got '{value}'")
    return layers


def _layers_cb(_ctx, _param, value):
    return parse_layers(value)


@click.group(cls=FFGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="featureforget", prog_name="ff")
def main() -> None:
    """FeatureForget: make a language model forget a body of knowledge with a dual-objective
    sparse autoencoder, trained offline from cached activations."""


@main.command("cache")
@click.option("--out", "out", default=None, metavar="STORE",
              help="Store folder to write. Default: stores/<model>.zarr")
@click.option("--model", default="gemma-3-270m",
              help="Hugging Face id (google/gemma-2-2b is the paper's), local HF folder, .gguf file, "
                   "or the embedded 'gemma-3-270m'.")
@click.option("--layers", default=None, callback=_layers_cb, metavar="L1,L2,...",
              help="Decoder blocks to capture (output of block l = HF hidden_states[l+1]). "
                   "Default: the paper's 5,12,19 of 26 scaled to the model's depth (3,8,13 on Gemma 3 270M).")
@click.option("--retain", default="demo", metavar="SPEC",
              help="Retain corpus: 'demo' (bundled), a .txt/.jsonl/.parquet file, a folder of them, "
                   "or a dataset id ID[:CONFIG][@SPLIT] such as monology/pile-uncopyrighted.")
@click.option("--unlearn", default="demo", metavar="SPEC",
              help="Unlearn corpus, same forms as --retain ('demo' is the bundled biology corpus; "
                   "the paper uses the WMDP-bio corpus).")
@click.option("--contexts", default=2048, type=click.IntRange(1), help="Retain contexts (paper: 2048).")
@click.option("--unlearn-contexts", default=None, type=click.IntRange(1),
              help="Unlearn contexts. Default: same as --contexts.")
@click.option("--ctx-len", default=128, type=click.IntRange(2), help="Tokens per context, BOS included.")
@click.option("--dtype", default="bfloat16", type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Storage dtype (bfloat16 is kept as uint16 bit patterns).")
@click.option("--model-dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Compute dtype: auto = float32 on CPU, bfloat16 on CUDA.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--chunk-contexts", default=None, type=click.IntRange(1),
              help="Contexts per stored chunk. Default: whole contexts filling about 4 MiB.")
@click.option("--text-field", default="text", help="Text field of .jsonl/.parquet files and datasets.")
@click.option("--overwrite", is_flag=True, help="Rebuild the store even if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache_cmd(out, model, layers, retain, unlearn, contexts, unlearn_contexts, ctx_len, dtype, model_dtype,
              device, chunk_contexts, text_field, overwrite, quiet):
    """Run the model once over the retain and unlearn corpora and write the activations of the
    chosen layers to a Zarr store. Interrupted runs resume when rerun with the same arguments;
    rerunning on a complete store does nothing."""
    from cache.build import CacheConfig, build_cache

    cfg = CacheConfig(model=model, layers=layers, retain=retain, unlearn=unlearn, contexts=contexts,
                      unlearn_contexts=unlearn_contexts, ctx_len=ctx_len, dtype=dtype,
                      chunk_contexts=chunk_contexts, text_field=text_field,
                      model_dtype=None if model_dtype == "auto" else model_dtype, device=device)
    out = out or default_store_path(model)
    res = build_cache(cfg, out, overwrite=overwrite, progress=not quiet)
    if res.skipped:
        click.echo(f"{out}: already complete, nothing to do (use --overwrite to rebuild)")
    else:
        rate = res.tokens_done / res.seconds if res.seconds else 0.0
        click.echo(f"{out}: wrote {res.tokens_done:,} tokens x {len(res.layers)} layers in {res.seconds:.1f} s "
                   f"({rate:,.0f} tok/s)")


def default_store_path(model: str) -> str:
    from pathlib import Path

    slug = Path(model.rstrip("/")).name.replace(".gguf", "").replace("@", "-")
    return f"stores/{slug}.zarr"


@main.command("inspect")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect_cmd(store, as_json):
    """Describe an activation store: model, layers, corpora, size, compression, completeness."""
    from cache.inspect import describe, format_description

    info = describe(store)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.command("verify")
@click.argument("path", metavar="STORE|RUN", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify_cmd(path, as_json):
    """Check a store (read every chunk: present, checksum, finite, tokens in range, metadata) or
    a run folder (files, shapes, checkpoint, the store's model). Exit 0: healthy; 1: problems
    found, each named; 2: not a store or run folder."""
    from trainer.verify import verify

    report = verify(path)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    sys.exit(0 if report.ok else 1)


_TRAIN_OVERRIDES = {  # CLI flag -> TrainConfig field; None keeps the preset's value
    "steps": "steps", "expansion": "expansion", "l1": "l1", "lr": "lr", "warmup": "warmup",
    "batch_contexts": "batch_contexts", "n_clusters": "n_clusters", "beta": "beta", "alpha": "alpha",
    "gate_lr": "gate_lr", "candidate_max_freq_r": "candidate_max_freq_r",
    "recluster_every": "recluster_every", "seed": "seed", "train_device": "device",
}


@main.command("train")
@click.option("--store", required=True, type=click.Path(), help="Activation store made by `ff cache`.")
@click.option("--unlearn-store", default=None, type=click.Path(),
              help="Take the unlearn corpus from this store instead (same model and d_model).")
@click.option("--layer", "layer", type=int, default=None, help="Train one layer of the store.")
@click.option("--layers", "layers", default=None, callback=_layers_cb, metavar="L1,L2,...",
              help="Train each of these layers, into OUT/layer_<L>. Default: every layer of the store.")
@click.option("--out", required=True, type=click.Path(), metavar="RUN",
              help="Run folder (one layer) or parent folder of layer_<L> run folders (several layers).")
@click.option("--method", default="featureforget", type=click.Choice(["featureforget", "baseline"]),
              help="featureforget: dual-objective SAE (two phases); baseline: ReLU + L1 SAE on both corpora mixed.")
@click.option("--preset", default="paper", type=click.Choice(["paper", "demo"]),
              help="paper: expansion 32, 32 clusters, L1 0.04, beta 0.9, lr 3e-4, warm-up 1000, batch 32x128; "
                   "demo: sized for a few minutes on 2 CPU cores with the embedded model.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimiser steps (both phases). [preset]")
@click.option("--expansion", type=click.IntRange(1), default=None, help="d_sae = expansion x d_model. [preset]")
@click.option("--l1", type=float, default=None, help="L1 coefficient lambda. [preset]")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate (cosine schedule). [preset]")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Linear warm-up steps. [preset]")
@click.option("--batch-contexts", type=click.IntRange(2), default=None, help="Contexts per step. [preset]")
@click.option("--n-clusters", type=click.IntRange(1), default=None, help="k-means clusters. [preset]")
@click.option("--beta", type=float, default=None, help="Threshold mix tau_c = beta*mean + (1-beta)*std. [preset]")
@click.option("--alpha", type=float, default=None, help="Weight of the gated per-cluster objectives. [preset]")
@click.option("--gate-lr", type=float, default=None, help="Peak learning rate of the gate parameters. [preset]")
@click.option("--candidate-max-freq-r", type=click.FloatRange(0, 1), default=None,
              help="Unlearn candidates must fire on fewer than this fraction of retain tokens "
                   "(1: no bound, the cluster thresholds alone). [preset]")
@click.option("--recluster-every", type=click.IntRange(1), default=None, help="Phase-2 steps between re-clusterings. [preset]")
@click.option("--seed", type=int, default=None, help="Seed for init, data order and k-means. [preset]")
@click.option("--device", "train_device", default=None, help="torch device for the SAE (cpu, cuda). [preset]")
@click.option("--no-importance", is_flag=True,
              help="Ablation: firing frequencies replace gradient importance in clustering and thresholds.")
@click.option("--no-adaptive-threshold", is_flag=True,
              help="Ablation: one global threshold replaces the per-cluster tau_c.")
@click.option("--no-clustering", is_flag=True, help="Ablation: one cluster instead of k-means clusters.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(store, unlearn_store, layer, layers, out, method, preset, no_importance, no_adaptive_threshold,
              no_clustering, resume, overwrite, quiet, **overrides):
    """Train the FeatureForget SAE (or the baseline SAE) from a store, without loading the LLM.
    Writes config.json, sae.safetensors, features.safetensors, clusters.json, metrics.jsonl,
    eval.json (held-out FVU, L0, dead fraction) and checkpoints/ to the run folder."""
    from pathlib import Path

    from cache.store import open_store
    from trainer.config import TrainConfig
    from trainer.train import train

    changes = {_TRAIN_OVERRIDES[k]: v for k, v in overrides.items() if v is not None}
    cfg = TrainConfig.preset(preset).replace(method=method, no_importance=no_importance,
                                             no_adaptive_threshold=no_adaptive_threshold,
                                             no_clustering=no_clustering, **changes)
    if layer is not None and layers is not None:
        raise click.UsageError("use --layer or --layers, not both")
    todo = [layer] if layer is not None else list(layers or open_store(store).meta.layers)
    for l in todo:
        run_dir = out if len(todo) == 1 else str(Path(out) / f"layer_{l}")
        summary = train(None if resume else cfg, store, l, run_dir, unlearn_store=unlearn_store,
                        resume=resume, overwrite=overwrite, progress=not quiet)
        click.echo(format_train_summary(l, summary))


def format_train_summary(layer: int, s) -> str:
    ev = s.eval
    parts = [f"{s.out}: {s.method} layer {layer}, {s.steps} steps, d_sae {s.d_sae}, {s.seconds:.0f} s"]
    for corpus in ("retain", "unlearn"):
        m = ev.get(corpus, {})
        if m:
            parts.append(f"  held-out {corpus:<7} FVU {m.get('fvu', float('nan')):.3f}  L0 {m.get('l0', float('nan')):.1f}  "
                         f"dead {m.get('dead_frac', float('nan')):.3f}")
    parts.append(f"  feature set: {s.n_candidates} features")
    return "\n".join(parts)


@main.command("run")
@click.option("--preset", default="demo", type=click.Choice(["demo", "paper"]),
              help="demo: embedded Gemma 3 270M, bundled corpora, about 20-25 min on 2 CPU cores. "
                   "paper: Gemma-2-2B, layers 5/12/19, Pile-uncopyrighted vs WMDP-bio (needs a GPU and "
                   "Hugging Face access to the gated model and corpus).")
@click.option("--out", default=None, type=click.Path(), help="Output folder. Default: ff-<preset>")
@click.option("--model", default=None, help="Override the preset's model.")
@click.option("--layers", default=None, callback=_layers_cb, metavar="L1,L2,...", help="Override the preset's layers.")
@click.option("--contexts", default=None, type=click.IntRange(1), help="Override the preset's context count.")
@click.option("--ablations", is_flag=True,
              help="Also train and evaluate the paper's three ablations (no importance, no adaptive "
                   "threshold, no clustering) and add them to the report.")
@click.option("--quiet", is_flag=True, help="Stage lines only, no progress bars.")
def run_cmd(preset, out, model, layers, contexts, ablations, quiet):
    """Cache, train (FeatureForget and baseline, each layer), evaluate and write a report
    (report.md, report.json, figures). Finished stages are reused, so rerunning resumes."""
    from pipelines.workflow import run_all

    overrides = {k: v for k, v in {"model": model, "layers": layers, "contexts": contexts}.items() if v is not None}
    report = run_all(preset, out or f"ff-{preset}", ablations=ablations, progress=not quiet,
                     cache_overrides=overrides, log=lambda m: click.echo(m, err=True))
    click.echo(f"report: {report / 'report.md'}")


def _load_for_run(run: str, model: str | None, device: str):
    """The model named in RUN/config.json (or --model), loaded once."""
    from pathlib import Path

    from cache.errors import FFError
    from cache.models import load_model

    cfg_file = Path(run) / "config.json"
    if not cfg_file.is_file():
        raise FFError(f"'{run}' is not a run folder (no config.json); create one with `ff train`")
    return load_model(model or json.loads(cfg_file.read_text())["model"], device=device)


@main.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--model", default=None, help="Model to splice into. Default: the one named in the run.")
@click.option("--preset", default="full", type=click.Choice(["full", "demo"]),
              help="full: 100 questions per file and the whole sweep; demo: a small sweep for CPUs.")
@click.option("--forget-mcq", default=None, help="Unlearn-domain questions: 'demo', a JSONL file "
              "({question, choices, answer} per line) or a dataset like cais/wmdp:wmdp-bio@test.")
@click.option("--retain-mcq", default=None, help="Retain-domain questions: 'demo', JSONL, or e.g. cais/mmlu:all@test.")
@click.option("--forget-text", default=None, help="Held-out unlearn-domain text (corpus spec; 'demo').")
@click.option("--retain-text", default=None, help="Held-out retain-domain text (corpus spec; 'demo').")
@click.option("--max-questions", default=None, type=click.IntRange(1), help="Questions per MCQ file. [preset]")
@click.option("--max-text-tokens", default=None, type=click.IntRange(2), help="Held-out text tokens per file. [preset]")
@click.option("--multipliers", default=None, metavar="M1,M2,...", help="Clamp multipliers to sweep. [preset]")
@click.option("--top-n", default=None, metavar="N1,N2,...|all", help="Feature counts to sweep ('all' = every candidate). [preset]")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def eval_cmd(run_dir, model, preset, forget_mcq, retain_mcq, forget_text, retain_text, max_questions,
             max_text_tokens, multipliers, top_n, device, as_json, quiet):
    """Splice the run's SAE into the model and measure unlearning: CE losses (clean, SAE spliced,
    zero ablation, loss recovered), CE loss change on held-out forget/retain text, MCQ accuracy
    before/after, a sweep of clamp multipliers and feature counts, and the unlearning score
    1 - acc_after/acc_before among settings keeping retain accuracy >= 0.99 of clean."""
    from pipelines.config import EvalConfig
    from pipelines.evaluate import evaluate_run

    cfg = EvalConfig.preset(preset)
    files = {"forget_mcq": forget_mcq, "retain_mcq": retain_mcq, "forget_text": forget_text,
             "retain_text": retain_text, "max_questions": max_questions, "max_text_tokens": max_text_tokens}
    cfg = cfg.replace(**{k: v for k, v in files.items() if v is not None})
    grid = {}
    if multipliers:
        grid["multipliers"] = tuple(float(m) for m in multipliers.split(","))
    if top_n:
        grid["top_n"] = tuple(None if n == "all" else int(n) for n in top_n.split(","))
    if grid:
        from dataclasses import replace

        cfg = cfg.replace(grid=replace(cfg.grid, **grid))
    lm = _load_for_run(run_dir, model, device)
    res = evaluate_run(run_dir, lm, cfg, progress=not quiet)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    b = res["best"]
    click.echo(f"{res['method']} layer {res['layer']}: SAE fvu {res['sae']['fvu']:.3f}, L0 {res['sae']['l0']:.1f}, "
               f"loss recovered {res['sae']['loss_recovered']}")
    if b is None:
        click.echo(f"no setting kept retain accuracy >= {cfg.retain_ratio} of clean: {res.get('best_reason')}")
    else:
        click.echo(f"best {b['setting']}: unlearning score {b['unlearning_score']:.3f}; forget MCQ "
                   f"{b['forget_mcq']['before']:.3f} -> {b['forget_mcq']['after']:.3f}; retain MCQ "
                   f"{b['retain_mcq']['before']:.3f} -> {b['retain_mcq']['after']:.3f}")


@main.command("generate")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=40, type=click.IntRange(1), help="Tokens to generate (greedy).")
@click.option("--mode", default=None, type=click.Choice(["clamp", "ablate"]), help="Intervention. Default: clamp.")
@click.option("--multiplier", default=None, type=float, help="Clamp value m (features -> -m). Default: 50.")
@click.option("--top-n", default=None, type=click.IntRange(1), help="Use only the top n features.")
@click.option("--model", default=None, help="Model. Default: the one named in the run.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
def generate_cmd(run_dir, prompt, max_new_tokens, mode, multiplier, top_n, model, device):
    """Print the model's greedy continuation of PROMPT without and with the unlearning intervention."""
    from pipelines.generate import default_setting, generate_pair

    from pathlib import Path

    lm = _load_for_run(run_dir, model, device)
    run_cfg = json.loads((Path(run_dir) / "config.json").read_text())
    setting = default_setting(run_cfg.get("method", "featureforget"))
    changes = {k: v for k, v in {"mode": mode, "multiplier": multiplier, "top_n": top_n}.items() if v is not None}
    pair = generate_pair(lm, run_dir, prompt, max_new_tokens, setting.replace(**changes))
    click.echo(f"clean:     {prompt}{pair.clean}")
    click.echo(f"unlearned: {prompt}{pair.unlearned}")


@main.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--format", "fmt", default="saelens", type=click.Choice(["saelens"]), help="Output format.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.argument("out", type=click.Path())
def export_cmd(run_dir, fmt, overwrite, out):
    """Write the run's SAE to OUT in SAELens's on-disk format (cfg.json + sae_weights.safetensors),
    with the normalisation scale folded in so it takes raw activations."""
    from pipelines.export import export_saelens

    res = export_saelens(run_dir, out, overwrite=overwrite)
    click.echo(f"wrote {res.out_dir} ({fmt})")


if __name__ == "__main__":  # pragma: no cover
    main()
