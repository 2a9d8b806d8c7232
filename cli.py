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
from pathlib import Path

import click

from cache.config import CacheConfig
from cache.options import apply_sets, field_option, parse_option, parse_sets, parse_value, set_option
from pipelines.config import PRESETS as EVAL_PRESETS
from pipelines.config import BakeConfig, EvalConfig, RunOptions, Setting
from pipelines.result import Entry, EvalResult, MinScores, ModelEvalResult, Part
from trainer.config import PRESETS as TRAIN_PRESETS
from trainer.config import TrainConfig


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


class FFCommand(click.Command):
    """A command whose help ends with the options of `ff` itself, which it accepts too."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from cache.options import set_listing

        super().format_epilog(ctx, formatter)
        if (sets := getattr(self.callback, "ff_sets", None)) is not None:
            cls, exclude, presets = sets
            formatter.write_paragraph()
            for line in set_listing(cls, presets=presets, exclude=exclude):
                formatter.write(line + "\n")
        formatter.write_paragraph()
        formatter.write_text("Also takes the options of ff itself, before or after the command: -q/--quiet, "
                             "--json, --device, --storage-options (ff --help).")


class FFGroup(click.Group):
    """Turns errors a user can cause into one readable line and exit status 2; takes the global
    options after the command's name too."""

    command_class = FFCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, hoist_global_options(args))
        except _user_errors() as e:  # a global option's value (--storage-options)
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

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


GLOBAL_OPTIONS = {"-q": 0, "--quiet": 0, "--json": 0, "--device": 1, "--storage-options": 1}
"""Options of `ff` itself, with the number of values each takes: accepted before or after the
command's name (`ff cache ... --quiet`), declared once."""


def hoist_global_options(args: list[str]) -> list[str]:
    """Move the global options found after the command's name in front of it (up to a "--")."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name, eq, _ = arg.partition("=")
        if name in GLOBAL_OPTIONS:
            n = 1 + (0 if eq else GLOBAL_OPTIONS[name])
            front += args[i:i + n]
            i += n
            continue
        rest.append(arg)
        i += 1
    return front + rest


def global_option(name: str):
    """The value of an option of `ff` itself (GLOBAL_OPTIONS) in the running command."""
    return click.get_current_context().find_root().params.get(name)


def _storage_options_cb(_ctx, _param, value):
    """--storage-options: parsed and handed to cache.location for every remote store this
    process opens; kept in memory only, never written or echoed."""
    from cache.location import parse_storage_options, use_storage_options

    options = parse_storage_options(value)
    use_storage_options(options)
    return options


STORE_HELP = "a folder or an fsspec URL (s3://bucket/x.zarr, gs://..., memory://...)"


@click.group(cls=FFGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="featureforget", prog_name="ff")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or progress lines.")
@click.option("--json", "json_out", is_flag=True, help="ff inspect, ff verify, ff eval: print one JSON object.")
@click.option("--device", default=None, metavar="DEVICE",
              help="Where the model (ff train: the SAE) runs: auto, cpu or cuda. Default: auto; ff export and "
                   "ff bake: cpu; ff train: its preset's.")
@click.option("--storage-options", default=None, metavar="JSON", envvar="FF_STORAGE_OPTIONS",
              expose_value=False, callback=_storage_options_cb,
              help="fsspec options for remote stores, a JSON object such as '{\"endpoint_url\": "
                   "\"http://127.0.0.1:9000\"}' (also FF_STORAGE_OPTIONS). Default: the filesystem's "
                   "standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Never written "
                   "to a store, a run folder or a log.")
def main(quiet, json_out, device) -> None:
    """FeatureForget: make a language model forget a body of knowledge with a dual-objective
    sparse autoencoder, trained offline from cached activations.

    Every command's options are fields of its stage's configuration (docs/architecture.md): the
    common ones are options, the others `--set FIELD=VALUE`, listed in each command's help."""
    from cache.runtime import keep_freed_memory

    keep_freed_memory()


def _quiet() -> bool:
    return bool(global_option("quiet"))


def _json() -> bool:
    return bool(global_option("json_out"))


def _device(default: str = "auto") -> str:
    return global_option("device") or default


CACHE_OPTIONS = ("model", "layers", "retain", "unlearn", "contexts")
"""CacheConfig fields `ff cache` shows as options; the others are `--set` fields (device: ff --device)."""


def config_options(cls, names, presets=None):
    """Field options of `cls` for `names` (cache.options), in order."""

    def deco(command):
        for name in reversed(names):
            command = field_option(cls, name, presets=presets)(command)
        return command

    return deco


@main.command("cache")
@click.option("--out", "out", default=None, metavar="STORE",
              help=f"Store to write, {STORE_HELP}. Default: stores/<model>.zarr")
@config_options(CacheConfig, CACHE_OPTIONS)
@set_option(CacheConfig, exclude=(*CACHE_OPTIONS, "device"))
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
def cache_cmd(out, sets, overwrite, repair, shard, finalize, **fields):
    """Run the model once over the retain and unlearn corpora and write the activations of the
    chosen layers to a Zarr store. Interrupted runs resume when rerun with the same arguments;
    rerunning on a complete store does nothing; --repair recomputes damaged chunks; --shard I/N
    (or torchrun) splits the work over processes writing one store (docs/scaling.md)."""
    from cache.build import build_cache
    from cache.location import public
    from cache.shard import Shard, shard_device, shard_from_env

    given = {k: parse_option(CacheConfig, k, v) for k, v in fields.items()}
    cfg = CacheConfig(**{k: v for k, v in given.items() if v is not None},
                      device=shard_device(_device()))  # cuda:LOCAL_RANK under torchrun
    cfg = apply_sets(cfg, parse_sets(CacheConfig, sets, exclude=(*CACHE_OPTIONS, "device")))
    out = out or default_store_path(cfg.model)
    if finalize:
        return _finalize(out, shard, overwrite, repair)
    part = Shard.parse(shard) if shard is not None else shard_from_env()
    part = part if part is None or part.count > 1 else None  # 0/1: the whole store
    res = build_cache(cfg, out, overwrite=overwrite, repair=repair, progress=not _quiet(), shard=part)
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
def inspect_cmd(store):
    """Describe an activation store (a folder or an fsspec URL): model, layers, corpora, size,
    compression, completeness."""
    from cache.inspect import describe, format_description

    info = describe(store)
    click.echo(json.dumps(info, indent=2) if _json() else format_description(info))


@main.command("verify")
@click.argument("path", metavar="STORE|RUN", type=click.Path())
def verify_cmd(path):
    """Check a store, a folder or an fsspec URL (read every chunk: present, checksum, finite,
    tokens in range, metadata), or a run folder (files, shapes, checkpoint, the store's model).
    Exit 0: healthy; 1: problems found, each named; 2: not a store or run folder."""
    from trainer.verify import verify

    report = verify(path)
    click.echo(json.dumps(report.to_dict(), indent=2) if _json() else report.format())
    sys.exit(0 if report.ok else 1)


@main.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--dst-storage-options", default=None, metavar="JSON",
              help="fsspec options for DST when they differ from --storage-options (a JSON object).")
@click.option("--overwrite", is_flag=True, help="Replace whatever DST holds (another store, other files).")
def copy_cmd(src, dst, dst_storage_options, overwrite):
    """Copy the complete store SRC to DST, each a folder or an fsspec URL (s3://, gs://, ...):
    the raw chunk bytes, each chunk decoded on the way (checksums), DST marked complete last.
    Rerunning an interrupted copy resumes: chunks already at DST with equal bytes are skipped."""
    from cache.copy import copy_store
    from cache.location import parse_storage_options

    dst_options = parse_storage_options(dst_storage_options) if dst_storage_options else None
    res = copy_store(src, dst, dst_options=dst_options, overwrite=overwrite, progress=not _quiet())
    click.echo(f"{res.dst}: copied {res.copied} of {res.chunks} chunks ({res.bytes_copied / 2**20:.1f} MiB), "
               f"{res.skipped} already there, from {res.src} in {res.seconds:.1f} s")


TRAIN_SET_EXCLUDE = ("device",)
"""TrainConfig fields `ff train --set` does not take: the SAE's device is `ff --device`."""


@main.command("train")
@click.option("--store", required=True, type=click.Path(),
              help=f"Activation store made by `ff cache`, {STORE_HELP}.")
@click.option("--unlearn-store", default=None, type=click.Path(),
              help="Take the unlearn corpus from this store (folder or URL) instead (same model and d_model).")
@click.option("--layer", "--layers", "layers", default=None, metavar="L|L1,L2,...",
              help="The store's layer to train; several: each into OUT/layer_<L>. Default: every layer of the store.")
@click.option("--out", required=True, type=click.Path(), metavar="RUN",
              help="Run folder (one layer) or parent folder of layer_<L> run folders (several layers).")
@click.option("--preset", default="paper", type=click.Choice(list(TRAIN_PRESETS)),
              help="paper: the paper's numbers (expansion 32, 32 clusters, L1 0.04, beta 0.9, lr 3e-4, warm-up "
                   "1000, batch 32x128); demo: sized for a few minutes on 2 CPU cores with the embedded model. "
                   "Both are listed with every --set field below.")
@set_option(TrainConfig, presets=TRAIN_PRESETS, exclude=TRAIN_SET_EXCLUDE)
@click.option("--resume", is_flag=True,
              help="Continue a killed run from its last checkpoint, with its saved options; steps and lr may "
                   "change (--set), any other field given must equal the saved one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
def train_cmd(store, unlearn_store, layers, out, preset, sets, resume, overwrite):
    """Train the FeatureForget SAE (or the baseline SAE: --set method=baseline) from a store,
    without loading the LLM. Writes config.json, sae.safetensors, features.safetensors,
    clusters.json, metrics.jsonl, eval.json (held-out FVU, L0, dead fraction) and checkpoints/ to
    the run folder. Under `torchrun --nproc-per-node N $(which ff) train ...` N processes share
    every batch (docs/scaling.md)."""
    from pathlib import Path

    from cache.store import open_store
    from trainer.dist import is_main_process
    from trainer.errors import TrainError
    from trainer.run import resume_config
    from trainer.train import train

    ctx = click.get_current_context()
    given = parse_sets(TrainConfig, sets, exclude=TRAIN_SET_EXCLUDE, error=TrainError)
    if global_option("device"):
        given["device"] = global_option("device")
    try:
        layer_list = None if layers is None else parse_value(tuple[int, ...], layers)
    except ValueError as e:
        raise TrainError(f"--layer {layers}: {e}") from None
    cfg = TrainConfig.preset(preset).replace(**given)
    if resume and overwrite:
        raise TrainError("use --resume or --overwrite, not both")
    named_preset = ctx.get_parameter_source("preset") is not click.core.ParameterSource.DEFAULT
    base = cfg if named_preset else None  # a resume checks a preset named again against the run
    todo = list(layer_list or open_store(store).meta.layers)
    for l in todo:
        run_dir = out if len(todo) == 1 else str(Path(out) / f"layer_{l}")
        run_cfg = resume_config(run_dir, given, base=base) if resume else cfg
        summary = train(run_cfg, store, l, run_dir, unlearn_store=unlearn_store,
                        resume=resume, overwrite=overwrite, progress=not _quiet())
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


RUN_OPTIONS = ("seeds",)
"""RunOptions fields `ff run` shows as options; the others are `--set` fields."""


@main.command("run")
@click.option("--preset", default="demo", type=click.Choice(["demo", "paper"]),
              help="demo: embedded Gemma 3 270M, bundled corpora, about 15 min on 2 CPU cores. "
                   "paper: Gemma-2-2B, layers 5/12/19, Pile-uncopyrighted vs WMDP-bio (needs a GPU and "
                   "Hugging Face access to the gated model and corpus).")
@click.option("--out", default=None, type=click.Path(), help="Output folder. Default: ff-<preset>")
@config_options(RunOptions, RUN_OPTIONS)
@set_option(RunOptions, exclude=RUN_OPTIONS)
def run_cmd(preset, out, sets, **fields):
    """Cache, train (FeatureForget and baseline, each layer), evaluate and write a report
    (report.md, report.json, figures). Finished stages are reused, so rerunning resumes."""
    from pipelines.workflow import run_all

    given = {k: parse_option(RunOptions, k, v) for k, v in fields.items() if v is not None}
    opts = apply_sets(RunOptions(**given), parse_sets(RunOptions, sets, exclude=RUN_OPTIONS))
    report = run_all(preset, out or f"ff-{preset}", ablations=opts.ablations, seeds=opts.seeds,
                     progress=not _quiet(), cache_overrides=opts.cache_overrides(),
                     log=lambda m: click.echo(m, err=True))
    click.echo(f"report: {report / 'report.md'}")


def _load_for_run(run: str, model: str | None, device: str):
    """The model named in RUN/config.json (or --model), loaded once."""
    from cache.errors import FFError
    from cache.models import load_model
    from trainer.run import RunFolder

    folder = RunFolder(run)
    if not folder.is_run():
        raise FFError(f"'{run}' is not a run folder (no {folder.config.name}); create one with `ff train`")
    spec = model or folder.run_config().model
    if spec is None:
        raise FFError(f"'{run}' names no model (trained from Python streams): pass --model")
    return load_model(spec, device=device)


EVAL_OPTIONS = ("forget_mcq", "retain_mcq", "formats")
"""EvalConfig fields `ff eval` shows as options; the others (the sweep's grid included) are `--set` fields."""
OOD_FIELDS = ("ood_forget_mcq", "ood_retain_mcq", "ood_forget_text", "ood_retain_text")


@main.command("eval")
@click.option("--run", "run_dir", default=None, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--model", default=None, help="With --run: the model to splice into (default: the one named in the "
              "run). Without: a model folder to score as it is (ff bake's), against --base.")
@click.option("--base", default=None, help="Without --run: the model --model was made from, the 'before' of every "
              "score. Default: the one its featureforget_bake.json names.")
@click.option("--preset", default="full", type=click.Choice(list(EVAL_PRESETS)),
              help="full: every question and the whole sweep; demo: a small sweep for CPUs. Both are listed "
                   "with every --set field below.")
@config_options(EvalConfig, EVAL_OPTIONS, presets=EVAL_PRESETS)
@click.option("--ood/--no-ood", default=True, help="Also evaluate the out-of-distribution sets (bundled textbook "
              "biology / general questions and prose, or the ood_* fields).")
@set_option(EvalConfig, presets=EVAL_PRESETS, exclude=EVAL_OPTIONS)
@click.option("--save", is_flag=True,
              help="Also write the result to RUN/unlearning.json (replaced only once complete): ff generate and "
              "the Python API apply its chosen setting by default.")
def eval_cmd(run_dir, model, base, preset, ood, sets, save, **fields):
    """Splice the run's SAE into the model and measure unlearning: CE losses (clean, SAE spliced,
    zero ablation, loss recovered), then a sweep of selections, feature counts, clamp strengths
    and gates. Each setting is chosen on the dev half of the questions (highest unlearning score
    1 - acc_after/acc_before among settings keeping retain accuracy >= 0.99 of clean) and
    reported on the test half with a 95% bootstrap interval; in and out of distribution.

    With --model FOLDER and no --run: the folder's model as it is (e.g. made by ff bake) against its
    base model, on the same question sets, prompt formats, halves, CE and fluency."""
    from pipelines.errors import EvalError
    from pipelines.evaluate import evaluate_run, save_result

    given = {k: parse_option(EvalConfig, k, v, error=EvalError) for k, v in fields.items() if v is not None}
    cfg = EvalConfig.preset(preset).replace(**given)
    if not ood:
        cfg = cfg.replace(**dict.fromkeys(OOD_FIELDS))
    cfg = apply_sets(cfg, parse_sets(EvalConfig, sets, exclude=EVAL_OPTIONS, error=EvalError))
    if run_dir is None:
        return _eval_model(model, base, cfg, save)
    if base is not None:
        raise EvalError("--base goes with --model FOLDER and no --run (the run names its own model)")
    lm = _load_for_run(run_dir, model, _device())
    res = evaluate_run(run_dir, lm, cfg, progress=not _quiet())
    if save:
        path = save_result(run_dir, res)
        if not _quiet():
            click.echo(f"saved: {path}", err=True)
    click.echo(json.dumps(res.to_dict(), indent=2) if _json() else format_eval(res))


def _eval_model(model, base, cfg, save) -> None:
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
    if base is None and not Path(model).exists():
        raise EvalError(f"no model folder {model} here (a model from the hub needs --base MODEL)")
    if base is None:
        raise EvalError(f"{model} names no base model (no featureforget_bake.json): pass --base MODEL")
    device = _device()
    res = evaluate_model(load_model(base, device=device), load_model(model, device=device), cfg, progress=not _quiet())
    click.echo(json.dumps(res.to_dict(), indent=2) if _json() else format_model_eval(res))


def format_model_eval(res: ModelEvalResult) -> str:
    """The human summary of `ff eval --model`: test scores per side and format, CE and fluency."""
    from pipelines.evaluate import maybe_num as _maybe

    b = res.best
    lines = [f"{res.model} against {res.base}:"]
    for side, p in (("in distribution", b), ("out of distribution", b.ood)):
        if not p or p.test is None:
            continue
        t, ci = p.test, p.test.ci95 or [float("nan")] * 2
        ce = "; ".join(f"{name} CE {x.before:.3f} -> {x.after:.3f}"
                       for name, x in (("forget", p.forget_loss), ("retain", p.retain_loss)) if x is not None)
        lines.append(f"{side}: test score {_maybe(t.unlearning_score)} [{ci[0]:.3f}, {ci[1]:.3f}]; forget MCQ "
                     f"{t.forget_mcq.before:.3f} -> {t.forget_mcq.after:.3f}, retain MCQ "
                     f"{t.retain_mcq.before:.3f} -> {t.retain_mcq.after:.3f}" + (f"; {ce}" if ce else ""))
        lines += format_lines(p)
    for name, f in (b.fluency or {}).items():
        lines.append(f"fluency {name}: clean-model NLL {f.nll:.2f} (its own {f.nll_clean:.2f}), distinct "
                     f"bigrams {f.distinct:.2f}, changed {f.changed:.2f}")
    return "\n".join(lines)


def format_eval(res: EvalResult) -> str:
    """The human summary of `ff eval`: SAE quality, then the best setting per gate (with the
    higher-scoring settings a retain bound held back) and OOD."""
    from pipelines.evaluate import maybe_num as _maybe
    from pipelines.report import held_back

    lines = [f"{res.method} layer {res.layer}: SAE fvu {res.sae.fvu:.3f}, L0 {res.sae.l0:.1f}, "
             f"loss recovered {_maybe(res.sae.loss_recovered)}"]

    def one(name: str, b: Entry | None, reason: str | None, ood: bool = False) -> str:
        if b is None:
            return f"{name}: {reason}"
        p = b.ood if ood else b
        t, ci = p.test, p.test.ci95 or [float("nan")] * 2
        return (f"{name}: {b.label} -> test score {t.unlearning_score:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                f"(dev {p.dev.unlearning_score:.3f}); forget MCQ {t.forget_mcq.before:.3f} -> "
                f"{t.forget_mcq.after:.3f}, retain MCQ {t.retain_mcq.before:.3f} -> "
                f"{t.retain_mcq.after:.3f}")

    for gate, g in (res.best_by_gate or {}).items():
        lines.append(one(f"best, gate {gate}", g.best, g.reason))
        lines += format_lines(g.best)
        lines += [f"  held back: {label} (dev {score:.3f}): {why}" for score, label, why in held_back(res, gate)]
    if res.best_ood is not None or res.best_ood_reason != "no out-of-distribution sets configured":
        lines.append(one("best out of distribution", res.best_ood, res.best_ood_reason, ood=True))
        lines += format_lines(res.best_ood.ood if res.best_ood else None)
    return "\n".join(lines)


def format_lines(part: Entry | Part | None) -> list[str]:
    """Per prompt format, the chosen setting's test score and retain accuracy (ff eval --formats)."""
    from pipelines.evaluate import maybe_num as _maybe

    if not part or not part.formats:
        return []
    out = []
    for fmt, p in part.formats.items():
        t, ci = p.test, p.test.ci95 or [float("nan")] * 2
        out.append(f"  format {fmt}: test score {_maybe(t.unlearning_score)} [{ci[0]:.3f}, {ci[1]:.3f}], "
                   f"retain MCQ {t.retain_mcq.before:.3f} -> {t.retain_mcq.after:.3f}")
    low = part.formats_min or MinScores()
    out.append(f"  minimum over formats: test {_maybe(low.test)} (dev {_maybe(low.dev)})")
    return out


@main.command("generate")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder made by `ff train`.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT|@FILE",
              help="Text to continue; give it several times for several prompts. @FILE: every non-blank line "
                   "of a UTF-8 text file is a prompt.")
@click.option("--max-new-tokens", default=40, type=click.IntRange(1), help="Tokens to generate (greedy).")
@set_option(Setting)
@click.option("--model", default=None, help="Model. Default: the one named in the run.")
def generate_cmd(run_dir, prompts, max_new_tokens, sets, model):
    """Print the model's greedy continuation of each prompt without and with the unlearning
    intervention. The setting is the best one `ff eval` / `ff run` found for the run
    (RUN/unlearning.json), else a gated clamp; --set changes single fields of it (a new gate,
    percentile or detector drops its calibrated threshold)."""
    from pathlib import Path

    from pipelines.errors import EvalError
    from pipelines.generate import generate_pair
    from pipelines.intervene import run_setting

    texts: list[str] = []
    for p in prompts:
        if not p.startswith("@"):
            texts.append(p)
            continue
        try:
            texts += [line for line in Path(p[1:]).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"cannot read the prompts file '{p[1:]}': {e}") from None
    if not texts:
        raise EvalError("give a prompt to continue: --prompt TEXT (several times for several) or --prompt @FILE")
    setting = run_setting(run_dir)  # an unreadable RUN/unlearning.json or a bad option fails before the model loads
    changes = parse_sets(Setting, sets, error=EvalError)
    setting = setting.changed(**changes)  # a new gate or percentile drops the chosen threshold
    lm = _load_for_run(run_dir, model, _device())
    click.echo(f"setting:   {setting.label}")
    for i, prompt in enumerate(texts):
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
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.argument("out", type=click.Path())
def export_cmd(run_dir, fmt, model, overwrite, out):
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
    lm = _load_for_run(run_dir, model, _device("cpu"))
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
@set_option(BakeConfig)
@click.option("--model", default=None, help="The model the run was trained on. Default: the one named in the run.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT and start over instead of resuming.")
def bake_cmd(run_dir, out, store, sets, model, overwrite):
    """Write the run's chosen edit into the weights: a low-rank update (peft LoRA) of the blocks up to
    the edited layer, trained so their output is the edited residual, merged and saved as a standard
    folder that `AutoModelForCausalLM.from_pretrained(OUT)` loads without ff or custom code. An
    interrupted bake resumes when the same command is run again."""
    from pathlib import Path

    from pipelines.bake import bake, check_bake_out
    from pipelines.errors import EvalError
    from pipelines.intervene import chosen_setting

    cfg = apply_sets(BakeConfig(), parse_sets(BakeConfig, sets, error=EvalError))
    setting = chosen_setting(run_dir)  # a run without one, or a full OUT, fails before the model loads
    check_bake_out(Path(out), overwrite)
    lm = _load_for_run(run_dir, model, _device("cpu"))
    res = bake(run_dir, out, lm, cfg, store=store, setting=setting, overwrite=overwrite, progress=not _quiet())
    loss = res.loss
    resumed = f", resumed at step {res.resumed_from}" if res.resumed_from else ""
    click.echo(f"wrote {res.out_dir} ({res.steps} steps{resumed}, {res.seconds:.0f} s); held-out error to the "
               f"edit: retain {loss['retain_before']:.3f} -> {loss['retain_after']:.3f}, unlearn "
               f"{loss['unlearn_before']:.3f} -> {loss['unlearn_after']:.3f} (units of the edit's size)")


if __name__ == "__main__":  # pragma: no cover
    main()
