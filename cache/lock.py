"""The writer lock of a store: one `ff cache` at a time writes to it.

An advisory `fcntl.flock` on `STORE/.ff-writer.lock`, which also records the holder's host and
pid for the message a second writer gets. The kernel drops a flock when its process dies
(Ctrl-C, kill -9, a crash), so a lock file left behind by a dead writer never blocks; the file
itself is kept, because deleting a lock file that another process may be opening races.
`check_unlocked` and `check_writable` refuse a store early, before a model is loaded.

Local stores only: object stores (s3://, gs://) have no flock, so on a remote store (any URL
but file://) the lock and both checks do nothing, and one writer at a time is up to the user
(docs/scaling.md).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .errors import StoreError
from .location import delete_all, is_remote, local_path, zarr_store

LOCK_FILE = ".ff-writer.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        info = {}
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"


def _flock_or_refuse(fd: int, store: Path) -> None:
    """Take the flock on `fd` without waiting; if another process holds it, close `fd` and
    raise StoreError naming the holder."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StoreError(f"store '{store}' is being written by another `ff cache` ({holder}); "
                         "wait for it to finish, or stop it and rerun") from None
    except BaseException:
        os.close(fd)
        raise


class WriterLock:
    """`with WriterLock(store):` holds the store's writer lock, or raises StoreError (one line,
    naming the holder's host and pid) if another process holds it. Creates the store folder."""

    def __init__(self, store: str | Path):
        self.remote = is_remote(store)  # no lock on an object store
        self.store = local_path(store)
        self.path = self.store / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.remote:
            return
        self.store.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        _flock_or_refuse(fd, self.store)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no stale holder named after us
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(store: str | Path) -> None:
    """Refuse early, before loading a model, if a live writer holds the store's lock (a probe:
    takes and drops the lock at once; writes nothing). Nothing to probe on a remote store."""
    if is_remote(store):
        return
    path = local_path(store) / LOCK_FILE
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        _flock_or_refuse(fd, local_path(store))
        os.close(fd)


def check_writable(store: str | Path) -> None:
    """Refuse early, before loading a model, a store that cannot be written: the store folder
    and its group and array folders, or for a new store the nearest existing folder above it,
    on a read-only file system or without write permission (writes nothing). A remote store's
    permissions show on the first write."""
    if is_remote(store):
        return
    path = local_path(store)
    if path.is_dir():
        folders = [path, *(p for p in sorted(path.glob("*")) if p.is_dir()),
                   *(p for p in sorted(path.glob("*/*")) if p.is_dir())]
    else:
        folders = [next(p for p in path.absolute().parents if p.exists())]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write to '{folder}' (read-only or no permission); make it "
                             "writable or choose another --out")


def is_vacant(store: str | Path, zstore=None) -> bool:
    """Nothing at `store` yet but perhaps the writer's lock file. A remote store: no key at all,
    looked up through `zstore` (its zarr store object, with the caller's storage options)."""
    if is_remote(store):
        from zarr.core.sync import sync

        return bool(sync((zstore or zarr_store(store, read_only=True)).is_empty("")))
    folder = local_path(store)
    return not folder.exists() or (folder.is_dir()
                                   and not any(p.name != LOCK_FILE for p in folder.iterdir()))


def clear_contents(store: str | Path, zstore=None) -> None:
    """Delete everything at `store` (--overwrite), keeping the lock file the caller holds."""
    if is_remote(store):
        delete_all(zstore or zarr_store(store, read_only=False))
        return
    import shutil

    for p in local_path(store).iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name != LOCK_FILE:
            p.unlink()
