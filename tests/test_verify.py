"""`ff verify` on stores and run folders, and `ff train` stopping on a damaged store: each bad
chunk is named (corpus, array, contexts); verify exits 0 / 1 / 2, train one line and 2."""

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import make_store

from cli import main
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.run import RunFolder
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TrainConfig(expansion=2, n_clusters=2, steps=6, warmup=1, batch_contexts=4, recluster_every=2,
                  importance_batches=1, log_every=2, checkpoint_every=3, buffer_chunks=2,
                  eval_frac=0.2, scale_chunks=2)
TRAIN_ARGS = ["--layer", "1", "--set", "steps=4", "--set", "expansion=2", "--set", "n_clusters=2",
              "--set", "batch_contexts=4", "--set", "warmup=1", "--quiet"]


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output.strip()


def chunk_file(store, corpus, array, i):
    """The file of chunk i (along contexts) of STORE/corpus/array."""
    return next(p for p in (store / corpus / array / "c" / str(i)).rglob("*") if p.is_file())


def delete_chunk(store, corpus, array, i):
    chunk_file(store, corpus, array, i).unlink()


def flip_bits(store, corpus, array, i):
    f = chunk_file(store, corpus, array, i)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def assert_one_line_error(code, out, *needles):
    assert code == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for n in needles:
        assert n in lines[0], lines[0]


def test_healthy_store_verifies(tmp_path):
    store = make_store(tmp_path / "s.zarr", vocab_size=100, dtype="bfloat16")
    code, out = run("verify", store)
    assert code == 0 and out.endswith("OK"), out
    code, out = run("verify", store, "--json")
    d = json.loads(out)
    assert code == 0 and d["ok"] and d["problems"] == [] and d["notes"] == []
    assert d["checked"] == {"arrays": 8, "chunks": 4 * (10 + 6)}  # (tokens, 2 layers, digests) x chunks


@pytest.mark.parametrize("damage,kind", [(delete_chunk, "missing"), (flip_bits, "corrupt")])
def test_damaged_chunk_is_named_by_verify(tmp_path, damage, kind):
    store = make_store(tmp_path / "s.zarr", vocab_size=100)
    damage(store, "retain", "layer_2", 3)
    damage(store, "unlearn", "tokens", 1)
    code, out = run("verify", store)
    assert code == 1, out
    assert f"retain/layer_2 chunk 3 (contexts 12-15): {kind}" in out
    assert f"unlearn/tokens chunk 1 (contexts 4-7): {kind}" in out
    assert out.endswith("2 problems found")
    d = json.loads(run("verify", store, "--json")[1])
    assert not d["ok"] and {p["kind"] for p in d["problems"]} == {kind}
    assert d["problems"][0]["chunk"] == {"corpus": "retain", "array": "layer_2", "index": 3,
                                         "start": 12, "stop": 16}


@pytest.mark.parametrize("damage,word", [(delete_chunk, "is missing"), (flip_bits, "is corrupt")])
@pytest.mark.parametrize("chunk", [2, 9])  # a training chunk; the one holding held-out contexts
def test_damaged_chunk_stops_train_with_one_line(tmp_path, damage, word, chunk):
    store = make_store(tmp_path / "s.zarr")
    damage(store, "retain", "layer_1", chunk)
    code, out = run("train", "--store", store, "--out", tmp_path / "run", *TRAIN_ARGS)
    lo = 4 * chunk
    assert_one_line_error(code, out, f"retain/layer_1 chunk {chunk} (contexts {lo}-{lo + 3})", word,
                          f"run `ff verify {store}`")
    assert not (tmp_path / "run" / "eval.json").exists()


def test_deleted_tokens_chunk_is_not_read_as_padding(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    delete_chunk(store, "unlearn", "tokens", 5)  # held out: checked when training starts
    with pytest.raises(TrainError, match=r"unlearn/tokens chunk 5 \(contexts 20-23\) .* missing"):
        train(CFG, str(store), 1, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any step


def test_non_finite_tokens_and_metadata_problems(tmp_path):
    store = make_store(tmp_path / "s.zarr", vocab_size=50)  # tokens are drawn from [3, 100)
    root = zarr.open_group(str(store), mode="r+")
    x = np.asarray(root["retain/layer_1"][4:8])
    x[1, 2, 3] = np.nan
    root["retain/layer_1"][4:8] = x
    root["unlearn"].attrs["n_contexts"] = 25
    code, out = run("verify", store)
    assert code == 1
    assert "retain/layer_1 chunk 1 (contexts 4-7): non-finite: 1 NaN and 0 inf" in out
    assert "retain/tokens chunk 0 (contexts 0-3): token-range" in out and "[0, 50)" in out
    assert "unlearn/tokens: metadata: shape (24, 6)" in out


def test_store_without_vocab_size_says_so(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    code, out = run("verify", store)
    assert code == 0 and "does not record its vocabulary size" in out


def test_incomplete_store_is_reported_not_its_unwritten_chunks(tmp_path):
    store = make_store(tmp_path / "s.zarr", complete=False)
    for array in ("tokens", "layer_1"):  # chunk 4 never written
        delete_chunk(store, "retain", array, 4)
    code, out = run("verify", store)
    assert code == 1 and "incomplete" in out and "chunk 4" not in out


def test_user_errors_exit_2(tmp_path):
    code, out = run("verify", tmp_path / "missing")
    assert_one_line_error(code, out, "does not exist")
    (tmp_path / "notes").mkdir()
    code, out = run("verify", tmp_path / "notes")
    assert_one_line_error(code, out, "neither an activation store", "nor a run folder")


def test_run_folder_verifies_and_names_its_problems(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    train(CFG, str(store), 1, str(tmp_path / "run"), progress=False)
    rf = RunFolder(tmp_path / "run")
    code, out = run("verify", rf.path)
    assert code == 0, out
    torch.load(rf.checkpoint, weights_only=True)  # checkpoints are plain data

    rf.features.write_bytes(rf.features.read_bytes()[:40])  # truncated
    rf.metrics.unlink()
    config = rf.read_config()
    rf.config.write_text(json.dumps({**config, "expansion": 3, "d_sae": 3 * config["d_model"]}))
    code, out = run("verify", rf.path)
    assert code == 1
    assert "metrics.jsonl: missing" in out and "features.safetensors: corrupt" in out
    assert "sae.safetensors:W_enc: shape: (8, 16), config.json gives (8, 24)" in out


def test_run_folder_store_identity(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    train(CFG, str(store), 1, str(tmp_path / "run"), progress=False)
    rf = RunFolder(tmp_path / "run")
    rf.config.write_text(json.dumps({**rf.read_config(), "model_hash": "other"}))
    code, out = run("verify", rf.path, "--json")
    d = json.loads(out)
    assert code == 1 and [p["kind"] for p in d["problems"]] == ["identity"]
    assert "model_hash h1" in d["problems"][0]["detail"] and "other" in d["problems"][0]["detail"]
    rf.config.write_text(json.dumps({**rf.read_config(), "model_hash": "h1",
                                     "store": str(tmp_path / "gone.zarr"),
                                     "unlearn_store": str(tmp_path / "gone.zarr")}))
    code, out = run("verify", rf.path)
    assert code == 0 and "not reachable" in out
