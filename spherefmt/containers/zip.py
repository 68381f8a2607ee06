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
        self._offsets: dict[str, int] = {}  # members are read with pread: no shared file position

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        off = self._offsets.get(info.filename)
        if off is None:
            off = self._offsets[info.filename] = data_offset(self._fd, info, self.where)
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
            data = read_member(self._fd, self._data_offset(info), info, self.where)
        except FormatError:
            raise
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


def data_offset(fd: int, info: zipfile.ZipInfo, where: str) -> int:
    """Where a member's data starts: after its local header (whose name and extra field lengths
    may differ from the central directory's), checked to lie inside the file."""
    raw = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
        raise FormatError(f"{where}: member {info.filename[:120]!r} has no local header")
    name_len, extra_len = _LOCAL_HEADER.unpack(raw)[-2:]
    off = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if off + info.compress_size > os.fstat(fd).st_size:
        raise FormatError(f"{where}: member {info.filename[:120]!r} runs past the end of the file")
    return off


#: compressed bytes fed to the inflater at a time (its output is bounded separately)
_INFLATE_STEP = 1 << 20


def read_member(fd: int, offset: int, info: zipfile.ZipInfo, where: str) -> bytes:
    """The bytes of a stored or deflated member whose data starts at ``offset`` of ``fd``,
    checked against the declared size and CRC-32.  Inflation stops at the declared size plus one
    byte, whatever the stream holds: a member that tells the truth about its size and CRC but
    whose deflate stream expands to gigabytes is refused having made at most that much
    (zipfile inflates up to 2 GiB per read before cutting to the declared size)."""
    name = info.filename[:120]
    if info.flag_bits & 0x1:
        raise FormatError(f"{where}: member {name!r} is encrypted")
    size, packed = info.file_size, info.compress_size
    if info.compress_type == zipfile.ZIP_STORED:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise FormatError(f"{where}: member {name!r} runs past the end of the file")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as zip stores it
        parts: list[bytes] = []
        made = read = 0
        while not d.eof:
            if d.unconsumed_tail:
                chunk = d.unconsumed_tail
            elif read < packed:
                chunk = os.pread(fd, min(_INFLATE_STEP, packed - read), offset + read)
                if not chunk:
                    raise FormatError(f"{where}: member {name!r} runs past the end of the file")
                read += len(chunk)
            else:
                break  # the declared compressed bytes end before the stream does
            out = d.decompress(chunk, size + 1 - made)
            made += len(out)
            parts.append(out)
            if made > size:
                raise FormatError(f"{where}: member {name!r} inflates past its declared {size} bytes: refused as a "
                                  "zip bomb")
        data = b"".join(parts)
        if not d.eof or len(data) != size:
            raise FormatError(f"{where}: member {name!r} inflates to {len(data)} bytes, declared {size}")
    else:
        raise FormatError(f"{where}: member {name!r} uses compression method {info.compress_type}; spherefmt "
                          "reads stored and deflated members")
    if zlib.crc32(data) != info.CRC:
        raise FormatError(f"{where}: member {name!r} fails its CRC-32")
    return data


def unpack(src: Path, folder: Path) -> None:
    """Every member of a zip into ``folder``: safe keys only (no absolute paths, no ``..``),
    members that would inflate like a zip bomb refused first, each inflated no further than its
    declared size (:func:`read_member`)."""
    try:
        with zipfile.ZipFile(src) as z, open(src, "rb") as f:
            fd = f.fileno()
            for info in z.infolist():
                check_inflation(info, str(src))
            for info in z.infolist():
                if not info.filename or info.is_dir():
                    continue
                dst = folder / safe_key(info.filename, str(src))
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(read_member(fd, data_offset(fd, info, str(src)), info, str(src)))
    except FormatError:
        raise
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

