"""A package at an fsspec URL (``s3://``, ``memory://``, ``gs://``...): one object per key.

Object storage has no rename and no lock.  A writer therefore stages every change under
``staging/`` and commits by replacing the manifest with a conditional write (S3's ``If-Match``
on the manifest's ETag, or ``If-None-Match: *`` for the first one): when two writers race, one
write fails and that writer's change is refused as a whole.  Filesystems where spherefmt cannot make such a
write are read-only (``r+`` is refused with a clear message); new packages can still be written.

Service failures (a server gone, a timeout, a refused request) surface as one-line
:class:`~spherefmt.errors.StorageError` naming the package and the object.  For S3, retries and
timeouts are bounded by default (:data:`S3_DEFAULTS`).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from spherefmt.containers.base import Blob, CommitConflict, Container, safe_key
from spherefmt.errors import BackendUnavailableError, FormatError, SpherefmtError, StorageError

__all__ = ["S3_DEFAULTS", "FsspecContainer", "client_options"]

#: botocore client settings for ``s3://`` where the user did not choose.  The clients' own
#: defaults take minutes to report a hung service: 15 s read timeouts, botocore's attempts, and
#: s3fs's 5 attempts around a call that itself makes 5 attempts (25 per request).  Here:
#: 3 attempts per request (standard mode: refused or dropped connections, timeouts, 5xx and
#: throttling, with jittered backoff), each waiting at most 10 s for a byte.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                      "retries": {"total_max_attempts": 3, "mode": "standard"}},
}
#: s3fs's own attempts around each call (nested: n attempts make n * n requests, each with
#: botocore's attempts).  s3fs has no option for it, only a class attribute (5), so it is set on
#: the filesystem spherefmt opens; botocore's retries above cover the same failures.
S3FS_ATTEMPTS = 1
#: protocols where spherefmt makes a conditional write: S3's ``If-Match`` / ``If-None-Match``,
#: and the process-local memory filesystem (under a lock); tested here with a real S3 server
CONDITIONAL = ("s3", "s3a", "memory")
_MEMORY_LOCK = threading.Lock()
#: Modules whose exceptions mean "the storage service failed" (not "the object is missing").
_REMOTE_ERRORS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "requests", "urllib3")


def client_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options spherefmt opens ``url`` with: ``storage_options``, plus for S3 the
    bounded retries and timeouts of :data:`S3_DEFAULTS` wherever the user has not chosen.

    The user chooses through ``storage_options``, fsspec's configuration (``FSSPEC_S3_*``
    variables, ``~/.config/fsspec/``) or botocore's (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``).
    fsspec lets explicit options replace its configuration key by key, so the configured
    ``config_kwargs`` are merged here rather than hidden by ours.
    """
    opts = dict(storage_options or {})
    protocol = url.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        return opts
    from fsspec.config import conf

    user: dict[str, Any] = {}
    for proto in ("s3", "s3a"):  # s3fs reads the configuration of both of its names
        user.update(conf.get(proto, {}))
    user.update(opts)
    mine = copy.deepcopy(S3_DEFAULTS["config_kwargs"])  # botocore edits the retries dict in place
    if "AWS_MAX_ATTEMPTS" in os.environ or "AWS_RETRY_MODE" in os.environ:
        mine.pop("retries")  # botocore's own configuration wins over our default
    opts["config_kwargs"] = {**mine, **(user.get("config_kwargs") or {})}
    return opts


def storage_error(e: BaseException, where: str, key: str) -> BaseException:
    """``e`` as a :class:`StorageError` when it is a storage failure, else ``e`` itself."""
    if isinstance(e, FileNotFoundError | KeyError | SpherefmtError) or not isinstance(e, Exception):
        return e
    if isinstance(e, OSError | TimeoutError) or type(e).__module__.split(".")[0] in _REMOTE_ERRORS:
        msg = " ".join(str(e).split()) or type(e).__name__
        return StorageError(f"{where}: storage failed on {key or '/'} ({type(e).__name__}: {msg[:200]})")
    return e


def _precondition_failed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    # s3fs turns S3's 412 PreconditionFailed into OSError(EINVAL, "At least one of the
    # pre-conditions you specified did not hold")
    return isinstance(e, FileExistsError) or any(s in text for s in ("PreconditionFailed", "412", "pre-condition"))


class FsspecContainer(Container):
    """Objects at ``<url>/<key>`` of an fsspec filesystem; see the module docstring."""

    remote = True
    can_lock = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.where = url
        self.protocol = url.split("://", 1)[0]
        try:
            fs, root = fsspec.core.url_to_fs(url, **client_options(url, storage_options))
        except ImportError as e:
            raise BackendUnavailableError(f"{url}: {e} (for s3:// install 'spherefmt[s3]')") from None
        except Exception as e:  # noqa: BLE001 - e.g. a malformed URL or missing credentials
            err = storage_error(e, url, "")
            if err is e:
                raise FormatError(f"{url}: cannot open ({type(e).__name__}: {str(e)[:160]})") from None
            raise err from None
        if self.protocol in ("s3", "s3a") and "retries" not in vars(fs):
            fs.retries = S3FS_ATTEMPTS
        self.fs, self.root = fs, root.rstrip("/")
        self.conditional = self.protocol in CONDITIONAL

    def _p(self, key: str) -> str:
        return f"{self.root}/{safe_key(key, self.where)}"

    def _call(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified by storage_error
            err = storage_error(e, self.where, key)
            if err is e:
                raise
            raise err from None

    def get(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
            ) -> Blob | None:
        try:
            return self._call(key, self.fs.cat_file, self._p(key), start=start, end=end)
        except FileNotFoundError:
            return None

    def get_many(self, keys: Sequence[str]) -> list[Blob | None]:
        if len(keys) < 2:
            return [self.get(k) for k in keys]
        paths = [self._p(k) for k in keys]
        got = self._call(keys[0], self.fs.cat, paths, on_error="return")
        out: list[Blob | None] = []
        for k, p in zip(keys, paths, strict=True):
            v = got.get(p)
            if isinstance(v, FileNotFoundError) or v is None:
                out.append(None)
            elif isinstance(v, BaseException):
                err = storage_error(v, self.where, k)
                raise err if err is not v else StorageError(f"{self.where}: storage failed on {k} ({v})")
            else:
                out.append(v)
        return out

    def size(self, key: str) -> int | None:
        try:
            return int(self._call(key, self.fs.size, self._p(key)))
        except FileNotFoundError:
            return None

    def keys(self, prefix: str = "") -> Iterator[str]:
        base = f"{self.root}/{prefix}".rstrip("/")
        try:
            found = self._call(prefix, self.fs.find, base)
        except FileNotFoundError:
            return iter(())
        n = len(self.root) + 1
        return iter(sorted(p[n:] if p.startswith(self.root + "/") else p.split(self.root + "/", 1)[-1]
                           for p in found))

    def put(self, key: str, data: Blob) -> None:
        self._call(key, self.fs.pipe_file, self._p(key), bytes(data))

    def version(self, key: str) -> str | None:
        if self.protocol not in ("s3", "s3a"):
            return super().version(key)
        try:
            info = self._call(key, self.fs.info, self._p(key), refresh=True)
        except FileNotFoundError:
            return None
        return str(info.get("ETag") or info.get("etag") or "")

    def replace(self, key: str, data: Blob, expect: str | None) -> None:
        if self.protocol == "memory":  # one process holds a memory filesystem: a lock will do
            with _MEMORY_LOCK:
                super().replace(key, data, expect)
            return
        if self.protocol not in ("s3", "s3a"):
            raise CommitConflict(f"{self.where}: {self.protocol}:// has no conditional write")
        bucket, _, path = self._p(key).partition("/")
        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=bytes(data), **cond)
        except Exception as e:  # noqa: BLE001 - a failed precondition is the answer we need
            if _precondition_failed(e):
                raise CommitConflict(f"{self.where}: {key} changed: another writer committed first") from None
            err = storage_error(e, self.where, key)
            raise (err if err is not e else StorageError(f"{self.where}: cannot write {key} ({e})")) from None
        self.fs.invalidate_cache(self._p(key))

    def move(self, src: str, dst: str) -> None:
        self._call(dst, self.fs.copy, self._p(src), self._p(dst))
        self.delete(src)

    def delete(self, key: str) -> None:
        try:
            self._call(key, self.fs.rm_file, self._p(key))
        except FileNotFoundError:
            pass

    def refresh(self) -> bool:
        self.fs.invalidate_cache()
        return False
