"""One writer per store in S3 (cache/lease.py), against the local S3 server (moto, which honours
S3's conditional puts and deletes): two `ff cache` processes into one store, `--repair` and
`--overwrite` beside a writer, a lease taken over after expiry by exactly one of two processes,
and a writer that lost its lease stopping. The killed writer whose lease expires is in
tests/test_s3_store.py (`test_kill_9_of_ff_cache_into_s3_then_resume_equals_uninterrupted`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_same_store, write_corpus

from cache import lease as lease_mod
from cache.errors import StoreError
from cache.store import open_store
from cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _args(tiny_model, tmp_path) -> list[str]:
    retain = write_corpus(tmp_path / "r.txt", 600, seed=3)
    unlearn = write_corpus(tmp_path / "u.txt", 200, seed=4)
    return ["cache", "--model", tiny_model, "--layers", "1,2", "--retain", str(retain), "--unlearn", str(unlearn),
            "--contexts", "120", "--set", "unlearn_contexts=20", "--set", "ctx_len=32", "--set", "chunk_contexts=2",
            "--quiet"]


def _lease(bucket: str, store: str) -> dict | None:
    import boto3

    try:
        body = boto3.client("s3").get_object(Bucket=bucket.removeprefix("s3://"), Key=f"{store}/.ff-lease.json")
    except Exception:
        return None
    return json.loads(body["Body"].read())


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


@pytest.mark.slow
def test_two_ff_cache_into_one_s3_store_one_finishes_the_other_is_refused(tmp_path, tiny_model, s3_bucket):
    args = _args(tiny_model, tmp_path)
    url = f"{s3_bucket}/shared.zarr"
    procs = [_start([*args, "--out", url]) for _ in range(2)]  # started together
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[0] == 2)
    errors = _error_lines(refused[2])
    assert len(errors) == 1 and "is being written by another `ff cache` (host" in errors[0], refused[2]
    assert _lease(s3_bucket, "shared.zarr") is None  # the winner gave it back
    local = tmp_path / "alone.zarr"
    assert CliRunner().invoke(main, [*args, "--out", str(local)]).exit_code == 0
    assert_same_store(local, url)
    r = CliRunner().invoke(main, ["verify", url])
    assert r.exit_code == 0 and r.output.strip().endswith("OK"), r.output


@pytest.mark.slow
def test_repair_and_overwrite_beside_a_running_writer_are_refused(tmp_path, tiny_model, s3_bucket):
    args = _args(tiny_model, tmp_path)
    url = f"{s3_bucket}/busy.zarr"
    writer = _start([*args, "--out", url])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and writer.poll() is None:  # the lease held, chunks being written
            try:
                if open_store(url).corpus("retain").completed_chunks().sum() >= 2:
                    break
            except (StoreError, KeyError, OSError):  # the store is still being created
                pass
            time.sleep(0.05)
        holder = _lease(s3_bucket, "busy.zarr")
        assert holder is not None and holder["pid"] == writer.pid
        for extra in ("--repair", "--overwrite"):
            r = CliRunner().invoke(main, [*args, "--out", url, extra])
            assert r.exit_code == 2, r.output
            lines = [ln for ln in r.output.splitlines() if ln.strip()]
            assert len(lines) == 1 and f"pid {writer.pid}" in lines[0] and "is being written" in lines[0], r.output
    finally:
        code = writer.wait(timeout=300)
    assert code == 0, writer.communicate()
    assert CliRunner().invoke(main, ["verify", url]).exit_code == 0


def test_an_expired_lease_is_taken_over_by_exactly_one_of_two(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/race.zarr"
    monkeypatch.setattr(lease_mod, "LEASE_SECONDS", 30.0)
    dead = lease_mod.Lease(url)
    dead.acquire()
    dead._stop.set()  # a writer that died: no more renewals, and it never gives the lease back
    dead._thread.join()
    import boto3

    s3 = boto3.client("s3")
    key = {"Bucket": s3_bucket.removeprefix("s3://"), "Key": "race.zarr/.ff-lease.json"}
    info = json.loads(s3.get_object(**key)["Body"].read())
    s3.put_object(**key, Body=json.dumps({**info, "expires": time.time() - 1}).encode())  # its time is up

    barrier, won, refused = threading.Barrier(2), [], []

    def take():
        mine = lease_mod.Lease(url)
        barrier.wait()
        try:
            mine.acquire()
            won.append(mine)
        except StoreError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 1, (won, refused)
    assert "is being written by another `ff cache`" in refused[0]
    assert json.loads(s3.get_object(**key)["Body"].read())["owner"] == won[0].info["owner"]
    won[0].release()
    assert "Contents" not in s3.list_objects_v2(Bucket=key["Bucket"], Prefix=key["Key"])


def test_a_writer_that_lost_its_lease_stops_and_leaves_the_new_one_alone(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/lost.zarr"
    monkeypatch.setattr(lease_mod, "LEASE_SECONDS", 0.4)  # renewed every 0.1 s
    mine = lease_mod.Lease(url)
    mine.acquire()
    mine.check()  # held
    import boto3

    s3 = boto3.client("s3")
    key = {"Bucket": s3_bucket.removeprefix("s3://"), "Key": "lost.zarr/.ff-lease.json"}
    s3.put_object(**key, Body=json.dumps({"owner": "another", "host": "h", "pid": 1,
                                          "expires": time.time() + 60}).encode())  # taken over
    deadline = time.time() + 5
    while not mine.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreError, match="lost the writer lease of store .* to another writer"):
        mine.check()
    mine.release()
    assert json.loads(s3.get_object(**key)["Body"].read())["owner"] == "another"  # theirs, untouched


def test_shards_hold_leases_side_by_side_but_not_beside_a_plain_writer(s3_bucket):
    from cache.shard import Shard

    url = f"{s3_bucket}/sharded.zarr"
    s0, s1 = lease_mod.Lease(url, shard=Shard(0, 2)), lease_mod.Lease(url, shard=Shard(1, 2))
    s0.acquire()
    s1.acquire()  # shards write side by side
    with pytest.raises(StoreError, match=r"is being written by `ff cache --shard` processes \(ff cache --shard 0/2"):
        lease_mod.Lease(url).acquire()
    with pytest.raises(StoreError, match="is being written by another `ff cache --shard 1/2`"):
        lease_mod.Lease(url, shard=Shard(1, 2)).acquire()  # the same shard twice
    s0.release()
    s1.release()
    plain = lease_mod.Lease(url)
    plain.acquire()
    with pytest.raises(StoreError, match="is being written by another `ff cache` "):
        lease_mod.Lease(url, shard=Shard(0, 2)).acquire()
    with pytest.raises(StoreError, match="is being written by another `ff cache` "):
        lease_mod.check_no_lease(url, Shard(1, 2))
    plain.release()
    lease_mod.check_no_lease(url)  # nothing held any more


def test_a_lease_of_a_writer_on_another_machine_blocks_until_it_expires(tmp_path, tiny_model, tiny_corpora,
                                                                         s3_bucket):
    import boto3

    url = f"{s3_bucket}/elsewhere.zarr"
    args = ["cache", "--model", tiny_model, "--layers", "1", "--retain", str(tiny_corpora[0]), "--unlearn",
            str(tiny_corpora[1]), "--contexts", "8", "--set", "ctx_len=16", "--set", "chunk_contexts=2", "--quiet",
            "--out", url]
    expires = time.time() + 4
    boto3.client("s3").put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="elsewhere.zarr/.ff-lease.json",
                                  Body=json.dumps({"owner": "x", "host": "another-machine", "pid": 4242,
                                                   "command": "ff cache", "expires": expires}).encode())
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "(host another-machine, pid 4242; its lease expires in" in lines[0], r.output
    time.sleep(max(expires - time.time(), 0) + 0.2)  # the other machine never renewed it
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert _lease(s3_bucket, "elsewhere.zarr") is None


def test_ff_copy_into_s3_takes_the_lease_with_its_destination_options(tmp_path, s3_server, s3_bucket, monkeypatch):
    import boto3
    from conftest import make_store

    src = make_store(tmp_path / "s.zarr")
    url = f"{s3_bucket}/copied.zarr"
    s3 = boto3.client("s3")  # made while the environment still names the server
    key = {"Bucket": s3_bucket.removeprefix("s3://"), "Key": "copied.zarr/.ff-lease.json"}
    s3.put_object(**key, Body=json.dumps({"owner": "x", "host": "another-machine", "pid": 7,
                                          "command": "ff cache", "expires": time.time() + 60}).encode())
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --dst-storage-options says where the server is
    opts = ["--dst-storage-options", json.dumps({"endpoint_url": s3_server})]
    r = CliRunner().invoke(main, ["copy", str(src), url, "--quiet", *opts])
    assert r.exit_code == 2 and "is being written by another `ff cache` (host another-machine, pid 7" in r.output
    s3.delete_object(**key)
    r = CliRunner().invoke(main, ["copy", str(src), url, "--quiet", *opts])
    assert r.exit_code == 0, r.output
    assert "Contents" not in s3.list_objects_v2(Bucket=key["Bucket"], Prefix=key["Key"])  # given back
