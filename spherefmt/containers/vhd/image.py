"""VHD disk images (Microsoft Virtual Hard Disk Image Format Specification, v1.0).

Fixed and dynamic ("expandable") images.  A dynamic image is::

    footer copy (512) | dynamic header "cxsparse" (1024) | BAT (u32 BE per block, padded to
    512) | blocks: sector bitmap (512 for 2 MiB blocks) + data ... | footer (512)

All integers are big-endian.  Checksums are the one's complement of the byte sum with the
checksum field zeroed.  Everything read from a file is checked before use (cookie, checksums,
sizes, offsets inside the file, blocks that overlap the metadata or each other), and a bad
image raises a one-line :class:`FormatError`.

Writes allocate a block only when it is first written (never for all-zero data), so the file
grows with its content.  Allocation is crash-safe (``spec/VHD.md``): (1) the footer is written
at the new end of file and synced, (2) the block's bitmap and data are written where the old
footer was and synced, (3) the BAT entry is written and synced.  A crash before (3) leaves at
worst an unreferenced region; the image always opens.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from pathlib import Path

from spherefmt.errors import FormatError, InputError, ReadOnlyError

__all__ = ["VHDImage", "create_vhd", "chs_geometry", "disk_size"]

SECTOR = 512
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
UNALLOCATED = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
DEFAULT_BLOCK = 2 * 1024 * 1024
MAX_SIZE = 2040 * 1024**3  # the spec's limit for VHD
#: Creator application.  qemu sizes images by CHS geometry when this is "vpc " or "qemu"; any
#: other creator (ours included) is sized by current_size, which we write exactly.
CREATOR_APP = b"sphr"
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sI4s512s192s256s")


def _checksum(buf: bytes, at: int) -> int:
    data = bytearray(buf)
    data[at : at + 4] = b"\0\0\0\0"
    return (~sum(data)) & 0xFFFFFFFF


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for ``size`` bytes, the spec's appendix algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def disk_size(requested: int) -> int:
    """The virtual size a new image gets for ``requested`` bytes: rounded up so that its CHS
    geometry describes it exactly.  Readers that size images by geometry (qemu does for most
    creator applications, older Virtual PC always) and readers that use ``current_size`` then
    agree.  Above the largest CHS geometry (~127 GB) the size is kept (rounded to a sector) and
    readers use ``current_size``."""
    total = -(-requested // SECTOR)
    if total >= 65535 * 16 * 255:
        return total * SECTOR
    for _ in range(64):
        c, h, spt = chs_geometry(total * SECTOR)
        if c * h * spt >= total:
            return c * h * spt * SECTOR
        total = -(-total // (h * spt)) * (h * spt)
    raise FormatError(f"no CHS geometry for {requested} bytes")


def _footer(size: int, disk_type: int, data_offset: int, uid: bytes, timestamp: int) -> bytes:
    c, h, s = chs_geometry(size)
    raw = _FOOTER.pack(FOOTER_COOKIE, 2, 0x00010000, data_offset, timestamp, CREATOR_APP, 0x00010000, b"Wi2k",
                       size, size, c, h, s, disk_type, 0, uid, 0, b"\0" * 427)
    return raw[:64] + struct.pack(">I", _checksum(raw, 64)) + raw[68:]


def create_vhd(path: str | os.PathLike[str], size: int, *, dynamic: bool = True, block_size: int = DEFAULT_BLOCK,
               timestamp: int | None = None, inplace: bool = False) -> int:
    """Create an empty VHD of at least ``size`` virtual bytes (see :func:`disk_size`).

    Dynamic images start at a few KiB and grow as blocks are written; fixed images occupy
    their size plus 512 bytes.  The image is written beside ``path`` and renamed onto it,
    unless ``inplace`` (``path`` is a file of the caller's that nobody sees yet).  Returns the
    virtual size.
    """
    if size <= 0 or size > MAX_SIZE:
        raise FormatError(f"{path}: VHD size must be 1..{MAX_SIZE} bytes, not {size}")
    size = disk_size(size)
    if block_size < SECTOR * 8 or block_size & (block_size - 1):
        raise FormatError(f"{path}: VHD block size must be a power of two >= 4096, not {block_size}")
    ts = int(time.time()) - VHD_EPOCH if timestamp is None else timestamp
    uid = uuid.uuid4().bytes
    tmp = Path(path) if inplace else Path(f"{os.fspath(path)}.partial")
    with open(tmp, "wb") as f:
        if not dynamic:
            f.truncate(size)
            f.seek(size)
            f.write(_footer(size, DISK_FIXED, NO_OFFSET, uid, ts))
        else:
            entries = -(-size // block_size)
            bat_bytes = -(-entries * 4 // SECTOR) * SECTOR
            footer = _footer(size, DISK_DYNAMIC, SECTOR, uid, ts)
            header = bytearray(_HEADER.pack(HEADER_COOKIE, NO_OFFSET, 3 * SECTOR, 0x00010000, entries, block_size, 0,
                                            b"\0" * 16, 0, b"\0" * 4, b"\0" * 512, b"\0" * 192, b"\0" * 256))
            header[36:40] = struct.pack(">I", _checksum(bytes(header), 36))
            f.write(footer + bytes(header) + b"\xff" * bat_bytes + footer)
        f.flush()
        os.fsync(f.fileno())
    if not inplace:
        os.replace(tmp, path)
    return size


class VHDImage:
    """An open VHD: ``read``/``write`` at virtual-disk offsets.

    Parameters
    ----------
    path
        The ``.vhd`` file.
    mode
        ``"r"`` or ``"r+"``.

    Raises
    ------
    FormatError
        The file is not a valid fixed or dynamic VHD (differencing images are refused).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise InputError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_RDONLY if mode == "r" else os.O_RDWR)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open VHD: {e.strerror}") from None
        try:
            self._load()
        except BaseException:
            os.close(self._fd)
            raise

    # -- parsing -----------------------------------------------------------------------
    def _fail(self, why: str) -> FormatError:
        return FormatError(f"{self.path}: not a valid VHD: {why}")

    def _pread(self, n: int, off: int) -> bytes:
        out = os.pread(self._fd, n, off)
        if len(out) != n:
            raise self._fail(f"file ends before offset {off + n}")
        return out

    def _parse_footer(self, raw: bytes) -> tuple:
        f = _FOOTER.unpack(raw)
        if f[0] != FOOTER_COOKIE:
            raise self._fail("bad footer cookie")
        if f[14] != _checksum(raw, 64):
            raise self._fail("footer checksum mismatch")
        return f

    def _load(self) -> None:
        self.file_size = os.fstat(self._fd).st_size
        if self.file_size < SECTOR:
            raise self._fail(f"{self.file_size} bytes is shorter than a footer")
        try:  # the footer at the end; a dynamic image keeps a copy at offset 0
            f = self._parse_footer(self._pread(SECTOR, (self.file_size // SECTOR - 1) * SECTOR))
            self.footer_offset = (self.file_size // SECTOR - 1) * SECTOR
        except FormatError:
            f = self._parse_footer(self._pread(SECTOR, 0))
            if f[13] != DISK_DYNAMIC:
                raise
            self.footer_offset = -(-self.file_size // SECTOR) * SECTOR  # footer lost: append a new one on write
        self._footer_raw = _footer(f[9], f[13], f[3], f[15], f[4])
        self.size, self.disk_type, self._uid, self._ts = f[9], f[13], f[15], f[4]
        if self.size <= 0 or self.size % SECTOR or self.size > MAX_SIZE:
            raise self._fail(f"virtual size {self.size} out of range")
        if self.disk_type == DISK_FIXED:
            if self.footer_offset < self.size:
                raise self._fail(f"fixed image of {self.size} bytes in a {self.file_size}-byte file")
            self.block_size = 0
            return
        if self.disk_type != DISK_DYNAMIC:
            raise self._fail(f"disk type {self.disk_type} is not fixed (2) or dynamic (3)")
        hoff = f[3]
        if hoff % SECTOR or hoff + 1024 > self.footer_offset:
            raise self._fail(f"dynamic header offset {hoff} outside the file")
        hraw = self._pread(1024, hoff)
        h = _HEADER.unpack(hraw)
        if h[0] != HEADER_COOKIE:
            raise self._fail("bad dynamic header cookie")
        if h[6] != _checksum(hraw, 36):
            raise self._fail("dynamic header checksum mismatch")
        self.block_size = h[5]
        if self.block_size < SECTOR * 8 or self.block_size > 256 * 1024**2 or self.block_size & (self.block_size - 1):
            raise self._fail(f"block size {self.block_size} is not a power of two in 4 KiB..256 MiB")
        entries = h[4]
        if entries < -(-self.size // self.block_size) or entries > MAX_SIZE // self.block_size + 1:
            raise self._fail(f"{entries} BAT entries for {self.size} bytes in {self.block_size}-byte blocks")
        self._bat_offset = h[2]
        bat_bytes = -(-entries * 4 // SECTOR) * SECTOR
        if self._bat_offset % SECTOR or self._bat_offset + bat_bytes > self.footer_offset or \
                self._bat_offset < hoff + 1024 and self._bat_offset + bat_bytes > hoff:
            raise self._fail("BAT outside the file or overlapping the header")
        self._bitmap = -(-self.block_size // SECTOR // 8 // SECTOR) * SECTOR
        self._bat = list(struct.unpack(f">{entries}I", self._pread(entries * 4, self._bat_offset)))
        meta_end = max(self._bat_offset + bat_bytes, hoff + 1024)
        spans = []
        for i, e in enumerate(self._bat):
            if e == UNALLOCATED:
                continue
            start, end = e * SECTOR, e * SECTOR + self._bitmap + self.block_size
            if start < meta_end or end > self.footer_offset:
                raise self._fail(f"BAT entry {i} points outside the data area")
            spans.append((start, end))
        spans.sort()
        for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise self._fail("two blocks overlap")
        self._data_end = max([meta_end] + [e for _, e in spans])

    # -- I/O -----------------------------------------------------------------------------
    def _check_range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise FormatError(f"{self.path}: range [{offset}, {offset + n}) outside the {self.size}-byte disk")

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the virtual disk at ``offset`` (unallocated blocks read as zeros)."""
        self._check_range(offset, n)
        if self.disk_type == DISK_FIXED:
            return self._pread(n, offset)
        block, within = divmod(offset, self.block_size)
        if within + n <= self.block_size:  # the common case: one block, one pread, no extra copy
            entry = self._bat[block]
            return bytes(n) if entry == UNALLOCATED else self._pread(n, entry * SECTOR + self._bitmap + within)
        return bytes(self.read_view(offset, n))

    def read_view(self, offset: int, n: int) -> bytes | memoryview:
        """Like :meth:`read`, but a range across blocks is read straight into one buffer (no
        copies after the kernel's, and not zero-filled first) and returned as a memoryview.

        Never a view of a memory map of the image: a writer in another process reuses freed
        clusters in place, so bytes verified through a map could change before they are used
        (a torn expert read as a decode error, or worse, as silently different weights)."""
        self._check_range(offset, n)
        block, within = divmod(offset, self.block_size)
        if self.disk_type == DISK_FIXED or within + n <= self.block_size:
            return self.read(offset, n)
        import numpy as np

        view = memoryview(np.empty(n, np.uint8).data)  # not zero-filled: every byte is read or zeroed below
        pos = 0
        while pos < n:
            block, within = divmod(offset + pos, self.block_size)
            k = min(n - pos, self.block_size - within)
            entry = self._bat[block]
            if entry != UNALLOCATED:
                got = os.preadv(self._fd, [view[pos : pos + k]], entry * SECTOR + self._bitmap + within)
                if got != k:
                    raise self._fail(f"file ends before offset {entry * SECTOR + self._bitmap + within + k}")
            else:
                view[pos : pos + k] = bytes(k)
            pos += k
        return view

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at virtual offset ``offset``, allocating blocks as needed."""
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.path}: VHD opened read-only")
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        with self._lock:
            if self.disk_type == DISK_FIXED:
                os.pwrite(self._fd, data, offset)
                return
            pos = 0
            while pos < len(data):
                block, within = divmod(offset + pos, self.block_size)
                k = min(len(data) - pos, self.block_size - within)
                piece = data[pos : pos + k]
                entry = self._bat[block]
                if entry == UNALLOCATED:
                    if not any(piece):  # zeros need no block: the disk reads zeros there
                        pos += k
                        continue
                    entry = self._allocate(block)
                os.pwrite(self._fd, piece, entry * SECTOR + self._bitmap + within)
                pos += k

    def _allocate(self, block: int) -> int:
        """Crash-safe block allocation (see the module docstring); returns the BAT entry."""
        start = self.footer_offset  # the block replaces the footer, which moves past it
        end = start + self._bitmap + self.block_size
        os.pwrite(self._fd, self._footer_raw, end)  # 1. footer at the new end (file grows)
        os.fsync(self._fd)
        os.pwrite(self._fd, b"\xff" * self._bitmap, start)  # 2. bitmap (every sector present)
        os.pwrite(self._fd, b"\0" * self.block_size, start + self._bitmap)  # and zeroed data
        os.fsync(self._fd)
        entry = start // SECTOR
        os.pwrite(self._fd, struct.pack(">I", entry), self._bat_offset + 4 * block)  # 3. publish
        os.fsync(self._fd)
        self._bat[block] = entry
        self._data_end = end
        self.footer_offset = end
        self.file_size = end + SECTOR
        return entry

    def allocated_blocks(self) -> int:
        return 0 if self.disk_type == DISK_FIXED else sum(e != UNALLOCATED for e in self._bat)

    def flush(self) -> None:
        if self.mode == "r+":
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> VHDImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
