"""`ff cache --repair`: recompute exactly the chunks `ff verify` finds bad, and nothing else, ending
with a store equal in every array to an uninterrupted one."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from test_verify import chunk_file, delete_chunk, flip_bits

from cli import main


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output.strip()


def cache_args(model, corpora, out, *extra):
    return ("cache", "--model", model, "--retain", corpora[0], "--unlearn", corpora[1],
            "--contexts", "12", "--set", "unlearn_contexts=8", "--set", "ctx_len=16", "--layers", "1,2",
            "--set", "chunk_contexts=2", "--quiet", "--out", out, *extra)


def arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{c}/{a}": np.asarray(root[c][a][:]) for c in ("retain", "unlearn")
            for a in root[c].array_keys()}


def chunk_files(store) -> dict:
    """Every chunk file -> (bytes, mtime), to show that a repair leaves them alone."""
    return {p.relative_to(store): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in store.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(store)) + "/"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_model, tiny_corpora):
    out = tmp_path_factory.mktemp("fresh") / "s.zarr"
    code, msg = run(*cache_args(tiny_model, tiny_corpora, out))
    assert code == 0, msg
    return out


def test_repair_recomputes_exactly_the_bad_chunks(tmp_path, fresh, tiny_model, tiny_corpora):
    store = tmp_path / "s.zarr"
    shutil.copytree(fresh, store)
    flip_bits(store, "retain", "layer_2", 3)
    delete_chunk(store, "unlearn", "tokens", 1)
    code, out = run("verify", store)
    assert code == 1, out
    assert "retain/layer_2 chunk 3 (contexts 6-7): corrupt" in out
    assert "unlearn/tokens chunk 1 (contexts 2-3): missing" in out
    assert "--repair" in out
    bad = {("retain", "3"), ("unlearn", "1")}
    untouched = {k: v for k, v in chunk_files(store).items() if (k.parts[0], k.parts[3]) not in bad}

    code, out = run(*cache_args(tiny_model, tiny_corpora, store, "--repair"))
    assert code == 0, out
    assert ("recomputed 2 damaged chunk(s): retain chunk 3 (contexts 6-7), "
            "unlearn chunk 1 (contexts 2-3)") in out
    assert "wrote 64 tokens x 2 layers" in out  # 2 chunks x 2 contexts x 16 tokens, nothing else
    after = chunk_files(store)
    assert {k: after[k] for k in untouched} == untouched
    want, got = arrays(fresh), arrays(store)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is True
    assert run("verify", store)[0] == 0
    code, out = run(*cache_args(tiny_model, tiny_corpora, store, "--repair"))
    assert code == 0 and "every chunk verifies, nothing to repair" in out


def test_repair_finishes_an_incomplete_store_and_its_bad_chunks(tmp_path, fresh, tiny_model,
                                                                 tiny_corpora):
    store = tmp_path / "s.zarr"
    shutil.copytree(fresh, store)
    zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    for array in ("tokens", "layer_1", "layer_2"):  # unlearn chunk 3 never written
        delete_chunk(store, "unlearn", array, 3)
    chunk_file(store, "retain", "tokens", 0).write_bytes(b"not a chunk")  # and one damaged
    code, out = run(*cache_args(tiny_model, tiny_corpora, store, "--repair"))
    assert code == 0, out
    assert "recomputed 1 damaged chunk(s): retain chunk 0 (contexts 0-1)" in out
    want, got = arrays(fresh), arrays(store)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    assert run("verify", store)[0] == 0


def test_repair_refuses_what_chunks_cannot_fix(tmp_path, fresh, tiny_model, tiny_corpora):
    store = tmp_path / "s.zarr"
    shutil.copytree(fresh, store)
    zarr.open_group(str(store), mode="r+")["unlearn"].attrs["n_contexts"] = 9
    before = chunk_files(store)
    code, out = run(*cache_args(tiny_model, tiny_corpora, store, "--repair"))
    assert code == 2 and out.startswith("error: cannot repair store"), out
    assert "unlearn/tokens: metadata" in out and "rebuild it with --overwrite" in out
    assert chunk_files(store) == before


def train_files(store, out) -> dict[str, bytes]:
    from test_verify import TRAIN_ARGS

    code, msg = run("train", "--store", store, "--out", out, *TRAIN_ARGS)
    assert code == 0, msg
    return {n: (out / n).read_bytes() for n in ("sae.safetensors", "features.safetensors")}


def test_a_valid_chunk_copied_over_another_is_named_repaired_and_trains_as_the_original(
        tmp_path, fresh, tiny_model, tiny_corpora):
    store = tmp_path / "s.zarr"
    shutil.copytree(fresh, store)
    # chunks that decode perfectly, each in the wrong place: another index, another layer
    chunk_file(store, "retain", "layer_2", 4).write_bytes(chunk_file(store, "retain", "layer_2", 1).read_bytes())
    chunk_file(store, "unlearn", "layer_1", 2).write_bytes(chunk_file(store, "unlearn", "layer_2", 2).read_bytes())
    chunk_file(store, "unlearn", "tokens", 0).write_bytes(chunk_file(store, "unlearn", "tokens", 3).read_bytes())
    code, out = run("verify", store)
    assert code == 1, out
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad == ["BAD  retain/layer_2 chunk 4 (contexts 8-9): misplaced: decodes, but its content is not "
                   "what was written at this array and index (a chunk copied from elsewhere)",
                   "BAD  unlearn/tokens chunk 0 (contexts 0-1): misplaced: decodes, but its content is not "
                   "what was written at this array and index (a chunk copied from elsewhere)",
                   "BAD  unlearn/layer_1 chunk 2 (contexts 4-5): misplaced: decodes, but its content is not "
                   "what was written at this array and index (a chunk copied from elsewhere)"], out

    code, out = run(*cache_args(tiny_model, tiny_corpora, store, "--repair"))
    assert code == 0, out
    assert ("recomputed 3 damaged chunk(s): retain chunk 4 (contexts 8-9), unlearn chunk 0 (contexts 0-1), "
            "unlearn chunk 2 (contexts 4-5)") in out
    want, got = arrays(fresh), arrays(store)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    assert run("verify", store)[0] == 0
    assert train_files(store, tmp_path / "run-repaired") == train_files(fresh, tmp_path / "run-original")


def test_a_store_without_digests_verifies_with_a_note(tmp_path, fresh):
    store = tmp_path / "s.zarr"
    shutil.copytree(fresh, store)
    for corpus in ("retain", "unlearn"):  # as a store written before digests existed
        shutil.rmtree(store / corpus / "digests")
    code, out = run("verify", store)
    assert code == 0, out
    assert "note the store records no chunk digests (written by an older ff)" in out
