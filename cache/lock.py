"""The writer lock of a store: one `ff cache` at a time writes to it, or the shards of one.

An advisory `fcntl.flock` on `STORE/.ff-writer.lock`, which also records the holder's host and
pid for the message a second writer gets. The shards of a sharded `ff cache --shard I/N`
(cache/shard.py) share that lock (LOCK_SH), so they run together while a plain writer (LOCK_EX)
is refused, and each also takes an exclusive lock on its own file `STORE/.ff-shards/I-of-N`, so
that two processes of the same shard are refused. The kernel drops a flock when its process
dies (Ctrl-C, kill -9, a crash), so a lock file left behind by a dead writer never blocks; the file
itself is kept, because deleting a lock file that another process may be opening races.
`check_unlocked` and `check_writable` refuse a store early, before a model is loaded.

Object stores have no flock: on `s3://` the lock is the store's writer lease instead
(cache/lease.py: a lease object written with S3's conditional puts, renewed while the writer
lives, expiring when it dies). Other remote stores (`gs://`, `memory://`) take no lock, and one
writer at a time is up to the user there (docs/scaling.md).
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from .chunks import PARTIAL_FILE
from .errors import StoreError
from .lease import LEASE_KEY, SHARD_LEASE_PREFIX, Lease, check_no_lease, takes_lease
from .location import delete_all, is_remote, local_path, zarr_store

if TYPE_CHECKING:
    from .shard import Shard

LOCK_FILE = ".ff-writer.lock"
SHARD_DIR = ".ff-shards"
"""`STORE/.ff-shards/I-of-N`: shard I of N's lock on a local store, and on any store the record
that shard I of N wrote to it (cache/shard.py names the shard to rerun from it)."""
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        info = {}
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"


def _flock_or_refuse(fd: int, store: Path, *, exclusive: bool = True, shard: "Shard | None" = None) -> None:
    """Take the flock on `fd` without waiting; if another process holds it, close `fd` and
    raise StoreError naming the holder: the plain writer, the shards, or (`shard`: `fd` is that
    shard's own lock) the other process of the same shard."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        if shard is not None:
            raise StoreError(f"shard {shard} of store '{store}' is being written by another "
                             f"`ff cache --shard {shard}` ({holder}); wait for it to finish, or "
                             "stop it and rerun") from None
        shards = _shard_holders(store) if exclusive else []
        if shards:
            raise StoreError(f"store '{store}' is being written by `ff cache --shard` processes "
                             f"({'; '.join(shards)}); wait for them to finish, or stop them and "
                             "rerun") from None
        raise StoreError(f"store '{store}' is being written by another `ff cache` ({holder}); "
                         "wait for it to finish, or stop it and rerun") from None
    except OSError as e:  # no lock support here (ENOLCK), or a lock the file system refuses
        os.close(fd)
        raise StoreError(f"cannot lock store '{store}' ({e.strerror or e}): its file system gives no file locks "
                         "here, so two writers could not be kept apart; write the store on a local disk") from None
    except BaseException:
        os.close(fd)
        raise


def _shard_holders(store: Path) -> list[str]:
    """'shard I/N: host H, pid P' for each shard lock of `store` that a live process holds."""
    import fcntl

    found = []
    for p in sorted((store / SHARD_DIR).glob("*-of-*")):
        m = _SHARD_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe, dropped at once
        except BlockingIOError:
            found.append(f"shard {m[1]}/{m[2]}: {_holder(fd)}")
        finally:
            os.close(fd)
    return found


def _write_holder(fd: int, **more) -> None:
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), **more}).encode())
    os.fsync(fd)


class WriterLock:
    """`with WriterLock(store):` holds the store's writer lock, or raises StoreError (one line,
    naming the holder's host and pid) if another process holds it. Creates the store folder.
    `shard`: hold the lock shared with the other shards, and shard's own lock exclusively.
    `options`: the storage options of a remote store (default: those of the process)."""

    def __init__(self, store: str | Path, shard: "Shard | None" = None, *, command: str = "ff cache",
                 options: dict | None = None):
        self.remote = is_remote(store)  # no flock on an object store: a lease on s3://, else nothing
        self.lease = Lease(store, command=command, shard=shard, options=options) if takes_lease(store) else None
        self.store = local_path(store)
        self.path = self.store / LOCK_FILE
        self.shard = shard
        self.fd: int | None = None  # the lock file naming us: the store's, or the shard's
        self.shared_fd: int | None = None  # a shard's shared lock on the store's lock file

    def acquire(self) -> None:
        if self.remote:
            if self.lease is not None:
                self.lease.acquire()
            return
        self.store.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if self.shard is None:
            _flock_or_refuse(fd, self.store)
            _write_holder(fd)
            self.fd = fd
            return
        _flock_or_refuse(fd, self.store, exclusive=False)  # refused only by a plain writer
        self.shared_fd = fd
        try:
            (self.store / SHARD_DIR).mkdir(exist_ok=True)
            own = os.open(self.store / SHARD_DIR / self.shard.name, os.O_RDWR | os.O_CREAT, 0o644)
            _flock_or_refuse(own, self.store, shard=self.shard)
        except BaseException:
            self.release()
            raise
        _write_holder(own, shard=str(self.shard))
        self.fd = own

    def check(self) -> None:
        """Raise if the lock was lost while held (an object store's lease; a flock cannot be)."""
        if self.lease is not None:
            self.lease.check()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no stale holder named after us
            os.close(self.fd)  # closing drops the flock
            self.fd = None
        if self.shared_fd is not None:  # shared with other shards: not ours to truncate
            os.close(self.shared_fd)
            self.shared_fd = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(store: str | Path, shard: "Shard | None" = None) -> None:
    """Refuse early, before loading a model, if a live writer holds the store's lock, or for a
    `shard`, a plain writer or the same shard (a probe: takes and drops the locks at once;
    writes nothing). On s3://, the store's lease (cache/lease.py); nothing on other remote stores."""
    if is_remote(store):
        check_no_lease(store, shard)
        return
    folder = local_path(store)
    probes = [(folder / LOCK_FILE, None)]
    if shard is not None:
        probes.append((folder / SHARD_DIR / shard.name, shard))
    for path, own in probes:
        if path.is_file():
            fd = _open_for_probe(path)
            _flock_or_refuse(fd, folder, exclusive=shard is None or own is not None, shard=own)
            os.close(fd)


def _open_for_probe(path: Path) -> int:
    """The lock file opened for the probe: read-write where we may (on NFS, flock is emulated with
    POSIX locks, and an exclusive one needs a file open for writing; nothing is written), else
    read-only (a store another user owns, on a local file system)."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


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
    """Nothing at `store` yet but perhaps the writer's lock file, shard records and the temp file
    of a root zarr.json being written (by a shard creating the store right now, or one killed
    doing so). A remote store: no key but shard records, looked up through `zstore` (its zarr
    store object, with the caller's storage options)."""
    if is_remote(store):
        from zarr.core.sync import sync

        zs = zstore or zarr_store(store, read_only=True)
        if sync(zs.is_empty("")):
            return True

        async def top() -> set[str]:  # one delimited listing
            return {k async for k in zs.list_dir("")}

        return {k for k in sync(top()) if not _is_lease(k)} <= {SHARD_DIR}
    folder = local_path(store)
    return not folder.exists() or (folder.is_dir() and not any(
        p.name not in {LOCK_FILE, SHARD_DIR} and not PARTIAL_FILE.search(p.name)
        for p in folder.iterdir()))


def _is_lease(key: str) -> bool:
    return key == LEASE_KEY or key.startswith(SHARD_LEASE_PREFIX)


def clear_contents(store: str | Path, zstore=None) -> None:
    """Delete everything at `store` (--overwrite), keeping the lock file (or lease) the caller holds."""
    if is_remote(store):
        delete_all(zstore or zarr_store(store, read_only=False), keep=_is_lease)
        return
    import shutil

    for p in local_path(store).iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name != LOCK_FILE:
            p.unlink()
