"""The manifest: every object of a package with its size and checksums, and the commit point of
every change (``spec/FORMAT.md`` section 10).

A version-2 package holds one manifest, ``manifest/zarr.json``: the metadata document of an
(empty) Zarr group, so plain Zarr readers walk past it, whose attributes list every object of
the package.  An object it lists MUST exist and match its size and checksums, an object it does
not list is never read as data, and a change (a conversion, a growth, a write-back of trained
experts) becomes visible at once when the manifest is replaced by the next generation's, in
one atomic step that fails if another writer replaced it first.  Nothing here does I/O: :mod:`spherefmt.format.store` reads and writes manifests
through a container.

The checks are designed to be fused with reads that happen anyway: every chunk spherefmt writes
ends with the crc32c codec's checksum of its bytes (its *trailer*), which the decoder verifies;
the manifest records each chunk's trailer, so checking that a chunk is the committed one costs a
4-byte comparison, also for one inner chunk of a shard read by byte range.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c

from spherefmt.constants import MANIFEST_FORMAT, MANIFEST_PREFIX, MANIFEST_VERSION, MAX_MANIFEST_BYTES, STAGING_PREFIX
from spherefmt.errors import FormatError

__all__ = ["MANIFEST_KEY", "Entry", "Manifest", "entry_for", "trailers_of"]

#: A missing inner chunk of a shard (the shard index holds 2^64 - 1 twice) in ``trailers``.
NO_CHUNK = None
_MISSING = 2**64 - 1
#: the one manifest object: the metadata document of the Zarr group ``manifest``
MANIFEST_KEY = f"{MANIFEST_PREFIX}/zarr.json"
_ATTR = "spherefmt_manifest"
#: What a stored key may look like: relative, ``/``-separated, no ``.``/``..`` parts, no NUL.
_BAD_PART = re.compile(r"(^|/)\.{1,2}(/|$)|//|^/|\x00|\\")


@dataclass(frozen=True)
class Entry:
    """What the manifest says of one object.

    Attributes
    ----------
    size
        Its length in bytes.
    crc
        crc32c of all its bytes.
    trailers
        For an object made of chunks that end with a crc32c checksum: each chunk's stored
        checksum (the last 4 bytes of the chunk), in the order of the shard index, with ``None``
        for an absent inner chunk, and the shard index's own checksum last; a plain chunk has
        one.  ``None`` for other objects (metadata, side files).
    """

    size: int
    crc: int
    trailers: tuple[int | None, ...] | None = None

    def to_json(self) -> list[Any]:
        out: list[Any] = [self.size, f"{self.crc:08x}"]
        if self.trailers is not None:
            out.append("".join("-" * 8 if t is None else f"{t:08x}" for t in self.trailers))
        return out

    @classmethod
    def from_json(cls, v: Any, key: str, where: str) -> Entry:
        ok = isinstance(v, list) and len(v) in (2, 3) and isinstance(v[0], int) and not isinstance(v[0], bool) \
            and 0 <= v[0] < 2**50 and isinstance(v[1], str) and len(v[1]) == 8
        trailers = None
        try:
            crc = int(v[1], 16) if ok else 0
            if ok and len(v) == 3:
                s = v[2]
                ok = isinstance(s, str) and len(s) % 8 == 0 and len(s) // 8 <= v[0]
                trailers = tuple(None if s[i:i + 8] == "-" * 8 else int(s[i:i + 8], 16)
                                 for i in range(0, len(s), 8)) if ok else None
        except ValueError:
            ok = False
        if not ok:
            raise FormatError(f"{where}: manifest entry for {key[:120]!r} is malformed")
        return cls(v[0], crc, trailers)


def reserved(key: str) -> bool:
    """True for keys the manifest machinery owns (manifests and staged objects)."""
    return key.startswith((MANIFEST_PREFIX + "/", STAGING_PREFIX + "/"))


def check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 4096 or _BAD_PART.search(key):
        raise FormatError(f"{where}: manifest names an unsafe object key {str(key)[:120]!r}")
    return key


@dataclass
class Manifest:
    """One generation of a package's manifest (``spec/FORMAT.md`` section 10)."""

    generation: int
    objects: dict[str, Entry] = field(default_factory=dict)
    #: committed objects whose new bytes may still sit at a staging key: ``key -> staging key``
    pending: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The manifest file: the canonical JSON of a Zarr group document whose attributes hold
        the manifest and, as their last member, the crc32c of the file with that member's eight
        hex digits written as zeros."""
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "generation": self.generation,
            "objects": {k: e.to_json() for k, e in sorted(self.objects.items())},
            "pending": dict(sorted(self.pending.items())),
        }
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {_ATTR: body}}
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)[:-2] + ',"crc32c":"00000000"}}'
        raw = text.encode("ascii")
        crc = crc32c.crc32c(raw)
        return raw[:-11] + f"{crc:08x}".encode() + raw[-3:]

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check an untrusted manifest file (size, checksum, every field)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FormatError(f"{where}: manifest of {len(raw)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
        if len(raw) < 24 or raw[-22:-11] != b',"crc32c":"' or raw[-3:] != b'"}}':
            raise FormatError(f"{where}: manifest is truncated or not a spherefmt manifest")
        try:
            stored = int(raw[-11:-3], 16)
        except ValueError:
            raise FormatError(f"{where}: manifest checksum is malformed") from None
        if crc32c.crc32c(raw[:-11] + b"00000000" + raw[-3:]) != stored:
            raise FormatError(f"{where}: manifest checksum mismatch (the manifest is corrupted)")
        try:
            doc = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise FormatError(f"{where}: manifest is not valid JSON") from None
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        body = attrs.get(_ATTR) if isinstance(attrs, dict) else None
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise FormatError(f"{where}: not a spherefmt manifest")
        if body.get("version") != MANIFEST_VERSION:
            raise FormatError(f"{where}: manifest version {str(body.get('version'))[:20]} is not supported; "
                              "upgrade spherefmt")
        gen, objects, pending = body.get("generation"), body.get("objects"), body.get("pending")
        if not isinstance(gen, int) or isinstance(gen, bool) or not 0 <= gen < 10**19 \
                or not isinstance(objects, dict) or not isinstance(pending, dict):
            raise FormatError(f"{where}: manifest fields are malformed")
        entries = {check_key(k, where): Entry.from_json(v, k, where) for k, v in objects.items()}
        for k, v in pending.items():
            if k not in entries or not isinstance(v, str) or not v.startswith(STAGING_PREFIX + "/"):
                raise FormatError(f"{where}: manifest pending entry for {str(k)[:120]!r} is malformed")
            check_key(v, where)
        return cls(gen, entries, dict(pending))


def trailers_of(blob: bytes | bytearray | memoryview, shard_chunks: int | None) -> tuple[int | None, ...]:
    """The checksums stored in an object whose chunks end with a crc32c codec: for a plain chunk
    its last 4 bytes; for a shard of ``shard_chunks`` inner chunks (index at the end, ``bytes`` +
    ``crc32c``), each present chunk's last 4 bytes in index order, then the index's.

    Raises
    ------
    FormatError
        The shard index does not fit the object (a writer bug: never stored).
    """
    mv = memoryview(blob).cast("B")
    if len(mv) < 4:
        raise FormatError(f"object of {len(mv)} bytes is too short for a checksum")
    last = int.from_bytes(mv[-4:], "little")
    if shard_chunks is None:
        return (last,)
    n = shard_chunks
    if len(mv) < 16 * n + 4:
        raise FormatError(f"shard of {len(mv)} bytes is too short for its {n}-chunk index")
    index = mv[len(mv) - 16 * n - 4 : len(mv) - 4]
    out: list[int | None] = []
    body = len(mv) - 16 * n - 4
    for i in range(n):
        off = int.from_bytes(index[16 * i : 16 * i + 8], "little")
        size = int.from_bytes(index[16 * i + 8 : 16 * i + 16], "little")
        if off == _MISSING and size == _MISSING:
            out.append(NO_CHUNK)
            continue
        if size < 4 or off + size > body:
            raise FormatError("shard index points outside the shard")
        out.append(int.from_bytes(mv[off + size - 4 : off + size], "little"))
    out.append(last)
    return tuple(out)


def entry_for(blob: bytes | bytearray | memoryview, layout: ChunkLayout | None) -> Entry:
    """The manifest entry of an object about to be stored (``layout``: how its array stores
    chunks, ``None`` for metadata and other objects)."""
    crc = crc32c.crc32c(blob)
    if layout is None or not layout.trailers:
        return Entry(len(blob), crc)
    return Entry(len(blob), crc, trailers_of(blob, layout.shard_chunks))


@dataclass(frozen=True)
class ChunkLayout:
    """How an array's objects end: ``trailers`` when its (inner) codec chain ends with crc32c,
    and ``shard_chunks`` inner chunks per object when it is sharded with the index at the end
    (``bytes`` + ``crc32c``)."""

    trailers: bool
    shard_chunks: int | None = None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> ChunkLayout | None:
        """From an array's ``zarr.json`` (a dict); ``None`` when it is not one spherefmt can
        describe (its objects are then checked by their whole-object crc32c only)."""
        try:
            codecs = md["codecs"]
            chunk = md["chunk_grid"]["configuration"]["chunk_shape"]
            if codecs and codecs[-1].get("name") == "sharding_indexed" and len(codecs) == 1:
                cfg = codecs[0]["configuration"]
                inner = cfg["chunk_shape"]
                index = [c.get("name") for c in cfg.get("index_codecs", [])]
                if cfg.get("index_location", "end") != "end" or index != ["bytes", "crc32c"]:
                    return None
                n = math.prod(int(o) // int(i) for o, i in zip(chunk, inner, strict=True))
                return cls(_ends_with_crc(cfg["codecs"]), n)
            return cls(_ends_with_crc(codecs))
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError):
            return None


def _ends_with_crc(codecs: Iterable[Any]) -> bool:
    names = [c.get("name") if isinstance(c, dict) else None for c in codecs]
    return bool(names) and names[-1] == "crc32c"


def array_of(key: str) -> str | None:
    """The array path of a chunk key in the default encoding (``<array>/c/...`` or ``<array>/c``)."""
    if key.endswith("/c"):
        return key[:-2]
    i = key.rfind("/c/")
    return key[:i] if i >= 0 else None
