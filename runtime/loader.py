"""Host side of streaming: which blocks a model is made of, their sizes, and reading them.

A *block* is the unit the runtime loads to the device, uses and releases:

- ``("cell", layer, lat, lon)``: one layer of one expert (one inner chunk of the package);
- ``("ffn", layer)``: every cell of a layer joined into one matrix of neuron rows (dense runs:
  the layer's FFN is then a few large products instead of a few per cell);
- ``("attn", layer)``: the layer's attention weights and first norm;
- ``("mlp", layer)``: the layer's second norm and FFN output bias (tiny, held over the FFN);
- ``("vocab", table, b)``: rows ``b * R .. (b + 1) * R`` of an embedding / LM-head table;
- ``("pos",)`` learned positions (GPT-2) and ``("final",)`` the final norm.

Block sizes are known before reading (from the header and the index arrays), so the cache can
make room first.  A block is a dict of named host arrays: weight matrices (cell rows, attention
matrices, vocabulary tables) stay in their stored precision when it is one of the formats the
loader is told to keep (:attr:`BlockLoader.keep`, from the backend: ``F16``/``BF16`` as
``float16``/``ml_dtypes.bfloat16``), everything else (vectors, and matrices of other formats)
is float32.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from spherefmt import constants as C
from spherefmt.backends.base import WEIGHT_DTYPES
from spherefmt.dtypes import BLOCK_DTYPES, dequantize_blocks, numpy_view, storage_dtype, to_float32
from spherefmt.errors import FormatError, SpherefmtError
from spherefmt.format.chunks import ChunkError, FastArray, read_many
from spherefmt.format.keys import core_key
from spherefmt.format.package import Package
from spherefmt.format.quant import block_slices, blocks_width, storage_shape
from spherefmt.interop.llamacpp import unpermute

__all__ = ["BlockLoader", "Key"]

Key = tuple[Any, ...]
_F32 = 4
_CELLS_POOL: Any = None
_POOL_LOCK = threading.Lock()


def _kept(a: np.ndarray, dtype: str, keep: frozenset[str]) -> np.ndarray:
    """A weight matrix as the device will hold it: its stored values in their own precision when
    ``dtype`` is kept (a view, no copy), else float32.  A block format (``Q8_0``, ``Q4_K``, or a
    raw GGUF tensor of another type such as ``Q6_K``): ``a`` is the rows' bytes ``(rows, bytes)``."""
    if dtype in BLOCK_DTYPES:
        blocks = np.ascontiguousarray(a).view(BLOCK_DTYPES[dtype])
        return blocks if dtype in keep else dequantize_blocks(blocks)
    if dtype not in C.DTYPES:  # a GGUF type the backends do not hold: float32 by gguf's dequantizer
        from spherefmt.interop.gguf import block_size, dequantize_raw

        values = block_size(dtype)
        return dequantize_raw(a, dtype, (a.shape[0], a.shape[1] // values[1] * values[0]) if values else a.shape)
    if dtype in keep and dtype in WEIGHT_DTYPES and a.ndim == 2:
        return np.ascontiguousarray(numpy_view(a, dtype))
    return _f32(a, dtype)


def _raw_gguf(pkg: Package) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The raw tensors of a package converted from GGUF, from its side file (checked)."""
    if C.GGUF_SIDE_FILE not in pkg.header.files:
        return {}
    from spherefmt.interop.gguf import read_side_file

    try:
        return {str(e["name"]): (str(e["type_name"]), tuple(int(x) for x in reversed(e["ne"])))
                for e in read_side_file(pkg)["tensors"] if e["raw"]}
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{pkg.where}: {C.GGUF_SIDE_FILE} is malformed ({type(e).__name__})") from None


def _f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A contiguous float32 array of a storage array's values: ``a`` itself when it already is
    one (weights are never written to, so a read-only view of a mapped chunk will do)."""
    if dtype == "F32" and a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(to_float32(a, dtype))


class BlockLoader:
    """Reads blocks of one package for one architecture.

    Parameters
    ----------
    pkg
        An open package with a sphere (GPT-2 or Llama).
    core
        Block name -> {part name: tensor name} for the ``attn``/``mlp``/``final``/``pos`` blocks,
        and ``tables``: table name -> tensor name (embedding / LM head).
    split
        Part name -> ``(axis, new names)``: the part is cut into equal pieces along ``axis`` on the
        host after reading (GPT-2's fused QKV bias).
    offsets
        Part name -> a constant added to it on the host (Gemma's norms multiply by ``1 + w``).
    keep
        Weight formats (``F16``, ``BF16``, ``Q8_0``, ``Q4_K``) whose matrices stay in their stored precision; others
        are widened to float32 on the host.  May be changed until the first block is read.
    permute_rows
        Part name -> heads: the part's rows are permuted from llama.cpp's RoPE pairs back to
        transformers' halves per head (the inverse of ``convert_hf_to_gguf.py``'s permutation).
    """

    def __init__(self, pkg: Package, core: dict[Key, dict[str, str]], tables: dict[str, str],
                 split: dict[str, tuple[int, list[str]]] | None = None,
                 offsets: dict[str, float] | None = None, keep: frozenset[str] = frozenset({"F32"}),
                 permute_rows: dict[str, int] | None = None) -> None:
        self.pkg = pkg
        self.permute_rows = permute_rows or {}
        #: raw GGUF tensors (stored as their bytes, spec 9.1): name -> (GGUF type name, shape)
        self.raw = _raw_gguf(pkg)
        self.core = core
        self.tables = tables
        self.split = split or {}
        self.offsets = offsets or {}
        self.layout = pkg.layout
        self._widths = {f.name: f.width for f in self.layout.fields}
        #: the format the sphere's rows are stored in (``Q8_0``/``Q4_K`` for a quantized sphere)
        self.row_format = pkg.sphere_type or self.layout.dtype
        self.keep = frozenset(keep)
        p, m = pkg.require_graticule()
        self.grid = (p, m)
        self.n_layers = len(pkg.layer_depth)
        self.lock = threading.Lock()  # guards the counters; reads themselves run in parallel
        self.bytes_read = 0
        self._fast_arrays: dict[str, FastArray | None] = {}
        # real neurons per (layer, lat, lon), from the index arrays (read once, small)
        self.counts = np.zeros((self.n_layers, p, m), dtype=np.int64)
        ex = pkg.header.experts
        #: native experts: per layer, the cell ``(lat, lon)`` of each expert (``spec/FORMAT.md`` 9.0.1)
        self.expert_cells: list[list[tuple[int, int]]] | None = None if ex is None else []
        for depth in range(pkg.depth):
            _, index, _ = pkg.shell_arrays(depth)
            for t, layer in enumerate(pkg.shell_layers(depth)):
                self.counts[layer] = (index[t] >= 0).sum(axis=-1)
        if ex is not None and self.expert_cells is not None:
            for layer in range(self.n_layers):
                self.expert_cells.append(self._experts_of(layer, int(ex["count"]), int(ex["neurons"])))
        self.row_width = self.layout.row_width
        # vocabulary blocks: about the size of one attention block, so the minimum budget is not
        # set by the embedding table; a whole number of core chunks when chunks are smaller
        self.table_rows: dict[str, int] = {}
        attn = max((self.nbytes(k) for k in core if k[0] == "attn"), default=4 << 20)
        for name, tensor in tables.items():
            v, d = self.shape_of(tensor)
            rows = max(1, attn // (d * _F32))
            chunk = self._array(tensor).chunks[0]
            if rows > chunk and tensor not in self.raw:
                rows = chunk  # one stored chunk per block: read in place, no reassembly
            self.table_rows[name] = min(v, rows)

    def _experts_of(self, layer: int, count: int, per: int) -> list[tuple[int, int]]:
        """Each expert's cell, checked: a cell holds all ``per`` neurons of one expert, no more."""
        depth = self.pkg.layer_depth[layer]
        _, index, _ = self.pkg.shell_arrays(depth)
        idx = index[self.pkg.shell_layers(depth).index(layer)]
        where: list[tuple[int, int] | None] = [None] * count
        for lat, lon in zip(*np.nonzero(self.counts[layer]), strict=True):
            real = idx[lat, lon][idx[lat, lon] >= 0]
            owners = np.unique(real // per)
            if len(owners) != 1 or len(real) != per or not 0 <= owners[0] < count or where[int(owners[0])]:
                raise FormatError(f"{self.pkg.where}: layer {layer} cell ({lat}, {lon}) does not hold exactly one "
                                  f"whole expert of {per} neurons")
            where[int(owners[0])] = (int(lat), int(lon))
        if any(w is None for w in where):
            raise FormatError(f"{self.pkg.where}: layer {layer} lacks expert {where.index(None)}")
        return [w for w in where if w is not None]

    def host_tensor(self, tensor: str) -> np.ndarray:
        """A core tensor as float32 on the host (the model's router: small, read once)."""
        a = self.pkg.stored(tensor)
        self._count(a.nbytes)
        return _f32(a, self.pkg.tensor_info(tensor).dtype)

    # --- the plan -----------------------------------------------------------------------------
    def cells(self, layer: int) -> list[tuple[int, int]]:
        """Occupied cells ``(lat, lon)`` of one layer."""
        lat, lon = np.nonzero(self.counts[layer])
        return [(int(a), int(b)) for a, b in zip(lat, lon, strict=True)]

    def table_blocks(self, name: str) -> int:
        return math.ceil(self.shape_of(self.tables[name])[0] / self.table_rows[name])

    @property
    def keep(self) -> frozenset[str]:
        """Weight formats whose matrices stay in their stored precision (see the class docstring)."""
        return self._keep

    @keep.setter
    def keep(self, formats: frozenset[str]) -> None:
        self._keep = frozenset(formats)
        # a quantized row held as blocks has every field on a block boundary (spec 5.1)
        held = self._held_rows()
        self.slices = block_slices(self._widths, held) if held in BLOCK_DTYPES else self.layout.slices()
        self.cols = {n: (sl.start, sl.stop) for n, sl in self.slices.items()}

    def _held_rows(self) -> str:
        return self.row_format if self.row_format in self._keep else "F32"

    def format_of(self, tensor: str) -> str:
        """The format a core tensor is stored in: its block type when quantized; for a raw GGUF
        tensor its GGUF type (``Q8_0`` and ``Q4_K`` are held as they are; the other types gguf
        dequantizes, ``Q6_K`` and the rest of the k-quants among them, are widened to float32
        at load).  A raw tensor gguf cannot read, or not a matrix of whole blocks, is refused by name."""
        if tensor in self.raw:
            kind, shape = self.raw[tensor]
            from spherefmt.interop.gguf import block_size

            size = block_size(kind)
            if size is None or len(shape) != 2 or shape[1] % size[0]:
                raise FormatError(f"{self.pkg.where}: {tensor} is GGUF {kind}{list(shape)}; the runtime reads GGUF "
                                  "matrices of whole blocks of the types gguf dequantizes (Q8_0, Q4_K, Q6_K, ...)")
            return kind
        return self.pkg.quant_type(tensor) or self.pkg.tensor_info(tensor).dtype

    def shape_of(self, tensor: str) -> tuple[int, ...]:
        """A tensor's shape as values (a raw GGUF tensor is stored as its bytes)."""
        return self.raw[tensor][1] if tensor in self.raw else tuple(self.pkg.tensor_info(tensor).shape)

    def held_bytes(self, fmt: str, shape: tuple[int, ...]) -> int:
        """Device bytes of a tensor of this stored format and shape as held (:attr:`keep`)."""
        n = math.prod(shape)
        if len(shape) != 2 or fmt not in self._keep or fmt not in WEIGHT_DTYPES:
            return n * _F32
        if fmt in BLOCK_DTYPES:
            values, size = C.QUANT_TYPES[fmt]
            return n // values * size
        return n * WEIGHT_DTYPES[fmt].itemsize

    def held_formats(self) -> list[str]:
        """The formats the device holds this model's tensors in (vectors are always float32)."""
        fmts = [(self.row_format, 2)] + [(self.format_of(t), 2) for t in self.tables.values()]
        fmts += [(self.format_of(t), len(self.shape_of(t))) for blk in self.core.values() for t in blk.values()]
        return sorted({f if ndim == 2 and f in self._keep and f in WEIGHT_DTYPES else "F32" for f, ndim in fmts})

    def nbytes(self, key: Key) -> int:
        """Device bytes of a block as held (:attr:`keep`), known before reading it."""
        kind = key[0]
        if kind in ("cell", "ffn"):
            n = int(self.counts[key[1], key[2], key[3]]) if kind == "cell" else int(self.counts[key[1]].sum())
            vectors = sum(1 for sl in self.slices.values() if sl.stop - sl.start == 1)
            held = self._held_rows()
            width = blocks_width(self._widths, held) if held in BLOCK_DTYPES else self.row_width
            return self.held_bytes(self.row_format, (n, width)) + n * vectors * _F32
        if kind == "vocab":
            _, name, b = key
            v, d = self.shape_of(self.tables[name])
            r = self.table_rows[name]
            return self.held_bytes(self.format_of(self.tables[name]), (min(v, (b + 1) * r) - b * r, d))
        return sum(self.held_bytes(self.format_of(t), self.shape_of(t)) for t in self.core[key].values())

    # --- reading ------------------------------------------------------------------------------
    def _array(self, tensor: str) -> Any:
        return self.pkg.array(core_key(tensor))

    def _count(self, nbytes: int) -> None:
        with self.lock:
            self.bytes_read += nbytes

    def _fast(self, tensor: str) -> FastArray | None:
        """The fast reader of a core tensor, opened once (metadata parsing costs ~1 ms)."""
        if tensor not in self._fast_arrays:
            arr = self._array(tensor)
            info = self.pkg.tensor_info(tensor)
            if (qt := self.pkg.quant_type(tensor)) is not None:  # its blocks' bytes
                ok = tuple(arr.shape) == storage_shape(tuple(info.shape), qt) and arr.dtype == np.uint8
            else:
                ok = tuple(arr.shape) == tuple(info.shape) and arr.dtype == storage_dtype(info.dtype)
            self._fast_arrays[tensor] = FastArray.maybe(arr) if ok else None
        return self._fast_arrays[tensor]

    def load(self, key: Key) -> dict[str, np.ndarray]:
        """Read and convert one block (float32 host arrays, freshly allocated: the caller may
        hand them to a backend without copying).  Safe to call from several threads.  When a
        writer in another process commits under it, the block is read again from the new state
        (:meth:`spherefmt.Package.consistent`)."""
        return self.pkg.consistent(self._load, key)

    def _load(self, key: Key) -> dict[str, np.ndarray]:
        kind = key[0]
        if kind == "cell":
            return self._cell(*key[1:])
        if kind == "ffn":  # the cells decoded on every core (codecs release the GIL), then joined
            cells = list(self._pool().map(lambda c: self._cell(key[1], *c), self.cells(key[1])))
            return {name: np.concatenate([c[name] for c in cells]) for name in cells[0]} if cells else {}
        if kind == "vocab":
            return {"table": self._rows(self.tables[key[1]], key[2] * self.table_rows[key[1]],
                                        self.table_rows[key[1]])}
        parts = self.core[key]
        fast = {t: fa for t in parts.values() if (fa := self._fast(t)) is not None}
        rowwise = {t: fa for t, fa in fast.items() if fa.arr.shape and not fa.sharded
                   and tuple(fa.outer_shape[1:]) == tuple(fa.arr.shape[1:])}
        many = {t: fa for t, fa in fast.items() if t not in rowwise}
        try:
            # tensors chunked by rows are read chunk by chunk as they lie (views of the mapped
            # objects when uncompressed) and joined with one copy; one-chunk tensors not at all
            raw = {t: self._join(fa) for t, fa in rowwise.items()}
            if many:
                raw.update(zip(many, read_many(list(many.values())), strict=True))
        except SpherefmtError:
            raise  # storage failures and named format errors pass as they are
        except (ChunkError, ValueError, RuntimeError, OSError) as e:
            raise FormatError(f"{self.pkg.where}: cannot read the weights of block {key} ({e})") from None
        out = {}
        for part, tensor in parts.items():
            a = raw.get(tensor)
            if a is None:
                a = self.pkg.stored(tensor, blocks=True)
                if a.dtype in BLOCK_DTYPES.values():
                    a = a.view(np.uint8)
            self._count(a.nbytes)
            if tensor in self.raw:  # a GGUF tensor's bytes: rows of whole blocks
                a = a.reshape(self.shape_of(tensor)[0], -1)
            out[part] = _kept(a, self.format_of(tensor), self.keep)
            if part in self.permute_rows:
                out[part] = unpermute(out[part], self.permute_rows[part])
            if part in self.offsets:
                out[part] = out[part] + np.float32(self.offsets[part])  # a new array: views stay unchanged
        for part, (axis, names) in self.split.items():
            if part in out:
                pieces = np.split(out.pop(part), len(names), axis=axis)
                out.update({n: np.ascontiguousarray(p) for n, p in zip(names, pieces, strict=True)})
        return out

    @staticmethod
    def _pool() -> Any:
        """Threads for a layer's cells, shared by all loaders; not the decode pool, which the cell
        reads themselves use (a task waiting on its own pool could wait forever)."""
        global _CELLS_POOL
        with _POOL_LOCK:
            if _CELLS_POOL is None:
                import os
                from concurrent.futures import ThreadPoolExecutor

                _CELLS_POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                                 thread_name_prefix="spherefmt-cells")
            return _CELLS_POOL

    @staticmethod
    def _join(fa: FastArray) -> np.ndarray:
        n, step = fa.arr.shape[0], fa.outer_shape[0]
        parts = [fa.read_chunk((c,) + (0,) * (len(fa.arr.shape) - 1)) for c in range(math.ceil(n / step))]
        return parts[0][:n] if len(parts) == 1 else np.concatenate(parts)[:n]

    def _cell(self, layer: int, lat: int, lon: int, wide: bool = False) -> dict[str, np.ndarray]:
        blocks = not wide and self._held_rows() in BLOCK_DTYPES
        rows, index, nbytes = self.pkg.cell_layer(lat, lon, layer, blocks=blocks)
        self._count(rows.nbytes)  # storage-dtype bytes, padding included, as for core reads
        n = int(self.counts[layer, lat, lon])
        if (index[:n] >= 0).all() and (index[n:] < 0).all():
            real = rows[:n]  # padding at the end (the usual case): a view, no copy
        else:
            real = rows[index >= 0]
        if real.shape[0] != n:
            raise FormatError(f"{self.pkg.where}: expert ({lat}, {lon}) layer {layer} changed while streaming")
        # rows come in their original dtype (bfloat16 as ml_dtypes'); ``wide``: float32 for host
        # arithmetic.  The rows stay whole (matmuls read each field as a column range, in place;
        # for an uncompressed local package this is a view of the mapped chunk)
        if blocks:  # Q8_0/Q4_K blocks, every field on a block boundary (self.slices)
            out = {"rows": np.ascontiguousarray(real)}
            vectors = [(name, sl.start) for name, sl in self.slices.items() if sl.stop - sl.start == 1]
            if vectors:
                values = dequantize_blocks(real)
                out.update({name: np.ascontiguousarray(values[:, at]) for name, at in vectors})
            return out
        keep = not wide and self.layout.dtype in self.keep and real.dtype == WEIGHT_DTYPES.get(self.layout.dtype)
        out = {"rows": real if keep or real.dtype == np.float32 else real.astype(np.float32)}
        # width-1 fields (GPT-2's per-neuron input bias) are also given as float32 vectors, for
        # the bias argument
        out.update({name: np.ascontiguousarray(real[:, sl.start], dtype=np.float32) for name, sl in self.slices.items()
                    if sl.stop - sl.start == 1})
        return out

    def _rows(self, tensor: str, start: int, count: int) -> np.ndarray:
        arr = self._array(tensor)
        info = self.pkg.tensor_info(tensor)
        rows, cols = self.shape_of(tensor)
        stop = min(rows, start + count)
        chunk = arr.chunks[0]
        fa = FastArray.maybe(arr)
        what = f"{self.pkg.where}: rows {start}..{stop} of {tensor}"
        try:
            if tensor in self.raw:  # a GGUF tensor's bytes: the rows' byte range
                from spherefmt.interop.gguf import block_size

                values, size = block_size(self.raw[tensor][0]) or (1, 0)  # format_of refused the others
                width = cols // values * size
                if info.shape != (rows * width,):
                    raise FormatError(f"{self.pkg.where}: {tensor} holds {info.shape[0]} bytes, not {rows} rows of "
                                      f"{width}")
                data = np.asarray(arr[start * width : stop * width]).reshape(stop - start, width)
            elif fa is not None and len(arr.shape) == 2 and arr.chunks[1] == arr.shape[1]:
                first = start // chunk
                parts = [fa.read_chunk((c, 0)) for c in range(first, math.ceil(stop / chunk))]
                data = parts[0] if len(parts) == 1 else np.concatenate(parts)
                data = data[start - first * chunk : stop - first * chunk]
            else:
                data = np.asarray(arr[start:stop])
        except SpherefmtError:
            raise  # storage failures and named format errors pass as they are
        except (ChunkError, ValueError, RuntimeError, OSError) as e:
            raise FormatError(f"cannot read {what} ({type(e).__name__}: {str(e)[:160]})") from None
        self._count(data.nbytes)
        fmt = self.format_of(tensor)
        if tensor not in self.raw and fmt not in BLOCK_DTYPES:
            data = data.reshape(stop - start, cols)
        return _kept(data, fmt, self.keep)

    def host_centroids(self, layer: int, field: str) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The centroid router of one layer: occupied cells and the mean ``field`` row of each
        (``(cells, d)``), read from the package once."""
        cells = self.cells(layer)
        sl = self.layout.slices()[field]  # of the rows as values (wide), not as held blocks
        out = np.empty((len(cells), sl.stop - sl.start), dtype=np.float32)
        for i, (lat, lon) in enumerate(cells):
            out[i] = self._cell(layer, lat, lon, wide=True)["rows"][:, sl].mean(axis=0)
        return cells, out

