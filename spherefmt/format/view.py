"""The public layout view of an open package: its typed header and where everything is stored.

:class:`PackageView` is what the layers above the format build on (growth, trainable modules,
export, routers, the runtime loader, pictures): the :attr:`~PackageView.header`, the neuron
:attr:`~PackageView.layout`, the depth :attr:`~PackageView.shells`, :meth:`~PackageView.slots`,
the :meth:`~PackageView.owner` of an FFN tensor, a shell's :meth:`~PackageView.shell_arrays`
(its neurons array and checked index and parent), and verified :meth:`~PackageView.array`
access.  :class:`spherefmt.format.package.Package` adds reading tensors and experts, and changes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from spherefmt import constants as C
from spherefmt.dtypes import TensorInfo, numpy_view, storage_dtype
from spherefmt.errors import ExpertNotFoundError, FormatError, IntegrityError, SpherefmtError
from spherefmt.format.arch import Layout
from spherefmt.format.chunks import ChunkError, FastArray, check_chunking, shard_shape
from spherefmt.format.header import Header, Shell, TensorEntry
from spherefmt.format.keys import shard_key, shell_path
from spherefmt.format.quant import blocks_width, dequantize, unpad_fields
from spherefmt.format.store import PackageStore, root_attrs

__all__ = ["PackageView"]


class PackageView:
    """Header, layout and storage arrays of an open package (see the module docstring).

    Subclassed by :class:`~spherefmt.format.package.Package`; every attribute is refreshed by
    ``_load_view`` when the package is opened and after each committed change.
    """

    where: str
    mode: str
    _store: PackageStore

    def _load_view(self) -> None:
        """Read the header and reset the views built on it."""
        store = self._store
        self.header: Header = Header.parse(root_attrs(store), self.where)
        if store.manifest is None and self.header.version >= 2:
            raise FormatError(f"{self.where}: package is incomplete (version {self.header.version} "
                              "without a manifest): its conversion was interrupted")
        try:
            self._group = zarr.open_group(store, mode="r" if self.mode == "r" else "r+")
        except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
            raise FormatError(f"{self.where}: not a readable Zarr v3 group ({type(e).__name__}: {str(e)[:160]})") \
                from None
        #: tensor name -> its header entry, in the source's order
        self.entries: dict[str, TensorEntry] = {t.name: t for t in self.header.tensors}
        self._arrays: dict[str, zarr.Array] = {}
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        #: the neuron layout (fields, per-layer tensors and neuron counts); no layers when generic
        self.layout: Layout = self.header.layout()
        self._owners = {tn: (i, fn) for i, lay in enumerate(self.header.layers) for fn, tn in lay.tensors.items()}
        #: depth -> its shell (layers, capacity)
        self.shells: dict[int, Shell] = {s.depth: s for s in self.header.shells}
        q = self.header.quantization
        #: core tensors stored as blocks -> their type, and whether the sphere's rows are (section 5.1)
        self.core_types: dict[str, str] = {n: q.get("types", {}).get(n, q["type"]) for n in q["core"]} if q else {}
        self.quantized_core: set[str] = set(self.core_types)
        self.quantized_sphere: bool = bool(q and q["sphere"])
        #: the block type of the sphere's rows (``None``: stored as values)
        self.sphere_type: str | None = q["type"] if q and q["sphere"] else None
        self._widths = {f.name: f.width for f in self.layout.fields}

    def quantized(self, name: str) -> bool:
        """Whether a tensor is stored as blocks (``Q8_0`` or ``Q4_K``)."""
        return name in self.quantized_core or (self.quantized_sphere and name in self._owners)

    def quant_type(self, name: str) -> str | None:
        """The block type a tensor is stored in (``None``: stored as values)."""
        if name in self.core_types:
            return self.core_types[name]
        return self.sphere_type if name in self._owners else None

    def stored_row_width(self) -> int:
        """The last axis of the ``neurons`` arrays: a row's values, or its blocks' bytes."""
        if self.sphere_type is not None:
            n, size = C.QUANT_TYPES[self.sphere_type]
            return blocks_width(self._widths, self.sphere_type) // n * size
        return self.layout.row_width

    def row_values(self, rows: np.ndarray) -> np.ndarray:
        """Neuron rows as values in the layout's dtype: stored rows themselves, or a quantized
        sphere's blocks ``(..., bytes)`` dequantized to float32 ``(..., F)``."""
        if self.sphere_type is None:
            return numpy_view(rows, self.layout.dtype)
        return unpad_fields(dequantize(rows, self.sphere_type), self._widths, self.sphere_type)
    @property
    def generation(self) -> int | None:
        """The manifest generation this view of the package reads (``None`` for version 1)."""
        return self._store.generation

    @property
    def group(self) -> zarr.Group:
        """The package's root Zarr group, every read verified by the package store (routers and
        growth create arrays in it inside a transaction)."""
        return self._group

    # --- header views ---------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """The package header as JSON (``spec/FORMAT.md`` section 3), a copy; :attr:`header` is
        the same, typed."""
        return copy.deepcopy(self.header.to_json())

    @property
    def architecture(self) -> str:
        return self.header.architecture

    @property
    def graticule(self) -> tuple[int, int] | None:
        return self.header.graticule

    @property
    def depth(self) -> int:
        return self.header.depth

    @property
    def layer_depth(self) -> list[int]:
        return list(self.header.layer_depth)

    @property
    def config(self) -> dict[str, Any] | None:
        return self.header.config

    def keys(self) -> list[str]:
        """Tensor names in the source's order."""
        return list(self.entries)

    def tensor_info(self, name: str, *, padded: bool = False) -> TensorInfo:
        """Name, dtype and shape of a tensor; ``padded``: as exported (see :meth:`tensor`)."""
        t = self.entry(name)
        shape = list(t.shape)
        if padded and (pad := self.pad_axis(name)) is not None:
            shape[pad[0]] = pad[1]
        return TensorInfo(name, t.dtype, tuple(shape))

    def ffn_size(self) -> int | None:
        """The largest layer's neuron count (``None`` without a sphere): what exports pad to."""
        return max(self.layout.neurons) if self.graticule is not None else None

    def owner(self, name: str) -> tuple[int, str] | None:
        """``(layer, field)`` of an FFN tensor (``None`` for a core tensor)."""
        return self._owners.get(name)

    def pad_axis(self, name: str) -> tuple[int, int] | None:
        """``(axis, size)`` when an FFN tensor has fewer neurons than the largest layer (after
        growth); exports pad it with zero neurons, which compute nothing."""
        owner = self.owner(name)
        if owner is None:
            return None
        layer, field = owner
        size = self.ffn_size()
        if size is None or self.layout.neurons[layer] == size:
            return None
        return next(f.axis for f in self.layout.fields if f.name == field), size

    def experts(self) -> Iterator[tuple[int, int, int]]:
        """Every expert address ``(lat, lon, depth)``."""
        if self.graticule is None:
            return
        p, m = self.graticule
        for d in range(self.depth):
            for lat in range(p):
                for lon in range(m):
                    yield lat, lon, d

    # --- arrays ---------------------------------------------------------------------------
    def array(self, path: str) -> zarr.Array:
        """The Zarr array at ``path`` (every read of it verified), or :class:`FormatError` naming
        what is missing or malformed."""
        arr = self._arrays.get(path)
        if arr is None:
            try:
                node = self._group[path]
            except SpherefmtError:
                raise  # a damaged or missing metadata object, named by the store
            except KeyError:
                if sync(self._group.store.exists(f"{path}/zarr.json")):
                    raise FormatError(f"{self.where}: array {path!r} has malformed metadata") from None
                raise FormatError(f"{self.where}: array {path!r} is missing") from None
            except (ValueError, TypeError, ArithmeticError, IndexError, AttributeError) as e:
                # zarr validates metadata as it builds the array: a zero chunk size divides by zero
                raise FormatError(f"{self.where}: array {path!r} has malformed metadata "
                                  f"({type(e).__name__}: {str(e)[:120]})") from None
            if not isinstance(node, zarr.Array):
                raise FormatError(f"{self.where}: {path!r} is not an array")
            check_chunking(node, f"{self.where}: {path}")
            arr = self._arrays[path] = node
        return arr

    def read_array(self, arr: zarr.Array, sel: Any, what: str) -> np.ndarray:
        """``arr[sel]`` as numpy; damaged or mismatched bytes raise :class:`IntegrityError`,
        other failures :class:`FormatError`, both naming ``what``."""
        try:
            if sel is Ellipsis and (fa := FastArray.maybe(arr)) is not None:
                return fa.read_all()
            return np.asarray(arr[sel])
        except ChunkError as e:
            raise IntegrityError(f"{self.where}: cannot read {what} ({e})") from None
        except SpherefmtError:
            raise
        except Exception as e:  # checksum failures, truncated objects, codec errors
            if "checksum" in str(e).lower():  # zarr's crc32c codec: the bytes are not what was written
                raise IntegrityError(f"{self.where}: cannot read {what} ({str(e)[:160]})") from None
            raise FormatError(f"{self.where}: cannot read {what} ({type(e).__name__}: {str(e)[:160]})") from None

    def entry(self, name: str) -> TensorEntry:
        """The header entry of a tensor (dtype, shape, ``core`` or ``sphere``)."""
        t = self.entries.get(name)
        if t is None:
            raise ExpertNotFoundError(f"{self.where}: no tensor {name!r}")
        return t

    def shell_arrays(self, depth: int) -> tuple[zarr.Array, np.ndarray, np.ndarray]:
        """The shell's ``neurons`` array and its ``index``/``parent`` (cut to the header's extent).

        The arrays MAY be larger than the header says along the layer and slot axes: growth
        (:mod:`spherefmt.training.grow`) resizes them before it rewrites the header, and a package whose
        growth was interrupted between the two must still read exactly as before."""
        s = self.shells[depth]
        p, m = self.require_graticule()
        shape = (len(s.layers), p, m, s.capacity)
        f = self.stored_row_width()
        neurons = self.array(f"{shell_path(depth)}/{C.NEURONS_ARRAY}")
        ns = neurons.shape
        st = np.dtype(np.uint8) if self.quantized_sphere else storage_dtype(self.layout.dtype)
        if (len(ns) != 5 or ns[0] < shape[0] or ns[1:3] != (p, m) or ns[3] < shape[3] or ns[4] != f
                or neurons.dtype != st):
            raise FormatError(f"{self.where}: {shell_path(depth)}/neurons is {neurons.dtype}{ns}, "
                              f"header says {(*shape, f)}")
        if depth not in self._index:
            pair = []
            for name in (C.INDEX_ARRAY, C.PARENT_ARRAY):
                arr = self.array(f"{shell_path(depth)}/{name}")
                if arr.shape[:1] + arr.shape[3:] != ns[:1] + ns[3:4] or arr.shape[1:3] != (p, m) or arr.dtype != np.int32:
                    raise FormatError(f"{self.where}: {shell_path(depth)}/{name} is {arr.dtype}{arr.shape}, want int32{shape}")
                sel: Any = Ellipsis if arr.shape == shape else (slice(0, shape[0]), slice(None), slice(None), slice(0, shape[3]))
                pair.append(self.read_array(arr, sel, f"{shell_path(depth)}/{name}"))
            for t, layer in enumerate(s.layers):
                # neurons numbered past the layer's count were written by a growth that has not
                # committed its header (spherefmt.training.grow): they are padding until it does
                beyond = pair[0][t] >= self.layout.neurons[layer]
                if beyond.any():
                    pair[0][t][beyond] = C.PADDING_INDEX
                    pair[1][t][beyond] = C.PADDING_INDEX
            self._check_index(depth, pair[0])
            self._index[depth] = (pair[0], pair[1])
        return neurons, *self._index[depth]

    def slots(self, depth: int) -> int:
        """``K``: neuron slots per cell of a shell (the header's capacity)."""
        return self.shells[depth].capacity

    def shell_layers(self, depth: int) -> list[int]:
        """The global layer indices a depth shell holds, in order."""
        return list(self.shells[depth].layers)

    def require_graticule(self) -> tuple[int, int]:
        """``(P, M)``, or :class:`ExpertNotFoundError` for a package without a sphere."""
        g = self.graticule
        if g is None:
            raise ExpertNotFoundError(f"{self.where}: package has no sphere (architecture {self.architecture})")
        return g

    def _single_object(self, neurons: zarr.Array, depth: int) -> bool:
        """True when every expert of the shell is one storage object (one shard spans the
        shell's layers and slots): the case before any growth."""
        s = self.shells[depth]
        shard = shard_shape(neurons)
        return neurons.shape[0] == shard[0] == len(s.layers) and neurons.shape[3] == shard[3] == s.capacity

    def expert_keys(self, lat: int, lon: int, depth: int) -> list[str]:
        """Every storage key of expert ``(lat, lon, depth)``: one object, or after growth one per
        block of layers and of slots (absent objects are all padding)."""
        self.check_address(lat, lon, depth)
        neurons = self.array(f"{shell_path(depth)}/{C.NEURONS_ARRAY}")
        shard = shard_shape(neurons)
        s = self.shells[depth]
        return [f"{shell_path(depth)}/{C.NEURONS_ARRAY}/c/{a}/{lat}/{lon}/{b}/0"
                for a in range(math.ceil(len(s.layers) / shard[0])) for b in range(math.ceil(s.capacity / shard[3]))]

    def _check_index(self, depth: int, index: np.ndarray) -> None:
        for t, layer in enumerate(self.shells[depth].layers):
            n = self.layout.neurons[layer]
            real = index[t][index[t] >= 0]
            if real.size != n or (real >= n).any() or np.unique(real).size != n:
                raise FormatError(f"{self.where}: {shell_path(depth)}/index layer {layer} is not a permutation of {n} neurons")
            if (index[t] < C.PADDING_INDEX).any():
                raise FormatError(f"{self.where}: {shell_path(depth)}/index has values below -1")

    def check_address(self, lat: int, lon: int, depth: int) -> None:
        """:class:`ExpertNotFoundError` unless ``(lat, lon, depth)`` is an expert of the sphere."""
        g = self.graticule
        if g is None:
            raise ExpertNotFoundError(f"{self.where}: package has no sphere (architecture {self.architecture})")
        if not (0 <= lat < g[0] and 0 <= lon < g[1] and 0 <= depth < self.depth):
            raise ExpertNotFoundError(f"{self.where}: no expert ({lat}, {lon}, {depth}) in a {g[0]}x{g[1]}x{self.depth} sphere")

    def stored_bytes(self, prefix: str = "") -> int:
        """Bytes the package's objects occupy in its container (under ``prefix``; the
        manifests themselves not counted)."""
        return sum(self._store.object_size(k) or 0 for k in self._store.listed(prefix))

    def object_bytes(self, key: str) -> int:
        size = self._store.object_size(key)
        if size is None:
            raise ExpertNotFoundError(f"{self.where}: no object {key!r}")
        return size

    def shard_key(self, lat: int, lon: int, depth: int) -> str:
        """The storage key of expert ``(lat, lon, depth)`` (one object before any growth)."""
        self.check_address(lat, lon, depth)
        return shard_key(lat, lon, depth)
