"""Crash-safe writes: a file or a folder is replaced whole or not at all, also across a crash or
a power loss.

    atomic_write(path, "text")             str (UTF-8) or bytes
    atomic_write(path, lambda tmp: ...)    a writer that creates the new file at `tmp`
    replace_dir(tmp_dir, target)           a finished folder put in place of `target`

Each writes beside its target (the same filesystem, so the rename is atomic), fsyncs what it
wrote, renames it over the target and fsyncs the parent folder, so that the rename itself is on
disk. A failure removes the temporary file and leaves the target as it was. Every file that a
later step or a user relies on goes through here: run folders, checkpoints, results, reports,
exports, the converted embedded model.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

Writer = Callable[[Path], object]


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """Where the next version of `path` is written before it replaces it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def atomic_write(path: str | Path, data: str | bytes | Writer) -> Path:
    """Replace `path` by `data` (module docstring); returns the path."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def replace_dir(tmp: str | Path, target: str | Path) -> Path:
    """Put the finished folder `tmp` in place of `target` (which may exist): every file and the
    folder fsynced first; an existing target is renamed aside, then removed once the new one is
    in place, so that there is no moment without a complete folder on disk."""
    tmp, target = Path(tmp), Path(target)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
