"""Each user error of `ff cache` is one readable line, a non-zero exit, and touches nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model

from cli import main


class Output(str):
    """The command's interleaved output (what a terminal shows), with stdout and stderr apart."""

    stdout: str
    stderr: str


def run(*args):
    r = CliRunner().invoke(main, list(args))
    out = Output(r.output.strip())
    out.stdout, out.stderr = r.stdout, r.stderr
    return r.exit_code, out


def cache_args(model, corpora, out, *extra):
    return ("cache", "--model", model, "--retain", corpora[0], "--unlearn", corpora[1], "--contexts", "8",
            "--set", "ctx_len=16", "--layers", "1", "--quiet", "--out", str(out), *extra)


def assert_one_line_error(code, out, *needles):
    """Exit 2; on stderr one `error:` line (besides transformers' weight-loading bar) and no
    traceback; nothing of it on stdout."""
    assert code == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "error:" not in out.stdout, out.stdout
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(root: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def test_unknown_model(tmp_path, tiny_corpora):
    code, out = run(*cache_args("no-such-model", tiny_corpora, tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "unknown model 'no-such-model'")
    assert not (tmp_path / "s.zarr").exists()


def test_unknown_hub_model_offline(tmp_path, tiny_corpora):
    code, out = run(*cache_args("nobody/no-such-model-xyz", tiny_corpora, tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "cannot load model 'nobody/no-such-model-xyz'")


def test_layer_out_of_range_names_the_depth(tmp_path, tiny_model, tiny_corpora):
    args = list(cache_args(tiny_model, tiny_corpora, tmp_path / "s.zarr"))
    args[args.index("--layers") + 1] = "1,9"
    code, out = run(*args)
    assert_one_line_error(code, out, "layer 9 is out of range", "has 4 layers")
    assert not (tmp_path / "s.zarr").exists()


def test_empty_corpus(tmp_path, tiny_model, tiny_corpora):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, out = run(*cache_args(tiny_model, (str(empty), tiny_corpora[1]), tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "has 0 tokens")


def test_too_few_tokens_says_how_many(tmp_path, tiny_model, tiny_corpora):
    small = tmp_path / "small.txt"
    small.write_text("the cell gene protein virus\n" * 3)  # 3 x (5 + EOS) = 18 tokens
    code, out = run(*cache_args(tiny_model, (str(small), tiny_corpora[1]), tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "has 18 tokens", "need 120", "at most 1 contexts fit")


def test_unreadable_file(tmp_path, tiny_model, tiny_corpora):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf8 \xc3\x28\n")
    code, out = run(*cache_args(tiny_model, (str(bad), tiny_corpora[1]), tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "cannot read corpus file")
    code, out = run(*cache_args(tiny_model, (str(tmp_path / "missing.jsonl"), tiny_corpora[1]), tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "does not exist")


def test_malformed_jsonl_names_the_line(tmp_path, tiny_model, tiny_corpora):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cell"}\n{"txt": "oops"}\n')
    code, out = run(*cache_args(tiny_model, (str(bad), tiny_corpora[1]), tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "bad.jsonl:2")


def test_unknown_dataset(tmp_path, tiny_model, tiny_corpora):
    code, out = run(*cache_args(tiny_model, ("nobody/no-such-dataset-xyz", tiny_corpora[1]), tmp_path / "s.zarr"))
    assert_one_line_error(code, out, "cannot load dataset 'nobody/no-such-dataset-xyz'")


def test_fp16_overflow_refused(tmp_path, tiny_corpora):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "hot")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # residual stream far beyond float16's 65504
    model.save_pretrained(folder)
    code, out = run(*cache_args(str(folder), tiny_corpora, tmp_path / "s.zarr", "--set", "dtype=float16"))
    assert_one_line_error(code, out, "float16 overflow", "use --set dtype=bfloat16 (or float32)")


def test_existing_store_with_other_arguments_untouched(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    assert run(*cache_args(tiny_model, tiny_corpora, out))[0] == 0
    snapshot = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    code, msg = run(*cache_args(tiny_model, tiny_corpora, out, "--set", "dtype=float32"))
    assert_one_line_error(code, msg, "built with other arguments", "dtype: 'bfloat16' in the store, 'float32' now")
    assert snapshot == {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    code, msg = run(*cache_args(tiny_model, tiny_corpora, out))
    assert code == 0 and "already complete" in msg


def test_bad_input_does_not_destroy_store_even_with_overwrite(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    assert run(*cache_args(tiny_model, tiny_corpora, out))[0] == 0
    before = snapshot(out)
    assert len([p for p in before if "/c/" in str(p)]) > 8  # chunks, not only metadata
    args = list(cache_args(tiny_model, tiny_corpora, out, "--overwrite"))
    args[args.index("--layers") + 1] = "7"
    code, msg = run(*args)
    assert_one_line_error(code, msg, "out of range")
    assert snapshot(out) == before  # every chunk and file as it was


def test_path_that_is_not_a_store(tmp_path, tiny_model, tiny_corpora):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    code, out = run(*cache_args(tiny_model, tiny_corpora, tmp_path / "notes", "--overwrite"))
    assert_one_line_error(code, out, "is not an activation store")
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"


@pytest.mark.parametrize("value", ["a,b", "-1", ","])
def test_bad_layers_value(tmp_path, value):
    code, out = run("cache", "--layers", value, "--out", str(tmp_path / "s.zarr"))
    assert code == 2 and out.startswith("error: ") and len(out.strip().splitlines()) == 1
    assert "--layers a,b: expected an integer" in out if value == "a,b" else "layers must be non-negative" in out
