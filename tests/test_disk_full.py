"""A full disk is the machine's fault, not a bug: one `error:` line, exit 2, nothing complete
damaged, and the same work finishes once there is space. Checked on a real tmpfs too small for
the run (CI runs as root; a test that cannot mount one fails instead of skipping)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_store
from safetensors.torch import load_file

from cli import main

TRAIN = ["train", "--layer", "1", "--preset", "demo", "--set", "steps=6", "--set", "expansion=2",
         "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=1", "--quiet"]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 16 KiB at tmp_path/disk, unmounted afterwards; `remount(size)` resizes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True, text=True)
    assert r.returncode == 0, f"this test mounts a tmpfs and needs root: {r.stderr.strip()}"

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, remount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ff_train_on_a_full_disk_is_one_line_and_resumes_to_the_same_run(tmp_path, small_disk):
    disk, remount = small_disk
    store = str(make_store(tmp_path / "s.zarr"))
    run = disk / "run"
    args = TRAIN + ["--store", store, "--out", str(run)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: the disk is full") and "rerun" in err[0], err
    assert "Traceback" not in r.output
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*")), "no half-written file left behind"
    before = _files(run)
    assert before, "what was complete before the disk filled is still there"

    remount("64m")
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref"
    assert CliRunner().invoke(main, TRAIN + ["--store", store, "--out", str(ref)]).exit_code == 0
    for name in ("sae.safetensors", "features.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), name
    assert sum(len(b) for b in _files(run).values()) > 16 * 1024, "the finished run does not fit the small disk"


def test_ff_cache_on_a_full_disk_is_one_line_and_a_rerun_completes_the_same_store(tmp_path, small_disk, tiny_model,
                                                                                   tiny_corpora):
    from conftest import assert_same_store

    disk, remount = small_disk
    remount("64k")  # room for the store's metadata and some chunks, not all
    args = ["cache", "--model", tiny_model, "--retain", tiny_corpora[0], "--unlearn", tiny_corpora[1],
            "--contexts", "64", "--set", "ctx_len=16", "--layers", "1", "--set", "chunk_contexts=4", "--quiet"]
    out = disk / "s.zarr"
    r = CliRunner().invoke(main, args + ["--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: the disk is full") and "rerun" in err[0], err
    remount("64m")
    r = CliRunner().invoke(main, args + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    ref = tmp_path / "ref.zarr"
    assert CliRunner().invoke(main, args + ["--out", str(ref)]).exit_code == 0
    assert_same_store(out, ref)
