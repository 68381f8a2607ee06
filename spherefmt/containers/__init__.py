"""Where packages live: one container per kind, chosen here and nowhere else.

=============  ==========================================  =====================================
kind           what                                        module
=============  ==========================================  =====================================
``dir``        a local directory                           :mod:`.directory`
``zip``        a ``.zip`` file                             :mod:`.zip`
``vhd``        the FAT32 filesystem inside a ``.vhd``      :mod:`.vhd`
``fsspec``     an fsspec URL: ``memory://``, ``s3://``...  :mod:`.remote`
``store``      a zarr ``Store`` the caller opened          :mod:`.store`
=============  ==========================================  =====================================

:func:`open_container` opens the container of an existing package, :func:`create_container`
one for a new package (staged so that it becomes visible only when finished, and so that the
package it replaces stays whole until then).  The interface is :class:`.base.Container`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from zarr.abc.store import Store

from spherefmt.constants import MAX_HEADER_JSON, ROOT_ATTR
from spherefmt.containers.base import AnonymousFile, CommitConflict, Container, FileLock, lock_path, remove_leftovers
from spherefmt.containers.directory import DirectoryContainer
from spherefmt.containers.remote import FsspecContainer
from spherefmt.containers.store import StoreContainer
from spherefmt.containers.zip import ZipContainer, ZipEditContainer
from spherefmt.errors import FormatError, InputError, PackageExistsError, ReadOnlyError, SpherefmtError

__all__ = ["CommitConflict", "Container", "create_container", "holds_package", "kind_of", "open_container"]

#: Virtual size of a new package VHD unless given: the larger of this and VHD_SIZE_FACTOR times
#: the model's raw bytes (dynamic images only occupy what is written).
DEFAULT_VHD_SIZE = 4 * 1024**3
VHD_SIZE_FACTOR = 8


def kind_of(url: Any) -> str:
    """``"store"``, ``"fsspec"``, ``"vhd"``, ``"zip"`` or ``"dir"``."""
    if isinstance(url, Store):
        return "store"
    u = os.fspath(url)
    if "://" in u and not u.startswith("file://"):
        return "fsspec"
    if u.endswith(".vhd"):
        return "vhd"
    return "zip" if u.endswith(".zip") else "dir"


def local_path(url: Any) -> str:
    u = os.fspath(url)
    return u[len("file://") :] if u.startswith("file://") else u


def open_container(url: Any, mode: str = "r", storage_options: dict[str, Any] | None = None,
                   lock_timeout: float = 0.0) -> Container:
    """The container of an existing package (``mode`` ``"r"`` or ``"r+"``).

    For ``r+`` the writer lock is not taken here but by the store on top
    (:class:`spherefmt.format.store.PackageStore`), except for a zip, which is unpacked for writing
    under its lock at once.
    """
    if mode not in ("r", "r+"):
        raise InputError(f"mode must be 'r' or 'r+', not {mode!r}")
    kind = kind_of(url)
    if kind == "store":
        return StoreContainer(url)
    if kind == "fsspec":
        c = FsspecContainer(os.fspath(url), storage_options)
        if mode == "r+" and not c.conditional:
            raise ReadOnlyError(f"{c.where}: {c.protocol}:// offers no conditional write, so two writers could "
                                "overwrite each other: open it read-only, or copy the package to a directory, "
                                ".vhd or s3:// to modify it")
        return c
    path = Path(local_path(url))
    if not path.exists():
        raise FormatError(f"{path}: no such package")
    if kind == "vhd":
        from spherefmt.containers.vhd.container import VHDContainer

        if not path.is_file():
            raise FormatError(f"{path}: not a VHD file")
        return VHDContainer(path, mode, lock_timeout=lock_timeout)
    if kind == "zip":
        if not path.is_file():
            raise FormatError(f"{path}: not a zip file")
        return ZipEditContainer(path, lock_timeout=lock_timeout) if mode == "r+" else ZipContainer(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a package directory")
    return DirectoryContainer(path)


def create_container(dst: Any, *, overwrite: bool = False, vhd_size: int | None = None, content_bytes: int = 0,
                     storage_options: dict[str, Any] | None = None) -> Container:
    """A container for a new package at ``dst``, holding the writer lock of ``dst``.

    Local packages are built aside (a staging directory, an unnamed file) and put in place by
    ``finish()`` in one rename; ``abort()`` drops them.  A URL is written in place (its package
    is marked complete only by its manifest).

    Raises
    ------
    PackageExistsError
        ``dst`` holds a package and ``overwrite`` is false, or holds anything else (never
        replaced, even with ``overwrite``).
    """
    kind = kind_of(dst)
    if kind == "store":
        return StoreContainer(dst)
    if kind == "fsspec":
        c = FsspecContainer(os.fspath(dst), storage_options)
        existing = list(c.keys())
        if existing:
            pkg = holds_package(c)
            if not (overwrite and pkg):
                raise PackageExistsError(f"{c.where}: already holds a {'package' if pkg else 'Zarr store or other data'}; "
                                         "pass --overwrite to replace a package")
            for key in existing:
                c.delete(key)
        return c
    path = Path(local_path(dst))
    if path.exists():
        pkg = _path_holds_package(path)
        empty_dir = path.is_dir() and not any(path.iterdir())
        if pkg and not overwrite:
            raise PackageExistsError(f"{path}: already holds a package; pass --overwrite to replace it")
        if not pkg and not empty_dir:
            raise PackageExistsError(f"{path}: exists and is not a spherefmt package; refusing to replace it")
    if not path.parent.is_dir():
        raise FormatError(f"{path.parent}: no such directory")
    if kind == "zip":
        return ZipEditContainer(path, new=True)
    lock = FileLock(lock_path(path), str(path))
    lock.acquire()
    try:
        remove_leftovers(path)
        if kind == "vhd":
            return _new_vhd(path, lock, vhd_size or max(DEFAULT_VHD_SIZE, VHD_SIZE_FACTOR * content_bytes))
        return _new_dir(path, lock)
    except BaseException:
        lock.release()
        raise


def holds_package(c: Container) -> bool:
    """True when the container's root ``zarr.json`` names a spherefmt package, complete or not
    (what decides whether ``overwrite`` may replace it; reading one is :mod:`spherefmt.format`'s
    job, and checks everything)."""
    try:
        blob = c.get("zarr.json", 0, MAX_HEADER_JSON + 1)
        doc = json.loads(bytes(blob)) if blob is not None and len(blob) <= MAX_HEADER_JSON else None
    except (OSError, ValueError, SpherefmtError):
        return False
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attrs, dict) and ROOT_ATTR in attrs


def _path_holds_package(path: Path) -> bool:
    try:
        c = open_container(path, "r")
    except (OSError, ValueError, SpherefmtError):
        return False
    try:
        return holds_package(c)
    finally:
        c.close()


def _new_vhd(path: Path, lock: FileLock, size: int) -> Container:
    from spherefmt.containers.vhd.container import VHDContainer
    from spherefmt.containers.vhd.filesystem import create_package_image

    image = AnonymousFile(path)
    try:
        create_package_image(image.path, size, inplace=True)
        c = VHDContainer(path, "r+", image=image)
    except BaseException:
        image.discard()
        raise
    c._lock = lock  # the lock taken to create it is the container's own
    return c


def _new_dir(path: Path, lock: FileLock) -> Container:
    stage = path.with_name(f".{path.name}.partial-{os.getpid()}")
    stage.mkdir()
    c = DirectoryContainer(stage, where=str(path), lock_at=path)
    c._lock = lock
    old = path.with_name(f".{path.name}.old-{os.getpid()}")

    def finish() -> None:
        if not path.exists():
            os.rename(stage, path)
        elif exchange(stage, path):  # one atomic swap: the old package stays whole until it
            shutil.rmtree(stage, ignore_errors=True)
        else:  # no renameat2: a moment without a package, never a mix of two
            os.rename(path, old)
            os.rename(stage, path)
            shutil.rmtree(old, ignore_errors=True)
        c.root = path
        lock.release()

    def abort() -> None:
        shutil.rmtree(stage, ignore_errors=True)
        lock.release()

    c.on_finish, c.on_abort = finish, abort
    return c


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0
