"""Direct chunk reads for the codec chains spherefmt writes.

zarr-python spends about a millisecond of event-loop and task overhead per chunk, which made a
full ``state_dict`` read run at ~30 MB/s.  For arrays whose metadata matches exactly a chain
spherefmt writes (``bytes`` little-endian, then ``blosc`` or, in packages written before it
became the default, optional ``numcodecs.shuffle`` and ``zstd``, then ``crc32c``; optionally inside ``sharding_indexed`` with a ``bytes`` + ``crc32c`` index at the
end, default ``c/`` chunk keys), this module fetches every needed object in one gather through
the same zarr store and decodes with the libraries zarr uses (numcodecs; crc32c for the same CRC-32C).
Anything else returns ``None`` from :func:`FastArray.maybe` and is read through zarr.

Checksums are always verified; a mismatch raises :class:`ChunkError` naming the object.  Byte
ranges read through a memory map of a local object are verified the first time each range of
that map is read (a map is read-only and is replaced when its file changes).
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Sequence
from itertools import product
from typing import Any, cast

import crc32c
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.numcodecs import Shuffle
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync

from spherefmt.errors import FormatError, InputError, IntegrityError
from spherefmt.format.store import PackageStore

# numcodecs.shuffle (the default chain of packages written before blosc) is a numcodecs codec
# registered with zarr; zarr warns that other implementations may lack it, each time it is built.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)

__all__ = ["ChunkError", "FastArray", "check_chunking", "open_arrays", "parallel_map", "read_many", "shard_shape"]

_MISSING = 2**64 - 1


class ChunkError(IntegrityError):
    """A chunk or shard failed its checksum or is malformed."""


def _chain(codecs: Sequence[Any]) -> list[Any] | None:
    """Decoders for ``[bytes, blosc, crc32c]``, ``[bytes, (shuffle), (zstd), crc32c]`` (packages
    written before blosc became the default) or ``[bytes, crc32c]``; None for any other chain."""
    if not codecs or not isinstance(codecs[0], BytesCodec) or str(getattr(codecs[0].endian, "value", "little")) != "little":
        return None
    steps: list[Any] = []
    rest = list(codecs[1:])
    if not rest or not isinstance(rest[-1], Crc32cCodec):
        return None
    if len(rest) == 2 and isinstance(rest[0], BloscCodec):
        return [numcodecs.Blosc()]  # a blosc frame carries its own parameters
    for c in rest[:-1]:
        if isinstance(c, Shuffle) and not steps:
            steps.append(numcodecs.Shuffle(**{k: v for k, v in c.codec_config.items() if k != "id"}))
        elif isinstance(c, ZstdCodec) and not any(isinstance(s, numcodecs.Zstd) for s in steps):
            steps.append(numcodecs.Zstd(level=c.level, checksum=c.checksum))
        else:
            return None
    return steps[::-1]  # decode order


def _verified(blob: bytes | memoryview, what: str) -> memoryview:
    mv = memoryview(blob)
    if len(mv) < 4:
        raise ChunkError(f"{what}: object of {len(mv)} bytes is too short for its checksum")
    if crc32c.crc32c(mv[:-4]) != int.from_bytes(mv[-4:], "little"):
        raise ChunkError(f"{what}: crc32c checksum mismatch")
    return mv[:-4]


class FastArray:
    """Reads whole chunks or whole shards of one array; see the module docstring."""

    def __init__(self, arr: zarr.Array, inner: Sequence[Any], sharded: bool) -> None:
        self.arr = arr
        self.store = arr.store_path.store
        self.path = arr.store_path.path
        self.dtype = np.dtype(arr.dtype)
        self.sharded = sharded
        md = cast(ArrayV3Metadata, arr.metadata)  # maybe() admits only zarr v3 arrays
        codecs = md.codecs
        self.outer_shape = tuple(cast(RegularChunkGrid, md.chunk_grid).chunk_shape)
        self.inner_shape = tuple(cast(ShardingCodec, codecs[0]).chunk_shape) if sharded else self.outer_shape
        steps = _chain(inner)
        if steps is None:
            raise FormatError(f"{arr.path}: codec chain {[type(c).__name__ for c in inner]} has no fast decoder")
        self.steps = steps
        fv = arr.metadata.fill_value
        self.fill = np.asarray(fv, dtype=self.dtype)

    @classmethod
    def maybe(cls, arr: zarr.Array) -> FastArray | None:
        if getattr(arr.metadata, "zarr_format", None) != 3:
            return None
        md = cast(ArrayV3Metadata, arr.metadata)
        if type(md.chunk_key_encoding) is not DefaultChunkKeyEncoding:
            return None
        if md.chunk_key_encoding.separator != "/" or not hasattr(md.chunk_grid, "chunk_shape"):
            return None
        if np.dtype(arr.dtype).byteorder == ">":
            return None
        codecs = md.codecs
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sh = codecs[0]
            idx = list(sh.index_codecs)
            if (str(getattr(sh.index_location, "value", sh.index_location)) != "end" or len(idx) != 2
                    or not isinstance(idx[0], BytesCodec) or not isinstance(idx[1], Crc32cCodec)):
                return None
            if _chain(list(sh.codecs)) is None:
                return None
            return cls(arr, list(sh.codecs), sharded=True)
        if _chain(list(codecs)) is None:
            return None
        return cls(arr, list(codecs), sharded=False)

    # -- decoding ------------------------------------------------------------------------
    def _decode(self, payload: memoryview, what: str) -> np.ndarray:
        data: Any = payload
        for step in self.steps:
            data = step.decode(data)
        out = np.frombuffer(data, dtype=self.dtype)
        if out.size != math.prod(self.inner_shape):
            raise ChunkError(f"{what}: decoded {out.size} items, chunk holds {math.prod(self.inner_shape)}")
        return out.reshape(self.inner_shape)

    def _decode_chunk(self, blob: Any, what: str) -> np.ndarray:
        return self._decode(_verified(blob, what), what)

    def _decode_shard(self, blob: Any, what: str, out: np.ndarray | None = None) -> np.ndarray:
        grid = tuple(o // i for o, i in zip(self.outer_shape, self.inner_shape, strict=True))
        n = math.prod(grid)
        mv = memoryview(blob)
        if len(mv) < 16 * n + 4:
            raise ChunkError(f"{what}: shard of {len(mv)} bytes is too short for its index")
        index = np.frombuffer(_verified(mv[len(mv) - 16 * n - 4 :], what + " (shard index)"), "<u8").reshape(n, 2)
        if out is None:
            out = np.empty(self.outer_shape, dtype=self.dtype)
        body = len(mv) - 16 * n - 4
        for flat, coords in enumerate(product(*(range(g) for g in grid))):
            off, size = int(index[flat, 0]), int(index[flat, 1])
            sel = tuple(slice(c * i, (c + 1) * i) for c, i in zip(coords, self.inner_shape, strict=True))
            if (off, size) == (_MISSING, _MISSING):
                out[sel] = self.fill
                continue
            if off + size > body:
                raise ChunkError(f"{what}: shard index points outside the shard")
            out[sel] = self._decode_chunk(mv[off : off + size], f"{what} chunk {coords}")
        return out

    # -- reading -------------------------------------------------------------------------
    def key(self, coords: Sequence[int]) -> str:
        return f"{self.path}/c/" + "/".join(map(str, coords)) if coords else f"{self.path}/c"

    def decode_object(self, blob: Any, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """One fetched object (``None`` if absent) decoded to the outer chunk shape (into ``out``
        when given, which must have that shape)."""
        if blob is None:
            if out is None:
                return np.full(self.outer_shape, self.fill, dtype=self.dtype)
            out[...] = self.fill
            return out
        if isinstance(blob, memoryview):  # a view of a map: verified once per map (see _Verified)
            raw: Any = blob
        elif hasattr(blob, "as_numpy_array"):
            raw = blob.as_numpy_array().view(np.uint8)
        else:
            raw = np.frombuffer(blob, np.uint8)
        if self.sharded:
            return self._decode_shard(raw, key, out)
        block = self._decode(_MAPS.checked(raw, 0, key), key)
        if out is None:
            return block
        out[...] = block
        return out

    def read_objects(self, coords: Sequence[Sequence[int]], out: np.ndarray | None = None) -> list[np.ndarray]:
        """Read and decode whole objects (chunks, or shards when sharded) at the given grid coords;
        with ``out`` of shape ``(len(coords), *outer_shape)`` they are decoded in place."""
        keys = [self.key(c) for c in coords]
        outs: list[Any] = [None] * len(keys) if out is None else list(out)

        def decode(i: int, blob: Any) -> None:
            outs[i] = self.decode_object(blob, keys[i], outs[i])

        _fetch_decode(self.store, keys, decode)
        return outs

    def read_all(self) -> np.ndarray:
        """The whole array."""
        return read_many([self])[0]

    def read_chunk(self, coords: Sequence[int]) -> np.ndarray:
        """One whole object of an unsharded array, decoded.  For an uncompressed local object
        this is a read-only view of its memory map (no copy); ``fill_value`` when absent."""
        if self.sharded:
            raise InputError("read_chunk needs an unsharded array")
        key = self.key(coords)
        blob = _read_range(self.store, key, 0, None, mapped=not self.steps)
        if blob is None:
            return np.full(self.outer_shape, self.fill, dtype=self.dtype)
        return self._decode(_MAPS.checked(blob, 0, key), key)

    def shard_chunks(self, outer: Sequence[int]) -> list[np.ndarray | None]:
        """Every inner chunk of one shard (``None`` for an absent one), in index order.  For an
        uncompressed chain on a local package the chunks are read-only views of the shard's
        memory map, each verified once (no copy at all); otherwise decoded."""
        if not self.sharded:
            raise InputError("shard_chunks needs a sharded array")
        key = self.key(outer)
        grid = tuple(o // i for o, i in zip(self.outer_shape, self.inner_shape, strict=True))
        n = math.prod(grid)
        blob = _read_range(self.store, key, 0, None, mapped=not self.steps)
        if blob is None:
            return [None] * n
        mv = memoryview(blob)
        if len(mv) < 16 * n + 4:
            raise ChunkError(f"{key}: shard of {len(mv)} bytes is too short for its index")
        body = len(mv) - 16 * n - 4
        index = np.frombuffer(_MAPS.checked(mv[body:], body, key + " (shard index)"), "<u8").reshape(n, 2)
        out: list[np.ndarray | None] = []
        for flat in range(n):
            off, size = int(index[flat, 0]), int(index[flat, 1])
            if (off, size) == (_MISSING, _MISSING):
                out.append(None)
                continue
            if size < 4 or off + size > body:
                raise ChunkError(f"{key}: shard index points outside the shard")
            what = f"{key} chunk {flat}"
            out.append(self._decode(_MAPS.checked(mv[off : off + size], off, what), what))
        return out

    def read_inner(self, outer: Sequence[int], inner: Sequence[int], index_cache: dict[str, Any] | None = None
                   ) -> tuple[np.ndarray, int]:
        """One inner chunk of a shard, by byte range: the shard index (kept in ``index_cache``
        when given), then the chunk's bytes.  Returns the decoded chunk and the bytes fetched."""
        if not self.sharded:
            raise InputError("read_inner needs a sharded array")
        key = self.key(outer)
        grid = tuple(o // i for o, i in zip(self.outer_shape, self.inner_shape, strict=True))
        n = math.prod(grid)
        fetched = 0
        index = None if index_cache is None else index_cache.get(key)
        if index is None:
            tail = _read_range(self.store, key, -(16 * n + 4), None, mapped=not self.steps)
            if tail is None:
                return np.full(self.inner_shape, self.fill, dtype=self.dtype), 0
            fetched += len(tail)
            if len(tail) != 16 * n + 4:
                raise ChunkError(f"{key}: shard of {len(tail)} bytes is too short for its index")
            index = np.frombuffer(_verified(tail, key + " (shard index)"), "<u8").reshape(n, 2).copy()
            if index_cache is not None:
                index_cache[key] = index
        flat = int(np.ravel_multi_index(tuple(inner), grid))
        off, size = int(index[flat, 0]), int(index[flat, 1])
        what = f"{key} chunk {tuple(inner)}"
        if (off, size) == (_MISSING, _MISSING):
            return np.full(self.inner_shape, self.fill, dtype=self.dtype), fetched
        if size < 4 or off > 2**62 or size > 2**40:
            raise ChunkError(f"{what}: shard index entry ({off}, {size}) is not valid")
        blob = _read_range(self.store, key, off, off + size, mapped=not self.steps)
        if blob is None or len(blob) != size:
            raise ChunkError(f"{what}: shard index points outside the shard")
        return self._decode(_MAPS.checked(blob, off, what), what), fetched + size


class _Verified:
    """Byte ranges of memory maps whose chunk checksum was verified: a map is read-only and is
    replaced (not changed) when its file is, so once verified a range stays verified.  Keyed by
    the map object itself (weakly: a dropped map takes its ranges with it)."""

    def __init__(self) -> None:
        import threading
        import weakref

        self._ranges: weakref.WeakKeyDictionary[Any, set[tuple[int, int]]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def checked(self, blob: Any, start: int, what: str) -> memoryview:
        """``blob`` without its checksum, verified unless this range of its map already was."""
        import mmap

        obj = blob.obj if isinstance(blob, memoryview) else None
        if not isinstance(obj, mmap.mmap):
            return _verified(blob, what)
        with self._lock:
            ranges = self._ranges.get(obj)
            if ranges is not None and (start, len(blob)) in ranges:
                return blob[:-4]
        out = _verified(blob, what)
        with self._lock:
            self._ranges.setdefault(obj, set()).add((start, len(blob)))
        return out


_MAPS = _Verified()


def _read_range(store: Any, key: str, start: int, end: int | None, mapped: bool = True
                ) -> bytes | memoryview | None:
    """Bytes ``[start, end)`` of one object (``start < 0``: the last ``-start`` bytes), or None
    when the package has no such object.  A package's own store checks them against its
    manifest (:meth:`spherefmt.format.store.PackageStore.read`); ``mapped`` lets an uncompressed local
    chunk come as a view of its memory map (no copy).  Compressed chunks are decoded into new
    memory anyway, so they are read with one ``pread``: mapping would populate the whole object
    into the process for one byte range (bench/bench_scale.py)."""
    if isinstance(store, PackageStore):
        return store.read(key, start, end, mapped=mapped)
    req: ByteRequest
    if start < 0:
        req = SuffixByteRequest(-start)
    elif end is None:  # to the end: a RangeByteRequest needs an int end (zarr's LocalStore computes end - start)
        req = OffsetByteRequest(start)
    else:
        req = RangeByteRequest(start, end)
    buf = sync(store.get(key, prototype=default_buffer_prototype(), byte_range=req))
    return None if buf is None else buf.to_bytes()


def _fetch_decode(store: Any, keys: Sequence[str], decode: Any, mapped: Sequence[bool] | None = None) -> None:
    """Fetch every key and call ``decode(i, blob)`` (blob ``None`` for an absent key) on the
    decode pool as each object arrives, so that reading and decoding overlap (``mapped[i]``:
    object ``i`` may come as a view of a memory map)."""
    if not keys:
        return
    if isinstance(store, PackageStore):
        if store.container.remote and len(keys) > 1:  # one concurrent round of requests, then decode
            blobs = store.read_many(list(keys))
            list(_decode_pool().map(lambda i: decode(i, blobs[i]), range(len(keys))))
            return

        def run_one(i: int) -> None:  # plain reads on the decode pool: no event-loop round trips
            decode(i, store.read(keys[i], mapped=bool(mapped and mapped[i])))

        if len(keys) == 1:
            run_one(0)
        else:
            list(_decode_pool().map(run_one, range(len(keys))))
        return
    proto = default_buffer_prototype()
    if len(keys) == 1:
        decode(0, sync(store.get(keys[0], prototype=proto)))
        return
    pool = _decode_pool()

    async def one(i: int, key: str) -> None:
        blob = await store.get(key, prototype=proto)
        await asyncio.get_running_loop().run_in_executor(pool, decode, i, blob)

    async def run() -> None:
        await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))

    sync(run())


def check_chunking(arr: zarr.Array, where: str) -> None:
    """:class:`FormatError` unless the array's chunks (and a shard's inner chunks) are regular
    grids of positive sizes, inner chunks tiling their shard: metadata that says otherwise would
    divide by zero or loop in zarr's indexing."""
    md = arr.metadata
    grid = getattr(md, "chunk_grid", None)
    outer = tuple(getattr(grid, "chunk_shape", ()) or ())
    if len(outer) != len(arr.shape) or not all(isinstance(c, int) and c >= 1 for c in outer):
        raise FormatError(f"{where}: chunk shape {list(outer)} is not a positive size per dimension of {arr.shape}")
    for codec in getattr(md, "codecs", ()):
        if isinstance(codec, ShardingCodec):
            inner = tuple(codec.chunk_shape)
            if len(inner) != len(outer) or not all(isinstance(c, int) and c >= 1 for c in inner) \
                    or any(o % i for o, i in zip(outer, inner, strict=True)):
                raise FormatError(f"{where}: inner chunk shape {list(inner)} does not tile the shard {list(outer)}")


def shard_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The shard shape of a sharded array (its chunk shape when not sharded)."""
    return tuple(cast(RegularChunkGrid, arr.metadata.chunk_grid).chunk_shape)  # spherefmt writes regular grids


def parallel_map(fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on the decode pool (numpy's copies and the codecs release the
    GIL), in order."""
    if len(items) < 2:
        return [fn(x) for x in items]
    return list(_decode_pool().map(fn, items))


def _decode_pool() -> Any:
    """A small shared thread pool: numcodecs' zstd and shuffle release the GIL while decoding."""
    global _POOL
    if _POOL is None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="spherefmt-decode")
    return _POOL


_POOL: Any = None


def open_arrays(store: Any, paths: Sequence[str]) -> list[zarr.Array | Exception]:
    """Open many arrays with one concurrent round of metadata reads (a ``KeyError`` or
    ``ValueError`` in place of an array that is missing or malformed)."""
    import json

    from zarr.core.array import AsyncArray
    from zarr.core.metadata.v3 import ArrayV3Metadata
    from zarr.storage import StorePath

    proto = default_buffer_prototype()

    async def fetch() -> list[Any]:
        return await asyncio.gather(*(store.get(f"{p}/zarr.json", prototype=proto) for p in paths))

    out: list[zarr.Array | Exception] = []
    for p, b in zip(paths, sync(fetch()), strict=True):
        if b is None:
            out.append(KeyError(p))
            continue
        try:
            md = json.loads(b.to_bytes())
            if not isinstance(md, dict) or md.get("node_type") != "array":
                raise FormatError("not an array")
            arr = zarr.Array(AsyncArray(ArrayV3Metadata.from_dict(md), StorePath(store, p)))
            check_chunking(arr, p)
            out.append(arr)
        except Exception as e:  # noqa: BLE001 - reported per array by the caller
            out.append(FormatError(f"{type(e).__name__}: {str(e)[:120]}"))
    return out


def read_many(arrays: Sequence[FastArray]) -> list[np.ndarray]:
    """Whole arrays, all objects fetched in one concurrent round and decoded on a thread pool."""
    plans = []
    keys: list[str] = []
    for fa in arrays:
        shape = tuple(fa.arr.shape)
        grid = tuple(math.ceil(s / c) if s else 0 for s, c in zip(shape, fa.outer_shape, strict=True))
        coords = list(product(*(range(g) for g in grid))) if shape else [()]
        plans.append((fa, shape, coords, len(keys), np.empty(shape, dtype=fa.dtype)))
        keys.extend(fa.key(c) for c in coords)
    where = [(fa, shape, c, out) for fa, shape, coords, _, out in plans for c in coords]

    def place(i: int, blob: Any) -> None:
        fa, shape, c, out = where[i]
        block = fa.decode_object(blob, keys[i])
        if not shape:
            out[()] = block.reshape(-1)[0]
            return
        sel = tuple(slice(j * o, min((j + 1) * o, s)) for j, o, s in zip(c, fa.outer_shape, shape, strict=True))
        out[sel] = block[tuple(slice(0, s.stop - s.start) for s in sel)]

    # uncompressed chunks come as views of their memory maps (local packages): one copy, into out
    mapped = [not fa.steps for fa, _, _, _ in where]
    _fetch_decode(arrays[0].store if arrays else None, keys, place, mapped)
    return [plan[4] for plan in plans]
