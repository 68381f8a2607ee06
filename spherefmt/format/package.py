"""Reading and changing a package: :func:`open`, :class:`Package`, :class:`Expert`.

A :class:`Package` is a :class:`~spherefmt.format.view.PackageView` (the typed header and the
public layout view the layers above the format build on) that also reads tensors, layers and
experts, keeps reads consistent beside a writer, and changes the package in transactions.
Writing a new package is :mod:`spherefmt.format.write`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import mmap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

from spherefmt import constants as C
from spherefmt.dtypes import BLOCK_DTYPES, contiguous, from_torch, numpy_view, storage_dtype, to_torch
from spherefmt.errors import ExpertNotFoundError, FormatError, InputError, IntegrityError, ReadOnlyError, SpherefmtError
from spherefmt.format.chunks import ChunkError, FastArray, open_arrays, parallel_map, read_many, shard_shape
from spherefmt.format.header import Header
from spherefmt.format.keys import core_key, file_key, shard_key, shell_path
from spherefmt.format.quant import dequantize, pad_fields, quantize_rows, storage_shape
from spherefmt.format.store import PackageStore, open_package_store
from spherefmt.format.store import is_package as _store_is_package
from spherefmt.format.view import PackageView

__all__ = ["Expert", "Package", "is_package", "open"]

# numcodecs.shuffle is a numcodecs codec registered with zarr, readable by any zarr-python;
# zarr warns that other implementations may lack it, which we document in the spec instead.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)


@dataclass
class Expert:
    """One expert ``(lat, lon, depth)``: its neuron rows for every layer of its shell.

    Attributes
    ----------
    neurons
        ``(layers, K, F)`` rows in the original dtype (bfloat16 via ``ml_dtypes``); padding
        slots are exact zeros.
    index
        ``(layers, K)`` original neuron index of each slot, ``-1`` for padding.
    parent
        ``(layers, K)`` lightning-tree parent (neuron index in the previous layer), ``-1`` none.
    layers
        Global layer index of each row block.
    fields
        Field name -> column slice of a row (``w_in``, ``b_in``, ``w_out`` / ``gate``, ``up``, ``down``).
    """

    lat: int
    lon: int
    depth: int
    layers: tuple[int, ...]
    neurons: np.ndarray
    index: np.ndarray
    parent: np.ndarray
    fields: dict[str, slice]

    def field(self, name: str) -> np.ndarray:
        """The ``(layers, K, width)`` view of one field."""
        return self.neurons[..., self.fields[name]]

    @property
    def counts(self) -> np.ndarray:
        """Real (non-padding) neurons per layer."""
        return (self.index >= 0).sum(axis=1)


_F = TypeVar("_F", bound=Callable[..., Any])


def _consistent(fn: _F) -> _F:
    """Run a read method under :meth:`Package.consistent` (re-read when a writer committed)."""

    @functools.wraps(fn)
    def run(self: Package, *args: Any, **kwargs: Any) -> Any:
        return self.consistent(fn, self, *args, **kwargs)

    return cast(_F, run)  # functools.wraps: run stands for fn


class Package(PackageView):
    """An open sphere package.  Use :func:`spherefmt.open` to get one.

    Reads are lazy: opening reads only the manifest and the root header; a tensor, a layer or
    an expert is read when asked for.  One expert is one storage object.  Every object read is
    checked against the package's manifest (version 2).  Changes happen in transactions
    (:meth:`transaction`); each method that writes is one by itself.
    """

    def __init__(self, store: PackageStore, mode: str) -> None:
        self.where, self.mode = store.where, mode
        self._store = store
        self._reload_lock = threading.RLock()
        self._tls = threading.local()
        self._load()

    def _load(self) -> None:
        """Read the header and reset every cached view (at open, and after a change)."""
        self._load_view()
        self._rows_cache: tuple[int, dict[str, np.ndarray]] | None = None
        self._shell_cache: tuple[int, dict[int, list[np.ndarray | None]]] | None = None
        self._inner_index: dict[str, np.ndarray] = {}  # shard key -> its index (cell_layer reads)

    # --- consistency and transactions -------------------------------------------------------
    def consistent(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, run again on the package's newest state whenever a writer
        in another process committed a change under it (an object it read no longer matched);
        bounded by ``MAX_REREADS`` and ``MAX_REREAD_SECONDS``.  A mismatch that a fresh look
        does not explain (a damaged package) raises :class:`IntegrityError` at once."""
        if getattr(self._tls, "depth", 0):
            return fn(*args, **kwargs)  # an outer call retries the whole of it
        t0, tries, views = time.monotonic(), 0, 0
        while True:
            self._tls.depth = 1
            try:
                return fn(*args, **kwargs)
            except IntegrityError:
                if self.mode != "r":
                    raise
                with self._reload_lock:
                    why = self._store.refresh()
                    if why == "changed":
                        views = 0
                    elif why == "view" and views < 2:
                        views += 1
                    else:
                        raise
                    tries += 1
                    if tries > C.MAX_REREADS or time.monotonic() - t0 > C.MAX_REREAD_SECONDS:
                        raise IntegrityError(f"{self.where}: the package kept changing while being read "
                                             f"({tries} re-reads in {time.monotonic() - t0:.1f} s)") from None
                    self._load()
                time.sleep(min(0.05, 0.002 * tries))
            finally:
                self._tls.depth = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Package]:
        """Make every change inside the block one all-or-nothing change: it commits when the
        block ends (a new manifest generation), and a process killed before leaves the package
        exactly as it was.  Methods that write (:meth:`write_expert`, :meth:`write_tensor`,
        growth, router and training write-back) join an open transaction, or are one.

        Raises
        ------
        ReadOnlyError
            The package was opened with mode ``"r"``.
        ConcurrentWriteError
            (object storage) another writer committed first; nothing was committed.
        """
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only; use spherefmt.open(..., mode='r+')")
        outer = not self._store.in_transaction
        try:
            with self._store.transaction():
                if outer and self._store.upgrading:  # a version-1 package gets its manifest now
                    header = copy.deepcopy(self.header)
                    header.version = C.FORMAT_VERSION
                    self._group.update_attributes({C.ROOT_ATTR: header.to_json()})
                yield self
        finally:
            if outer:
                self._load()

    def write_header(self, header: Header) -> None:
        """Write a new header inside the current transaction (growth changes it); it is checked
        and read back when the transaction ends."""
        if not self._store.in_transaction:
            raise ReadOnlyError(f"{self.where}: a header is written inside a transaction")
        header = copy.deepcopy(header)
        header.version = C.FORMAT_VERSION
        self._group.update_attributes({C.ROOT_ATTR: header.to_json()})

    # --- reading --------------------------------------------------------------------------
    @_consistent
    def expert(self, lat: int, lon: int, depth: int, *, layer: int | None = None) -> Expert:
        """Read expert ``(lat, lon, depth)`` (one storage object), or one layer of it.

        Raises
        ------
        ExpertNotFoundError
            The address is outside the sphere, or ``layer`` is not in this depth shell.
        """
        self.check_address(lat, lon, depth)
        neurons, index, parent = self.shell_arrays(depth)
        layers = tuple(self.shells[depth].layers)
        k = self.slots(depth)
        if layer is None:
            sel: Any = slice(0, len(layers))
        else:
            if layer not in layers:
                raise ExpertNotFoundError(f"{self.where}: layer {layer} is not in depth shell {depth} (layers {list(layers)})")
            sel = slice(layers.index(layer), layers.index(layer) + 1)
            layers = (layer,)
        what = f"expert ({lat}, {lon}, {depth}) of {shell_path(depth)}/neurons"
        fa = FastArray.maybe(neurons) if layer is None and self._single_object(neurons, depth) else None
        if fa is not None:  # the whole shard: one object, decoded here
            try:
                rows = fa.read_objects([(0, lat, lon, 0, 0)])[0].reshape(len(layers), *neurons.shape[3:])
            except ChunkError as e:
                raise IntegrityError(f"{self.where}: cannot read {what} ({e})") from None
            except SpherefmtError:
                raise  # storage failures and named format errors pass as they are
            except (ValueError, RuntimeError, OSError) as e:
                raise FormatError(f"{self.where}: cannot read {what} ({e})") from None
        else:  # one layer, or a grown expert: zarr reads just those inner chunks' byte ranges
            rows = self.read_array(neurons, (sel, lat, lon, slice(0, k)), what)
        return Expert(lat, lon, depth, layers, self.row_values(rows), index[sel, lat, lon].copy(),
                      parent[sel, lat, lon].copy(), self.layout.slices())

    @_consistent
    def cell_layer(self, lat: int, lon: int, layer: int, *, blocks: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """One layer of one expert (one inner chunk, read by byte range): its ``(K, F)`` rows in
        the original dtype, their ``(K,)`` neuron indices (``-1`` padding) and the bytes read.
        With ``blocks``, a quantized sphere's rows come as their ``Q8_0``/``Q4_K`` blocks
        ``(K, blocks per row)`` (every field padded to whole blocks, section 5.1).

        This is the runtime's unit of streaming.  A chunk that fails its checksum raises
        :class:`FormatError` naming the expert and the object.
        """
        if not 0 <= layer < len(self.layer_depth):
            raise ExpertNotFoundError(f"{self.where}: no layer {layer} (the package has {len(self.layer_depth)})")
        depth = self.layer_depth[layer]
        self.check_address(lat, lon, depth)
        neurons, index, _ = self.shell_arrays(depth)
        t = self.shells[depth].layers.index(layer)
        k = self.slots(depth)
        what = f"expert ({lat}, {lon}, {depth}) layer {layer} in {self.where}/{shard_key(lat, lon, depth)}"
        fa = FastArray.maybe(neurons)
        shard = shard_shape(neurons)
        try:
            if fa is not None and fa.sharded and fa.inner_shape[0] == 1 and fa.inner_shape[3] == shard[3]:
                # one inner chunk per block of slots (one block unless the shell has grown)
                parts, nbytes = [], 0
                for b in range(math.ceil(k / shard[3])):
                    part, n = fa.read_inner((t // shard[0], lat, lon, b, 0), (t % shard[0], 0, 0, 0, 0),
                                            self._inner_index)
                    parts.append(part.reshape(shard[3:]))
                    nbytes += n
                rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
                rows = rows[:k]
            else:
                rows, nbytes = np.asarray(neurons[t, lat, lon, :k]), 0
        except ChunkError as e:
            raise IntegrityError(f"{self.where}: cannot read {what}: {e}") from None
        except SpherefmtError:
            raise
        except Exception as e:  # noqa: BLE001 - codec errors become FormatError
            raise FormatError(f"cannot read {what}: {type(e).__name__}: {str(e)[:160]}") from None
        if blocks and self.sphere_type is not None:
            return np.ascontiguousarray(rows).view(BLOCK_DTYPES[self.sphere_type]), index[t, lat, lon].copy(), nbytes
        return self.row_values(rows), index[t, lat, lon].copy(), nbytes

    def _shell_chunks(self, depth: int) -> dict[int, list[np.ndarray | None]]:
        """Per occupied flat cell of a shell, its ``(K, F)`` rows for each layer of the shell
        (``None``: not stored, all zeros).  For an uncompressed local package these are views of
        the shard's memory map, for others the decoded shards; the last shell read is kept, so
        that reading its layers one by one reads it once."""
        if self._shell_cache is not None and self._shell_cache[0] == depth:
            return self._shell_cache[1]
        self._shell_cache = None
        neurons, index, _ = self.shell_arrays(depth)
        p, m = self.require_graticule()
        n_layers, k = index.shape[0], index.shape[3]
        f = neurons.shape[4]
        occupied = [int(c) for c in np.flatnonzero((index.reshape(n_layers, p * m, k) >= 0).any(axis=(0, 2)))]
        what = f"{shell_path(depth)}/neurons"
        fa = FastArray.maybe(neurons) if self._single_object(neurons, depth) else None
        try:
            if fa is not None and fa.sharded and fa.inner_shape == (1, 1, 1, k, f):
                shards = parallel_map(lambda c: fa.shard_chunks((0, c // m, c % m, 0, 0)), occupied)
                chunks = {c: [None if x is None else x.reshape(k, f) for x in parts]
                          for c, parts in zip(occupied, shards, strict=True)}
            else:  # a grown shell (experts of several objects): zarr reads it whole
                block = np.asarray(neurons[:n_layers, :, :, :k]).reshape(n_layers, p * m, k, f)
                chunks = {c: [block[t, c] for t in range(n_layers)] for c in occupied}
        except ChunkError as e:
            raise IntegrityError(f"{self.where}: cannot read {what} ({e})") from None
        except SpherefmtError:
            raise
        except Exception as e:  # noqa: BLE001 - checksum and codec errors become FormatError
            if "checksum" in str(e).lower():
                raise IntegrityError(f"{self.where}: cannot read {what} ({str(e)[:160]})") from None
            raise FormatError(f"{self.where}: cannot read {what} ({type(e).__name__}: {str(e)[:160]})") from None
        self._shell_cache = (depth, chunks)
        return chunks

    def _layer_cells(self, layer: int, held: dict[int, Any] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each occupied cell of a layer: the original indices of its neurons and their rows
        (views; no copy).  ``held``: shells already read (depth -> :meth:`_shell_chunks`)."""
        depth = self.layer_depth[layer]
        _, index, _ = self.shell_arrays(depth)  # checked: a permutation of the layer's neurons
        t = self.shells[depth].layers.index(layer)
        m = self.require_graticule()[1]
        out = []
        chunks = held[depth] if held is not None else self._shell_chunks(depth)
        for c, parts in chunks.items():
            idx = index[t, c // m, c % m]
            real = idx >= 0
            n = int(real.sum())
            if n == 0:
                continue
            rows = parts[t]
            if rows is None:  # not stored: every byte zero
                rows = np.zeros((idx.shape[0], self.layout.row_width), dtype=storage_dtype(self.layout.dtype))
            elif self.quantized_sphere:
                rows = self.row_values(rows)
            if real[:n].all():  # real neurons first (spec section 4): a view
                out.append((idx[:n], rows[:n]))
            else:
                out.append((idx[real], rows[real]))
        return out

    @_consistent
    def layer_rows(self, layer: int) -> np.ndarray:
        """All ``(N, F)`` neuron rows of one layer in original neuron order (storage dtype)."""
        cells = self._layer_cells(layer)
        out = np.empty((self.layout.neurons[layer], self.layout.row_width), dtype=storage_dtype(self.layout.dtype))
        for idx, rows in cells:
            out[idx] = rows
        return out

    def _build_layer(self, layer: int, held: dict[int, Any] | None = None) -> dict[str, np.ndarray]:
        """Every FFN tensor of a layer, rebuilt from its cells: each neuron's slice of a field is
        copied once into place (and a field whose neuron axis is not the first, GPT-2's
        ``c_fc``, Llama's ``down``, transposed once, by blocks)."""
        cells = self._layer_cells(layer, held)
        n = self.layout.neurons[layer]
        st = storage_dtype(self.layout.dtype)
        out = {}
        for f, sl in zip(self.layout.fields, self.layout.slices().values(), strict=True):
            name = self.layout.layers[layer][f.name]
            shape = tuple(self.entries[name].shape)
            moved = (shape[f.axis],) + tuple(s for i, s in enumerate(shape) if i != f.axis)
            rows = np.empty((n, sl.stop - sl.start), dtype=st)
            for idx, r in cells:
                rows[idx] = r[:, sl]
            out[name] = rows.reshape(moved) if f.axis == 0 else _move_first_axis(rows.reshape(moved), f.axis)
        return out

    def _layer_tensors(self, layer: int) -> dict[str, np.ndarray]:
        """:meth:`_build_layer`, keeping the last layer: reading its tensors one by one rebuilds
        them once."""
        if self._rows_cache and self._rows_cache[0] == layer:
            return self._rows_cache[1]
        out = self._build_layer(layer)
        self._rows_cache = (layer, out)
        return out

    def stored(self, name: str, *, padded: bool = False, blocks: bool = False) -> np.ndarray:
        """A tensor as its storage array (bfloat16 and float8 as raw words, ``spherefmt.dtypes``);
        ``padded`` as in :meth:`tensor`.  A quantized core tensor reads as its float32 values, or
        with ``blocks`` as its blocks ``(rows, columns / block)`` (section 5.1)."""
        if padded and (pad := self.pad_axis(name)) is not None:
            arr = self.stored(name)
            width = [(0, 0)] * arr.ndim
            width[pad[0]] = (0, pad[1] - arr.shape[pad[0]])
            return np.pad(arr, width)  # zero bits: zero neurons
        t = self.entry(name)
        shape = tuple(t.shape)
        if t.where == "core":
            z = self.array(core_key(name))
            q = self.core_types.get(name)
            want = (storage_shape(shape, q), np.dtype(np.uint8)) if q else (shape, storage_dtype(t.dtype))
            if z.shape != want[0] or z.dtype != want[1]:
                raise FormatError(f"{self.where}: {core_key(name)} is {z.dtype}{z.shape}, header says "
                                  f"{f'{q} blocks of ' if q else ''}{t.dtype}{list(shape)}")
            data = self.read_array(z, Ellipsis, core_key(name))
            if q:
                return np.ascontiguousarray(data).view(BLOCK_DTYPES[q]) if blocks else dequantize(data, q)
            return data.reshape(shape)  # zarr returns 0-d arrays as shape (1,)
        layer, _ = self._owners[name]
        return self._layer_tensors(layer)[name]

    @_consistent
    def tensor(self, name: str, framework: str = "numpy", *, padded: bool = False) -> Any:
        """One tensor with its original name, shape, dtype and bytes.

        Parameters
        ----------
        name
            Original tensor name.
        framework
            ``"numpy"`` (bfloat16 as ``ml_dtypes.bfloat16``) or ``"torch"``.
        padded
            After growth, layers may hold different neuron counts; frameworks need one FFN
            size, so with ``padded`` FFN tensors are padded with zero neurons to
            :meth:`ffn_size` (what exports and :mod:`spherefmt.training.modules` use).
        """
        if framework not in ("numpy", "torch", "pt"):
            raise InputError(f"framework must be 'numpy' or 'torch', not {framework!r}")
        arr = self.stored(name, padded=padded)
        dtype = self.entries[name].dtype
        return numpy_view(arr, dtype) if framework == "numpy" else to_torch(arr, dtype)

    @_consistent
    def state_dict(self, framework: str = "numpy", *, padded: bool = False) -> dict[str, Any]:
        """Every tensor, in the source's order.

        Core tensors are fetched in one concurrent round of reads and decoded on all cores;
        sphere tensors are rebuilt shell by shell, each shell read once.
        """
        if framework not in ("numpy", "torch", "pt"):
            raise InputError(f"framework must be 'numpy' or 'torch', not {framework!r}")
        core = self._bulk_core([n for n, t in self.entries.items() if t.where == "core"])
        ffn: dict[str, np.ndarray] = {}
        if self.graticule is not None:
            # shells are read (views of maps cost no memory; decoded ones are held up to a
            # bound), then their layers rebuilt in parallel
            held: dict[int, Any] = {}
            decoded = 0
            for depth in range(self.depth):
                self._shell_cache = None
                held[depth] = self._shell_chunks(depth)
                decoded += sum(x.nbytes for parts in held[depth].values() for x in parts
                               if x is not None and not _is_mapped(x))
                if decoded > _HOLD_BYTES or depth == self.depth - 1:
                    layers = [lay for d in held for lay in self.shells[d].layers]
                    for built in parallel_map(functools.partial(self._build_layer, held=held), layers):
                        ffn.update(built)
                    held, decoded = {}, 0
            self._shell_cache = None
        out = {}
        for name, t in self.entries.items():
            if name in core:
                arr = core.pop(name)
            elif name in ffn and not (padded and self.pad_axis(name) is not None):
                arr = ffn.pop(name)
            else:
                arr = self.stored(name, padded=padded)
            out[name] = numpy_view(arr, t.dtype) if framework == "numpy" else to_torch(arr, t.dtype)
        self._shell_cache = self._rows_cache = None
        return out

    def _bulk_core(self, names: list[str]) -> dict[str, np.ndarray]:
        """Core tensors read together (metadata in one round, chunks in another)."""
        paths = [core_key(n) for n in names]
        todo = [p for p in paths if p not in self._arrays]
        opened = dict(zip(todo, open_arrays(self._group.store, todo), strict=True)) if todo else {}
        fast, fast_names = [], []
        for name, path in zip(names, paths, strict=True):
            arr = self._arrays[path] if path in self._arrays else opened[path]
            if isinstance(arr, Exception):
                continue  # the per-tensor path reports it with the usual message
            self._arrays[path] = arr
            t = self.entries[name]
            if arr.shape != tuple(t.shape) or arr.dtype != storage_dtype(t.dtype):
                continue
            if (fa := FastArray.maybe(arr)) is not None:
                fast.append(fa)
                fast_names.append(name)
        try:
            return dict(zip(fast_names, read_many(fast), strict=True)) if fast else {}
        except ChunkError as e:
            raise IntegrityError(f"{self.where}: cannot read core tensors ({e})") from None
        except SpherefmtError:
            raise
        except (ValueError, RuntimeError) as e:
            raise FormatError(f"{self.where}: cannot read core tensors ({e})") from None

    @_consistent
    def file(self, name: str) -> bytes:
        """A side file carried from the source (e.g. ``tokenizer.json``)."""
        if name not in self.header.files:
            raise ExpertNotFoundError(f"{self.where}: no side file {name!r}")
        return self.read_array(self.array(file_key(name)), Ellipsis, file_key(name)).tobytes()

    # --- writing --------------------------------------------------------------------------
    def write_expert(self, lat: int, lon: int, depth: int, neurons: Any, *, layer: int | None = None) -> None:
        """Replace the neuron rows of one expert in place (only its storage object is rewritten).

        Parameters
        ----------
        neurons
            ``(layers, K, F)`` rows (``(K, F)`` with ``layer``) in the package's dtype, as numpy
            (bfloat16 via ``ml_dtypes`` or raw uint16 words) or torch.  Padding slots must stay
            exact zeros.

        Raises
        ------
        ReadOnlyError
            The package was opened with mode ``"r"``.
        FormatError
            Wrong shape or dtype, or non-zero padding.
        """
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only; use spherefmt.open(..., mode='r+')")
        self.check_address(lat, lon, depth)
        arr, index, _ = self.shell_arrays(depth)
        layers = self.shells[depth].layers
        if layer is not None:
            if layer not in layers:
                raise ExpertNotFoundError(f"{self.where}: layer {layer} is not in depth shell {depth}")
            t = layers.index(layer)
            sel: Any = slice(t, t + 1)
        else:
            sel = slice(0, len(layers))
        data = _as_storage(neurons, self.layout.dtype)
        k = self.slots(depth)
        row = (k, self.layout.row_width)
        want = row if layer is not None else (len(layers), *row)
        if data.shape != tuple(want):
            raise FormatError(f"{self.where}: expert ({lat}, {lon}, {depth}) needs rows of shape {tuple(want)}, got {data.shape}")
        data = data.reshape((-1, *row))
        pad = index[sel, lat, lon] < 0
        if data[pad].any():
            raise FormatError(f"{self.where}: padding slots of expert ({lat}, {lon}, {depth}) must stay exact zeros")
        if self.sphere_type is not None:  # quantized again, as the converter did (zero rows stay zero bytes)
            data = quantize_rows(pad_fields(data, self._widths, self.sphere_type), self.sphere_type).view(np.uint8)
        with self.transaction():
            arr[sel, lat, lon, :k] = data

    def write_tensor(self, name: str, data: Any) -> None:
        """Replace a core tensor in place (same shape and dtype); only chunks whose bytes change
        are rewritten.  FFN tensors live in experts: change them with :meth:`write_expert`."""
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only; use spherefmt.open(..., mode='r+')")
        t = self.entry(name)
        if t.where != "core":
            raise FormatError(f"{self.where}: {name!r} is stored in experts; write it with write_expert")
        new = _as_storage(data, t.dtype)
        if new.shape != tuple(t.shape):
            raise FormatError(f"{self.where}: {name!r} has shape {tuple(t.shape)}, got {new.shape}")
        arr = self.array(core_key(name))
        old = self.stored(name)
        if name in self.quantized_core:  # compared and written as blocks
            new = quantize_rows(new, self.core_types[name]).view(np.uint8)
            old = self.stored(name, blocks=True).view(np.uint8)
        with self.transaction():
            if not new.shape:
                if old.tobytes() != new.tobytes():
                    arr[...] = new.reshape(arr.shape)
                return
            step = arr.chunks[0]
            for start in range(0, new.shape[0], step):  # chunk by chunk: unchanged chunks stay as they are
                a, b = old[start : start + step], new[start : start + step]
                if a.tobytes() != b.tobytes():
                    arr[start : start + step] = b

    def replace_with(self, other: Package) -> dict[str, Any]:
        """Make this package hold exactly ``other``'s objects, in one transaction, writing only
        those whose bytes differ and removing those ``other`` lacks (``sphere sparsify`` builds
        its result aside, then puts it in place this way: in a ``.vhd`` or an object store, the
        unchanged objects are never rewritten).  Returns the ``written`` and ``removed`` keys and
        the count ``unchanged``."""
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only; use spherefmt.open(..., mode='r+')")
        mine, theirs = self._store, other._store
        written, removed, unchanged = [], [], 0
        with self.transaction():
            keep = set(theirs.listed())
            for key in sorted(keep):
                data = bytes(theirs.read(key))
                # the manifest entries first (cheap: chunk CRCs included), then the bytes: an
                # object that ends with its own crc32c has the same whole-object CRC as any
                # other object of its length, so the entry alone cannot tell two apart
                if mine.entry(key) == theirs.entry(key) and bytes(mine.read(key)) == data:
                    unchanged += 1
                    continue
                mine.write(key, data)
                written.append(key)
            for key in mine.listed():
                if key not in keep:
                    mine.remove(key)
                    removed.append(key)
        return {"written": written, "removed": removed, "unchanged": unchanged}

    def close(self) -> None:
        """Release the store (and the writer lock; a zip opened ``r+`` is rewritten now when
        something committed).  A store the caller passed in stays open."""
        self._arrays.clear()
        self._rows_cache = self._shell_cache = None
        self._store.close()

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        g = self.graticule
        sphere = f", graticule={g[0]}x{g[1]}, depth={self.depth}" if g else ""
        return f"<spherefmt.Package {self.where!r} {self.architecture}{sphere}, {len(self.entries)} tensors>"

    # --- sizes ----------------------------------------------------------------------------
    def verify(self, progress: Any = None) -> dict[str, Any]:
        """Read every object of the package whole and check it against the manifest; see
        :meth:`spherefmt.format.store.PackageStore.verify` (``sphere verify``)."""
        return self._store.verify(progress)



#: decoded shells ``state_dict`` holds at once before rebuilding their layers in parallel
_HOLD_BYTES = 256 * 1024**2


def _is_mapped(a: np.ndarray) -> bool:
    """True for a view of a memory map (it holds no memory of its own)."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, mmap.mmap) or (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap))


def _move_first_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` with its first axis moved to ``axis``, as a new contiguous array; a 2-D transpose is
    copied by blocks of rows (about twice as fast as numpy's element-wise transposed copy)."""
    if a.ndim != 2 or axis != 1:
        return np.ascontiguousarray(np.moveaxis(a, 0, axis))
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)
    step = 64
    for i in range(0, a.shape[0], step):
        out[:, i : i + step] = a[i : i + step].T
    return out


def _as_storage(data: Any, dtype: str) -> np.ndarray:
    if type(data).__module__.startswith("torch"):
        name, arr = from_torch(data)
        if name != dtype:
            raise FormatError(f"rows are {name}, the package holds {dtype}")
        return arr
    arr = np.asarray(data)
    st = storage_dtype(dtype)
    if arr.dtype == st or arr.dtype == numpy_view(np.zeros(0, st), dtype).dtype:
        return contiguous(arr).view(st)
    raise FormatError(f"rows are {arr.dtype}, the package holds {dtype}")


def open(url: Any, mode: str = "r", *, storage_options: dict[str, Any] | None = None,
         lock_timeout: float = 0.0) -> Package:
    """Open a package.

    Parameters
    ----------
    url
        A package directory, a ``.zip``, a ``.vhd``, an fsspec URL (``memory://``, ``file://``,
        ``s3://``) or a zarr ``Store``.
    mode
        ``"r"`` (read) or ``"r+"`` (read and modify in place; one writer at a time).
    storage_options
        fsspec options for a URL (``endpoint_url``, ``key``, ``config_kwargs``...).
    lock_timeout
        With ``"r+"``: seconds to wait for another process that is writing the package (0:
        refuse at once).

    Raises
    ------
    FormatError
        Not a package, an incomplete one, a newer format version, or malformed metadata.
    PackageLockedError
        ``"r+"`` while another process is writing the package.
    """
    store = open_package_store(url, mode, storage_options=storage_options, lock_timeout=lock_timeout)
    try:
        return Package(store, mode)
    except BaseException:
        store.close()
        raise


def is_package(url: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``url`` holds a spherefmt package."""
    return _store_is_package(url, storage_options)

