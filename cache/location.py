"""Where a store lives: a local folder, or any fsspec URL (`s3://`, `gs://`, `memory://`, ...).

A local path (or a `file://` URL, which is turned into one) opens with zarr's LocalStore exactly
as before: atomic chunk files, the writer lock, temp-file cleanup. Any other URL opens with zarr's
`FsspecStore.from_url`; object stores make each put atomic, so a chunk is there whole or not at
all and the "tokens chunk last" rule of cache/store.py still marks completion, but there is no
writer lock and there are no temp files (docs/scaling.md).

Storage options (credentials, endpoint) come from the standard environment of each filesystem
(for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ... read by
botocore), and from `--storage-options JSON` / FF_STORAGE_OPTIONS, which the CLI hands to
`use_storage_options`. They live in this process only: stores, run folders and messages name a
store by its URL, with any `user:password@` part removed (`public`).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import StoreError

StoreLocation = str | Path
"""A local folder (str or Path) or an fsspec URL (str)."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")
_options: dict[str, Any] = {}


def is_remote(location: StoreLocation) -> bool:
    """True for a URL other than file:// (also fsspec chains such as `simplecache::s3://...`)."""
    s = str(location)
    if isinstance(location, Path) or s.startswith("file://"):
        return False
    return bool(_SCHEME.match(s)) or "::" in s


def local_path(location: StoreLocation) -> Path:
    """The folder of a local location; `file:///a/b` -> /a/b."""
    s = str(location)
    if s.startswith("file://"):
        parts = urlsplit(s)
        return Path(unquote(parts.netloc + parts.path))
    return Path(location)


def normalize(location: StoreLocation) -> StoreLocation:
    """A Path for a local location, the URL (without a trailing '/') for a remote one."""
    return str(location).rstrip("/") if is_remote(location) else local_path(location)


def public(location: StoreLocation) -> str:
    """The location as it may be written down (run folders, messages): no `user:password@`."""
    return _USERINFO.sub(r"\1", str(location))


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options JSON` -> dict. The error never repeats the text: it may hold secrets."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise StoreError("--storage-options must be a JSON object such as "
                         "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (the value given is not "
                         "shown: it may hold credentials)")
    return value


def use_storage_options(options: dict[str, Any] | None) -> None:
    """Options for every remote store this process opens without explicit ones (the CLI's
    --storage-options). Kept in memory only."""
    _options.clear()
    _options.update(options or {})


def storage_options(explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """`explicit` if given, else those set by `use_storage_options`. The environment is read by
    the filesystem itself (botocore for s3://, google-auth for gs://)."""
    return dict(_options if explicit is None else explicit)


def store_like(location: StoreLocation, *, read_only: bool, options: dict[str, Any] | None = None):
    """What zarr's open/create functions take for `location`: the folder name for a local store
    (zarr makes its LocalStore from it, as it always has), an FsspecStore for a URL."""
    if not is_remote(location):
        return str(local_path(location))
    return zarr_store(location, read_only=read_only, options=options)


def zarr_store(location: StoreLocation, *, read_only: bool,
               options: dict[str, Any] | None = None):
    """A zarr store object for `location`, for key-level reads and writes: LocalStore for a
    folder, FsspecStore for a URL."""
    from zarr.storage import LocalStore

    if not is_remote(location):
        return LocalStore(local_path(location), read_only=read_only)
    url = str(normalize(location))
    opts = storage_options(options)
    if url.startswith("s3://") and "config_kwargs" not in opts:
        import os

        retries = {k: v for k, v in S3_RETRIES.items() if _RETRY_ENV[k] not in os.environ}
        if retries:  # botocore's own environment (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS) wins
            opts["config_kwargs"] = {"retries": retries}
    try:
        store = _remote_store_class().from_url(url, storage_options=opts, read_only=read_only)
    except (ImportError, ValueError) as e:  # unknown protocol, or its package not installed
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(f"cannot open '{public(location)}': {why}; install the fsspec filesystem "
                         "for it (s3fs for s3://, gcsfs for gs://)") from e
    store.ff_url = public(url)
    return store


S3_RETRIES = {"mode": "standard", "max_attempts": 8}
"""botocore's retries for s3:// stores, unless --storage-options sets `config_kwargs`: throttling,
5xx answers and dropped connections are retried with exponential backoff and jitter (at most
20 s between attempts), 8 attempts in all (s3fs adds its own few for some errors). Only when
they run out does a command stop, with one line naming the object (`_remote_store_class`).
`AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` in the environment, or `config_kwargs` in the storage
options, take precedence."""
_RETRY_ENV = {"mode": "AWS_RETRY_MODE", "max_attempts": "AWS_MAX_ATTEMPTS"}


def _remote_error(what: str, store, key: str, e: BaseException) -> StoreError:
    url = getattr(store, "ff_url", None)
    if url is None:  # a copy zarr made (with_read_only): the filesystem's protocol and path
        proto = store.fs.protocol[0] if isinstance(store.fs.protocol, (tuple, list)) else store.fs.protocol
        url = f"{proto}://{store.path}"
    where = f"{url}/{key}"
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return StoreError(f"cannot {what} '{where}': the object store kept failing after retries ({why}); "
                      "what was complete is untouched: rerun the command to go on")


@functools.cache
def _remote_store_class():
    """zarr's FsspecStore, with every request's failure (once the filesystem's retries are spent)
    turned into a one-line StoreError naming the object, instead of a traceback from deep in the
    HTTP client."""
    from zarr.storage import FsspecStore

    def named(what: str, method):
        async def wrapped(self, key, *args, **kwargs):
            try:
                return await method(self, key, *args, **kwargs)
            except StoreError:
                raise
            except Exception as e:
                raise _remote_error(what, self, key, e) from e
        return wrapped

    class RemoteStore(FsspecStore):
        get = named("read", FsspecStore.get)
        set = named("write", FsspecStore.set)
        exists = named("look up", FsspecStore.exists)
        delete = named("delete", FsspecStore.delete)

    return RemoteStore


def delete_all(store, keep=None) -> None:
    """Delete every key of a remote zarr store (--overwrite) but those `keep(key)` accepts, key by
    key through the store API (FsspecStore.clear leaves keys behind on some filesystems, memory://
    among them)."""
    import asyncio

    from zarr.core.sync import sync

    async def run() -> None:
        keys = [k async for k in store.list() if keep is None or not keep(k)]
        for i in range(0, len(keys), 256):  # bounded concurrency
            await asyncio.gather(*(store.delete(k) for k in keys[i:i + 256]))

    sync(run())
