"""cache/atomic.py: files and folders replaced whole or not at all, flushed to disk before and
after the rename."""
from __future__ import annotations

import os

import pytest

import cache.atomic as atomic


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync was called on, in order."""
    seen: list[str] = []
    real = os.fsync

    def record(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    return seen


def test_atomic_write_replaces_the_file_and_flushes_file_then_folder(tmp_path, synced):
    path = tmp_path / "result.json"
    path.write_text("old")
    atomic.atomic_write(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert synced == [str(tmp_path / "result.json.tmp"), str(tmp_path)], "the new file, then the rename"
    atomic.atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic.atomic_write(path, lambda tmp: tmp.write_text("by a writer"))
    assert path.read_text() == "by a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, synced):
    path = tmp_path / "ckpt.pt"
    path.write_text("complete checkpoint")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write(path, half_then_fail)
    assert path.read_text() == "complete checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert synced == []


def test_replace_dir_swaps_a_finished_folder_in_after_flushing_it(tmp_path, synced):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    new = tmp_path / "model.partial"
    (new / "sub").mkdir(parents=True)
    (new / "weights").write_text("new")
    (new / "sub" / "config").write_text("{}")
    atomic.replace_dir(new, target)
    assert (target / "weights").read_text() == "new" and (target / "sub" / "config").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary or old folder left"
    assert str(new / "weights") in synced and str(new / "sub" / "config") in synced
    assert synced[-1] == str(tmp_path), "the parent folder last, after the rename"
