"""A package in a local directory: one file per object.

Objects are replaced atomically (written to a temporary file beside the target, then renamed
over it), so a reader holding the old file keeps reading the old bytes.  The writer lock is a
``flock`` on ``.<name>.lock`` beside the directory.  Uncompressed chunks MAY be read through
read-only memory maps (``mapped=True``): a map is reused while its file keeps its inode, size
and mtime, and since files are only ever replaced by rename, a map never sees a half-written
object.
"""

from __future__ import annotations

import itertools
import mmap
import os
import resource
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from spherefmt.containers.base import (
    Blob,
    CommitConflict,
    Container,
    FileLock,
    clip,
    fsync_dir,
    lock_path,
    remove_leftovers,
    safe_key,
    storage_failure,
)
from spherefmt.errors import FormatError

__all__ = ["DirectoryContainer"]

_TMP = ".tmp-"
_counter = itertools.count()


def tmp_name(target: Path) -> Path:
    """A temporary name beside ``target`` that a later writer recognises as a leftover."""
    return target.with_name(f".{target.name}{_TMP}{os.getpid()}-{next(_counter)}")


def is_leftover(name: str) -> bool:
    return name.startswith(".") and _TMP in name


class DirectoryContainer(Container):
    """Objects as files under ``root``; see the module docstring.

    Parameters
    ----------
    root
        The package directory.
    where
        The name used in messages (the package path).
    lock_at
        The path whose lock file guards writers (the package path; a staged conversion locks
        its destination, not its staging directory).
    """

    can_lock = True

    def __init__(self, root: str | os.PathLike[str], where: str | None = None,
                 lock_at: Path | None = None) -> None:
        self.root = Path(root)
        self.where = where or str(self.root)
        self._lock = FileLock(lock_path(lock_at or self.root), self.where)
        self._unsynced: list[Path] = []
        self._checked_dirs: set[Path] = set()  # directories of keys found free of links
        self._unsynced_lock = threading.Lock()
        self.on_finish: Callable[[], None] | None = None
        self.on_abort: Callable[[], None] | None = None

    def _path(self, key: str) -> Path:
        """The file of ``key``; a key that passes through a symbolic link inside the package is
        refused (a link could make a read or a write land anywhere on the machine)."""
        path = self.root / safe_key(key, self.where)
        parent = path.parent
        if parent not in self._checked_dirs:
            p = self.root
            for part in Path(key).parts[:-1]:
                p = p / part
                if p.is_symlink():
                    raise FormatError(f"{self.where}: {key[:120]!r} passes through the symbolic link {part!r}: "
                                      "packages never follow links")
            if parent.is_dir():
                self._checked_dirs.add(parent)
        if path.is_symlink():
            raise FormatError(f"{self.where}: {key[:120]!r} is a symbolic link: packages never follow links")
        return path

    # -- reading ----------------------------------------------------------------------------
    def get(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
            ) -> Blob | None:
        path = self._path(key)
        if mapped:
            view = _MAPS.get(str(path))
            if view is None:
                return None
            lo, hi = clip(len(view), start, end)
            return view[lo:hi]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise storage_failure(e, self.where, key) from None
        try:
            size = os.fstat(fd).st_size
            lo, hi = clip(size, start, end)
            return os.pread(fd, hi - lo, lo)
        except IsADirectoryError:
            return None
        finally:
            os.close(fd)

    def size(self, key: str) -> int | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def keys(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirs, files in os.walk(base):
            dirs.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in sorted(files):
                yield f if rel == "." else f"{rel}/{f}"

    # -- writing ----------------------------------------------------------------------------
    def _write_new(self, path: Path, data: Blob, key: str) -> Path:
        """``data`` in a temporary file beside ``path``; returns the temporary file."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_name(path)
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            if "tmp" in locals():
                tmp.unlink(missing_ok=True)
            raise storage_failure(e, self.where, key, str(self.root)) from None
        return tmp

    def put(self, key: str, data: Blob) -> None:
        path = self._path(key)
        tmp = self._write_new(path, data, key)
        os.replace(tmp, path)
        with self._unsynced_lock:
            self._unsynced.append(path)

    def version(self, key: str) -> str | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"  # a replaced file is a new inode

    def replace(self, key: str, data: Blob, expect: str | None) -> None:
        path = self._path(key)
        tmp = self._write_new(path, data, key)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if self.version(key) != expect:  # the writer lock keeps others out from here on
                raise CommitConflict(f"{self.where}: {key} changed: another writer committed first")
            os.replace(tmp, path)
        except OSError as e:
            raise storage_failure(e, self.where, key, str(self.root)) from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def move(self, src: str, dst: str) -> None:
        s, d = self._path(src), self._path(dst)
        d.parent.mkdir(parents=True, exist_ok=True)
        os.replace(s, d)
        with self._unsynced_lock:
            self._unsynced.append(d)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        parent = path.parent
        while parent != self.root:  # zarr's local store leaves empty folders; so would we
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def sync(self) -> None:
        with self._unsynced_lock:
            paths, self._unsynced = self._unsynced, []
        dirs = set()
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue  # moved on again since
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(p.parent)
        for d in dirs:
            fsync_dir(d)

    # -- writers ----------------------------------------------------------------------------
    def lock(self, timeout: float = 0.0) -> None:
        if not self._lock.held:
            self._lock.acquire(timeout)
            if self.root.name and self._lock.path == lock_path(self.root):
                remove_leftovers(self.root)  # staging beside it, from writers that were killed

    def unlock(self) -> None:
        self._lock.release()

    def leftovers(self) -> Iterator[Path]:
        """Temporary files of writers that were killed (they hold the lock no longer)."""
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if is_leftover(f):
                    yield Path(dirpath) / f

    def close(self) -> None:
        self.unlock()

    def finish(self) -> None:
        if self.on_finish is not None:
            self.on_finish()

    def abort(self) -> None:
        if self.on_abort is not None:
            self.on_abort()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class _Maps:
    """Read-only memory maps of local objects, at most ``limit`` open (least recently used
    dropped first; each map holds a file descriptor)."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = max(16, min(4096, (soft if soft > 0 else 1024) // 4))
        self.limit = limit
        self._maps: OrderedDict[str, tuple[tuple[int, int, int], memoryview]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> memoryview | None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._maps.get(path)
            if hit is not None and hit[0] == ident:
                self._maps.move_to_end(path)
                return hit[1]
        if st.st_size == 0:
            return memoryview(b"")
        try:
            with open(path, "rb") as f:
                # MAP_POPULATE maps every page at once: one call instead of a fault per page
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                view = memoryview(mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ))
        except FileNotFoundError:
            return None
        with self._lock:
            self._maps[path] = (ident, view)
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)  # closes when its last view goes
        return view


_MAPS = _Maps()
