"""The container interface: where the objects of a package live.

A *container* stores named objects (bytes) for one package: a directory, a zip file, the FAT
filesystem inside a ``.vhd`` image, an fsspec URL (``memory://``, ``s3://``...), or a zarr
``Store`` handed in by the caller.  Everything above it (the manifest, transactions, zarr,
the package API) is written once against this interface, in :mod:`spherefmt.format.store`.

Contract (``spherefmt/testing/containers.py`` checks every implementation against it):

* Keys are relative, ``/``-separated (``core/x/c/0/0``, ``manifest/…json``).  A container never
  reads or writes outside its root, whatever the key.
* ``get(key, start, end)`` returns the bytes ``[start, end)`` of an object (``start < 0``: its
  last ``-start`` bytes; ``end`` past the object is clipped), or ``None`` when the object does
  not exist.  With ``mapped=True`` a container MAY return a read-only view of a memory map.
* ``put(key, data)`` stores an object; a reader sees its old bytes or its new bytes, never a
  mix, and never a truncated object.
* ``version(key)`` is a token that changes whenever the object is replaced (``None`` when it
  does not exist); ``replace(key, data, expect)`` stores an object only if its version is still
  ``expect``, atomically against other writers (this is how a manifest commits); otherwise
  :class:`CommitConflict`.
* ``move(src, dst)`` makes ``dst`` hold ``src``'s bytes (atomically, as ``put``) and removes
  ``src``; ``delete(key)`` removes an object (absent: nothing happens).
* ``keys(prefix)`` lists the stored keys under ``prefix``.
* ``sync()`` makes everything stored so far durable: it is called before a commit.
* ``lock(timeout)`` makes this process the one writer of the package (``PackageLockedError``
  when another one is); ``can_lock`` says whether the container can lock at all.  A container
  that cannot lock writes every change to staging keys and relies on ``create`` to refuse a
  second writer's commit (``conditional``); one that can do neither refuses ``r+``.
* ``refresh()`` forgets what was cached of the container (a VHD's FAT) after another process
  changed it; ``close()`` releases it.  A container created for a new package is made visible
  by ``finish()`` (an atomic rename where there is one) or dropped by ``abort()``.

Storage failures are :class:`~spherefmt.errors.StorageError` naming the package and the key,
a full host disk :class:`~spherefmt.errors.DiskFullError`.  Subclasses fill in the hooks; the
few helpers here are built on them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from spherefmt.errors import DiskFullError, FormatError, PackageLockedError, SpherefmtError, StorageError

__all__ = ["CommitConflict", "Container", "FileLock", "disk_full", "storage_failure"]

Blob = bytes | bytearray | memoryview


class CommitConflict(SpherefmtError, FileExistsError):
    """``replace`` found the object changed: another writer committed first."""


class Container(ABC):
    """One package's objects; see the module docstring for the contract."""

    #: where the package is, for messages (a path or a URL)
    where: str = "<container>"
    #: ``lock`` works (local files); otherwise every change is staged and ``create`` guards
    can_lock: bool = False
    #: ``replace`` is atomic against other processes
    conditional: bool = True
    #: I/O blocks on a network: callers on an event loop run it in a thread
    remote: bool = False
    #: the caller owns the underlying store: ``close`` leaves it open
    borrowed: bool = False

    # -- hooks -----------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
            ) -> Blob | None: ...

    @abstractmethod
    def put(self, key: str, data: Blob) -> None: ...

    def version(self, key: str) -> str | None:
        """A token of the object's current bytes (by default their CRC-32C)."""
        import crc32c

        data = self.get(key)
        return None if data is None else f"{len(data)}:{crc32c.crc32c(data):08x}"

    def replace(self, key: str, data: Blob, expect: str | None) -> None:
        """Store ``data`` at ``key`` if its version is still ``expect`` (``None``: absent).  The
        default, for containers with a writer lock, checks and then puts: the lock keeps other
        writers out in between."""
        if self.version(key) != expect:
            raise CommitConflict(f"{self.where}: {key} changed: another writer committed first")
        self.put(key, data)
        self.sync()

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def keys(self, prefix: str = "") -> Iterator[str]: ...

    def move(self, src: str, dst: str) -> None:
        data = self.get(src)
        if data is None:
            raise FileNotFoundError(f"{self.where}: {src}")
        self.put(dst, data)
        self.delete(src)

    def get_many(self, keys: Sequence[str]) -> list[Blob | None]:
        """Whole objects (``None`` where absent); remote containers fetch them concurrently."""
        return [self.get(k) for k in keys]

    def size(self, key: str) -> int | None:
        data = self.get(key)
        return None if data is None else len(data)

    def sync(self) -> None:  # noqa: B027 - most containers are durable as they write
        """Make everything stored so far durable."""

    def lock(self, timeout: float = 0.0) -> None:
        raise PackageLockedError(f"{self.where}: this storage has no writer lock")

    def unlock(self) -> None:  # noqa: B027
        pass

    def refresh(self) -> bool:
        """Forget cached views of the container; True when there were any."""
        return False

    def close(self) -> None:  # noqa: B027
        pass

    def finish(self) -> None:  # noqa: B027
        """Make a newly created package visible (see
        :func:`spherefmt.containers.create_container`) and release the container."""

    def abort(self) -> None:  # noqa: B027
        """Drop a newly created package that was not finished, and release the container."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.where!r}>"


def safe_key(key: str, where: str) -> str:
    """``key`` if it is relative and ``/``-separated without empty, ``.`` or ``..`` parts (no
    key can reach outside a container), else :class:`~spherefmt.errors.FormatError`."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key \
            or any(part in ("", ".", "..") for part in key.split("/")):
        raise FormatError(f"{where}: unsafe object key {key[:120]!r}")
    return key


def disk_full(e: BaseException) -> bool:
    """True when ``e`` (or what caused it) is the host's ENOSPC / EDQUOT."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def storage_failure(e: BaseException, where: str, key: str, path: str | None = None) -> BaseException:
    """``e`` as the error spherefmt reports for a failed write or read of ``key``."""
    if isinstance(e, SpherefmtError):
        return e
    if disk_full(e):
        return DiskFullError(f"{where}: the host disk is full (no space left on the device holding "
                             f"{path or where}) while writing {key}; free space and retry: the package is unchanged")
    if isinstance(e, OSError):
        return StorageError(f"{where}: storage failed on {key or '/'} ({e.strerror or type(e).__name__})")
    return e


class FileLock:
    """An exclusive ``flock`` on a lock file beside a package, released when the process ends.

    The lock file is removed on release; a waiter re-checks, once it holds the lock, that the
    file it locked is still the one at the path (else it locked a file that was just removed
    and tries again), so at most one process ever holds the lock of a path.
    """

    def __init__(self, path: Path, where: str) -> None:
        self.path, self.where = path, where
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise storage_failure(e, self.where, self.path.name, str(self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    holder = _holder(self.path)
                    raise PackageLockedError(
                        f"{self.where}: another process{holder} is writing this package; wait for it to finish"
                        + (" (or pass a longer lock timeout)" if timeout else " (or pass lock_timeout to wait)")
                    ) from None
                time.sleep(0.02)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)  # the file was removed by its last holder while we waited: again

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)  # while still holding it: see the class docstring
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1


def _holder(path: Path) -> str:
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return ""
    return f" (pid {pid})" if pid > 0 else ""


def lock_path(path: Path) -> Path:
    """The lock file of the package at ``path``: ``.<name>.lock`` beside it."""
    return path.with_name(f".{path.name}.lock")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clip(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """``[lo, hi)`` of an object of ``size`` bytes for the contract's ``start``/``end``."""
    if start is None:
        lo = 0
    elif start < 0:
        lo = max(0, size + start)
    else:
        lo = min(start, size)
    hi = size if end is None or (start is not None and start < 0) else max(lo, min(end, size))
    return lo, hi



def remove_leftovers(path: Path) -> None:
    """What writers killed while working on the package at ``path`` left beside it (staging
    directories, partial files); call with the package's writer lock held, so none is live."""
    import shutil

    for p in path.parent.glob(f".{path.name}.*"):
        if p.name == lock_path(path).name:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class AnonymousFile:
    """A new file in the folder of ``target`` that has no name until :meth:`publish` renames it
    over ``target`` (Linux ``O_TMPFILE``): a process killed before that leaves nothing behind.
    Where ``O_TMPFILE`` is not supported it is a named ``.<target>.partial-<pid>`` file instead,
    which the next writer removes."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._named: Path | None = None
        try:
            self.fd = os.open(target.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
            self.path = f"/proc/self/fd/{self.fd}"
            if not os.path.exists(self.path):  # no /proc: a tmpfile could never be named
                os.close(self.fd)
                raise OSError(errno.EOPNOTSUPP, "no /proc")
        except (OSError, AttributeError):
            self._named = target.with_name(f".{target.name}.partial-{os.getpid()}")
            self.fd = os.open(self._named, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self.path = str(self._named)

    def publish(self) -> None:
        """fsync, then give the file the target's name (replacing what was there, atomically)."""
        os.fsync(self.fd)
        if self._named is None:
            named = self.target.with_name(f".{self.target.name}.partial-{os.getpid()}")
            named.unlink(missing_ok=True)
            _link_fd(self.fd, named)
        else:
            named = self._named
        os.replace(named, self.target)
        fsync_dir(self.target.parent)
        self._close()

    def discard(self) -> None:
        self._close()
        if self._named is not None:
            self._named.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _link_fd(fd: int, dst: Path) -> None:
    """Give the unnamed file ``fd`` the name ``dst`` (``linkat``: CPython's ``os.link`` does not
    follow ``/proc/self/fd`` links)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, follow, empty = -100, 0x400, 0x1000
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(dst), follow) == 0:
        return
    if libc.linkat(fd, b"", at_fdcwd, os.fsencode(dst), empty) == 0:  # needs CAP_DAC_READ_SEARCH
        return
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), str(dst))
