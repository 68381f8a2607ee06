"""Packages as a source (``convert`` re-places a package with other parameters) and the streamed
tensor reader that every export writer uses."""

from __future__ import annotations

from typing import Any

import numpy as np

from spherefmt.dtypes import TensorInfo
from spherefmt.errors import FormatError
from spherefmt.format.keys import shell_path
from spherefmt.format.package import Package
from spherefmt.format.package import open as open_package
from spherefmt.interop.base import TensorSource

__all__ = ["LayerReader", "PackageSource"]


class PackageSource(TensorSource):
    """A package as a conversion source (to re-place it with other parameters)."""

    def __init__(self, url: Any) -> None:
        self.pkg = open_package(url)
        self.where = self.pkg.where
        self.config = self.pkg.config
        self.metadata = dict(self.pkg.header.metadata)
        self.files = {n: self.pkg.file(n) for n in self.pkg.header.files}

    def keys(self) -> list[str]:
        return self.pkg.keys()

    def info(self, name: str) -> TensorInfo:
        return self.pkg.tensor_info(name)

    def read(self, name: str) -> np.ndarray:
        return self.pkg.stored(name)

    def close(self) -> None:
        self.pkg.close()


class LayerReader:
    """Storage arrays of a package's tensors for a streamed export, in bounded memory.

    ``Package.tensor`` rebuilds an FFN tensor from its decoded depth shell and keeps the shell
    (``layers / depth`` layers of every expert) so that reading a shell's layers one by one
    decodes it once; on a large model that cache dominates an export's peak memory (GPT-2 XL:
    about 5 layers, 200 MB, plus the compressed shards read at once).  Here a layer is rebuilt
    from one inner chunk per expert (byte-range reads through zarr), so an export holds
    one layer's neuron rows (the last layer read is kept: its tensors usually come
    one after another) plus the tensor being written.
    """

    def __init__(self, pkg: Package) -> None:
        self.pkg = pkg
        self._rows: tuple[int, np.ndarray] | None = None

    def storage(self, name: str) -> np.ndarray:
        """The storage array of ``name`` as exported (FFN tensors padded as ``Package.tensor(...,
        padded=True)`` pads them)."""
        p = self.pkg
        if p.entry(name).where != "sphere":
            return p.stored(name, padded=True)
        arr = self._ffn(name)
        if (pad := p.pad_axis(name)) is not None:
            width = [(0, 0)] * arr.ndim
            width[pad[0]] = (0, pad[1] - arr.shape[pad[0]])
            arr = np.pad(arr, width)  # zero bits: zero neurons
        return arr

    def _ffn(self, name: str) -> np.ndarray:
        p = self.pkg
        owner = p.owner(name)
        if owner is None:
            raise FormatError(f"{p.where}: {name!r} is not an FFN tensor")
        layer, field = owner
        rows = self._layer_rows(layer)
        lay = p.layout
        f = next(fd for fd in lay.fields if fd.name == field)
        shape = tuple(p.entry(name).shape)
        moved = (shape[f.axis],) + tuple(s for i, s in enumerate(shape) if i != f.axis)
        part = rows[:, lay.slices()[field]]
        if f.axis == 0:
            return np.ascontiguousarray(part).reshape(moved)
        return np.ascontiguousarray(np.moveaxis(part.reshape(moved), 0, f.axis))

    def _layer_rows(self, layer: int) -> np.ndarray:
        """All ``(N, F)`` rows of one layer in original neuron order (storage dtype)."""
        if self._rows is not None and self._rows[0] == layer:
            return self._rows[1]
        self._rows = None
        p = self.pkg
        lay = p.layout
        depth = p.layer_depth[layer]
        neurons, index, _ = p.shell_arrays(depth)  # index checked: a permutation of the layer's neurons
        t = p.shell_layers(depth).index(layer)
        k = index.shape[3]
        # one layer of every expert: zarr reads just that inner chunk of each shard (a byte
        # range, checksum verified), into process memory (no map of the whole shard)
        block = p.read_array(neurons, (t, slice(None), slice(None), slice(0, k)), f"layer {layer} of {shell_path(depth)}")
        if p.quantized_sphere:  # Q8_0/Q4_K blocks: their float32 values (spec 5.1)
            block = p.row_values(block)
        idx = index[t].reshape(-1)
        real = np.flatnonzero(idx >= 0)
        pos = np.empty(lay.neurons[layer], dtype=np.intp)
        pos[idx[real]] = real  # where each original neuron sits in the layer's slots
        rows = block.reshape(-1, lay.row_width)[pos]  # one gather, straight into original order
        del block
        self._rows = (layer, rows)
        return rows
