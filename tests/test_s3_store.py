"""Stores in object storage, against a real S3-compatible HTTP server (moto's server mode on
127.0.0.1, conftest.s3_server), credentials and endpoint in the standard AWS environment:
`ff cache` into S3 equals caching to a folder, training from S3 gives the same SAE weights,
`ff copy` S3 -> local -> S3 round-trips, `ff inspect` / `ff verify` work on the URL, a killed
`ff cache` resumes, and the secret never lands in a store, a run folder or the output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import S3_SECRET, assert_same_store, kill_when, make_store, write_corpus
from safetensors.torch import load_file

from cache.store import open_store
from cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache_args(tiny_model, retain, unlearn, contexts=24, unlearn_contexts=16, chunk=4) -> list[str]:
    return ["cache", "--model", tiny_model, "--layers", "1,2", "--retain", str(retain), "--unlearn",
            str(unlearn), "--contexts", str(contexts), "--set", f"unlearn_contexts={unlearn_contexts}",
            "--set", "ctx_len=32", "--set", f"chunk_contexts={chunk}", "--quiet"]


def _bucket_objects(bucket: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    name = bucket.removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]
    return {k: s3.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


def test_cache_train_inspect_verify_on_s3_equal_local(tmp_path, tiny_model, tiny_corpora, s3_bucket):
    runner = CliRunner()
    url, local = f"{s3_bucket}/stores/tiny.zarr", tmp_path / "tiny.zarr"
    outputs = []
    for out in (url, local):
        r = runner.invoke(main, [*_cache_args(tiny_model, *tiny_corpora), "--out", str(out)])
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    assert_same_store(url, local)
    assert not any(k.endswith(".ff-writer.lock") for k in _bucket_objects(s3_bucket))  # no lock on S3

    r = runner.invoke(main, ["inspect", url, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["path"] == url and info["complete"] and info["corpora"]["retain"]["chunks_done"] == 6
    assert info["size_on_disk"] > 0 and info["compression_ratio"]
    r = runner.invoke(main, ["verify", url])
    assert r.exit_code == 0 and r.output.strip().endswith("OK"), r.output
    outputs += [r.output]

    args = ["train", "--layer", "2", "--preset", "demo", "--set", "steps=8", "--set", "expansion=2",
            "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=2", "--set", "recluster_every=2",
            "--quiet"]
    for store, out in ((url, tmp_path / "run_s3"), (local, tmp_path / "run_local")):
        r = runner.invoke(main, [*args, "--store", str(store), "--out", str(out)])
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    for name in ("sae.safetensors", "features.safetensors"):
        a, b = load_file(str(tmp_path / "run_s3" / name)), load_file(str(tmp_path / "run_local" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "run_s3" / "config.json").read_text())["store"] == url
    r = runner.invoke(main, ["verify", str(tmp_path / "run_s3")])
    assert r.exit_code == 0 and "not reachable" not in r.output, r.output
    outputs.append(r.output)

    secret = S3_SECRET.encode()
    assert not any(secret in v for v in _bucket_objects(s3_bucket).values())
    assert not any(secret in p.read_bytes() for p in (tmp_path / "run_s3").rglob("*") if p.is_file())
    assert not any(S3_SECRET in o for o in outputs)


def test_copy_s3_local_s3_round_trip_and_missing_chunk(tmp_path, s3_bucket):
    import boto3

    src = make_store(tmp_path / "src.zarr")
    runner = CliRunner()
    up, down, again = f"{s3_bucket}/a.zarr", tmp_path / "down.zarr", f"{s3_bucket}/b.zarr"
    for a, b in ((src, up), (up, down), (down, again)):
        r = runner.invoke(main, ["copy", str(a), str(b), "--quiet"])
        assert r.exit_code == 0 and "copied 64 of 64 chunks" in r.output, r.output
        assert S3_SECRET not in r.output
    for store in (up, down, again):
        assert_same_store(src, store)
    objects = _bucket_objects(s3_bucket)
    for key in ("zarr.json", "retain/layer_2/zarr.json", "unlearn/tokens/c/5/0"):
        assert objects[f"b.zarr/{key}"] == (src / key).read_bytes()  # byte-exact
    r = runner.invoke(main, ["copy", str(down), again, "--quiet"])
    assert r.exit_code == 0 and "64 already there" in r.output, r.output

    boto3.client("s3").delete_object(Bucket=s3_bucket.removeprefix("s3://"),
                                      Key="b.zarr/unlearn/layer_1/c/2/0/0")
    r = runner.invoke(main, ["verify", again])
    assert r.exit_code == 1 and "unlearn/layer_1 chunk 2 (contexts 8-11): missing" in r.output, r.output
    r = runner.invoke(main, ["copy", again, str(tmp_path / "x.zarr"), "--quiet"])
    assert r.exit_code == 2 and "unlearn/layer_1 chunk 2 (contexts 8-11)" in r.output and "missing" in r.output
    r = runner.invoke(main, ["copy", str(down), again, "--quiet"])  # the copy repairs it
    assert r.exit_code == 0 and "copied 1 of 64 chunks" in r.output, r.output
    assert_same_store(src, again)


def test_storage_options_flag_reaches_s3(tmp_path, s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the flag says where the server is
    opts = json.dumps({"endpoint_url": s3_server, "key": "ff-test-key-id", "secret": S3_SECRET})
    url = f"{s3_bucket}/opt.zarr"
    r = CliRunner().invoke(main, ["copy", str(make_store(tmp_path / "s.zarr")), url, "--quiet",
                                  "--storage-options", opts])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", url, "--storage-options", opts])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # for boto3 in _bucket_objects
    assert S3_SECRET.encode() not in b"".join(_bucket_objects(s3_bucket).values())


@pytest.mark.slow
def test_kill_9_of_ff_cache_into_s3_then_resume_equals_uninterrupted(tmp_path, tiny_model, s3_bucket):
    retain = write_corpus(tmp_path / "r.txt", 600, seed=3)
    unlearn = write_corpus(tmp_path / "u.txt", 200, seed=4)
    args = _cache_args(tiny_model, retain, unlearn, contexts=120, unlearn_contexts=20, chunk=2)
    killed = f"{s3_bucket}/killed.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--out", killed], env=env,
                            cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: int(open_store(killed).corpus("retain").completed_chunks().sum()), 5)
    store = open_store(killed)
    assert not store.meta.complete and 5 <= store.corpus("retain").completed_chunks().sum() < 60

    # the dead writer's lease is unexpired, but it names a process of this host that is gone:
    # taken over at once, as a local flock dies with its process
    lease = json.loads(_bucket_objects(s3_bucket)["killed.zarr/.ff-lease.json"])
    assert lease["pid"] == proc.pid and lease["expires"] > time.time()
    runner = CliRunner()
    r = runner.invoke(main, [*args, "--out", killed])
    assert r.exit_code == 0, r.output
    assert "killed.zarr/.ff-lease.json" not in _bucket_objects(s3_bucket)  # given back
    clean = tmp_path / "clean.zarr"
    assert runner.invoke(main, [*args, "--out", str(clean)]).exit_code == 0
    assert_same_store(clean, killed)
    assert open_store(killed).meta.complete


def test_unreachable_endpoint_is_one_line_without_the_secret(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    opts = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": S3_SECRET})
    for cmd in (["inspect", "s3://ff-nowhere/x.zarr"], ["verify", "s3://ff-nowhere/x.zarr"],
                ["train", "--store", "s3://ff-nowhere/x.zarr", "--layer", "1", "--out", str(tmp_path / "run")]):
        r = CliRunner().invoke(main, [*cmd, "--storage-options", opts])
        assert r.exit_code == 2, r.output
        assert "cannot reach store 's3://ff-nowhere/x.zarr'" in r.output and S3_SECRET not in r.output
