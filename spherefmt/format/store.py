"""The zarr store of a package: a container seen through its manifest, with transactions.

Every byte spherefmt reads from a package comes through :class:`PackageStore`, zarr's own reads
and the direct chunk reads of :mod:`spherefmt.format.chunks` alike, and every byte it writes goes
through a :meth:`PackageStore.transaction` (``spec/FORMAT.md`` section 10):

* **Reading** (version 2): an object the latest manifest does not list reads as absent (zarr's
  fill value) whatever the container holds; a listed object that is missing, or whose size and
  checksums do not match, raises :class:`~spherefmt.errors.IntegrityError` naming the package
  and the object.  The checks cost a 4-byte comparison for chunks (their stored crc32c, which
  the decoder verifies anyway) and one crc32c pass for metadata.
* **Writing**: a transaction writes new objects in place (nothing lists them yet) and new bytes
  of existing objects at ``staging/<generation>-<id>-<n>``; its commit replaces the manifest
  (atomically, and only if it is still the one this writer read) with the next generation's,
  which lists the staged copies as *pending*; then they are moved into place.
  A process killed before the commit leaves the old package; after it, the new one (a reader
  finds a pending object at its staging key until it has been moved).  The next writer finishes
  the moves and removes what killed writers left.
* **One writer**: opening ``r+`` takes the container's writer lock.  Object storage has none: a
  writer there stages everything and a second writer's commit fails on the conditional write.
* **Readers beside a writer** see one generation at a time: when an object no longer matches
  (a writer committed since), :meth:`PackageStore.refresh` loads the new manifest and the
  package re-reads (``Package`` retries, bounded by ``MAX_REREADS`` / ``MAX_REREAD_SECONDS``).

A version-1 package (no manifest) is read as it is, without these checks; opening one ``r+``
upgrades it: its first commit writes a manifest of everything it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import crc32c
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from spherefmt.constants import (
    CORE_GROUP,
    MANIFEST_PREFIX,
    MAX_HEADER_JSON,
    ROOT_ATTR,
    ROUTER_GROUP,
    SPHERE_GROUP,
    STAGING_PREFIX,
)
from spherefmt.containers import Container, open_container
from spherefmt.containers.base import CommitConflict, clip
from spherefmt.containers.directory import is_leftover
from spherefmt.errors import (
    ConcurrentWriteError,
    FormatError,
    InputError,
    IntegrityError,
    ReadOnlyError,
    SpherefmtError,
    StorageError,
)
from spherefmt.format.manifest import MANIFEST_KEY, ChunkLayout, Entry, Manifest, array_of, entry_for, trailers_of

__all__ = ["PackageStore", "is_package", "open_package_store"]

#: top-level names of a package's own objects: what recovery may remove when no manifest lists it
OWNED_ROOTS = (CORE_GROUP, SPHERE_GROUP, ROUTER_GROUP, "files", MANIFEST_PREFIX, STAGING_PREFIX)


def _owned(key: str) -> bool:
    return key == "zarr.json" or key.split("/", 1)[0] in OWNED_ROOTS or is_leftover(key.rsplit("/", 1)[-1])


@dataclass
class Transaction:
    """The changes of one transaction: ``writes`` maps a key to where its new bytes are and
    their manifest entry; ``deletes`` are committed keys to drop."""

    generation: int
    txid: str
    stage_all: bool
    writes: dict[str, tuple[str, Entry]] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)
    depth: int = 1
    staged: int = 0

    def staging(self, key: str) -> str:
        """A flat name in ``staging/`` (no folders to make, one per transaction's object)."""
        self.staged += 1
        return f"{STAGING_PREFIX}/{self.generation}-{self.txid}-{self.staged}"


class PackageStore(Store):
    """A zarr store over a :class:`~spherefmt.containers.Container` (see the module docstring).

    Parameters
    ----------
    container
        Where the objects are.
    mode
        ``"r"`` or ``"r+"`` (takes the writer lock and finishes what a killed writer left).
    new
        A new package (an empty container from :func:`~spherefmt.containers.create_container`):
        everything is written in place and the first commit creates its manifest.
    lock_timeout
        Seconds to wait for another writer to finish (``r+``); 0: refuse at once.
    """

    supports_writes = True
    supports_deletes = True
    supports_listing = True
    supports_partial_writes = False

    def __init__(self, container: Container, mode: str = "r", *, new: bool = False, lock_timeout: float = 0.0) -> None:
        super().__init__(read_only=mode == "r")
        self.container, self.mode, self.where = container, mode, container.where
        self._mutex = threading.RLock()
        self._txn: Transaction | None = None
        self._layouts: dict[str, ChunkLayout | None] = {}
        self._trailer_sets: dict[str, frozenset[int | None]] = {}
        self.upgrading = False
        self._version: str | None = None  # of the manifest object this store read
        if new:
            self.manifest: Manifest | None = Manifest(0)
            return
        if mode == "r+" and container.can_lock:
            container.lock(lock_timeout)
        try:
            self.manifest = self._latest()
            if mode == "r+":
                if self.manifest is None:  # version 1: every object as it is, upgraded on commit
                    self.upgrading = self._has_root()
                    self.manifest = Manifest(0, self.scan()) if self.upgrading else None
                elif container.can_lock:
                    self._recover()
                else:
                    self._drop_dead_staging()
        except BaseException:
            if not container.borrowed:
                container.close()
            raise

    # -- the manifest ------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        """True inside :meth:`transaction` (changes are staged until it ends)."""
        return self._txn is not None

    def _has_root(self) -> bool:
        return self.container.size("zarr.json") is not None

    def _latest(self) -> Manifest | None:
        """The package's manifest, or ``None`` (a version-1 package); remembers the version of
        the object it was read from, which the next commit must still find."""
        for attempt in range(6):
            try:
                version = self.container.version(MANIFEST_KEY)
                raw = self.container.get(MANIFEST_KEY) if version is not None else None
                if raw is None and version is not None:
                    raise IntegrityError(f"{self.where}: {MANIFEST_KEY} vanished")
                if not raw:  # none, or an empty one a killed first commit left: no manifest
                    self._version = version
                    return None
                m = Manifest.decode(bytes(raw), f"{self.where}: {MANIFEST_KEY}")
                self._version = version if self.container.version(MANIFEST_KEY) == version else None
                if self._version is None and version is not None:
                    raise IntegrityError(f"{self.where}: {MANIFEST_KEY} changed while being read")
                return m
            except FormatError:
                # beside a writer a read can be stale (a VHD's FAT, a replaced object): look again
                if attempt == 5:
                    raise
                self.container.refresh()
                time.sleep(0.01 * (attempt + 1))
        raise IntegrityError(f"{self.where}: its manifest kept changing while being read")

    @property
    def generation(self) -> int | None:
        return None if self.manifest is None else self.manifest.generation

    def refresh(self) -> str:
        """Look at the package again after a failed check: ``"changed"`` when a newer
        generation committed, ``"view"`` when only the container's cached view was dropped (a
        VHD's FAT), ``""`` when nothing could have changed."""
        if self._txn is not None or self.mode == "r+" and self.container.can_lock:
            return ""  # the writer holds the lock: nobody else changed anything
        view = self.container.refresh()
        before = self.generation
        self.manifest = self._latest()
        self._layouts.clear()
        self._trailer_sets.clear()
        if self.generation != before:
            return "changed"
        return "view" if view else ""

    def scan(self) -> dict[str, Entry]:
        """Entries for every object of a version-1 package (read once, as they are)."""
        out: dict[str, Entry] = {}
        keys = [k for k in self.container.keys() if _owned(k) and not k.startswith((MANIFEST_PREFIX, STAGING_PREFIX))
                and not is_leftover(k.rsplit("/", 1)[-1])]
        for key in sorted(keys, key=lambda k: not k.endswith("zarr.json")):  # metadata first: layouts
            blob = self.container.get(key)
            if blob is not None:
                out[key] = entry_for(blob, self._layout(key, out))
        return out

    def _recover(self) -> None:
        """Finish what a killed writer committed (pending moves) and remove what it left that
        no manifest lists; runs with the writer lock held."""
        m = self.manifest
        if m is None:
            return
        for key, phys in m.pending.items():
            blob = self.container.get(phys)
            if blob is None:
                continue
            if self._check(m.objects[key], blob, None, None, key):
                self.container.move(phys, key)
            else:
                self.container.delete(phys)
        for key in list(self.container.keys()):
            if key in m.objects or key == MANIFEST_KEY or not _owned(key):
                continue
            self.container.delete(key)

    def _drop_dead_staging(self) -> None:
        """Without a lock (object storage) other writers may be staging right now; but a staged
        object of a generation that is not newer than the committed one belongs to a transaction
        that is over (committed and moved, or refused): those are removed."""
        m = self.manifest
        if m is None:
            return
        live = set(m.pending.values())
        for key in list(self.container.keys(STAGING_PREFIX)):
            gen = key.split("/", 1)[-1].split("-", 1)[0]
            if key not in live and gen.isdigit() and int(gen) <= m.generation:
                self.container.delete(key)

    # -- checks -------------------------------------------------------------------------------
    def _trailers(self, key: str, e: Entry) -> frozenset[int | None]:
        s = self._trailer_sets.get(key)
        if s is None:
            s = self._trailer_sets[key] = frozenset(e.trailers or ())
        return s

    def _check(self, e: Entry, blob: Any, start: int | None, end: int | None, key: str) -> bool | None:
        """Whether ``blob`` (bytes ``[start, end)`` of the object) is the committed object;
        ``None`` when a range cannot be checked alone (an object without chunk checksums)."""
        whole = start in (None, 0) and end is None
        n = len(blob)
        if whole:
            if n != e.size:
                return False
            if e.trailers is None:
                return crc32c.crc32c(blob) == e.crc
            if n < 4 or int.from_bytes(blob[-4:], "little") != e.trailers[-1]:
                return False
            if len(e.trailers) == 1:
                return True
            try:  # a shard: every inner chunk's checksum, read at the offsets of its (checked) index
                return trailers_of(blob, len(e.trailers) - 1) == e.trailers
            except FormatError:
                return False
        if e.trailers is None or len(e.trailers) == 1:
            return None
        if n < 4:
            return False
        t = int.from_bytes(blob[-4:], "little")
        if start is not None and start < 0:
            return t == e.trailers[-1]  # the shard index
        return t in self._trailers(key, e)  # one inner chunk, at an offset of the checked index

    # -- reading ------------------------------------------------------------------------------
    def read(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
             ) -> Any:
        """Bytes ``[start, end)`` of object ``key`` as the package holds it (``start < 0``: the
        last ``-start`` bytes), or ``None`` when the package has no such object.

        Raises
        ------
        IntegrityError
            The manifest lists the object but it is missing or does not match.
        """
        txn = self._txn
        if txn is not None:
            if key in txn.deletes:
                return None
            hit = txn.writes.get(key)
            if hit is not None:
                return self.container.get(hit[0], start, end, mapped=mapped)
        m = self.manifest
        if m is None:
            return self.container.get(key, start, end, mapped=mapped)
        e = m.objects.get(key)
        if e is None:
            return None
        places = [key] if key not in m.pending else [key, m.pending[key], key]
        found = False
        for phys in places:
            blob = self.container.get(phys, start, end, mapped=mapped)
            if blob is None:
                continue
            found = True
            ok = self._check(e, blob, start, end, key)
            if ok is None:  # a range of an object without chunk checksums: check it whole
                full = self.container.get(phys)
                if full is not None and self._check(e, full, None, None, key):
                    lo, hi = clip(len(full), start, end)
                    return full[lo:hi]
            elif ok:
                return blob
        what = "does not match the package's manifest" if found else "is listed in the package's manifest but missing"
        raise IntegrityError(f"{self.where}: object {key} {what} (damaged, or changed outside spherefmt)")

    def read_many(self, keys: list[str]) -> list[Any]:
        """Whole objects, fetched concurrently where the container is remote."""
        if not self.container.remote or self._txn is not None or self.manifest is None or len(keys) < 2:
            return [self.read(k) for k in keys]
        m = self.manifest
        listed = [k for k in keys if k in m.objects and k not in m.pending]
        got = dict(zip(listed, self.container.get_many(listed), strict=True))
        out = []
        for k in keys:
            blob = got.get(k)
            if blob is None or not self._check(m.objects[k], blob, None, None, k):
                blob = self.read(k)  # absent, pending or mismatched: the careful path decides
            out.append(blob)
        return out

    def entry(self, key: str) -> Entry | None:
        if self._txn is not None and key in self._txn.writes:
            return self._txn.writes[key][1]
        return None if self.manifest is None else self.manifest.objects.get(key)

    def _listing(self) -> list[str]:
        if self.manifest is None:
            return [k for k in self.container.keys() if not k.startswith((MANIFEST_PREFIX + "/", STAGING_PREFIX + "/"))]
        keys = set(self.manifest.objects)
        if self._txn is not None:
            keys = (keys - self._txn.deletes) | set(self._txn.writes)
        return sorted(keys)

    def listed(self, prefix: str = "") -> list[str]:
        return [k for k in self._listing() if k.startswith(prefix)]

    def object_size(self, key: str) -> int | None:
        e = self.entry(key)
        if e is not None:
            return e.size
        if self.manifest is None:
            return self.container.size(key)
        return None

    def _layout(self, key: str, objects: dict[str, Entry] | None = None) -> ChunkLayout | None:
        if key.endswith("zarr.json") or key.startswith((MANIFEST_PREFIX + "/", STAGING_PREFIX + "/")):
            return None
        arr = array_of(key)
        if arr is None:
            return None
        if arr not in self._layouts:
            raw = self.read(f"{arr}/zarr.json") if objects is None else self.container.get(f"{arr}/zarr.json")
            layout = None
            if raw is not None and len(raw) <= MAX_HEADER_JSON:
                try:
                    md = json.loads(bytes(raw))
                    if isinstance(md, dict) and md.get("node_type") == "array":
                        layout = ChunkLayout.from_metadata(md)
                except (ValueError, RecursionError):
                    layout = None
            self._layouts[arr] = layout
        return self._layouts[arr]

    def verify(self, progress: Any = None) -> dict[str, Any]:
        """Check every object the manifest lists, whole (size and CRC-32C of all its bytes, and
        its chunk checksums), and list what the container holds that the manifest does not.

        Returns
        -------
        dict
            ``generation``, ``objects`` and ``bytes`` checked, and the keys found ``missing``,
            ``mismatched`` and ``unlisted`` (leftovers a writer will remove; never read).
        """
        m = self.manifest
        if m is None:
            raise FormatError(f"{self.where}: a version-1 package has no manifest to verify against")
        out: dict[str, Any] = {"generation": m.generation, "objects": 0, "bytes": 0, "missing": [],
                               "mismatched": [], "unlisted": []}
        for key, e in sorted(m.objects.items()):
            places = [key] + ([m.pending[key]] if key in m.pending else [])
            blobs = [b for b in (self.container.get(p) for p in places) if b is not None]
            if not blobs:
                out["missing"].append(key)
            elif not any(len(b) == e.size and crc32c.crc32c(b) == e.crc and self._check(e, b, None, None, key)
                         for b in blobs):
                out["mismatched"].append(key)
            out["objects"] += 1
            out["bytes"] += e.size
            if progress is not None:
                progress(e.size)
        keep = set(m.objects) | set(m.pending.values()) | {MANIFEST_KEY}
        out["unlisted"] = [k for k in self.container.keys() if k not in keep]
        return out

    # -- transactions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Group writes into one all-or-nothing change (nested calls join the outer one)."""
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only; open it with mode 'r+' to modify it")
        with self._mutex:
            if self._txn is not None:
                self._txn.depth += 1
                outer = False
            else:
                self._txn = self._begin()
                outer = True
        txn = self._txn
        try:
            yield txn
        except BaseException:
            if outer:
                self._abort(txn)
            raise
        else:
            if outer:
                self._commit(txn)
        finally:
            with self._mutex:
                if outer:
                    self._txn = None
                else:
                    txn.depth -= 1

    def _begin(self) -> Transaction:
        m = self.manifest
        if m is None:
            raise FormatError(f"{self.where}: not a package (nothing to modify)")
        if not self.container.can_lock and m.generation > 0:
            latest = self._latest()
            if latest is None or latest.generation != m.generation:
                raise ConcurrentWriteError(f"{self.where}: another writer changed the package since it was opened; "
                                           "reopen it and try again")
        # new objects may go in place only where a lock keeps every other writer out and the
        # package has a manifest that leaves them unlisted until the commit
        stage_all = self.upgrading or (not self.container.can_lock and m.generation > 0)
        return Transaction(m.generation + 1, uuid.uuid4().hex[:12], stage_all)

    def write(self, key: str, data: Any) -> None:
        """Store an object as part of the current transaction."""
        txn = self._txn
        if txn is None:
            raise ReadOnlyError(f"{self.where}: writes need a transaction (spherefmt writes through Package methods)")
        data = bytes(data) if not isinstance(data, bytes | bytearray) else data
        entry = entry_for(data, self._layout(key))
        with self._mutex:
            hit = txn.writes.get(key)
            if hit is not None:
                phys = hit[0]
            elif txn.stage_all or (self.manifest is not None and key in self.manifest.objects):
                phys = txn.staging(key)
            else:
                phys = key
            self.container.put(phys, data)
            txn.writes[key] = (phys, entry)
            txn.deletes.discard(key)
            if key.endswith("zarr.json"):
                self._layouts.pop(key[: -len("zarr.json")].rstrip("/"), None)

    def remove(self, key: str) -> None:
        txn = self._txn
        if txn is None:
            raise ReadOnlyError(f"{self.where}: deletes need a transaction")
        with self._mutex:
            hit = txn.writes.pop(key, None)
            if hit is not None:
                self.container.delete(hit[0])  # never committed: a staged copy or a new object
            if self.manifest is not None and key in self.manifest.objects:
                txn.deletes.add(key)

    def _commit(self, txn: Transaction) -> None:
        if not txn.writes and not txn.deletes:
            return
        base = self.manifest or Manifest(0)
        objects = {k: e for k, e in base.objects.items() if k not in txn.deletes}
        for k, (_, e) in txn.writes.items():
            objects[k] = e
        pending = {k: phys for k, (phys, _) in txn.writes.items() if phys != k}
        new = Manifest(txn.generation, objects, pending)
        try:
            self.container.sync()
            self.container.replace(MANIFEST_KEY, new.encode(), self._version)  # the commit
        except CommitConflict:
            self._abort(txn)
            raise ConcurrentWriteError(f"{self.where}: another writer committed a change first; nothing of this one "
                                       "was committed: reopen the package and try again") from None
        except BaseException:
            self._abort(txn)
            raise
        self.manifest = new
        self._version = self.container.version(MANIFEST_KEY)
        self.upgrading = False
        self._trailer_sets.clear()
        try:
            self._apply(new, txn.deletes)
        except (OSError, SpherefmtError) as e:  # committed: the next writer finishes the moves
            warnings.warn(f"{self.where}: committed, but moving objects into place failed ({e}); "
                          "the next writer finishes it", stacklevel=3)

    def _apply(self, m: Manifest, deletes: Iterable[str]) -> None:
        for key, phys in m.pending.items():
            with contextlib.suppress(FileNotFoundError):
                self.container.move(phys, key)
        for key in deletes:
            self.container.delete(key)

    def _abort(self, txn: Transaction) -> None:
        # zarr may still be finishing writes of the failed block on its other threads: delete
        # what they staged until no new object appears (anything later is a leftover that the
        # next writer's recovery removes, never part of a commit)
        done: set[str] = set()
        for _ in range(20):
            todo = [phys for phys, _ in list(txn.writes.values()) if phys not in done]
            if not todo:
                break
            for phys in todo:
                with contextlib.suppress(OSError, SpherefmtError):
                    self.container.delete(phys)
                done.add(phys)
            time.sleep(0.01)
        self._layouts.clear()

    # -- zarr's Store interface ---------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.container.remote:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
                  ) -> Buffer | None:
        start: int | None
        end: int | None = None
        if byte_range is None:
            start = None
        elif isinstance(byte_range, RangeByteRequest):
            start, end = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start = byte_range.offset
        elif isinstance(byte_range, SuffixByteRequest):
            start = -byte_range.suffix
        else:
            raise InputError(f"unexpected byte range {byte_range!r}")
        blob = await self._run(self.read, key, start, end)
        return None if blob is None else prototype.buffer.from_bytes(bytes(blob))

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        if self.manifest is None and self._txn is None:
            return await self._run(self.container.size, key) is not None
        return self.entry(key) is not None and not (self._txn is not None and key in self._txn.deletes)

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()
        await self._run(self.write, key, value.to_bytes())

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self.exists(key):
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._check_writable()
        await self._run(self.remove, key)

    async def getsize(self, key: str) -> int:
        size = self.object_size(key)
        if size is None:
            raise FileNotFoundError(key)
        return size

    async def list(self) -> AsyncIterator[str]:
        for k in self._listing():
            yield k

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for k in self.listed(prefix):
            yield k

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        base = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        seen: set[str] = set()
        for k in self.listed(base):
            child = k[len(base):].split("/", 1)[0]
            if child not in seen:
                seen.add(child)
                yield child

    def close(self) -> None:
        """Release the container (and the writer lock)."""
        if not self.container.borrowed:
            self.container.close()
        else:
            self.container.unlock()
        super().close()

    def __repr__(self) -> str:
        return f"<PackageStore {self.where!r} {self.mode} generation {self.generation}>"


def open_package_store(url: Any, mode: str = "r", *, storage_options: dict[str, Any] | None = None,
                       lock_timeout: float = 0.0) -> PackageStore:
    """The store of an existing package (its container chosen by :mod:`spherefmt.containers`)."""
    container = open_container(url, mode, storage_options, lock_timeout)
    try:
        return PackageStore(container, mode, lock_timeout=lock_timeout)
    except BaseException:
        if not container.borrowed:
            container.close()
        raise


def root_attrs(store: PackageStore) -> dict[str, Any] | None:
    """The root group's attributes, read and checked as untrusted JSON; ``None`` if absent."""
    try:
        raw = store.read("zarr.json")
    except StorageError:
        raise
    except (OSError, KeyError) as e:
        raise FormatError(f"{store.where}: cannot read zarr.json ({e})") from None
    if raw is None:
        return None
    if len(raw) > MAX_HEADER_JSON:
        raise FormatError(f"{store.where}: zarr.json of {len(raw)} bytes exceeds the {MAX_HEADER_JSON}-byte limit")
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{store.where}: zarr.json is not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise FormatError(f"{store.where}: zarr.json is not a Zarr v3 group")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise FormatError(f"{store.where}: zarr.json attributes are not an object")
    return attrs


def is_package(url: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``url`` (a path, URL, zarr store or container) holds a spherefmt package,
    complete or not."""
    try:
        if isinstance(url, Container):
            store = PackageStore(url, "r")
        else:
            if not isinstance(url, Store) and "://" not in os.fspath(url):
                p = os.fspath(url)
                if not (os.path.isdir(p) or os.path.isfile(p)):
                    return False
            store = open_package_store(url, "r", storage_options=storage_options)
        try:
            attrs = root_attrs(store)
        finally:
            if not isinstance(url, Container):
                store.close()
    except (FormatError, OSError, ValueError):
        return False
    return attrs is not None and ROOT_ATTR in attrs  # (an empty dict has no ROOT_ATTR either)
