"""`ff cache` as the only writer of its store: the writer lock, a read-only store refused before the
model loads, and resume refusing chunks that would be computed differently (weights, dtype,
device), naming both values."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from cache.errors import StoreError
from cache.lock import LOCK_FILE, WriterLock
from cli import main

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from cache.lock import WriterLock; WriterLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(120)")


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output.strip()


def cache_args(model, corpora, out, *extra):
    return ("cache", "--model", model, "--retain", corpora[0], "--unlearn", corpora[1],
            "--contexts", "8", "--set", "ctx_len=16", "--layers", "1", "--set", "chunk_contexts=2",
            "--quiet", "--out", out, *extra)


def assert_one_line_error(code, out, *needles):
    assert code == 2 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]  # not the loading bar
    assert len(lines) == 1, out
    for n in needles:
        assert n in lines[0], lines[0]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_held_lock_refuses_a_second_writer_until_its_process_dies(tmp_path, tiny_model,
                                                                    tiny_corpora):
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        code, msg = run(*cache_args(tiny_model, tiny_corpora, out))
        assert_one_line_error(code, msg, "being written by another `ff cache`",
                              f"host {socket.gethostname()}, pid {holder.pid}")
        with pytest.raises(StoreError, match=f"pid {holder.pid}"):
            WriterLock(out).acquire()
    finally:
        holder.kill()  # like kill -9: the lock file keeps naming the dead holder
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    code, msg = run(*cache_args(tiny_model, tiny_corpora, out))
    assert code == 0, msg
    assert (out / LOCK_FILE).read_text() == ""  # released: names no one
    assert run("verify", out)[0] == 0


def test_stale_lock_file_does_not_block(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with WriterLock(store):
        assert json.loads((store / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):  # a second writer, same process
            WriterLock(store).acquire()


def test_resume_refuses_another_compute_dtype_and_cleans_partial_writes(tmp_path, tiny_model,
                                                                         tiny_corpora):
    out = tmp_path / "s.zarr"
    assert run(*cache_args(tiny_model, tiny_corpora, out))[0] == 0
    root = zarr.open_group(str(out), mode="r+")
    attrs = dict(root.attrs)
    recorded = attrs["compute_dtype"], attrs["device_kind"], attrs["vocab_size"]
    assert recorded == ("float32", "cpu", 45)  # 45: the tiny tokenizer's vocabulary
    root.attrs["complete"] = False  # an interrupted run: chunk 3 of retain was being written
    for f in (out / "retain" / "tokens" / "c" / "3").rglob("*"):
        f.unlink()
    partial = out / "retain" / "layer_1" / "c" / "3" / "0" / ("0." + "ab" * 16 + ".partial")
    partial.write_bytes(b"half a chunk")

    code, msg = run(*cache_args(tiny_model, tiny_corpora, out, "--set", "model_dtype=bfloat16"))
    assert_one_line_error(code, msg, "compute dtype float32", "this run has bfloat16",
                          "--model-dtype float32")
    assert partial.exists()  # refused before anything was touched
    assert "temp file(s) of an interrupted write" in run("verify", out)[1]

    del root.attrs["compute_dtype"]  # a store from before the attribute: not checked
    code, msg = run(*cache_args(tiny_model, tiny_corpora, out, "--set", "model_dtype=bfloat16"))
    assert code == 0, msg
    assert not partial.exists()
    assert zarr.open_group(str(out)).attrs["complete"] and run("verify", out)[0] == 0


@pytest.mark.parametrize("key,value,needles", [
    ("model_hash", "sha256:0123", ("model weights hash sha256:0123", "the model changed")),
    ("model_revision", "abc123", ("model revision abc123", "this run has None", "--model ID@REV")),
    ("device_kind", "cuda", ("device kind cuda", "this run has cpu", "--device cuda")),
])
def test_resume_refuses_chunks_computed_otherwise(tmp_path, tiny_model, tiny_corpora, key, value,
                                                  needles):
    out = tmp_path / "s.zarr"
    assert run(*cache_args(tiny_model, tiny_corpora, out))[0] == 0
    zarr.open_group(str(out), mode="r+").attrs.update({"complete": False, key: value})
    code, msg = run(*cache_args(tiny_model, tiny_corpora, out))
    assert_one_line_error(code, msg, "cannot resume store", *needles)


@contextmanager
def read_only(path: Path):
    """`path` and the folders in it read-only to this process: chmod for a user, a read-only bind
    mount for root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        folders = [path, *(p for p in path.rglob("*") if p.is_dir())]
        for f in folders:
            f.chmod(0o555)
        try:
            yield
        finally:
            for f in folders:
                f.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", path, path], capture_output=True).returncode:
        pytest.skip("running as root without mount: no read-only folder can be made")
    try:
        yield
    finally:
        subprocess.run(["umount", path], check=True)


@pytest.mark.parametrize("where", ["store", "parent"])
def test_read_only_store_folder_fails_before_the_model_loads(tmp_path, tiny_model, tiny_corpora,
                                                             monkeypatch, where):
    if where == "store":  # an interrupted store to resume
        folder = out = tmp_path / "s.zarr"
        assert run(*cache_args(tiny_model, tiny_corpora, out))[0] == 0
        zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    else:  # a new store in a read-only folder
        folder = tmp_path / "ro"
        folder.mkdir()
        out = folder / "new.zarr"

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cache.models.load_model", no_model)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with read_only(folder):
        r = CliRunner().invoke(main, [str(a) for a in cache_args(tiny_model, tiny_corpora, out)])
    assert isinstance(r.exception, SystemExit) and r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr  # one line
    assert r.stderr.startswith(f"error: cannot write to '{folder}' (read-only or no permission); "
                               "make it writable or choose another --out"), r.stderr
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_the_lock_probe_opens_for_writing_and_a_file_system_without_locks_is_one_line(tmp_path, monkeypatch):
    """`check_unlocked` opens the lock file read-write where it may (NFS emulates flock with POSIX
    locks, which need a file open for writing), writing nothing; a file system that refuses
    locks (ENOLCK) is a StoreError naming the store, not a traceback."""
    import errno
    import fcntl

    import cache.lock as lock

    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    before = (store / LOCK_FILE).read_bytes()
    flags = []
    real_open = os.open
    monkeypatch.setattr(lock.os, "open", lambda path, fl, *a: flags.append(fl) or real_open(path, fl, *a))
    lock.check_unlocked(store)
    assert flags and flags[0] & os.O_ACCMODE == os.O_RDWR
    assert (store / LOCK_FILE).read_bytes() == before, "the probe writes nothing"

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(StoreError, match=r"^cannot lock store '.*s\.zarr' \(No locks available\): .*local disk$"):
        lock.check_unlocked(store)


def test_a_local_model_changed_in_the_middle_of_a_file_is_another_model(tmp_path, tiny_corpora, monkeypatch):
    from conftest import build_tiny_model

    from cache import models

    monkeypatch.setenv("FF_CACHE_DIR", str(tmp_path / "ff-cache"))
    folder = build_tiny_model(tmp_path / "model", hidden=256)  # a weights file over 2 MiB
    weights = folder / "model.safetensors"
    assert weights.stat().st_size > 4 << 20
    out = tmp_path / "s.zarr"
    assert run(*cache_args(str(folder), tiny_corpora, out))[0] == 0
    recorded = zarr.open_group(str(out)).attrs["model_hash"]
    assert recorded == models.folder_hash(folder) and recorded.startswith("sha256-files:")

    zarr.open_group(str(out), mode="r+").attrs["complete"] = False  # an interrupted store
    legacy = models.legacy_fingerprint(folder)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 // 4 * 4] ^= 0x01  # the lowest byte of one float32 weight, mid-file
    weights.write_bytes(bytes(data))
    assert models.legacy_fingerprint(folder) == legacy  # what ff used to compare: blind to it
    code, msg = run(*cache_args(str(folder), tiny_corpora, out))
    assert_one_line_error(code, msg, "cannot resume store", f"model weights hash {recorded}", "the model changed")

    # a store recorded by an older ff (first and last MiB) still resumes with its own model
    zarr.open_group(str(out), mode="r+").attrs["model_hash"] = legacy
    code, msg = run(*cache_args(str(folder), tiny_corpora, out))
    assert code == 0, msg


def test_a_folders_hash_reads_each_file_once_until_it_changes(tmp_path, monkeypatch):
    from cache import models

    monkeypatch.setenv("FF_CACHE_DIR", str(tmp_path / "ff-cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(3 << 20))
    reads = []
    real = models._sha256_file
    monkeypatch.setattr(models, "_sha256_file", lambda p: reads.append(p.name) or real(p))
    first = models.folder_hash(folder)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert models.folder_hash(folder) == first and len(reads) == 2  # remembered
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert models.folder_hash(folder) != first and reads[2:] == ["model.safetensors"]


def test_a_lock_file_left_by_a_dead_writer_does_not_block_ff_cache(tmp_path, tiny_model, tiny_corpora):
    """Row 21 through the CLI: a store interrupted by a writer that died, its lock file still naming
    it; the same command takes the lock, finishes the store and names itself in the file."""
    out = tmp_path / "s.zarr"
    assert run(*cache_args(tiny_model, tiny_corpora, out))[0] == 0
    zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    for f in (out / "retain" / "tokens" / "c" / "3").rglob("*"):  # its last chunk never finished
        f.unlink()
    dead = dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    r = CliRunner().invoke(main, [str(a) for a in cache_args(tiny_model, tiny_corpora, out)])
    assert r.exit_code == 0 and r.stderr.count("error:") == 0, r.output
    assert "wrote" in r.stdout and zarr.open_group(str(out)).attrs["complete"] is True
    assert run("verify", out)[0] == 0
