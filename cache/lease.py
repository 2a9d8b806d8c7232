"""The writer lease of a store in S3: one writer at a time where there is no file lock.

An object store has no flock, but S3 (and S3-compatible servers) make a put conditional:
`If-None-Match: *` creates an object only if it does not exist, `If-Match: ETAG` replaces it
only if it is still the version read. The lease is the object `STORE/.ff-lease.json`:

- **take**: create it with `If-None-Match: *` (owner id, host, pid, command, expiry). If it exists
  and has not expired, the store is being written: refused, naming the holder. If it has expired
  (its writer died or lost the network), or its writer was a process of this host that is gone,
  replace it with `If-Match` on the version read, so that of two processes taking over at once
  exactly one wins. (Host names must tell the writers' machines apart, as they do in messages.)
- **hold**: a thread renews it every `LEASE_SECONDS / 4` with `If-Match` on our last version. A
  renewal refused (someone took the lease over after it expired) marks it lost, and the writer
  stops before its next chunk (`check`).
- **give back**: delete it with `If-Match`, so that a lease taken over by another writer is left alone.

Shards of one `ff cache --shard I/N` run hold leases of their own (`.ff-lease-shard-I-of-N.json`):
they write side by side, as they do on a local store; a plain writer is refused while a shard's
lease is live, and a shard while the plain writer's is. Expiry is judged by the clocks of the
machines involved: they must agree within `LEASE_SECONDS` (NTP does this).

Only `s3://` URLs take a lease. Other object stores (`gs://`, `memory://`) are written without one,
as before: one writer at a time is up to the user there (docs/scaling.md).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from zarr.core.sync import sync

from .chunks import first_line
from .errors import StoreError
from .location import StoreLocation, public, zarr_store

LEASE_KEY = ".ff-lease.json"
SHARD_LEASE_PREFIX = ".ff-lease-shard-"
LEASE_SECONDS = float(os.environ.get("FF_LEASE_SECONDS", "60"))
"""How long a lease lives without renewal; a dead writer's lease blocks the store this long."""


def takes_lease(store: StoreLocation) -> bool:
    return str(store).startswith("s3://")


def _precondition_failed(e: BaseException) -> bool:
    """Whether `e` (as s3fs raises it, or its botocore cause) is S3's 412 for a failed condition."""
    seen = 0
    while e is not None and seen < 5:
        response = getattr(e, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {409, 412}:
            return True
        if "pre-condition" in str(e) or "precondition" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class _S3:
    """The lease objects of one store, through the store's own s3fs filesystem."""

    def __init__(self, store: StoreLocation, options: dict[str, Any] | None = None):
        zs = zarr_store(store, read_only=False, options=options)
        self.fs, self.url = zs.fs, public(store)
        self.bucket, _, prefix = zs.path.partition("/")
        self.prefix = prefix.rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> tuple[dict[str, Any], str] | None:
        """(the lease's content, its ETag), or None if there is none."""
        async def go():
            try:
                r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key(name))
            except FileNotFoundError:
                return None
            body = await r["Body"].read()
            return body, r["ETag"]

        got = sync(go())
        if got is None:
            return None
        try:
            info = json.loads(got[0])
        except ValueError:
            info = {}
        return (info if isinstance(info, dict) else {}), got[1]

    def put(self, name: str, info: dict[str, Any], *, if_match: str | None) -> str | None:
        """Create (`if_match` None: only if absent) or replace (only if still `if_match`) ->
        the new ETag, or None when the condition failed."""
        cond = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
        try:
            r = sync(self.fs._call_s3("put_object", Bucket=self.bucket, Key=self.key(name),
                                      Body=json.dumps(info).encode(), **cond))
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise StoreError(f"cannot write the writer lease of store '{self.url}': {first_line(e)}") from e
        return r["ETag"]

    def delete(self, name: str, if_match: str) -> None:
        try:
            sync(self.fs._call_s3("delete_object", Bucket=self.bucket, Key=self.key(name), IfMatch=if_match))
        except Exception as e:
            if not _precondition_failed(e):  # taken over by another writer: theirs now
                raise

    def shard_leases(self) -> list[str]:
        async def go():
            r = await self.fs._call_s3("list_objects_v2", Bucket=self.bucket,
                                       Prefix=self.key(SHARD_LEASE_PREFIX))
            return [o["Key"].rsplit("/", 1)[-1] for o in r.get("Contents", [])]

        return sync(go())


_HELD: set[str] = set()
"""Owner ids of the leases this process holds now."""


def _live(info: dict[str, Any] | None, now: float) -> bool:
    """Whether a lease still stands: not expired, and not left by a writer known to be dead (a
    process of this host that no longer runs, or this very process, which does not hold it any
    more: as a local flock dies with its process)."""
    if not info or float(info.get("expires", 0)) <= now:
        return False
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if info["pid"] == os.getpid():
            return info.get("owner") in _HELD
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            pass
    return True


def _holder(info: dict[str, Any], now: float) -> str:
    left = max(float(info.get("expires", 0)) - now, 0.0)
    what = info.get("command", "ff cache")
    return f"`{what}` (host {info.get('host', '?')}, pid {info.get('pid', '?')}; its lease expires in {left:.0f} s " \
           "unless renewed)"


def check_no_lease(store: StoreLocation, shard: Any = None) -> None:
    """Refuse early (before a model loads) a store whose lease another writer holds."""
    if not takes_lease(store):
        return
    s3, now = _S3(store), time.time()
    mine = f"{SHARD_LEASE_PREFIX}{shard.name}.json" if shard is not None else LEASE_KEY
    for name in [mine, *([LEASE_KEY] if shard is not None else [])]:
        got = s3.get(name)
        if got is not None and _live(got[0], now):
            raise _refusal(s3.url, got[0], now)
    if shard is None:
        _refuse_live_shards(s3, now)


def _refusal(url: str, info: dict[str, Any], now: float) -> StoreError:
    return StoreError(f"store '{url}' is being written by another {_holder(info, now)}; wait for it to "
                      "finish, or stop it and rerun once its lease has expired")


def _refuse_live_shards(s3: _S3, now: float) -> None:
    live = []
    for name in s3.shard_leases():
        got = s3.get(name)
        if got is not None and _live(got[0], now):
            live.append(f"{got[0].get('command', name)}: host {got[0].get('host', '?')}, pid {got[0].get('pid', '?')}")
    if live:
        raise StoreError(f"store '{s3.url}' is being written by `ff cache --shard` processes ({'; '.join(live)}); "
                         "wait for them to finish, or stop them and rerun once their leases have expired")


class Lease:
    """The store's writer lease (see the module docstring): `acquire()` takes it or raises a
    one-line StoreError naming the holder, `release()` gives it back, `check()` raises once it was
    lost. WriterLock (cache/lock.py) holds one for an s3:// store."""

    def __init__(self, store: StoreLocation, *, command: str = "ff cache", shard: Any = None,
                 options: dict[str, Any] | None = None):
        self.store, self.shard, self.options = store, shard, options
        self.name = f"{SHARD_LEASE_PREFIX}{shard.name}.json" if shard is not None else LEASE_KEY
        self.info = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                     "command": command + (f" --shard {shard}" if shard is not None else "")}
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._s3: _S3 | None = None

    def _fresh(self) -> dict[str, Any]:
        return {**self.info, "expires": time.time() + LEASE_SECONDS}

    def acquire(self) -> None:
        self._s3 = s3 = _S3(self.store, self.options)
        etag = s3.put(self.name, self._fresh(), if_match=None)
        if etag is None:  # a lease is there: live, or left by a writer that died
            got = s3.get(self.name)
            now = time.time()
            if got is not None and got[0].get("owner") == self.info["owner"]:
                etag = got[1]  # ours after all: a retried create whose first answer was lost
            elif got is not None and _live(got[0], now):
                raise _refusal(s3.url, got[0], now)
            elif got is not None:  # expired: take it over only if nobody else did first
                etag = s3.put(self.name, self._fresh(), if_match=got[1])
            else:  # gone meanwhile
                etag = s3.put(self.name, self._fresh(), if_match=None)
            if etag is None:
                got = s3.get(self.name)
                raise _refusal(s3.url, got[0] if got else {}, time.time())
        self.etag = etag
        _HELD.add(self.info["owner"])
        try:
            now = time.time()
            if self.shard is None:
                _refuse_live_shards(s3, now)
            else:
                got = s3.get(LEASE_KEY)
                if got is not None and _live(got[0], now):
                    raise _refusal(s3.url, got[0], now)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._renew, name="ff-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                etag = self._s3.put(self.name, self._fresh(), if_match=self.etag)
            except Exception:  # a transient error: try again at the next beat, within the lease
                continue
            if etag is None:  # refused: taken over, unless it was our own retried write that landed
                try:
                    got = self._s3.get(self.name)
                except Exception:
                    continue
                if got is None or got[0].get("owner") != self.info["owner"]:
                    self.lost = True
                    return
                etag = got[1]
            self.etag = etag

    def check(self) -> None:
        """Raise if the lease was lost (renewals failed until another writer took it over)."""
        if self.lost:
            raise StoreError(f"lost the writer lease of store '{public(self.store)}' to another writer "
                             f"(this process was not heard from for {LEASE_SECONDS:.0f} s); its chunks so far "
                             "are complete; rerun the command once the other writer has finished")

    def release(self) -> None:
        _HELD.discard(self.info["owner"])
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.etag is not None and self._s3 is not None and not self.lost:
            try:
                self._s3.delete(self.name, self.etag)
            except Exception:  # unreachable store: the lease expires on its own
                pass
        self.etag = None
