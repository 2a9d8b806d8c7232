"""Remote stores through fsspec URLs, on fsspec's in-process memory:// filesystem (fast): reads,
missing-chunk detection, `ff verify`, `ff copy` (round trip, resume, refusals), training from a
URL, storage options. tests/test_s3_store.py runs the same paths against a real S3 server."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_store, make_store
from safetensors.torch import load_file

from cache.copy import copy_store
from cache.errors import StoreError
from cache.location import is_remote, local_path, public
from cache.store import open_store
from cli import main


@pytest.fixture
def mem() -> str:
    """A fresh memory:// prefix (fsspec's memory filesystem is shared by the whole process)."""
    import fsspec

    prefix = f"memory://ff-{uuid.uuid4().hex[:12]}"
    yield prefix
    fs = fsspec.filesystem("memory")
    if fs.exists(prefix.removeprefix("memory:/")):
        fs.rm(prefix.removeprefix("memory:/"), recursive=True)


def test_locations():
    assert is_remote("s3://b/x.zarr") and is_remote("memory://x") and is_remote("simplecache::s3://b/x")
    assert not is_remote("stores/x.zarr") and not is_remote("file:///tmp/x.zarr")
    assert str(local_path("file:///tmp/a%20b.zarr")) == "/tmp/a b.zarr"
    assert public("s3://KEY:SECRET@bucket/x.zarr") == "s3://bucket/x.zarr"
    assert public("stores/x.zarr") == "stores/x.zarr"


def test_memory_store_reads_like_local_and_names_a_missing_chunk(tmp_path, mem):
    import fsspec

    url = make_store(f"{mem}/s.zarr")
    local = make_store(tmp_path / "s.zarr")
    assert_same_store(url, local)
    store = open_store(url)
    assert store.meta.complete and store.corpora == ("retain", "unlearn")
    np.testing.assert_array_equal(store.corpus("unlearn").read_chunk(2, 1),
                                  open_store(local).corpus("unlearn").read_chunk(2, 1))
    r = CliRunner().invoke(main, ["verify", url])
    assert r.exit_code == 0 and r.output.strip().endswith("OK"), r.output

    fsspec.filesystem("memory").rm(f"{url.removeprefix('memory:/')}/retain/layer_1/c/2/0/0")
    with pytest.raises(StoreError, match=r"retain/layer_1 chunk 2 \(contexts 8-11\).*missing"):
        store.corpus("retain").read_chunk(1, 2)
    r = CliRunner().invoke(main, ["verify", url, "--json"])
    assert r.exit_code == 1, r.output
    problems = json.loads(r.output)["problems"]
    assert [(p["kind"], p["where"]) for p in problems] == [
        ("missing", "retain/layer_1 chunk 2 (contexts 8-11)")]


def test_damaged_metadata_of_a_remote_store_is_named(mem):
    import fsspec

    url = make_store(f"{mem}/s.zarr")
    fsspec.filesystem("memory").pipe(f"{url.removeprefix('memory:/')}/unlearn/zarr.json", b"{oops")
    with pytest.raises(StoreError, match="unlearn/zarr.json does not parse"):
        open_store(url)
    r = CliRunner().invoke(main, ["verify", url])
    assert r.exit_code == 1 and "unlearn/zarr.json: corrupt" in r.output, r.output


def test_ff_copy_round_trip_memory_local_memory(tmp_path, mem):
    src, local, back = make_store(f"{mem}/s.zarr"), tmp_path / "local.zarr", f"{mem}/back.zarr"
    runner = CliRunner()
    for a, b in ((src, local), (local, back)):
        r = runner.invoke(main, ["copy", str(a), str(b), "--quiet"])
        assert r.exit_code == 0, r.output
        assert "copied 64 of 64 chunks" in r.output
    assert_same_store(src, local)
    assert_same_store(src, back)
    assert (local / ".ff-writer.lock").is_file()  # a local destination is written under the lock
    # the raw chunk bytes and the metadata documents are copied as they are
    import fsspec

    fs = fsspec.filesystem("memory")
    for key in ("zarr.json", "retain/zarr.json", "unlearn/layer_2/zarr.json", "retain/layer_1/c/3/0/0"):
        assert fs.cat(f"{back.removeprefix('memory:/')}/{key}") == (local / key).read_bytes()
    r = runner.invoke(main, ["copy", str(local), back, "--quiet"])  # again: nothing to do
    assert r.exit_code == 0 and "copied 0 of 64 chunks" in r.output and "64 already there" in r.output


def test_interrupted_copy_resumes_and_is_marked_complete_last(tmp_path, mem, monkeypatch):
    from cache import copy as copy_mod

    src, dst = make_store(tmp_path / "s.zarr"), f"{mem}/dst.zarr"
    real = copy_mod._Writes.put_changed
    calls = {"n": 0}

    def dies_after_five(self, keys, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self, keys, data)

    monkeypatch.setattr(copy_mod._Writes, "put_changed", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        copy_store(src, dst, progress=False)
    store = open_store(dst)  # an incomplete store, its rows written layers first, tokens last
    assert not store.meta.complete
    done = store.corpus("retain").completed_chunks()
    assert 1 <= done.sum() < len(done)
    r = CliRunner().invoke(main, ["verify", dst])
    assert r.exit_code == 1 and "incomplete" in r.output
    monkeypatch.setattr(copy_mod._Writes, "put_changed", real)
    res = copy_store(src, dst, progress=False)
    assert res.skipped > 0 and res.copied + res.skipped == res.chunks == 64
    assert open_store(dst).meta.complete
    assert_same_store(src, dst)


def test_copy_refuses_corrupt_source_incomplete_source_and_another_store(tmp_path, mem):
    import fsspec

    src = make_store(f"{mem}/s.zarr")
    key = f"{src.removeprefix('memory:/')}/unlearn/layer_2/c/1/0/0"
    fs = fsspec.filesystem("memory")
    good = fs.cat(key)
    fs.pipe(key, good[:-1] + bytes([good[-1] ^ 0xFF]))
    r = CliRunner().invoke(main, ["copy", src, str(tmp_path / "c.zarr"), "--quiet"])
    assert r.exit_code == 2
    assert "unlearn/layer_2 chunk 1 (contexts 4-7) of store" in r.output and "corrupt" in r.output
    fs.pipe(key, good)

    other = make_store(tmp_path / "other.zarr", model_hash="h2")
    with pytest.raises(StoreError, match="holds another store"):
        copy_store(src, other, progress=False)
    copy_store(src, other, overwrite=True, progress=False)
    assert_same_store(src, other)
    with pytest.raises(StoreError, match="incomplete"):
        copy_store(make_store(f"{mem}/part.zarr", complete=False), tmp_path / "p.zarr", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not an activation store"):
        copy_store(src, tmp_path / "junk", progress=False)


def test_train_from_a_url_equals_training_from_the_folder(tmp_path, mem):
    url, local = make_store(f"{mem}/s.zarr"), make_store(tmp_path / "s.zarr")
    args = ["train", "--layer", "1", "--preset", "demo", "--set", "steps=8", "--set", "expansion=2",
            "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=2", "--set", "recluster_every=2",
            "--quiet"]
    runner = CliRunner()
    for store, out in ((url, tmp_path / "from_url"), (local, tmp_path / "from_folder")):
        r = runner.invoke(main, [*args, "--store", str(store), "--out", str(out)])
        assert r.exit_code == 0, r.output
    for name in ("sae.safetensors", "features.safetensors"):
        a, b = load_file(str(tmp_path / "from_url" / name)), load_file(str(tmp_path / "from_folder" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    config = json.loads((tmp_path / "from_url" / "config.json").read_text())
    assert config["store"] == config["unlearn_store"] == url  # the URL is the store reference
    r = runner.invoke(main, ["verify", str(tmp_path / "from_url")])  # reaches the store by URL
    assert r.exit_code == 0 and "not reachable" not in r.output, r.output


def test_storage_options_json_errors_do_not_echo_the_value(mem):
    secret = "sekrit-value-123"
    r = CliRunner().invoke(main, ["inspect", f"{mem}/s.zarr", "--storage-options", f'{{"key": "{secret}"'])
    assert r.exit_code == 2 and "must be a JSON object" in r.output and secret not in r.output
    r = CliRunner().invoke(main, ["verify", f"{mem}/nothing.zarr", "--storage-options", "{}"])
    assert r.exit_code == 2 and "not an activation store" in r.output, r.output


def test_file_urls_are_local_stores(tmp_path):
    src = make_store(tmp_path / "s.zarr")
    res = copy_store(src, f"file://{tmp_path}/c.zarr", progress=False)
    assert res.copied == 64 and (tmp_path / "c.zarr" / ".ff-writer.lock").is_file()
    assert open_store(f"file://{tmp_path}/c.zarr").meta.complete


def test_cache_into_a_url_resumes_and_repairs_like_a_folder(tmp_path, mem, tiny_model, tiny_corpora):
    import fsspec

    from cache.build import CacheConfig, build_cache

    cfg = CacheConfig(model=tiny_model, layers=(1,), retain=tiny_corpora[0], unlearn=tiny_corpora[1],
                      contexts=12, unlearn_contexts=8, ctx_len=16, chunk_contexts=4)
    url, local = f"{mem}/c.zarr", tmp_path / "c.zarr"
    build_cache(cfg, url, progress=False)
    build_cache(cfg, local, progress=False)
    assert_same_store(url, local)
    assert build_cache(cfg, url, progress=False).skipped  # complete: nothing to do
    with pytest.raises(StoreError, match="other arguments"):
        build_cache(CacheConfig(**{**cfg.__dict__, "ctx_len": 8}), url, progress=False)
    fsspec.filesystem("memory").rm(f"{url.removeprefix('memory:/')}/unlearn/layer_1/c/1/0/0")
    res = build_cache(cfg, url, repair=True, progress=False)
    assert res.repaired == ("unlearn chunk 1 (contexts 4-7)",)
    assert_same_store(url, local)
    build_cache(cfg, url, overwrite=True, progress=False)
    assert_same_store(url, local)
