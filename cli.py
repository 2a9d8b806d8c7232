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


if __name__ == "__main__":  # pragma: no cover
    main()
