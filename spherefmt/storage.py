"""Where packages live: zarr stores for a directory, a ``.zip`` or any fsspec URL.

Reading goes through zarr's own stores.  Writing a *new* package is staged so that an
interrupted conversion never leaves something that looks complete and never destroys what the
user had: local directories and zips are written beside the destination and moved into place
last; object stores (``memory://``, ``s3://``...) are written in place with the package's state
marked ``writing`` until the very last write flips it to ``complete``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

from .constants import MAX_HEADER_JSON, ROOT_ATTR
from .errors import FormatError, PackageExistsError, ReadOnlyError

#: Virtual size of a new package VHD unless given: the larger of this and VHD_SIZE_FACTOR times
#: the model's raw bytes (dynamic images only occupy what is written).
DEFAULT_VHD_SIZE = 4 * 1024**3
VHD_SIZE_FACTOR = 8

__all__ = ["S3_DEFAULTS", "Destination", "client_options", "close_store", "is_package", "open_store",
           "prepare_destination", "root_attrs"]


def _kind(url: str) -> str:
    if "://" in url and not url.startswith("file://"):
        return "fsspec"
    if url.endswith(".vhd"):
        return "vhd"
    return "zip" if url.endswith(".zip") else "dir"


def _vhd_store(path: str, mode: str, durable: bool = True) -> Store:
    """A zarr store over the files inside a package VHD (see :mod:`spherefmt.vhdfs`)."""
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    from .vhdfs import VHDFileSystem

    try:
        import pyfatfs  # noqa: F401
    except ImportError:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"{path}: VHD packages need pyfatfs: pip install 'spherefmt[vhd]'") from None
    fs = VHDFileSystem(path, mode, durable=durable)
    return FsspecStore(AsyncFileSystemWrapper(fs, asynchronous=True), path="/", read_only=mode == "r")


#: Modules whose exceptions mean "the storage service failed" (not "the object is missing").
_REMOTE_ERRORS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "requests", "urllib3")


def _storage_error(e: BaseException, where: str, key: str) -> BaseException:
    """``e`` as a :class:`StorageError` when it is a storage failure, else ``e`` itself."""
    from .errors import SpherefmtError, StorageError

    if isinstance(e, FileNotFoundError | KeyError | SpherefmtError) or not isinstance(e, Exception):
        return e
    if isinstance(e, OSError | TimeoutError) or type(e).__module__.split(".")[0] in _REMOTE_ERRORS:
        msg = " ".join(str(e).split()) or type(e).__name__
        return StorageError(f"{where}: storage failed on {key or '/'} ({type(e).__name__}: {msg[:200]})")
    return e


class RemoteStore(FsspecStore):
    """An fsspec store whose service failures (a server gone, a timeout, a refused request)
    surface as one-line :class:`~spherefmt.errors.StorageError` naming the package and the
    object, instead of whichever client library's exception."""

    where = "<remote>"

    async def _guard(self, key: str, coro: Any) -> Any:
        try:
            return await coro
        except Exception as e:  # noqa: BLE001 - classified by _storage_error
            err = _storage_error(e, self.where, key)
            if err is e:
                raise
            raise err from None

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        return await self._guard(key, super().get(key, *args, **kwargs))

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        return await self._guard("", super().get_partial_values(prototype, key_ranges))

    async def set(self, key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        return await self._guard(key, super().set(key, value, *args, **kwargs))

    async def exists(self, key: str) -> bool:
        return await self._guard(key, super().exists(key))

    async def delete(self, key: str) -> None:
        return await self._guard(key, super().delete(key))

    async def getsize(self, key: str) -> int:
        return await self._guard(key, super().getsize(key))

    async def _listing(self, prefix: str, gen: Any) -> Any:
        try:
            async for item in gen:
                yield item
        except Exception as e:  # noqa: BLE001 - classified by _storage_error
            err = _storage_error(e, self.where, prefix)
            if err is e:
                raise
            raise err from None

    def list(self) -> Any:
        return self._listing("", super().list())

    def list_prefix(self, prefix: str) -> Any:
        return self._listing(prefix, super().list_prefix(prefix))

    def list_dir(self, prefix: str) -> Any:
        return self._listing(prefix, super().list_dir(prefix))


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
#: the filesystem spherefmt opens; botocore's retries above cover the same failures.  A hung
#: server is then reported after about 3 x 10 s, a refused connection after about a second.
S3FS_ATTEMPTS = 1


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


def _remote(url: str, read_only: bool, storage_options: dict[str, Any] | None = None) -> RemoteStore:
    try:
        store = RemoteStore.from_url(url, storage_options=client_options(url, storage_options), read_only=read_only)
    except ImportError as e:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"{url}: {e} (for s3:// install 'spherefmt[s3]')") from None
    except Exception as e:  # noqa: BLE001 - e.g. a malformed URL or missing credentials
        err = _storage_error(e, url, "")
        if err is e:
            raise FormatError(f"{url}: cannot open ({type(e).__name__}: {str(e)[:160]})") from None
        raise err from None
    store.where = url
    if url.split("://", 1)[0] in ("s3", "s3a") and "retries" not in vars(store.fs):
        store.fs.retries = S3FS_ATTEMPTS
    return store


def close_store(store: Store) -> None:
    """Close a store and, for VHD packages, the image under it."""
    from .vhdfs import VHDFileSystem

    fs = getattr(getattr(store, "fs", None), "sync_fs", None)
    try:
        store.close()
    finally:
        if isinstance(fs, VHDFileSystem):
            fs.close()


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def open_store(url: Any, mode: str = "r", storage_options: dict[str, Any] | None = None) -> tuple[Store, str, str]:
    """Open an existing package's store; returns ``(store, where, kind)``.

    ``storage_options`` go to fsspec for a URL (``endpoint_url``, ``key``...; see
    :func:`client_options`) and are ignored for local packages.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
    ro = mode == "r"
    if isinstance(url, Store):
        # a store opened by open_store(url, storage_options=...) keeps its URL for messages
        return url, url.where if isinstance(url, RemoteStore) else type(url).__name__, "store"
    url = os.fspath(url)
    kind = _kind(url)
    if kind == "fsspec":
        return _remote(url, ro, storage_options), url, kind
    path = _local(url)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such package")
    if kind == "vhd":
        return _vhd_store(path, mode), path, kind
    if kind == "zip":
        if not ro:
            raise ReadOnlyError(f"{path}: zip packages are read-only; convert to a directory or .vhd to modify")
        if not zipfile.is_zipfile(path):
            raise FormatError(f"{path}: not a zip file")
        return sync(ZipStore.open(path, mode="r")), path, kind
    if not os.path.isdir(path):
        raise FormatError(f"{path}: not a package directory")
    return LocalStore(path, read_only=ro), path, kind


def root_attrs(store: Store, where: str) -> dict[str, Any] | None:
    """The root group's attributes, read and checked as untrusted JSON; ``None`` if absent."""
    from zarr.core.buffer import default_buffer_prototype

    from .errors import StorageError

    try:
        buf = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
    except StorageError:
        raise
    except (OSError, KeyError) as e:
        raise FormatError(f"{where}: cannot read zarr.json ({e})") from None
    if buf is None:
        return None
    raw = buf.to_bytes()
    if len(raw) > MAX_HEADER_JSON:
        raise FormatError(f"{where}: zarr.json of {len(raw)} bytes exceeds the {MAX_HEADER_JSON}-byte limit")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{where}: zarr.json is not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise FormatError(f"{where}: zarr.json is not a Zarr v3 group")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise FormatError(f"{where}: zarr.json attributes are not an object")
    return attrs


def is_package(url: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``url`` holds a spherefmt package (complete or not)."""
    try:
        if not isinstance(url, Store):
            u = os.fspath(url)
            if _kind(u) != "fsspec":
                p = _local(u)
                if not (os.path.isdir(p) or (p.endswith(".zip") and zipfile.is_zipfile(p))
                        or (p.endswith(".vhd") and os.path.isfile(p))):
                    return False
        store, where, _ = open_store(url, "r", storage_options)
        try:
            attrs = root_attrs(store, where)
        finally:
            if not isinstance(url, Store):
                close_store(store)
    except (FormatError, OSError, ValueError):
        return False
    return bool(attrs) and ROOT_ATTR in attrs


@dataclass
class Destination:
    """A store to write a new package into, and how to put it in place."""

    store: Store
    where: str
    finish: Callable[[], None]
    abort: Callable[[], None]
    kind: str


def _zip_dir(folder: Path, dst: Path) -> None:
    """Pack a staged directory into a zip, deterministically (sorted names, fixed times)."""
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                info = zipfile.ZipInfo(p.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with open(p, "rb") as src, z.open(info, "w", force_zip64=True) as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def prepare_destination(dst: Any, overwrite: bool, vhd_size: int | None = None, content_bytes: int = 0,
                        storage_options: dict[str, Any] | None = None) -> Destination:
    """Check ``dst`` and return a :class:`Destination` to write into (``storage_options``: as
    for :func:`open_store`).

    Raises
    ------
    PackageExistsError
        ``dst`` holds a package and ``overwrite`` is false, or holds anything else (never
        replaced, even with ``overwrite``).
    """
    if isinstance(dst, Store):
        where = dst.where if isinstance(dst, RemoteStore) else type(dst).__name__
        return Destination(dst, where, lambda: None, lambda: None, "store")
    url = os.fspath(dst)
    kind = _kind(url)
    if kind == "fsspec":
        store = _remote(url, False, storage_options)
        if sync(store.exists("zarr.json")):
            pkg = is_package(url, storage_options)
            if not (overwrite and pkg):
                raise PackageExistsError(f"{url}: already holds a {'package' if pkg else 'Zarr store'}; "
                                         "pass --overwrite to replace a package")
            sync(store.delete_dir(""))
        return Destination(store, url, lambda: None, lambda: None, kind)
    path = Path(_local(url))
    if path.exists():
        pkg = is_package(path)
        empty_dir = path.is_dir() and not any(path.iterdir())
        if pkg and not overwrite:
            raise PackageExistsError(f"{path}: already holds a package; pass --overwrite to replace it")
        if not pkg and not empty_dir:
            raise PackageExistsError(f"{path}: exists and is not a spherefmt package; refusing to replace it")
    if not path.parent.exists():
        raise FormatError(f"{path.parent}: no such directory")
    if kind == "vhd":
        from .vhdfs import create_package_image

        image = path.with_name(f".{path.name}.partial-{os.getpid()}.vhd")
        create_package_image(image, vhd_size or max(DEFAULT_VHD_SIZE, VHD_SIZE_FACTOR * content_bytes))
        try:
            store = _vhd_store(str(image), "r+", durable=False)
        except BaseException:
            image.unlink(missing_ok=True)
            raise

        def finish_vhd() -> None:
            close_store(store)
            os.replace(image, path)  # atomic: the old package stays whole until this moment

        def abort_vhd() -> None:
            try:
                close_store(store)
            finally:
                image.unlink(missing_ok=True)

        return Destination(store, str(path), finish_vhd, abort_vhd, kind)
    stage = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")

    def finish() -> None:
        if kind == "zip":
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.zip")
            _zip_dir(stage, tmp)
            os.replace(tmp, path)  # atomic on one filesystem
            shutil.rmtree(stage)
            return
        if path.exists():
            os.rename(path, old)
        os.rename(stage, path)
        if old.exists():
            shutil.rmtree(old)

    def abort() -> None:
        shutil.rmtree(stage, ignore_errors=True)
        for leftover in path.parent.glob(f".{path.name}.partial-{os.getpid()}*"):
            if leftover.is_file():
                leftover.unlink()

    return Destination(LocalStore(stage, read_only=False), str(path), finish, abort, kind)


def open_group(store: Store, mode: str, where: str) -> zarr.Group:
    try:
        return zarr.open_group(store, mode=mode)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{where}: not a readable Zarr v3 group ({type(e).__name__}: {str(e)[:160]})") from None
