"""A package inside a ``.vhd`` image: the objects are files of the FAT32 filesystem in it
(:mod:`spherefmt.containers.vhd.filesystem`, over the image of :mod:`spherefmt.containers.vhd.image`).

An existing file is replaced atomically inside the image (new clusters, then its directory
entry, then the old clusters freed: ``spec/VHD.md``), so readers in other processes see old or
new bytes; their cached view of the FAT may go stale, which shows as a checksum mismatch and
is cured by :meth:`VHDContainer.refresh`.  A new package is built in an unnamed file beside
the destination and renamed over it when finished, so a killed conversion leaves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from spherefmt.containers.base import (
    AnonymousFile,
    Blob,
    Container,
    FileLock,
    lock_path,
    remove_leftovers,
    safe_key,
    storage_failure,
)
from spherefmt.errors import BackendUnavailableError

__all__ = ["VHDContainer"]


def _vhdfs() -> type:
    try:
        import pyfatfs  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("VHD packages need pyfatfs: pip install 'spherefmt[vhd]'") from None
    from spherefmt.containers.vhd.filesystem import VHDFileSystem

    return VHDFileSystem


class VHDContainer(Container):
    """The files inside a package image; see the module docstring.

    Parameters
    ----------
    path
        The ``.vhd`` file.
    mode
        ``"r"`` or ``"r+"``.
    image
        For a new package: the file the image is built in (it becomes ``path`` on ``finish``).
    """

    can_lock = True

    def __init__(self, path: str | os.PathLike[str], mode: str = "r", *, image: AnonymousFile | None = None,
                 lock_timeout: float = 0.0) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.mode = mode
        self._image = image
        self._lock = FileLock(lock_path(self.path), self.where)
        fs_cls = _vhdfs()
        if mode == "r+" and image is None:  # the package lock first: the image's own is taken next
            self.lock(lock_timeout)
        # a new image is only visible once finished: its FAT is written once, at the end
        try:
            self.fs = fs_cls(image.path if image is not None else str(self.path), mode, durable=image is None,
                             where=self.where)
        except BaseException:
            self.unlock()
            raise

    def _p(self, key: str) -> str:
        return "/" + safe_key(key, self.where)

    def get(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
            ) -> Blob | None:
        try:
            return self.fs.read_range(self._p(key), start, end)
        except FileNotFoundError:
            return None

    def size(self, key: str) -> int | None:
        try:
            info = self.fs.info(self._p(key))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info["type"] == "file" else None

    def keys(self, prefix: str = "") -> Iterator[str]:
        try:
            found = self.fs.walk_files("/" + prefix.strip("/"))
        except FileNotFoundError:
            return iter(())
        return iter(p.lstrip("/") for p, _ in found)

    def put(self, key: str, data: Blob) -> None:
        try:
            self.fs.pipe_file(self._p(key), bytes(data))
        except OSError as e:
            raise storage_failure(e, self.where, key, str(self.path.parent)) from None

    def replace(self, key: str, data: Blob, expect: str | None) -> None:
        """As the base class, but a file that does not exist yet is first created empty: the
        filesystem replaces existing files atomically, and a new file is then one (an empty
        manifest left by a kill is no manifest, section 10 of ``FORMAT.md``)."""
        if expect is None and self.size(key) is None:
            self.put(key, b"")
            self.sync()
            expect = self.version(key)
        super().replace(key, data, expect)

    def delete(self, key: str) -> None:
        self.fs.rm_file(self._p(key))
        parent = self._p(key).rsplit("/", 1)[0]
        while parent:  # no empty folders left behind (plain Zarr readers would list them)
            try:
                if self.fs.ls(parent, detail=False):
                    break
                self.fs.rmdir(parent)
            except (FileNotFoundError, OSError, ValueError):
                break
            parent = parent.rsplit("/", 1)[0]

    def sync(self) -> None:
        try:
            self.fs.flush()
        except OSError as e:
            raise storage_failure(e, self.where, "the FAT", str(self.path.parent)) from None

    def lock(self, timeout: float = 0.0) -> None:
        if not self._lock.held:
            self._lock.acquire(timeout)
            if self._image is None:
                remove_leftovers(self.path)  # partial images beside it, from writers that were killed

    def unlock(self) -> None:
        self._lock.release()

    def refresh(self) -> bool:
        if self.mode != "r":
            return False
        self.fs.refresh()
        return True

    def close(self) -> None:
        try:
            self.fs.close()
        finally:
            self.unlock()
            if self._image is not None:
                self._image.discard()

    def finish(self) -> None:
        self.fs.close()
        image, self._image = self._image, None
        if image is not None:
            try:
                image.publish()
            except OSError as e:
                image.discard()
                raise storage_failure(e, self.where, "the image", str(self.path.parent)) from None
        self.unlock()

    def abort(self) -> None:
        self.close()
