"""A package in a ``.zip`` file.

Reading: the members are the objects; stored (uncompressed) members, which spherefmt writes, are
read by byte range straight from the file, others are inflated whole.  A zip cannot change in
place, so writing goes through a directory: ``r+`` unpacks the zip beside itself
(``.<name>.edit-<pid>``) under the package's writer lock, transactions commit there, and
``close`` writes a new zip and renames it over the old one in one step (only when something
committed).  A process killed before that leaves the old zip as it was; the next writer
removes the leftovers.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from spherefmt.constants import MAX_HEADER_JSON
from spherefmt.containers.base import (
    AnonymousFile,
    Blob,
    Container,
    FileLock,
    clip,
    lock_path,
    remove_leftovers,
    safe_key,
    storage_failure,
)
from spherefmt.containers.directory import DirectoryContainer, is_leftover
from spherefmt.errors import FormatError, ReadOnlyError

__all__ = ["ZipContainer", "ZipEditContainer", "write_zip"]

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


#: bytes a compressed member may inflate to beyond twice its compressed size (all-zero chunks
#: compress to almost nothing; a real chunk is at most a few MiB)
MAX_FREE_INFLATE = 64 * 1024**2

class ZipContainer(Container):
    """A zip file, read-only (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
                IndexError, KeyError, OverflowError, struct.error) as e:  # zipfile parses untrusted bytes
            raise FormatError(f"{self.where}: not a readable zip file ({type(e).__name__}: {str(e)[:120]})") from None
        # a member with an empty name is no object (zipfile's is_dir() fails on one)
        self._members = {i.filename: i for i in self._zip.infolist() if i.filename and not i.is_dir()}
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._offsets: dict[str, int] = {}
        self._io = threading.Lock()  # zipfile's file object is shared by every member read

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        off = self._offsets.get(info.filename)
        if off is None:
            raw = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
            if len(raw) != _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
                raise FormatError(f"{self.where}: member {info.filename[:120]!r} has no local header")
            name_len, extra_len = _LOCAL_HEADER.unpack(raw)[-2:]
            off = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if off + info.compress_size > os.fstat(self._fd).st_size:
                raise FormatError(f"{self.where}: member {info.filename[:120]!r} runs past the end of the file")
            self._offsets[info.filename] = off
        return off

    def get(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
            ) -> Blob | None:
        info = self._members.get(safe_key(key, self.where))
        if info is None:
            return None
        check_inflation(info, self.where)
        try:
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                lo, hi = clip(info.file_size, start, end)
                return os.pread(self._fd, hi - lo, self._data_offset(info) + lo)
            with self._io:
                data = self._zip.read(info)  # zipfile stops inflating at the declared size
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, IndexError,
                KeyError, OverflowError, struct.error) as e:
            raise FormatError(f"{self.where}: cannot read member {key[:120]!r} ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None
        except OSError as e:
            raise storage_failure(e, self.where, key) from None
        lo, hi = clip(len(data), start, end)
        return data[lo:hi]

    def size(self, key: str) -> int | None:
        info = self._members.get(key)
        return None if info is None else info.file_size

    def keys(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(k for k in self._members if k.startswith(prefix)))

    def _ro(self, *_: object, **__: object) -> NoReturn:
        raise ReadOnlyError(f"{self.where}: opened read-only")

    put = replace = delete = move = _ro

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._zip.close()


class ZipEditContainer(DirectoryContainer):
    """``r+`` on a zip, or a new zip being written: a directory beside the zip, packed into the
    zip by ``close`` (``r+``, when something committed) or ``finish`` (a new package)."""

    def __init__(self, path: str | os.PathLike[str], *, new: bool = False, lock_timeout: float = 0.0) -> None:
        self.zip_path = Path(path)
        self._zlock = FileLock(lock_path(self.zip_path), str(self.zip_path))
        self._zlock.acquire(lock_timeout)
        try:
            remove_leftovers(self.zip_path)
            edit = self.zip_path.with_name(f".{self.zip_path.name}.edit-{os.getpid()}")
            shutil.rmtree(edit, ignore_errors=True)
            edit.mkdir()
            super().__init__(edit, where=str(self.zip_path), lock_at=edit)
            self.changed = False
            if not new:
                unpack(self.zip_path, edit)
        except BaseException:
            self._zlock.release()
            raise

    def lock(self, timeout: float = 0.0) -> None:
        pass  # the zip's own lock is held from open to close

    def replace(self, key: str, data: Blob, expect: str | None) -> None:
        super().replace(key, data, expect)
        self.changed = True  # a manifest committed: the zip gets rewritten on close

    def finish(self) -> None:
        self.changed = True
        self.close()  # writes the zip, drops the directory, releases the lock

    def close(self) -> None:
        try:
            if self.changed:
                write_zip(self.root, self.zip_path)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._zlock.release()

    def abort(self) -> None:
        self.changed = False
        self.close()


def check_inflation(info: zipfile.ZipInfo, where: str) -> None:
    """Refuse a compressed member that declares more bytes than a real chunk could: past
    ``MAX_HEADER_JSON`` for metadata, else past twice its compressed size plus
    ``MAX_FREE_INFLATE`` (spherefmt's chunks compress to about 0.7; a zip bomb to 0.001).
    zipfile itself stops inflating at the declared size."""
    name = info.filename[:120]
    if info.filename.endswith("zarr.json") and info.file_size > MAX_HEADER_JSON:
        raise FormatError(f"{where}: member {name!r} declares {info.file_size} bytes of metadata "
                          f"(at most {MAX_HEADER_JSON})")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > 2 * info.compress_size + MAX_FREE_INFLATE:
        raise FormatError(f"{where}: member {name!r} inflates {info.compress_size} bytes to {info.file_size}: "
                          "refused as a zip bomb")


def unpack(src: Path, folder: Path) -> None:
    """Every member of a zip into ``folder`` (zipfile drops absolute paths and ``..``; members
    that would inflate like a zip bomb are refused first)."""
    try:
        with zipfile.ZipFile(src) as z:
            for info in z.infolist():
                check_inflation(info, str(src))
            z.extractall(folder)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, IndexError,
            KeyError, OverflowError, struct.error) as e:
        raise FormatError(f"{src}: not a readable zip file ({type(e).__name__}: {str(e)[:120]})") from None


def write_zip(folder: Path, dst: Path) -> None:
    """Pack a directory into ``dst`` deterministically (sorted names, fixed times, stored), then
    rename it into place: readers see the old zip or the new one."""
    tmp = AnonymousFile(dst)
    try:
        with zipfile.ZipFile(tmp.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for p in sorted(folder.rglob("*")):
                if p.is_file() and not is_leftover(p.name):
                    info = zipfile.ZipInfo(p.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = 0o644 << 16
                    with open(p, "rb") as src, z.open(info, "w", force_zip64=True) as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        tmp.publish()
    except BaseException as e:
        tmp.discard()
        if isinstance(e, OSError):
            raise storage_failure(e, str(dst), dst.name, str(dst.parent)) from None
        raise

