"""Files inside a VHD: an MBR partition with a FAT32 filesystem, as an fsspec filesystem.

Layout of a package image: a dynamic VHD; sector 0 an MBR with one partition (type 0x0C,
FAT32 LBA) from sector 2048 to the end; a FAT32 filesystem in it (written here: pyfatfs's own
``mkfs`` makes images it cannot reopen); the Zarr store as ordinary files at the root.  Windows
and Linux mount this without extra drivers.

File operations go through pyfatfs (a maintained pure-Python FAT implementation) over a file
object that maps onto the VHD's virtual disk, so only the sectors that are touched are read,
and a new VHD block is allocated only when one is first written.  :class:`VHDFileSystem` is an
fsspec filesystem (protocol ``vhd``) over those files: zarr opens the store through it.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import time
import warnings
from typing import Any

from fsspec.spec import AbstractFileSystem

from spherefmt.containers.base import disk_full, storage_failure
from spherefmt.containers.vhd.image import SECTOR, VHDImage, create_vhd, disk_size
from spherefmt.containers.vhd.names import CONTINUED, ENCODED, decode, encode, needs_encoding
from spherefmt.errors import FormatError, IntegrityError, PackageLockedError, ReadOnlyError, SpherefmtError

__all__ = ["DiskFile", "format_disk", "VHDFileSystem", "create_package_image", "PARTITION_START"]

PARTITION_START = 2048  # sectors: 1 MiB alignment, as every partitioning tool does
#: nested parts of one long name a reader follows (a 16 KiB name has 130)
_MAX_PARTS = 4096


def _same_entry(have: str, name: str) -> bool:
    """Whether an entry listed as ``have`` is ``name``: the same name, or (an 8.3 entry with no
    long name and no lowercase flags, as DOS tools write) its upper case."""
    return have == name or (have == name.upper() and have != have.lower() and _is_83(have))


def _is_83(name: str) -> bool:
    """A name that fits an 8.3 directory entry (base up to 8, extension up to 3 characters)."""
    base, dot, ext = name.partition(".")
    return 0 < len(base) <= 8 and len(ext) <= 3 and "." not in ext and " " not in name


RESERVED = 32
CLUSTER = 32 * 1024
FAT32_MIN_CLUSTERS = 65525

#: mounts a reader's refresh tries while a writer may be rewriting a directory (about 2 s in all)
REMOUNT_TRIES = 25


class DiskFile(io.RawIOBase):
    """A seekable binary file over a VHD's virtual disk (what pyfatfs reads and writes)."""

    def __init__(self, vhd: VHDImage) -> None:
        self.vhd, self._pos = vhd, 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self.vhd.mode == "r+"

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self.vhd.size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        n = self.vhd.size - self._pos if size is None or size < 0 else max(0, min(size, self.vhd.size - self._pos))
        out = self.vhd.read(self._pos, n)
        self._pos += n
        return out

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.vhd.size - self._pos))
        b[:n] = self.vhd.read(self._pos, n)
        self._pos += n
        return n

    def write(self, b: Any) -> int:
        data = memoryview(b).cast("B")
        self.vhd.write(self._pos, data)
        self._pos += len(data)
        return len(data)

    def close(self) -> None:  # pyfatfs closes the file object it was given; the VHD stays ours
        pass


def _fat_layout(sectors: int) -> tuple[int, int, int, int]:
    """(sectors per cluster, FAT sectors, cluster count, volume sectors) for FAT32 in at most
    ``sectors``.  The volume is sized so that the FAT has exactly one entry per cluster: some
    FAT implementations (pyfatfs among them) size the volume from the FAT and would otherwise
    allocate clusters past its end."""
    spc = CLUSTER // SECTOR
    per_fat_sector = SECTOR // 4
    fat = (sectors - RESERVED + 2 * spc) // (2 + per_fat_sector * spc)
    clusters = fat * per_fat_sector - 2
    if clusters < FAT32_MIN_CLUSTERS:
        raise FormatError(f"a FAT32 volume needs at least {FAT32_MIN_CLUSTERS} clusters of {CLUSTER} bytes; "
                          f"make the image larger (--vhd-size)")
    return spc, fat, clusters, RESERVED + 2 * fat + clusters * spc


def format_disk(vhd: VHDImage) -> None:
    """Write an MBR with one FAT32 partition and an empty FAT32 filesystem to a blank VHD."""
    spc, fat, clusters, part = _fat_layout(vhd.size // SECTOR - PARTITION_START)
    mbr = bytearray(SECTOR)
    mbr[440:444] = struct.pack("<I", 0x53504852)  # disk signature "SPHR"
    # status, CHS first (unused: LBA), type 0x0C FAT32 LBA, CHS last, LBA start, sectors
    mbr[446:462] = struct.pack("<B3sB3sII", 0x00, b"\xfe\xff\xff", 0x0C, b"\xfe\xff\xff", PARTITION_START, part)
    mbr[510:512] = b"\x55\xaa"
    vhd.write(0, bytes(mbr))
    vol = b"NO NAME    "  # a label here needs a matching volume entry in the root directory
    bpb = struct.pack("<3s8sHBHBHHBHHHIIIHHIHH12sBBBI11s8s", b"\xeb\x58\x90", b"MSWIN4.1", SECTOR, spc, RESERVED, 2,
                      0, 0, 0xF8, 0, 63, 255, PARTITION_START, part, fat, 0, 0, 2, 1, 6, b"\0" * 12, 0x80, 0, 0x29,
                      0x53504852, vol, b"FAT32   ")
    boot = bytearray(SECTOR)
    boot[: len(bpb)] = bpb
    boot[510:512] = b"\x55\xaa"
    fsinfo = bytearray(SECTOR)
    fsinfo[0:4] = struct.pack("<I", 0x41615252)
    fsinfo[484:492] = struct.pack("<II", 0x61417272, clusters - 1)  # root dir takes cluster 2
    fsinfo[492:496] = struct.pack("<I", 3)
    fsinfo[508:512] = b"\x00\x00\x55\xaa"
    base = PARTITION_START * SECTOR
    for at in (0, 6):  # boot sector + FSInfo, and their backups at sector 6
        vhd.write(base + at * SECTOR, bytes(boot))
        vhd.write(base + (at + 1) * SECTOR, bytes(fsinfo))
    fat0 = struct.pack("<III", 0x0FFFFFF8, 0x0FFFFFFF, 0x0FFFFFFF)  # media, reserved, root dir (end of chain)
    for i in range(2):
        vhd.write(base + (RESERVED + i * fat) * SECTOR, fat0)
    # the root directory cluster is already zero (unallocated blocks read as zeros)


#: MBR partition types: FAT32 (CHS and LBA), and the FAT12/16 ones refused by name
_FAT32_TYPES = {0x0B, 0x0C}
_OTHER_FAT_TYPES = {0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x0E: "FAT16"}
_GPT_PROTECTIVE = 0xEE
#: GPT partition type GUID of a Windows/FAT "basic data" partition (on disk, mixed endian)
_GPT_BASIC_DATA = bytes.fromhex("a2a0d0ebe5b9334487c068b6b72699c7")


def find_fat32(vhd: VHDImage, where: str) -> int:
    """The first sector of the image's FAT32 volume: from the MBR partition table (any start
    sector, as fdisk, parted or libguestfs place it), a GPT's basic-data partition, or sector 0
    for a volume without a partition table.  Every field the volume is read with is checked
    against the disk first (a hostile BPB must not make anything allocate gigabytes).

    Raises
    ------
    FormatError
        No FAT32 volume: FAT12/16, another filesystem's partition, or a BPB that does not fit.
    """
    disk = vhd.size // SECTOR
    mbr = vhd.read(0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        raise FormatError(f"{where}: no partition table or boot sector (no 55 AA signature in sector 0)")
    if _is_fat32_bpb(mbr):
        start = 0  # a "superfloppy": the volume fills the disk
    else:
        entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
        used = [(t, lba, n) for _, _, t, _, lba, n in entries if t]
        if not used:
            raise FormatError(f"{where}: the partition table is empty")
        if used[0][0] == _GPT_PROTECTIVE:
            start = _gpt_basic_data(vhd, disk, where)
        else:
            fat32 = [(lba, n) for t, lba, n in used if t in _FAT32_TYPES]
            if not fat32:
                kinds = ", ".join(_OTHER_FAT_TYPES.get(t, f"type 0x{t:02X}") for t, _, _ in used)
                raise FormatError(f"{where}: no FAT32 partition (found {kinds}); packages live on FAT32")
            start, length = fat32[0]
            if not 0 < start < disk or start + length > disk:
                raise FormatError(f"{where}: the FAT32 partition (sectors {start}..{start + length}) lies outside "
                                  f"the {disk}-sector disk")
    boot = vhd.read(start * SECTOR, SECTOR)
    if not _is_fat32_bpb(boot):
        if boot[510:512] == b"\x55\xaa" and struct.unpack_from("<H", boot, 22)[0]:
            raise FormatError(f"{where}: the volume at sector {start} is FAT12/16; packages live on FAT32")
        raise FormatError(f"{where}: no FAT32 boot sector at sector {start}")
    bps, spc, reserved, nfats = struct.unpack_from("<HBHB", boot, 11)
    total, fatsz, _, _, root = struct.unpack_from("<IIHHI", boot, 32, )
    if bps != SECTOR:
        raise FormatError(f"{where}: {bps}-byte sectors (spherefmt reads 512-byte sectors)")
    if spc not in (1, 2, 4, 8, 16, 32, 64, 128) or not reserved or nfats not in (1, 2):
        raise FormatError(f"{where}: malformed FAT32 boot sector (sectors per cluster {spc}, reserved {reserved}, "
                          f"FATs {nfats})")
    if not total or start + total > disk or reserved + nfats * fatsz >= total:
        raise FormatError(f"{where}: the FAT32 volume ({total} sectors, FATs of {fatsz}) does not fit its "
                          f"{disk - start}-sector disk")
    clusters = (total - reserved - nfats * fatsz) // spc
    # The FAT's size must also be consistent with the volume, not only fit in it: the largest a
    # formatter makes it is Microsoft's FATSz (fatgen103: the data sectors over (256 spc + nfats)
    # / 2, which overestimates), plus one cluster of slack for alignment.  A larger one is
    # hostile: readers load the whole FAT (a 512 MiB FAT on a big, mostly unallocated disk).
    most = -(-(total - reserved) * 2 // (256 * spc + nfats)) + spc
    if fatsz > most:
        raise FormatError(f"{where}: malformed FAT32 boot sector (FAT of {fatsz} sectors; a {total}-sector volume "
                          f"of {spc}-sector clusters needs at most {most})")
    if fatsz * SECTOR // 4 < clusters + 2 or not 2 <= root < clusters + 2:
        raise FormatError(f"{where}: malformed FAT32 boot sector (FAT of {fatsz} sectors for {clusters} clusters, "
                          f"root at cluster {root})")
    return start


def _is_fat32_bpb(boot: bytes) -> bool:
    """A FAT32 BPB: boot signature, 16-bit FAT size and root entry count zero, 32-bit FAT size set."""
    return (boot[510:512] == b"\x55\xaa" and boot[0] in (0xEB, 0xE9) and struct.unpack_from("<H", boot, 17)[0] == 0
            and struct.unpack_from("<H", boot, 22)[0] == 0 and struct.unpack_from("<I", boot, 36)[0] > 0)


def _gpt_basic_data(vhd: VHDImage, disk: int, where: str) -> int:
    head = vhd.read(SECTOR, 92)
    if head[:8] != b"EFI PART":
        raise FormatError(f"{where}: a protective MBR without a GPT header")
    table, count, size = struct.unpack_from("<QII", head, 72)
    if not 2 <= table < disk or not 0 < count <= 1024 or size < 128 or size > 4096:
        raise FormatError(f"{where}: malformed GPT header (entries at {table}, {count} of {size} bytes)")
    raw = vhd.read(table * SECTOR, count * size)
    for i in range(count):
        e = raw[i * size : i * size + 128]
        if e[:16] == _GPT_BASIC_DATA:
            first, last = struct.unpack_from("<QQ", e, 32)
            if not 0 < first <= last < disk:
                raise FormatError(f"{where}: GPT partition {i} (sectors {first}..{last}) lies outside the disk")
            return int(first)
    raise FormatError(f"{where}: no basic-data (FAT) partition in the GPT")


def _fix_fsinfo(vhd: VHDImage, start: int = PARTITION_START) -> None:
    """Set FSInfo's free-cluster count from the FAT (pyfatfs leaves it stale; fsck would complain)."""
    import numpy as np

    base = start * SECTOR
    boot = vhd.read(base, SECTOR)
    spc, reserved, nfats = boot[13], struct.unpack_from("<H", boot, 14)[0], boot[16]
    part, fat = struct.unpack_from("<II", boot, 32)
    info, backup = struct.unpack_from("<HH", boot, 48)  # FSInfo sector, backup boot sector
    clusters = (part - reserved - nfats * fat) // spc  # the boot sector was checked by find_fat32
    table = np.frombuffer(vhd.read(base + reserved * SECTOR, (clusters + 2) * 4), "<u4") & 0x0FFFFFFF
    free = int((table[2:] == 0).sum())
    nxt = int(np.argmax(table[2:] == 0)) + 2 if free else 0xFFFFFFFF
    for at in {info, backup + info} - {0, 0xFFFF, backup + 0xFFFF}:
        if vhd.read(base + at * SECTOR, 4) == b"RRaA":  # an FSInfo sector is there
            vhd.write(base + at * SECTOR + 488, struct.pack("<II", free, nxt))


def create_package_image(path: str | os.PathLike[str], size: int, *, inplace: bool = False) -> int:
    """Create a dynamic VHD of (at least) ``size`` bytes holding an empty FAT32 partition
    (``inplace``: into the caller's file at ``path``, see :func:`spherefmt.containers.vhd.image.create_vhd`)."""
    _fat_layout(disk_size(size) // SECTOR - PARTITION_START)  # too small: refuse before any file exists
    real = create_vhd(path, size, inplace=inplace)
    try:
        with VHDImage(path, "r+") as v:
            format_disk(v)
            v.flush()
    except BaseException:
        if not inplace:
            os.unlink(path)
        raise
    return real


def _flush_fat_before_directories(fat: Any) -> None:
    """Make pyfatfs write the FAT before each directory it writes.

    pyfatfs writes a new file's or folder's directory entry, which names its first cluster,
    before it writes the FAT that marks that cluster used (it flushes the FAT last, or when the
    file closes).  A writer killed in between leaves an entry pointing at a free cluster, and
    every later listing of that folder fails ("FREE_CLUSTER mark found").  With the FAT written
    first, any cluster a directory entry names is already marked on disk; a removal still
    writes its directory before the freed clusters reach the FAT.  A kill then leaks clusters at
    worst (fsck reclaims them), never breaks a folder.
    """
    write_dir = fat.update_directory_entry

    def update_directory_entry(dir_entry: Any) -> None:
        fat.flush_fat()
        write_dir(dir_entry)

    fat.update_directory_entry = update_directory_entry


class VHDFileSystem(AbstractFileSystem):
    """fsspec filesystem over the files inside a package VHD (protocol ``vhd``).

    Parameters
    ----------
    fo
        Path of the ``.vhd`` file.
    mode
        ``"r"`` or ``"r+"``.  One writer at a time: ``"r+"`` takes an exclusive lock on the
        image file and a second writer gets :class:`ReadOnlyError` at once.
    durable
        Write the FAT after every file (in-place edits).  A new package being staged skips
        this and writes it once when closed: it only becomes visible, atomically, after that.
    """

    protocol = "vhd"
    cachable = False
    root_marker = "/"

    def __init__(self, fo: str, mode: str = "r", durable: bool = True, where: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_path, self.mode, self.durable = os.fspath(fo), mode, durable
        self.where = where or self.image_path
        self._vhd = VHDImage(self.image_path, mode)
        self._lockf = None
        if mode == "r+":
            import fcntl

            self._lockf = open(self.image_path, "rb")  # noqa: SIM115 - held for the writer's lifetime
            try:
                fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lockf.close()
                self._vhd.close()
                raise PackageLockedError(f"{self.where}: another process is writing this package") from None
        self._io = threading.RLock()  # pyfatfs is not thread-safe; zarr calls from several threads
        self._mount()

    def _mount(self, close_on_error: bool = True) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyfatfs imports fs, which warns about pkg_resources
            from pyfatfs.PyFatFS import PyFatBytesIOFS
        try:
            self._start = find_fat32(self._vhd, self.where)
            # pyfatfs warns ("One or more FATs differ...") on stderr in two lines: kept here as
            # notes instead (``fat_notes``; a damaged volume shows in what is then read, by name)
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                self._fat = PyFatBytesIOFS(DiskFile(self._vhd), offset=self._start * SECTOR, lazy_load=True)
            #: what pyfatfs noticed while mounting (one line each)
            self.fat_notes = [" ".join(str(n.message).split()) for n in notes]
        except FormatError:
            if close_on_error:
                self.close()
            raise
        except Exception as e:  # noqa: BLE001 - pyfatfs raises many kinds on a bad filesystem
            if close_on_error:
                self.close()
            raise FormatError(f"{self.where}: no readable FAT32 filesystem at sector {self._start} "
                              f"({type(e).__name__}: {str(e)[:120]})") from None
        if self.mode == "r+" and self.durable:
            _flush_fat_before_directories(self._fat.fs)
        self._extent_cache: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        self._dirs: dict[str, Any] = {}  # directory path -> pyfatfs entry: lookups walk one level
        self._listings: dict[int, dict[str, tuple[int, int, bool, str]]] = {}  # see _listing
        self._root_cluster = int(self._fat.fs.bpb_header["BPB_RootClus"])

    def refresh(self) -> None:
        """Forget what was read of the filesystem (FAT, directories, file extents) and read it
        again: a reader calls this when a writer in another process may have changed files."""
        if self.mode != "r":
            return
        with self._io:
            # a writer in another process may be in the middle of rewriting a directory: a mount
            # that reads it torn is tried again, a bounded number of times, before it is an error
            for attempt in range(REMOUNT_TRIES):
                last = attempt == REMOUNT_TRIES - 1
                if getattr(self, "_vhd", None) is not None:
                    self._vhd.close()
                self._vhd = VHDImage(self.image_path, "r")  # the BAT may have grown too
                try:
                    self._mount(close_on_error=last)
                    return
                except FormatError:
                    if last:
                        raise
                    time.sleep(0.005 * (attempt + 1))

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path.split("://", 1)[-1] if "://" in path else path
        return "/" + path.strip("/")

    # -- the hooks fsspec builds everything else on ---------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Entries of a directory with their names as written (long names, or 8.3 names with
        their case flags applied), from the directory clusters themselves."""
        path = self._strip_protocol(path)
        with self._io:
            first, size, is_dir = self._lookup(path)
            if not is_dir:
                out = [{"name": path, "size": size, "type": "file"}]
            else:
                base = path.rstrip("/")
                out = [{"name": f"{base}/{name}", "size": 0 if sub else n, "type": "directory" if sub else "file"}
                       for name, _, n, sub in self._entries(first)]
        return out if detail else [o["name"] for o in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        with self._io:
            _, size, is_dir = self._lookup(path)
        return {"name": path, "size": 0 if is_dir else size, "type": "directory" if is_dir else "file"}

    def _extents(self, path: str) -> tuple[int, list[tuple[int, int]]]:
        """A file's size and its runs of contiguous clusters as (disk offset, length), looked up
        once (:meth:`_lookup`) and then read straight from the VHD (through the BAT)."""
        hit = self._extent_cache.get(path)
        if hit is not None:
            return hit
        with self._io:
            fat = self._fat.fs
            first, size, is_dir = self._lookup(path)
            if is_dir:
                raise FileNotFoundError(path)
            per = fat.bytes_per_cluster
            runs: list[tuple[int, int]] = []
            if size and first:
                base = self._start * SECTOR
                for cluster in self._chain(first):
                    off = base + fat.get_data_cluster_address(cluster)
                    if runs and runs[-1][0] + runs[-1][1] == off:
                        runs[-1] = (runs[-1][0], runs[-1][1] + per)
                    else:
                        runs.append((off, per))
            if sum(n for _, n in runs) < size:
                raise FormatError(f"{self.where}: {path}: cluster chain shorter than the file")
            self._extent_cache[path] = (size, runs)
            return size, runs

    def _chain(self, first: int) -> list[int]:
        """A cluster chain, refusing one that loops (a hostile FAT must not hang a reader)."""
        fat = self._fat.fs
        chain = []
        for c in fat.get_cluster_chain(first):
            chain.append(c)
            if len(chain) > len(fat.fat):
                raise FormatError(f"{self.where}: a FAT cluster chain loops")
        return chain

    def _cluster_bytes(self, first: int) -> bytes:
        fat = self._fat.fs
        base = self._start * SECTOR
        return b"".join(self._vhd.read(base + fat.get_data_cluster_address(c), fat.bytes_per_cluster)
                        for c in self._chain(first))

    def _listing(self, first: int) -> dict[str, tuple[int, int, bool, str]]:
        """A directory's entries, ``name.lower() -> (first cluster, size, is_dir, name)``, parsed from
        its clusters (FAT 8.3 entries with their long names).  Much cheaper than pyfatfs's
        lookup, which is where reading a freshly opened package spent its time."""
        hit = self._listings.get(first)
        if hit is not None:
            return hit
        raw = self._cluster_bytes(first)
        out: dict[str, tuple[int, int, bool, str]] = {}
        lfn: list[str] = []
        for i in range(0, len(raw) - 31, 32):
            e = raw[i : i + 32]
            if e[0] == 0x00:
                break
            attr = e[11]
            if e[0] == 0xE5 or (attr & 0x08 and attr != 0x0F):  # deleted, or the volume label
                lfn = []
                continue
            if attr == 0x0F:  # a long-name part; parts are stored last part first
                part = (e[1:11] + e[14:26] + e[28:32]).decode("utf-16-le", "replace")
                lfn.insert(0, part.split("\x00", 1)[0])
                continue
            if lfn:
                name = "".join(lfn)
            else:  # an 8.3 name only: Windows and mtools mark all-lowercase parts with flags (byte 12)
                base = e[0:8].decode("ascii", "replace").rstrip()
                ext = e[8:11].decode("ascii", "replace").rstrip()
                if e[12] & 0x08:
                    base = base.lower()
                if e[12] & 0x10:
                    ext = ext.lower()
                name = f"{base}.{ext}" if ext else base
            lfn = []
            if name in (".", ".."):
                continue
            cluster = struct.unpack_from("<H", e, 20)[0] << 16 | struct.unpack_from("<H", e, 26)[0]
            out[name.lower()] = (cluster, struct.unpack_from("<I", e, 28)[0], bool(attr & 0x10), name)
        self._listings[first] = out
        return out

    def _native(self, path: str) -> str:
        """``path`` for a write, as pyfatfs names it: each component that exists spelled as pyfatfs
        lists it (a volume written by Windows or mtools stores ``sphere`` as the 8.3 entry
        ``SPHERE`` with a lowercase flag, which pyfatfs, case-sensitive on write, would otherwise
        duplicate beside it), and each one that FAT cannot hold as it is in its encoded form
        (:mod:`spherefmt.containers.vhd.names`): over 127 characters, a trailing dot or space, or
        a name a different-case sibling holds."""
        out: list[str] = []
        new = False  # below a directory that does not exist yet, every name is free
        for name in (p for p in path.split("/") if p):
            have = None
            if not new:
                have = self._fat_names("/" + "/".join(out)).get(name.lower())
                if have is not None and not needs_encoding(name) and _same_entry(have, name):
                    out.append(have)
                    continue
                found = self._encoded_parts(out, name)
                if found is not None:
                    out += found
                    continue
                new = True
            out += encode(name) if have is not None or needs_encoding(name) else [name]
        return "/" + "/".join(out)

    def _encoded_parts(self, parent: list[str], name: str) -> list[str] | None:
        """The pyfatfs names of ``name``'s encoded form under ``parent``, if it exists there."""
        parts: list[str] = []
        for part in encode(name):
            hit = self._fat_names("/" + "/".join(parent + parts)).get(part)
            if hit is None:
                return None
            parts.append(hit)
        return parts

    def _fat_names(self, path: str) -> dict[str, str]:
        """pyfatfs's names in a directory by their lower case ({} where it is not a directory):
        in a writer the directories on disk may lag what pyfatfs holds."""
        try:
            return {n.lower(): n for n in self._fat.listdir(path)}
        except Exception:  # noqa: BLE001 - not a directory (yet)
            return {}

    def _lookup(self, path: str) -> tuple[int, int, bool]:
        """(first cluster, size, is_dir) of a path, directory by directory via :meth:`_listing`:
        each component by its plain name, then its encoded form (:mod:`.names`)."""
        cluster, size, is_dir = self._root_cluster, 0, True
        for name in filter(None, path.split("/")):
            if not is_dir:
                raise FileNotFoundError(path)
            hit = self._listing(cluster).get(name.lower())
            if hit is None or needs_encoding(name) or not _same_entry(hit[3], name):
                hit = self._encoded(cluster, name)
                if hit is None:
                    raise FileNotFoundError(path)
            cluster, size, is_dir, _ = hit
        return cluster, size, is_dir

    def _encoded(self, cluster: int, name: str) -> tuple[int, int, bool, str] | None:
        """The entry of ``name`` in its encoded form in directory ``cluster``, if there is one."""
        *dirs, last = encode(name)
        for part in dirs:
            hit = self._listing(cluster).get(part)
            if hit is None or not hit[2]:
                return None
            cluster = hit[0]
        return self._listing(cluster).get(last)

    def _entries(self, first: int) -> list[tuple[str, int, int, bool]]:
        """A directory's entries as ``(name, first cluster, size, is_dir)`` with encoded names
        decoded and the parts of a long one joined (:mod:`.names`), sorted by name."""
        out: list[tuple[str, int, int, bool]] = []
        todo, seen = [("", first)], {first}
        while todo:
            prefix, at = todo.pop()
            for _, (c, n, sub, name) in self._listing(at).items():
                if name.startswith(CONTINUED) and sub:
                    if c in seen or len(seen) > _MAX_PARTS:  # a hostile image: parts that loop
                        raise FormatError(f"{self.where}: a long name's parts loop")
                    seen.add(c)
                    todo.append((prefix + decode(name[2:]), c))
                elif name.startswith(ENCODED):
                    out.append((prefix + decode(name[2:]), c, n, sub))
                elif not prefix:
                    out.append((name, c, n, sub))
        return sorted(out)

    def walk_files(self, path: str = "/") -> list[tuple[str, int]]:
        """Every file under ``path`` with its size, from the directory clusters themselves
        (:meth:`_listing`; names as stored).  Raises :class:`IntegrityError` on a directory tree
        that does not hold together (a stale view beside a writer, or a damaged image)."""
        path = self._strip_protocol(path)
        try:
            with self._io:
                first, _, is_dir = self._lookup(path)
                if not is_dir:
                    raise FileNotFoundError(path)
                out: list[tuple[str, int]] = []
                todo = [(path.rstrip("/"), first)]
                seen: set[int] = set()
                while todo:
                    base, cluster = todo.pop()
                    if cluster in seen:
                        raise FormatError(f"{self.where}: the directory tree loops")
                    seen.add(cluster)
                    for name, c, size, sub in self._entries(cluster):
                        if sub:
                            todo.append((f"{base}/{name}", c))
                        else:
                            out.append((f"{base}/{name}", size))
                return sorted(out)
        except FileNotFoundError:
            raise
        except (FormatError, Exception) as e:  # noqa: BLE001 - pyfatfs and parse errors on a stale chain
            raise IntegrityError(f"{self.where}: cannot list {path} ({type(e).__name__}: {str(e)[:120]})") from None

    def _dir_entry(self, path: str) -> Any:
        hit = self._dirs.get(path)
        if hit is None:
            if path == "/":
                hit = self._fat.fs.root_dir
            else:
                parent, name = path.rsplit("/", 1)
                hit = self._dir_entry(parent or "/").get_entry(name)
                if not hit.is_directory():
                    raise FileNotFoundError(path)
            self._dirs[path] = hit
        return hit

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes | memoryview:  # a memoryview only for _view=True (read_range)
        path = self._strip_protocol(path)
        for attempt in range(4):
            try:
                return self._cat(path, start, end, bool(kwargs.get("_view")))
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - pyfatfs's errors on a chain a writer just changed
                if self.mode != "r" or attempt == 3:
                    raise IntegrityError(f"{self.where}: cannot read {path} ({type(e).__name__}: "
                                      f"{str(e)[:120]})") from None
                self.refresh()  # a writer in another process changed the filesystem: look again
        raise AssertionError("unreachable")

    def read_range(self, path: str, start: int | None = None, end: int | None = None) -> bytes | memoryview:
        """Bytes of a file like :meth:`cat_file`, as a bytes-like object with as few copies as
        possible (a range inside one extent is read straight into one buffer)."""
        return self.cat_file(path, start, end, _view=True)

    def _cat(self, path: str, start: int | None, end: int | None, view: bool = False) -> bytes | memoryview:
        size, runs = self._extents(path)
        s = 0 if start is None else (start if start >= 0 else max(0, size + start))
        e = size if end is None else (end if end >= 0 else max(0, size + end))
        e = min(e, size)
        out, pos = [], 0
        for off, n in runs:
            lo, hi = max(s, pos), min(e, pos + n)
            if lo < hi:
                out.append((self._vhd.read_view if view else self._vhd.read)(off + lo - pos, hi - lo))
            pos += n
            if pos >= e:
                break
        if view and len(out) == 1:
            return out[0]
        return b"".join(out)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Write a whole file.  An existing file is replaced atomically (see
        :meth:`_replace_contents`); a new one is written in place."""
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only")
        path = self._strip_protocol(path)
        self._extent_cache.pop(path, None)
        with self._io:
            path = self._native(path)
            parent, name = path.rsplit("/", 1)
            self._listings.clear()
            if self._fat.exists(path) and not self._fat.isdir(path):
                self._replace_contents(path, bytes(value))
                return
            # a new file is written in place: until zarr's metadata names it, nothing reads it
            try:
                self._fat.makedirs(parent or "/", recreate=True)
                with self._fat.openbin(path, "w") as f:
                    f.write(bytes(value))
            except Exception as e:  # noqa: BLE001 - pyfatfs signals a full volume in several ways
                host = disk_full(e)  # the disk holding the image, not the filesystem inside it
                with contextlib.suppress(Exception):
                    if self._fat.exists(path):
                        self._fat.remove(path)
                if host:
                    raise storage_failure(e, self.where, path.lstrip("/"), os.path.dirname(self.where)) from None
                if "free" in str(e).lower() or "space" in str(e).lower():
                    raise self._full() from None
                if isinstance(e, SpherefmtError):
                    raise
                raise FormatError(f"{self.where}: cannot write {path} in the FAT volume ({type(e).__name__}: "
                                  f"{str(e)[:120]})") from None
            if self.durable:  # in-place edits: the FAT reaches the disk with each file
                self._fat.fs.flush_fat()

    def _full(self) -> OSError:
        return OSError(28, f"{self.where}: the filesystem inside the image is full; convert into a larger image: "
                           "sphere convert THIS.vhd BIGGER.vhd --vhd-size SIZE")

    def _replace_contents(self, path: str, data: bytes) -> None:
        """Replace an existing file's bytes so that a process killed at any point leaves the old
        or the new contents, never a mix (``spec/VHD.md`` section 4):

        1. the new bytes go to newly allocated clusters; the FAT with the new chain is written;
        2. the file's directory entry is pointed at the new chain (one write of its directory);
        3. the old chain is freed and the FAT written again.

        A kill between the steps leaks clusters (which ``fsck`` reclaims), never data.
        """
        fat = self._fat.fs
        parent, name = path.rsplit("/", 1)
        pdir = self._dir_entry(parent or "/")
        entry = pdir.get_entry(name)
        old_first = entry.get_cluster()
        first = 0
        if data:
            try:
                first = fat.allocate_bytes(len(data))[0]
                fat.write_data_to_cluster(data, first, extend_cluster=False)
            except Exception as e:  # noqa: BLE001 - pyfatfs's "not enough free space", or the host's
                if disk_full(e):
                    raise storage_failure(e, self.where, path.lstrip("/"), os.path.dirname(self.where)) from None
                raise self._full() from e
        fat.flush_fat()
        self._vhd.flush()
        entry.set_cluster(first)
        entry.filesize = len(data)
        fat.update_directory_entry(pdir)
        self._vhd.flush()
        if old_first:
            fat.free_cluster_chain(old_first)
            fat.flush_fat()

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self._extent_cache.pop(path, None)
        with self._io:
            path = self._native(path)
            self._listings.clear()
            if self._fat.exists(path) and not self._fat.isdir(path):
                self._fat.remove(path)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        self._extent_cache.clear()
        self._dirs.clear()
        self._listings.clear()
        for p in [path] if isinstance(path, str) else path:
            p = self._strip_protocol(p)
            with self._io:
                p = self._native(p)
                self._listings.clear()
                if not self._fat.exists(p):
                    continue
                if not self._fat.isdir(p):
                    self._fat.remove(p)
                elif recursive:
                    for name in self._fat.listdir(p):  # the root itself cannot go; its contents can
                        child = f"{p.rstrip('/')}/{name}"
                        (self._fat.removetree if self._fat.isdir(child) else self._fat.remove)(child)
                    if p != "/":
                        self._fat.removedir(p)
                    self._fat.fs.flush_fat()

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        with self._io:
            native = self._native(self._strip_protocol(path))
            self._listings.clear()
            self._fat.makedirs(native, recreate=True)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.mkdir(path)

    def rmdir(self, path: str) -> None:
        self._dirs.clear()
        self._listings.clear()
        with self._io:
            native = self._native(self._strip_protocol(path))
            self._fat.removedir(native)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return io.BytesIO(self.cat_file(path))
        fs = self

        class _Writer(io.BytesIO):
            def close(self) -> None:
                if not self.closed:
                    fs.pipe_file(path, self.getvalue())
                super().close()

        return _Writer()

    def flush(self) -> None:
        """Make everything written durable and the filesystem consistent (FSInfo counts)."""
        if self.mode == "r+":
            with self._io:
                _fix_fsinfo(self._vhd, self._start)
                self._vhd.flush()

    def close(self) -> None:
        fat = getattr(self, "_fat", None)
        if fat is not None:
            with self._io:
                if self.mode == "r+":
                    fat.close()  # pyfatfs writes its FAT and marks the volume clean
                self._fat = None
                if self.mode == "r+":
                    _fix_fsinfo(self._vhd, self._start)
                    self._vhd.flush()
        if getattr(self, "_vhd", None) is not None:
            self._vhd.close()
            del self._vhd  # closed: no image, as when __init__ failed before opening one (hence the getattr)
        if self._lockf is not None:
            self._lockf.close()
            self._lockf = None
