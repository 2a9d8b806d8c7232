"""Sharded caching (`ff cache --shard I/N`, torchrun): N processes fill one store together and it
ends equal, file for file, to the single-process store; a shard killed with kill -9 and rerun
ends equal too; --finalize; the per-shard writer lock; --shard validation. On the tiny random
model, with real CLI subprocesses started together."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import assert_same_store, kill_when, write_corpus

from cache.build import CacheConfig, build_cache
from cache.errors import StoreError
from cache.lock import LOCK_FILE, SHARD_DIR, WriterLock
from cache.shard import Shard, ShardError, global_chunks, record_shard, shard_device, shard_from_env
from cache.store import open_store
from cli import main

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def cache_args(model: str, corpora, out, *extra, contexts=24, unlearn_contexts=16, chunk=4,
               layers=(1, 2)) -> list[str]:
    return ["cache", "--model", model, "--layers", ",".join(map(str, layers)), "--retain", str(corpora[0]), "--unlearn",
            str(corpora[1]), "--contexts", str(contexts), "--set", f"unlearn_contexts={unlearn_contexts}",
            "--set", "ctx_len=32", "--set", f"chunk_contexts={chunk}", "--quiet", "--out", str(out), *extra]


def config(model: str, corpora, contexts=24, unlearn_contexts=16, chunk=4, layers=(1, 2)) -> CacheConfig:
    return CacheConfig(model=model, layers=layers, retain=str(corpora[0]), unlearn=str(corpora[1]),
                       contexts=contexts, unlearn_contexts=unlearn_contexts, ctx_len=32,
                       chunk_contexts=chunk)


def same_files(a: Path, b: Path) -> None:
    """Every file of store `a` is in `b` with the same bytes, and no other (lock files aside)."""
    def files(p: Path) -> dict[str, bytes]:
        return {str(f.relative_to(p)): f.read_bytes() for f in p.rglob("*")
                if f.is_file() and not f.relative_to(p).parts[0].startswith(".ff-")}

    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []


def spawn(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


def tokens_written(text: str) -> int:
    """Tokens the `ff cache` processes whose output is `text` say they wrote."""
    return sum(int(m.replace(",", "")) for m in re.findall(r"wrote ([\d,]+) tokens", text))


def one_line_error(r, *needles) -> str:
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and r.output.strip().splitlines()[-1] == lines[0], r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model, tiny_corpora) -> Path:
    """The single-process store every sharded one must equal."""
    out = tmp_path_factory.mktemp("single") / "s.zarr"
    build_cache(config(tiny_model, tiny_corpora), out, progress=False)
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_shards_equal_the_single_process_store(tmp_path, tiny_model, tiny_corpora, single, n):
    out = tmp_path / "s.zarr"
    procs = [spawn(cache_args(tiny_model, tiny_corpora, out, "--shard", f"{i}/{n}")) for i in range(n)]
    outs = finish(procs)
    assert sum("store complete" in o for o in outs) >= 1  # at least the last one marked it
    assert all(f"[shard {i}/{n}]: wrote" in o for i, o in enumerate(outs))
    assert tokens_written("".join(outs)) == (24 + 16) * 32  # disjoint shares: each chunk once
    same_files(single, out)
    assert_same_store(single, out)
    assert sorted(p.name for p in (out / SHARD_DIR).iterdir()) == [f"{i}-of-{n}" for i in range(n)]
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed in this environment")
def test_torchrun_ranks_are_the_shards(tmp_path, tiny_model, tiny_corpora, single):
    out = tmp_path / "s.zarr"
    p = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "cli",
                        *cache_args(tiny_model, tiny_corpora, out)], cwd=ROOT, text=True,
                       capture_output=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[shard 0/2]: wrote" in p.stdout and "[shard 1/2]: wrote" in p.stdout, p.stdout
    assert tokens_written(p.stdout) == (24 + 16) * 32
    same_files(single, out)
    assert open_store(out).meta.complete


def test_shard_killed_mid_write_then_rerun_ends_equal(tmp_path, tiny_model):
    corpora = (write_corpus(tmp_path / "r.txt", 600, seed=3), write_corpus(tmp_path / "u.txt", 200, seed=4))
    # 140 chunks of every layer: shard 0 runs long enough to be killed half way
    sizes = dict(contexts=240, unlearn_contexts=40, chunk=2, layers=(0, 1, 2, 3))
    ref = tmp_path / "ref.zarr"
    build_cache(config(tiny_model, corpora, **sizes), ref, progress=False)
    out = tmp_path / "s.zarr"
    args = [cache_args(tiny_model, corpora, out, "--shard", f"{i}/2", **sizes) for i in (0, 1)]
    victim, other = spawn(args[0]), spawn(args[1])
    kill_when(victim, lambda: int(open_store(out).corpus("retain").completed_chunks()[0::2].sum()), 3,
              what="shard 0")
    assert "chunk(s) of other shards still to come" in finish([other])[0]
    store = open_store(out)
    assert not store.meta.complete
    done = store.corpus("retain").completed_chunks()
    assert done[1::2].all() and 3 <= done[0::2].sum() < 60  # shard 1 finished; shard 0 did not

    r = CliRunner().invoke(main, ["cache", "--finalize", "--out", str(out)])
    one_line_error(r, "is not complete:", "of 140 chunks are missing", "rerun `ff cache --shard 0/2`")

    # temp files of a write the kill interrupted: the rerun of shard 0 removes those in its own
    # chunks only (shard 1 might still be writing its own)
    own = next(k for k in range(0, 120, 2) if not done[k])
    hex_ = uuid.uuid4().hex
    ours = out / "retain" / "layer_1" / "c" / str(own) / "0" / f"0.{hex_}.partial"
    theirs = out / "retain" / "layer_2" / "c" / "1" / "0" / f"0.{hex_}.partial"
    for f in (ours, theirs):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a chunk")
    r = CliRunner().invoke(main, args[0])
    assert r.exit_code == 0 and "store complete" in r.output, r.output
    assert not ours.exists() and theirs.exists()
    theirs.unlink()
    same_files(ref, out)
    assert_same_store(ref, out)


def test_finalize_refuses_a_partial_store_and_marks_a_full_one(tmp_path, tiny_model, tiny_corpora, single):
    out = tmp_path / "s.zarr"
    cfg = config(tiny_model, tiny_corpora)
    res = build_cache(cfg, out, progress=False, shard=Shard(0, 2))
    assert res.missing == 5 and not open_store(out).meta.complete  # 10 chunks, 5 for each shard
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = CliRunner().invoke(main, ["cache", "--finalize", "--out", str(out)])
    one_line_error(r, f"store '{out}' is not complete: 5 of 10 chunks are missing, the first retain "
                      "chunk 1 (contexts 4-7) (chunk 1 of the store's 10); rerun `ff cache --shard "
                      "1/2` with the same arguments (shards owning missing chunks: 1/2), then "
                      "--finalize again")
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}  # nothing written

    res = build_cache(cfg, out, progress=False, shard=Shard(1, 2))
    assert res.missing == 0 and open_store(out).meta.complete
    same_files(single, out)
    # a shard killed between its last chunk and the mark: --finalize marks it
    zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    layer = out / "retain" / "layer_2" / "c" / "3" / "0" / "0"  # every array's chunk must be there
    saved = layer.read_bytes()
    layer.unlink()
    r = CliRunner().invoke(main, ["cache", "--finalize", "--out", str(out)])
    one_line_error(r, "1 of 10 chunks are missing, the first retain chunk 3 (contexts 12-15)",
                   "`ff cache --shard 1/2`")
    layer.write_bytes(saved)
    r = CliRunner().invoke(main, ["cache", "--finalize", "--out", str(out)])
    assert r.exit_code == 0 and r.output.strip() == f"{out}: all 10 chunks present; marked complete"
    same_files(single, out)
    r = CliRunner().invoke(main, ["cache", "--finalize", "--out", str(out)])
    assert r.exit_code == 0 and "already complete" in r.output


@pytest.mark.parametrize("args,needles", [
    (["--shard", "2/2"], ("--shard takes I/N with 0 <= I < N", "got '2/2'")),
    (["--shard", "x"], ("--shard takes I/N", "got 'x'")),
    (["--shard", "1/0"], ("got '1/0'",)),
    (["--shard", "0/2", "--overwrite"], ("--shard cannot be combined with --overwrite",)),
    (["--shard", "0/2", "--repair"], ("--shard cannot be combined with --repair",)),
    (["--finalize", "--shard", "0/2"], ("--finalize takes only --out",)),
    (["--finalize"], ("is not an activation store (no zarr.json)",)),
])
def test_shard_options_are_one_line_errors(tmp_path, tiny_model, tiny_corpora, monkeypatch, args, needles):
    monkeypatch.setattr("cache.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "s.zarr"
    one_line_error(CliRunner().invoke(main, cache_args(tiny_model, tiny_corpora, out, *args)), *needles)
    assert not out.exists()


def test_torchrun_environment_gives_the_shard():
    assert shard_from_env({}) is None and shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == Shard(3, 8)
    with pytest.raises(ShardError, match="RANK='8' and WORLD_SIZE='8'"):
        shard_from_env({"RANK": "8", "WORLD_SIZE": "8"})
    assert shard_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"  # an explicit device stays
    if not torch.cuda.is_available():
        assert shard_device("auto", {"LOCAL_RANK": "1"}) == "auto"  # -> cpu, as without torchrun


def test_global_chunks_are_dealt_round_robin(single):
    chunks = global_chunks(open_store(single))
    assert [(c.k, c.corpus, c.index) for c in chunks[5:7]] == [(5, "retain", 5), (6, "unlearn", 0)]
    shares = [[c.k for c in chunks if Shard(i, 4).owns(c.k)] for i in range(4)]
    assert shares == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


def test_shards_share_the_lock_but_not_a_shard_or_with_a_plain_writer(tmp_path, tiny_model, tiny_corpora):
    out, me = tmp_path / "s.zarr", f"pid {os.getpid()}"
    with WriterLock(out, Shard(0, 2)):
        with WriterLock(out, Shard(1, 2)):  # another shard: runs alongside
            assert json.loads((out / SHARD_DIR / "1-of-2").read_text())["shard"] == "1/2"
            with pytest.raises(StoreError, match=r"being written by `ff cache --shard` processes "
                                                 rf"\(shard 0/2: host .*, {me}; shard 1/2: host .*, {me}\)"):
                WriterLock(out).acquire()
        with pytest.raises(StoreError, match=rf"shard 0/2 of store .* by another `ff cache --shard 0/2` "
                                             rf"\(host .*, {me}\)"):
            WriterLock(out, Shard(0, 2)).acquire()
        r = CliRunner().invoke(main, cache_args(tiny_model, tiny_corpora, out))  # refused before loading
        one_line_error(r, "being written by `ff cache --shard` processes (shard 0/2: host")
        r = CliRunner().invoke(main, cache_args(tiny_model, tiny_corpora, out, "--shard", "0/2"))
        one_line_error(r, "by another `ff cache --shard 0/2`")
    assert (out / SHARD_DIR / "0-of-2").read_text() == ""  # released: names no one
    with WriterLock(out):
        with pytest.raises(StoreError, match=rf"being written by another `ff cache` \(host .*, {me}\)"):
            WriterLock(out, Shard(1, 2)).acquire()
    with WriterLock(out, Shard(1, 2)):  # a dropped plain lock and dropped shard locks never block
        pass


def test_a_store_another_shard_is_creating_is_new_or_existing(tmp_path, monkeypatch, tiny_model,
                                                             tiny_corpora, single):
    """A shard's look at a store that another shard is creating right now: only the temp file of
    its root zarr.json is there (new), or the root appears between the two looks (existing)."""
    from cache import build

    out = tmp_path / "s.zarr"
    (out / SHARD_DIR).mkdir(parents=True)
    for f in (out / LOCK_FILE, out / SHARD_DIR / "1-of-2", out / f"zarr.json.{uuid.uuid4().hex}.partial"):
        f.write_text("")
    spec = config(tiny_model, tiny_corpora).spec()
    assert build._check_existing(out, spec, False) == "new"
    (out / "notes.txt").write_text("")
    with pytest.raises(StoreError, match="exists and is not an activation store"):
        build._check_existing(out, spec, False)
    looks = iter([False, True])
    monkeypatch.setattr(build, "has_root", lambda _: next(looks, True))
    monkeypatch.setattr(build, "is_vacant", lambda _: False)  # the root's documents now
    assert build._check_existing(single, spec, False) == "complete"


def test_a_shard_with_other_arguments_is_refused(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    build_cache(config(tiny_model, tiny_corpora), out, progress=False, shard=Shard(0, 2))
    r = CliRunner().invoke(main, cache_args(tiny_model, tiny_corpora, out, "--shard", "1/2",
                                            contexts=20))
    one_line_error(r, "was built with other arguments (contexts: 24 in the store, 20 now); give "
                      "every shard the store's arguments, or use another --out")


def test_shards_into_a_remote_store(tiny_model, tiny_corpora, single):
    url = f"memory://ff-{uuid.uuid4().hex[:12]}/s.zarr"
    cfg = config(tiny_model, tiny_corpora)
    record_shard(url, Shard(1, 2))  # shard 1 started first: only its record is there
    assert build_cache(cfg, url, progress=False, shard=Shard(0, 2)).missing == 5
    r = CliRunner().invoke(main, ["cache", "--finalize", "--out", url])
    one_line_error(r, "5 of 10 chunks are missing", "rerun `ff cache --shard 1/2`")
    assert build_cache(cfg, url, progress=False, shard=Shard(1, 2)).missing == 0
    assert_same_store(single, url)
    import fsspec

    fsspec.filesystem("memory").rm(url.removeprefix("memory:/").rsplit("/", 1)[0], recursive=True)


def test_concurrent_shards_into_s3_equal_the_single_process_store(tiny_model, tiny_corpora, single, s3_bucket):
    url = f"{s3_bucket}/s.zarr"
    outs = finish([spawn(cache_args(tiny_model, tiny_corpora, url, "--shard", f"{i}/2")) for i in (0, 1)])
    assert any("store complete" in o for o in outs), outs
    assert_same_store(single, url)
