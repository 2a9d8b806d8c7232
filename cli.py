"""`ff`: the FeatureForget command line. It only wires the stages together:

    ff cache    model -> Zarr activation store          (cache/)
    ff inspect  describe a store
    ff copy     copy a store between two locations (folders, s3://, ...)
    ff train    store -> SAE run folder                  (trainer/, never loads the LLM)
    ff eval     run folder -> unlearning metrics         (pipelines/)
    ff generate run folder + prompt -> text with and without the intervention
    ff export   run folder -> SAELens format
    ff run      cache, train, eval and report in one go

Heavy imports (torch, transformers) happen inside the commands so `ff --help` is instant.
"""
from __future__ import annotations

import errno
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


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EIO: "an I/O error", errno.EROFS: "the file system is read-only"}
"""OS errors that are the machine's, not ff's: one line, exit 2, like a user error."""


class FFGroup(click.Group):
    """Turns errors a user can cause into one readable line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            where = f" writing '{e.filename}'" if e.filename else ""
            click.echo(f"error: {DISK_ERRORS[e.errno]}{where} ({e.strerror or e}); what was complete is "
                       "untouched: free space and rerun the command to go on (ff train: with --resume)", err=True)
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


def parse_window(value: str, flag: str) -> int | None:
    """'none' -> None, else a positive number of tokens."""
    from pipelines.errors import EvalError

    if value.strip() == "none":
        return None
    try:
        n = int(value)
    except ValueError:
        raise EvalError(f"{flag} takes a number of tokens or 'none', got '{value}'") from None
    if n < 1:
        raise EvalError(f"{flag} must be at least 1 token, got {n}")
    return n


def parse_template(value: str) -> str:
    """An MCQ prompt template: '\\n' becomes a newline; it must take the question, and nothing else."""
    from pipelines.errors import EvalError

    template = value.replace("\\n", "\n")
    try:
        filled = template.format(question="\0")
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(f"--mcq-template may name {{question}} only (braces as {{{{ }}}}): {e!r} "
                        f"in '{value}'") from None
    if filled.count("\0") != 1:
        raise EvalError(f"--mcq-template must hold {{question}} once, got '{value}'")
    return template


def _layers_cb(_ctx, _param, value):
    return parse_layers(value)


def _storage_options_cb(_ctx, _param, value):
    """--storage-options: parsed and handed to cache.location for every remote store this
    process opens; kept in memory only, never written or echoed."""
    from cache.location import parse_storage_options, use_storage_options

    options = parse_storage_options(value)
    use_storage_options(options)
    return options


STORE_HELP = "a folder or an fsspec URL (s3://bucket/x.zarr, gs://..., memory://...)"


def storage_options_option(command):
    """The --storage-options option of every command that opens a store."""
    return click.option(
        "--storage-options", default=None, metavar="JSON", envvar="FF_STORAGE_OPTIONS",
        expose_value=False, callback=_storage_options_cb,
        help="fsspec options for remote stores, a JSON object such as '{\"endpoint_url\": "
             "\"http://127.0.0.1:9000\"}' (also FF_STORAGE_OPTIONS). Default: the filesystem's "
             "standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Never written "
             "to a store, a run folder or a log.")(command)


@click.group(cls=FFGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="featureforget", prog_name="ff")
def main() -> None:
    """FeatureForget: make a language model forget a body of knowledge with a dual-objective
    sparse autoencoder, trained offline from cached activations."""


@main.command("cache")
@click.option("--out", "out", default=None, metavar="STORE",
              help=f"Store to write, {STORE_HELP}. Default: stores/<model>.zarr")
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
@click.option("--repair", is_flag=True,
              help="Recompute exactly the chunks `ff verify` finds bad (missing, corrupt, non-finite, "
                   "tokens out of range); give the arguments the store was built with.")
@click.option("--shard", default=None, metavar="I/N",
              help="Compute only shard I of N (0-based): chunk k of the store goes to shard k mod N. "
                   "Start the N shards together, on one machine or many, with the same arguments and "
                   "--out; the last to finish marks the store complete. Under torchrun: RANK/WORLD_SIZE.")
@click.option("--finalize", is_flag=True,
              help="Mark a sharded store complete if every chunk is present, else name the missing "
                   "chunks and the shard to rerun. Needs only --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_options_option
def cache_cmd(out, model, layers, retain, unlearn, contexts, unlearn_contexts, ctx_len, dtype, model_dtype,
              device, chunk_contexts, text_field, overwrite, repair, shard, finalize, quiet):
    """Run the model once over the retain and unlearn corpora and write the activations of the
    chosen layers to a Zarr store. Interrupted runs resume when rerun with the same arguments;
    rerunning on a complete store does nothing; --repair recomputes damaged chunks; --shard I/N
    (or torchrun) splits the work over processes writing one store (docs/scaling.md)."""
    from cache.build import CacheConfig, build_cache
    from cache.location import public
    from cache.shard import Shard, shard_device, shard_from_env

    out = out or default_store_path(model)
    if finalize:
        return _finalize(out, shard, overwrite, repair)
    part = Shard.parse(shard) if shard is not None else shard_from_env()
    part = part if part is None or part.count > 1 else None  # 0/1: the whole store
    cfg = CacheConfig(model=model, layers=layers, retain=retain, unlearn=unlearn, contexts=contexts,
                      unlearn_contexts=unlearn_contexts, ctx_len=ctx_len, dtype=dtype,
                      chunk_contexts=chunk_contexts, text_field=text_field,
                      model_dtype=None if model_dtype == "auto" else model_dtype,
                      device=shard_device(device))  # cuda:LOCAL_RANK under torchrun
    res = build_cache(cfg, out, overwrite=overwrite, repair=repair, progress=not quiet, shard=part)
    out = public(out)  # a URL without any user:password@
    if part is not None:
        out = f"{out} [shard {part}]"
    if res.skipped:
        click.echo(f"{out}: every chunk verifies, nothing to repair" if repair else
                   f"{out}: already complete, nothing to do" if part is not None else
                   f"{out}: already complete, nothing to do (use --overwrite to rebuild)")
    else:
        if res.repaired:
            click.echo(f"{out}: recomputed {len(res.repaired)} damaged chunk(s): {', '.join(res.repaired)}")
        rate = res.tokens_done / res.seconds if res.seconds else 0.0
        click.echo(f"{out}: wrote {res.tokens_done:,} tokens x {len(res.layers)} layers in {res.seconds:.1f} s "
                   f"({rate:,.0f} tok/s)")
        if part is not None:
            click.echo(f"{out}: store complete" if not res.missing else
                       f"{out}: {res.missing} chunk(s) of other shards still to come; the last shard "
                       "to finish marks the store complete (or run `ff cache --finalize`)")


def _finalize(out: str, shard: str | None, overwrite: bool, repair: bool) -> None:
    from cache.errors import StoreError
    from cache.shard import finalize

    given = [f for f, on in (("--shard", shard is not None), ("--overwrite", overwrite),
                             ("--repair", repair)) if on]
    if given:
        raise StoreError(f"--finalize takes only --out (and --storage-options), not {given[0]}")
    res = finalize(out)
    click.echo(f"{res.path}: already complete, nothing to do" if res.already else
               f"{res.path}: all {res.chunks} chunks present; marked complete")


def default_store_path(model: str) -> str:
    from pathlib import Path

    slug = Path(model.rstrip("/")).name.replace(".gguf", "").replace("@", "-")
    return f"stores/{slug}.zarr"


@main.command("inspect")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@storage_options_option
def inspect_cmd(store, as_json):
    """Describe an activation store (a folder or an fsspec URL): model, layers, corpora, size,
    compression, completeness."""
    from cache.inspect import describe, format_description

    info = describe(store)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.command("verify")
@click.argument("path", metavar="STORE|RUN", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@storage_options_option
def verify_cmd(path, as_json):
    """Check a store, a folder or an fsspec URL (read every chunk: present, checksum, finite,
    tokens in range, metadata), or a run folder (files, shapes, checkpoint, the store's model).
    Exit 0: healthy; 1: problems found, each named; 2: not a store or run folder."""
    from trainer.verify import verify

    report = verify(path)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    sys.exit(0 if report.ok else 1)


@main.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--dst-storage-options", default=None, metavar="JSON",
              help="fsspec options for DST when they differ from --storage-options (a JSON object).")
@click.option("--overwrite", is_flag=True, help="Replace whatever DST holds (another store, other files).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_options_option
def copy_cmd(src, dst, dst_storage_options, overwrite, quiet):
    """Copy the complete store SRC to DST, each a folder or an fsspec URL (s3://, gs://, ...):
    the raw chunk bytes, each chunk decoded on the way (checksums), DST marked complete last.
    Rerunning an interrupted copy resumes: chunks already at DST with equal bytes are skipped."""
    from cache.copy import copy_store
    from cache.location import parse_storage_options

    dst_options = parse_storage_options(dst_storage_options) if dst_storage_options else None
    res = copy_store(src, dst, dst_options=dst_options, overwrite=overwrite, progress=not quiet)
    click.echo(f"{res.dst}: copied {res.copied} of {res.chunks} chunks ({res.bytes_copied / 2**20:.1f} MiB), "
               f"{res.skipped} already there, from {res.src} in {res.seconds:.1f} s")


_TRAIN_OVERRIDES = {  # CLI flag -> TrainConfig field; None keeps the preset's value
    "steps": "steps", "expansion": "expansion", "l1": "l1", "lr": "lr", "warmup": "warmup",
    "batch_contexts": "batch_contexts", "n_clusters": "n_clusters", "beta": "beta", "alpha": "alpha",
    "gate_lr": "gate_lr", "candidate_max_freq_r": "candidate_max_freq_r",
    "recluster_every": "recluster_every", "seed": "seed", "train_device": "device",
    "probe_offset": "probe_offset",
}
_TRAIN_FLAGS = ("method", "no_importance", "no_adaptive_threshold", "no_clustering")
"""Options of `ff train` that are TrainConfig fields of the same name."""


def _positive(_ctx, param, value):
    """A learning rate of 0 (or less, or nan) is a one-line error, not a ZeroDivisionError."""
    if value is not None and not value > 0:
        from cache.errors import FFError

        raise FFError(f"--{param.name.replace('_', '-')} must be > 0, got {value}")
    return value


def _given_train_options(ctx: click.Context) -> dict:
    """The TrainConfig fields set on the command line, not left at their defaults: what a
    `--resume` applies to the saved config (trainer/run.py, RESUME_MAY_CHANGE)."""
    from click.core import ParameterSource

    flags = {**_TRAIN_OVERRIDES, **{k: k for k in _TRAIN_FLAGS}}
    return {field: ctx.params[flag] for flag, field in flags.items()
            if ctx.get_parameter_source(flag) not in (None, ParameterSource.DEFAULT)}


@main.command("train")
@click.option("--store", required=True, type=click.Path(),
              help=f"Activation store made by `ff cache`, {STORE_HELP}.")
@click.option("--unlearn-store", default=None, type=click.Path(),
              help="Take the unlearn corpus from this store (folder or URL) instead (same model and d_model).")
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
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Optimiser steps (both phases); a larger value on --resume extends the run. [preset]")
@click.option("--expansion", type=click.IntRange(1), default=None, help="d_sae = expansion x d_model. [preset]")
@click.option("--l1", type=float, default=None, help="L1 coefficient lambda. [preset]")
@click.option("--lr", type=float, default=None, callback=_positive,
              help="Peak AdamW learning rate (cosine schedule); may change on --resume. [preset]")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Linear warm-up steps. [preset]")
@click.option("--batch-contexts", type=click.IntRange(2), default=None, help="Contexts per step. [preset]")
@click.option("--n-clusters", type=click.IntRange(1), default=None, help="k-means clusters. [preset]")
@click.option("--beta", type=float, default=None, help="Threshold mix tau_c = beta*mean + (1-beta)*std. [preset]")
@click.option("--alpha", type=float, default=None, help="Weight of the gated per-cluster objectives. [preset]")
@click.option("--gate-lr", type=float, default=None, callback=_positive,
              help="Peak learning rate of the gate parameters. [preset]")
@click.option("--candidate-max-freq-r", type=click.FloatRange(0, 1), default=None,
              help="Unlearn candidates must fire on fewer than this fraction of retain tokens "
                   "(1: no bound, the cluster thresholds alone). [preset]")
@click.option("--recluster-every", type=click.IntRange(1), default=None,
              help="Phase-2 steps between re-clusterings. [preset]")
@click.option("--seed", type=int, default=None, help="Seed for init, data order and k-means. [preset]")
@click.option("--probe-offset", type=click.IntRange(0), default=None,
              help="The probe gate's detector reads the residual stream this many blocks before the trained "
                   "layer (the store must hold that layer too). [0]")
@click.option("--device", "train_device", default=None, help="torch device for the SAE (cpu, cuda). [preset]")
@click.option("--no-importance", is_flag=True,
              help="Ablation: firing frequencies replace gradient importance in clustering and thresholds.")
@click.option("--no-adaptive-threshold", is_flag=True,
              help="Ablation: one global threshold replaces the per-cluster tau_c.")
@click.option("--no-clustering", is_flag=True, help="Ablation: one cluster instead of k-means clusters.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run from its last checkpoint, with its saved options; --steps and "
                   "--lr may change, any other option given must equal the saved one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_options_option
def train_cmd(store, unlearn_store, layer, layers, out, method, preset, no_importance, no_adaptive_threshold,
              no_clustering, resume, overwrite, quiet, **overrides):
    """Train the FeatureForget SAE (or the baseline SAE) from a store, without loading the LLM.
    Writes config.json, sae.safetensors, features.safetensors, clusters.json, metrics.jsonl,
    eval.json (held-out FVU, L0, dead fraction) and checkpoints/ to the run folder. Under
    `torchrun --nproc-per-node N $(which ff) train ...` N processes share every batch
    (docs/scaling.md)."""
    from pathlib import Path

    from cache.store import open_store
    from trainer.config import TrainConfig
    from trainer.dist import is_main_process
    from trainer.errors import TrainError
    from trainer.run import resume_config
    from trainer.train import train

    ctx = click.get_current_context()
    changes = {_TRAIN_OVERRIDES[k]: v for k, v in overrides.items() if v is not None}
    cfg = TrainConfig.preset(preset).replace(method=method, no_importance=no_importance,
                                             no_adaptive_threshold=no_adaptive_threshold,
                                             no_clustering=no_clustering, **changes)
    if layer is not None and layers is not None:
        raise click.UsageError("use --layer or --layers, not both")
    if resume and overwrite:
        raise TrainError("use --resume or --overwrite, not both")
    named_preset = ctx.get_parameter_source("preset") is not click.core.ParameterSource.DEFAULT
    base = cfg if named_preset else None  # a resume checks a preset named again against the run
    todo = [layer] if layer is not None else list(layers or open_store(store).meta.layers)
    for l in todo:
        run_dir = out if len(todo) == 1 else str(Path(out) / f"layer_{l}")
        run_cfg = resume_config(run_dir, _given_train_options(ctx), base=base) if resume else cfg
        summary = train(run_cfg, store, l, run_dir, unlearn_store=unlearn_store,
                        resume=resume, overwrite=overwrite, progress=not quiet)
        if is_main_process():  # under torchrun (docs/scaling.md) rank 0 reports for all
            click.echo(format_train_summary(l, summary))


def format_train_summary(layer: int, s) -> str:
    ev = s.eval
    parts = [f"{s.out}: {s.method} layer {layer}, {s.steps} steps, d_sae {s.d_sae}, {s.seconds:.0f} s"]
    for corpus in ("retain", "unlearn"):
        m = ev.get(corpus, {})
        if m:
            parts.append(f"  held-out {corpus:<7} FVU {m.get('fvu', float('nan')):.3f}  "
                         f"L0 {m.get('l0', float('nan')):.1f}  "
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
@click.option("--seeds", default=1, type=click.IntRange(1),
              help="Training seeds per method and layer; the report adds mean and spread of the test score.")
@click.option("--quiet", is_flag=True, help="Stage lines only, no progress bars.")
def run_cmd(preset, out, model, layers, contexts, ablations, seeds, quiet):
    """Cache, train (FeatureForget and baseline, each layer), evaluate and write a report
    (report.md, report.json, figures). Finished stages are reused, so rerunning resumes."""
    from pipelines.workflow import run_all

    overrides = {k: v for k, v in {"model": model, "layers": layers, "contexts": contexts}.items() if v is not None}
    report = run_all(preset, out or f"ff-{preset}", ablations=ablations, seeds=seeds, progress=not quiet,
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
@click.option("--run", "run_dir", default=None, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--model", default=None, help="With --run: the model to splice into (default: the one named in the "
              "run). Without: a model folder to score as it is (ff bake's), against --base.")
@click.option("--base", default=None, help="Without --run: the model --model was made from, the 'before' of every "
              "score. Default: the one its featureforget_bake.json names.")
@click.option("--preset", default="full", type=click.Choice(["full", "demo"]),
              help="full: 100 questions per file and the whole sweep; demo: a small sweep for CPUs.")
@click.option("--forget-mcq", default=None, help="Unlearn-domain questions: 'demo', a JSONL file "
              "({question, choices, answer} per line) or a dataset like cais/wmdp:wmdp-bio@test.")
@click.option("--retain-mcq", default=None, help="Retain-domain questions: 'demo', JSONL, or e.g. cais/mmlu:all@test.")
@click.option("--forget-text", default=None, help="Held-out unlearn-domain text (corpus spec; 'demo').")
@click.option("--retain-text", default=None, help="Held-out retain-domain text (corpus spec; 'demo').")
@click.option("--ood/--no-ood", default=True, help="Also evaluate the out-of-distribution sets (bundled textbook "
              "biology / general questions and prose, or --ood-forget-mcq etc.).")
@click.option("--ood-forget-mcq", default=None,
              help="Out-of-distribution forget questions ('demo-ood', JSONL, dataset).")
@click.option("--ood-retain-mcq", default=None, help="Out-of-distribution retain questions.")
@click.option("--ood-forget-text", default=None, help="Out-of-distribution held-out forget text (corpus spec).")
@click.option("--ood-retain-text", default=None, help="Out-of-distribution held-out retain text (corpus spec).")
@click.option("--max-questions", default=None, type=click.IntRange(2),
              help="A seeded random sample of N questions per MCQ file (split into dev and test halves). [all]")
@click.option("--sample-seed", default=None, type=click.IntRange(0), help="Seed of the question sample and split. [0]")
@click.option("--max-text-tokens", default=None, type=click.IntRange(2), help="Held-out text tokens per file. [preset]")
@click.option("--multipliers", default=None, metavar="M1,M2,...",
              help="Clamp strengths m to sweep, in units of each feature's mean firing value (every gate, "
              "unless --probe-multipliers is given). [preset]")
@click.option("--probe-multipliers", default=None, metavar="M1,M2,...",
              help="Clamp strengths for the probe gate only (it stays shut on retain prompts, so it can "
              "clamp harder). [preset; demo: 100,1000]")
@click.option("--top-n", default=None, metavar="N1,N2,...|all",
              help="Feature counts to sweep ('all' = every candidate). [preset]")
@click.option("--selections", default=None, metavar="S1,S2,...",
              help="Selection rules to sweep: candidates (FeatureForget runs), saebench, ratio. [preset]")
@click.option("--gate", default=None, metavar="G1,G2,...|all",
              help="Gates to sweep, each with its own best setting: none (static clamp), sequence (share "
              "of tokens on which a selected feature fires), probe (the run's topic detector on the residual "
              "stream); "
              "'both' = none,sequence; 'all' = all three. [all]")
@click.option("--gate-percentile", default=None, type=click.FloatRange(0, 100),
              help="The sequence gate's threshold: this percentile of retain contexts' firing share. [95]")
@click.option("--probe-percentiles", default=None, metavar="P1,P2,...",
              help="Percentiles of the retain calibration prompts' detector scores tried for the probe gate. "
              "[preset; full: 99,100; demo: 99]")
@click.option("--gate-window", default=None, metavar="N|none",
              help="The probe gate averages its detector's scores over the last N tokens instead of every token "
              "since the start: it follows the topic of what is read now (a question after a long general "
              "preamble, a general question after a biology passage). [none]")
@click.option("--max-retain-ce-rise", default=None, type=click.FloatRange(0),
              help="A retain-safe setting raises held-out retain CE by at most this fraction (out of "
              "distribution: twice it). [0.01]")
@click.option("--mcq-template", default=None, metavar="TEXT",
              help="The questions' prompt, with {question} where the question goes (\\n for a newline); each "
              "choice is scored as ' ' + choice after it. Use the format your model will serve, so that the "
              "probe gate is calibrated on it. ['Question: {question}\\nAnswer:']")
@click.option("--gate-calibration", default=None, type=click.Choice(["dev", "train"]),
              help="Probe gate threshold from the retain dev questions (dev) or the retain training contexts. [dev]")
@click.option("--formats", default=None, metavar="F1,F2,...|all",
              help="Prompt formats every question set is scored in: plain, instruct (instruction header), kshot2 / "
              "kshot5 (general few-shot examples), preamble (a general paragraph), dialogue (a general first turn), "
              "after_bio (a biology paragraph first). A setting must be retain-safe in every format; its score is "
              "the minimum over them. [preset; full: plain; demo: all]")
@click.option("--format-questions", default=None, type=click.IntRange(2),
              help="Questions per set in each format other than plain (half dev, half test). [preset; demo: 24]")
@click.option("--kv-cache-gib", default=None, type=click.FloatRange(0),
              help="Memory the clean pass may keep for the attention keys and values above the edited layer, "
              "so that each setting reruns a changed row only from its first edited position; 0, or sets that "
              "need more, rerun whole rows (same scores, slower). [8]")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--save", is_flag=True,
              help="Also write the result to RUN/unlearning.json (replaced only once complete): ff generate and "
              "the Python API apply its chosen setting by default.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def eval_cmd(run_dir, model, base, preset, forget_mcq, retain_mcq, forget_text, retain_text, ood, ood_forget_mcq,
             ood_retain_mcq, ood_forget_text, ood_retain_text, max_questions, sample_seed, max_text_tokens,
             multipliers, probe_multipliers, top_n, selections, gate, gate_percentile, probe_percentiles,
             gate_window, max_retain_ce_rise, mcq_template, gate_calibration, formats,
             format_questions, kv_cache_gib, device, as_json, save, quiet):
    """Splice the run's SAE into the model and measure unlearning: CE losses (clean, SAE spliced,
    zero ablation, loss recovered), then a sweep of selections, feature counts, clamp strengths
    and gates. Each setting is chosen on the dev half of the questions (highest unlearning score
    1 - acc_after/acc_before among settings keeping retain accuracy >= 0.99 of clean) and
    reported on the test half with a 95% bootstrap interval; in and out of distribution.

    With --model FOLDER and no --run: the folder's model as it is (e.g. made by ff bake) against its
    base model, on the same question sets, prompt formats, halves, CE and fluency."""
    from pipelines.config import EvalConfig
    from pipelines.errors import EvalError
    from pipelines.evaluate import evaluate_run, save_result

    cfg = EvalConfig.preset(preset)
    files = {"forget_mcq": forget_mcq, "retain_mcq": retain_mcq, "forget_text": forget_text,
             "retain_text": retain_text, "max_questions": max_questions, "max_text_tokens": max_text_tokens,
             "sample_seed": sample_seed, "ood_forget_mcq": ood_forget_mcq, "ood_retain_mcq": ood_retain_mcq,
             "ood_forget_text": ood_forget_text, "ood_retain_text": ood_retain_text}
    cfg = cfg.replace(**{k: v for k, v in files.items() if v is not None})
    if not ood:
        cfg = cfg.replace(ood_forget_mcq=None, ood_retain_mcq=None, ood_forget_text=None, ood_retain_text=None)
    if mcq_template is not None:
        cfg = cfg.replace(mcq_template=parse_template(mcq_template))
    if formats is not None:
        from pipelines.formats import parse_formats

        cfg = cfg.replace(formats=parse_formats(formats))
    if format_questions is not None:
        cfg = cfg.replace(format_questions=format_questions)
    if kv_cache_gib is not None:
        cfg = cfg.replace(kv_cache_gib=kv_cache_gib)
    grid = {}
    try:
        if multipliers:
            grid["multipliers"] = tuple(float(m) for m in multipliers.split(","))
            grid["probe_multipliers"] = None
        if probe_multipliers:
            grid["probe_multipliers"] = tuple(float(m) for m in probe_multipliers.split(","))
        if top_n:
            grid["top_n"] = tuple(None if n.strip() == "all" else int(n) for n in top_n.split(","))
    except ValueError as e:
        raise EvalError(f"--multipliers, --probe-multipliers and --top-n take comma-separated numbers: {e}") from None
    if selections:
        grid["selections"] = tuple(x.strip() for x in selections.split(",") if x.strip())
    if gate:
        from pipelines.config import GATES

        gates = {"both": ("none", "sequence"), "all": GATES}.get(gate) or tuple(
            g.strip() for g in gate.split(",") if g.strip())
        bad = [g for g in gates if g not in GATES]
        if bad or not gates:
            raise EvalError(f"--gate: unknown gate '{','.join(bad) or gate}': use {', '.join(GATES)}, both or all")
        grid["gates"] = gates
    if gate_percentile is not None:
        grid["gate_percentile"] = gate_percentile
    if probe_percentiles:
        try:
            grid["probe_percentiles"] = tuple(float(p) for p in probe_percentiles.split(","))
        except ValueError as e:
            raise EvalError(f"--probe-percentiles takes comma-separated numbers: {e}") from None
        if not all(0 <= p <= 100 for p in grid["probe_percentiles"]):
            raise EvalError("--probe-percentiles must lie within [0, 100]")
    if gate_window is not None:
        grid["gate_window"] = parse_window(gate_window, "--gate-window")
    if gate_calibration:
        cfg = cfg.replace(gate_calibration=gate_calibration)
    if max_retain_ce_rise is not None:
        cfg = cfg.replace(max_retain_ce_rise=max_retain_ce_rise)  # the OOD bound follows (EvalConfig.replace)
    if grid:
        from dataclasses import replace

        cfg = cfg.replace(grid=replace(cfg.grid, **grid))
    if run_dir is None:
        return _eval_model(model, base, cfg, device, as_json, save, quiet)
    if base is not None:
        raise EvalError("--base goes with --model FOLDER and no --run (the run names its own model)")
    lm = _load_for_run(run_dir, model, device)
    res = evaluate_run(run_dir, lm, cfg, progress=not quiet)
    if save:
        path = save_result(run_dir, res)
        if not quiet:
            click.echo(f"saved: {path}", err=True)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(format_eval(res))


def _eval_model(model, base, cfg, device, as_json, save, quiet) -> None:
    """`ff eval --model FOLDER`: the folder's model as it is against its base (pipelines/artifact.py)."""
    from cache.models import load_model
    from pipelines.artifact import base_of, check_plain, evaluate_model
    from pipelines.errors import EvalError

    if model is None:
        raise EvalError("pass --run RUN (a run's edit) or --model FOLDER (a model folder as it is, e.g. ff bake's)")
    if save:
        raise EvalError("--save writes RUN/unlearning.json; for a model folder use --json > FILE")
    check_plain(model)
    base = base or base_of(model)
    if base is None:
        raise EvalError(f"{model} names no base model (no featureforget_bake.json): pass --base MODEL")
    res = evaluate_model(load_model(base, device=device), load_model(model, device=device), cfg, progress=not quiet)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(format_model_eval(res))


def format_model_eval(res: dict) -> str:
    """The human summary of `ff eval --model`: test scores per side and format, CE and fluency."""
    from pipelines.evaluate import maybe_num as _maybe

    b = res["best"]
    lines = [f"{res['model']} against {res['base']}:"]
    for side, p in (("in distribution", b), ("out of distribution", b.get("ood"))):
        if not p or "test" not in p:
            continue
        t, ci = p["test"], p["test"].get("ci95") or [float("nan")] * 2
        ce = "; ".join(f"{k.replace('_loss', '')} CE {p[k]['before']:.3f} -> {p[k]['after']:.3f}"
                       for k in ("forget_loss", "retain_loss") if k in p)
        lines.append(f"{side}: test score {_maybe(t['unlearning_score'])} [{ci[0]:.3f}, {ci[1]:.3f}]; forget MCQ "
                     f"{t['forget_mcq']['before']:.3f} -> {t['forget_mcq']['after']:.3f}, retain MCQ "
                     f"{t['retain_mcq']['before']:.3f} -> {t['retain_mcq']['after']:.3f}" + (f"; {ce}" if ce else ""))
        lines += format_lines(p)
    for name, f in (b.get("fluency") or {}).items():
        lines.append(f"fluency {name}: clean-model NLL {f['nll']:.2f} (its own {f['nll_clean']:.2f}), distinct "
                     f"bigrams {f['distinct']:.2f}, changed {f['changed']:.2f}")
    return "\n".join(lines)


def format_eval(res: dict) -> str:
    """The human summary of `ff eval`: SAE quality, then the best setting per gate (with the
    higher-scoring settings a retain bound held back) and OOD."""
    from pipelines.evaluate import maybe_num as _maybe
    from pipelines.report import held_back

    lines = [f"{res['method']} layer {res['layer']}: SAE fvu {res['sae']['fvu']:.3f}, L0 {res['sae']['l0']:.1f}, "
             f"loss recovered {_maybe(res['sae']['loss_recovered'])}"]

    def one(name: str, b: dict | None, reason: str | None, part: str = "") -> str:
        if b is None:
            return f"{name}: {reason}"
        p = b[part] if part else b
        t, ci = p["test"], p["test"].get("ci95") or [float("nan")] * 2
        return (f"{name}: {b['label']} -> test score {t['unlearning_score']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                f"(dev {p['dev']['unlearning_score']:.3f}); forget MCQ {t['forget_mcq']['before']:.3f} -> "
                f"{t['forget_mcq']['after']:.3f}, retain MCQ {t['retain_mcq']['before']:.3f} -> "
                f"{t['retain_mcq']['after']:.3f}")

    for gate, g in res.get("best_by_gate", {}).items():
        lines.append(one(f"best, gate {gate}", g["best"], g["reason"]))
        lines += format_lines(g["best"])
        lines += [f"  held back: {label} (dev {score:.3f}): {why}" for score, label, why in held_back(res, gate)]
    if res.get("best_ood") is not None or res.get("best_ood_reason") != "no out-of-distribution sets configured":
        lines.append(one("best out of distribution", res.get("best_ood"), res.get("best_ood_reason"), "ood"))
        lines += format_lines((res.get("best_ood") or {}).get("ood"))
    return "\n".join(lines)


def format_lines(part: dict | None) -> list[str]:
    """Per prompt format, the chosen setting's test score and retain accuracy (ff eval --formats)."""
    from pipelines.evaluate import maybe_num as _maybe

    if not part or not part.get("formats"):
        return []
    out = []
    for fmt, p in part["formats"].items():
        t, ci = p["test"], p["test"].get("ci95") or [float("nan")] * 2
        out.append(f"  format {fmt}: test score {_maybe(t['unlearning_score'])} [{ci[0]:.3f}, {ci[1]:.3f}], "
                   f"retain MCQ {t['retain_mcq']['before']:.3f} -> {t['retain_mcq']['after']:.3f}")
    m = part.get("formats_min") or {}
    out.append(f"  minimum over formats: test {_maybe(m.get('test'))} (dev {_maybe(m.get('dev'))})")
    return out


@main.command("generate")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--prompt", "prompts", multiple=True, help="Text to continue; give it several times for several prompts.")
@click.option("--prompts-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text file of prompts, one per line (blank lines skipped), after any --prompt.")
@click.option("--max-new-tokens", default=40, type=click.IntRange(1), help="Tokens to generate (greedy).")
@click.option("--mode", default=None, type=click.Choice(["clamp", "ablate"]), help="Intervention. [clamp]")
@click.option("--multiplier", default=None, type=click.FloatRange(0, min_open=True),
              help="Clamp strength m, in units of each feature's mean firing value.")
@click.option("--top-n", default=None, type=click.IntRange(1), help="Use only the top n features.")
@click.option("--selection", default=None, type=click.Choice(["candidates", "saebench", "ratio"]),
              help="Feature selection rule.")
@click.option("--gate", default=None, type=click.Choice(["none", "sequence", "probe"]),
              help="Static clamp, the sequence gate, or the probe gate (the run's topic detector on the "
                   "residual stream).")
@click.option("--gate-percentile", default=None, type=click.FloatRange(0, 100),
              help="The gate's retain percentile (another than the chosen setting's takes its threshold "
              "from the run's retain training contexts).")
@click.option("--gate-threshold", default=None, type=float,
              help="An explicit gate threshold (firing share, or probe score); overrides the percentile.")
@click.option("--gate-window", default=None, metavar="N|none",
              help="The gate averages its signal over the last N tokens (none: every token since the start); the "
              "threshold stays the chosen setting's.")
@click.option("--model", default=None, help="Model. Default: the one named in the run.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
def generate_cmd(run_dir, prompts, prompts_file, max_new_tokens, mode, multiplier, top_n, selection, gate,
                 gate_percentile, gate_threshold, gate_window, model, device):
    """Print the model's greedy continuation of each prompt without and with the unlearning
    intervention. The setting defaults to the best one `ff eval` / `ff run` found for the run
    (RUN/unlearning.json), else a gated clamp; the options override single fields."""
    from pathlib import Path

    from pipelines.errors import EvalError
    from pipelines.generate import generate_pair
    from pipelines.intervene import run_setting

    prompts = list(prompts)
    if prompts_file is not None:
        try:
            prompts += [line for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"cannot read --prompts-file '{prompts_file}': {e}") from None
    if not prompts:
        raise EvalError("give a prompt to continue: --prompt TEXT (several times for several) or --prompts-file FILE")
    setting = run_setting(run_dir)  # an unreadable RUN/unlearning.json or a bad option fails before the model loads
    changes = {k: v for k, v in {"mode": mode, "multiplier": multiplier, "top_n": top_n, "selection": selection,
                                  "gate": gate, "gate_percentile": gate_percentile,
                                  "gate_threshold": gate_threshold}.items() if v is not None}
    if gate_window is not None:
        changes["gate_window"] = parse_window(gate_window, "--gate-window")
    setting = setting.changed(**changes)  # a new gate or percentile drops the chosen threshold
    lm = _load_for_run(run_dir, model, device)
    click.echo(f"setting:   {setting.label}")
    for i, prompt in enumerate(prompts):
        pair = generate_pair(lm, run_dir, prompt, max_new_tokens, setting)
        click.echo(("\n" if i else "") + f"clean:     {prompt}{pair.clean}")
        click.echo(f"unlearned: {prompt}{pair.unlearned}")


@main.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--format", "fmt", default="saelens", type=click.Choice(["saelens", "hf"]),
              help="saelens: the SAE in SAELens's format. hf: a Hugging Face model folder with the run's chosen "
              "setting (RUN/unlearning.json) inside the forward pass; loads with AutoModelForCausalLM."
              "from_pretrained(OUT, trust_remote_code=True), no ff needed. [saelens]")
@click.option("--model", default=None, help="hf: the model the run was trained on. Default: the one named in the run.")
@click.option("--device", default="cpu", help="hf: where to load the model to write it (auto, cpu or cuda). [cpu]")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.argument("out", type=click.Path())
def export_cmd(run_dir, fmt, model, device, overwrite, out):
    """Write the run's SAE to OUT in SAELens's on-disk format (cfg.json + sae_weights.safetensors,
    the normalisation scale folded in so it takes raw activations), or (--format hf) a model folder
    that has unlearned: the model's weights, the edit and a model card."""
    if fmt == "saelens":
        from pipelines.export import export_saelens

        res = export_saelens(run_dir, out, overwrite=overwrite)
        click.echo(f"wrote {res.out_dir} ({fmt})")
        return
    from pathlib import Path

    from pipelines.export import check_out, export_hf, verify_hf
    from pipelines.intervene import chosen_setting

    setting = chosen_setting(run_dir)  # a run without one, or a full OUT, fails before the model loads
    check_out(Path(out), overwrite)
    lm = _load_for_run(run_dir, model, device)
    folder = export_hf(run_dir, out, lm, setting, overwrite=overwrite)
    err = verify_hf(folder, lm, run_dir, setting)
    click.echo(f"wrote {folder} (hf: {setting.label}); loaded back, its logits match the hooked edit "
               f"(max |diff| {err:.2e})")


@main.command("bake")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`, "
              "evaluated (its RUN/unlearning.json names the chosen setting).")
@click.option("--out", required=True, type=click.Path(), help="Model folder to write (a standard Hugging Face folder).")
@click.option("--store", default=None, help="Store whose retain and unlearn text the update trains on. "
              "Default: the run's.")
@click.option("--target", default="corpus", type=click.Choice(["corpus", "gated"]),
              help="corpus: the edit on all unlearn text, nothing on retain text; gated: reproduce the chosen "
              "setting with its gate.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1), help="Optimizer steps.")
@click.option("--batch-contexts", default=4, show_default=True, type=click.IntRange(1),
              help="Contexts per corpus per step.")
@click.option("--lr", default=None, type=click.FloatRange(0, min_open=True), help="Learning rate. [1e-3]")
@click.option("--rank", default=32, show_default=True, type=click.IntRange(1), help="LoRA rank.")
@click.option("--multiplier", default=100.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Clamp strength of the edit baked in, in units of each feature's mean firing value (the "
              "chosen setting's other fields are kept).")
@click.option("--forget-weight", default=0.25, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Weight of the unlearn text's error against the retain text's.")
@click.option("--model", default=None, help="The model the run was trained on. Default: the one named in the run.")
@click.option("--device", default="cpu", help="auto, cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT and start over instead of resuming.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def bake_cmd(run_dir, out, store, target, steps, batch_contexts, lr, rank, multiplier, forget_weight, model, device,
             overwrite, quiet):
    """Write the run's chosen edit into the weights: a low-rank update (peft LoRA) of the blocks up to
    the edited layer, trained so their output is the edited residual, merged and saved as a standard
    folder that `AutoModelForCausalLM.from_pretrained(OUT)` loads without ff or custom code. An
    interrupted bake resumes when the same command is run again."""
    import dataclasses
    from pathlib import Path

    from pipelines.bake import BakeConfig, bake, check_bake_out
    from pipelines.intervene import chosen_setting

    setting = chosen_setting(run_dir)  # a run without one, or a full OUT, fails before the model loads
    check_bake_out(Path(out), overwrite)
    cfg = BakeConfig(steps=steps, batch_contexts=batch_contexts, rank=rank, target=target, multiplier=multiplier,
                     forget_weight=forget_weight)
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    lm = _load_for_run(run_dir, model, device)
    res = bake(run_dir, out, lm, cfg, store=store, setting=setting, overwrite=overwrite, progress=not quiet)
    loss = res.loss
    resumed = f", resumed at step {res.resumed_from}" if res.resumed_from else ""
    click.echo(f"wrote {res.out_dir} ({res.steps} steps{resumed}, {res.seconds:.0f} s); held-out error to the "
               f"edit: retain {loss['retain_before']:.3f} -> {loss['retain_after']:.3f}, unlearn "
               f"{loss['unlearn_before']:.3f} -> {loss['unlearn_after']:.3f} (units of the edit's size)")


if __name__ == "__main__":  # pragma: no cover
    main()
