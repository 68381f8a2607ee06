"""Export a package back to the formats it came from, with original names, shapes, dtypes, bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError
from .package import Package, shell_path
from .package import open as open_package
from .safetensors_io import write_safetensors
from .sources import bounded_heap

__all__ = ["export"]


def export(pkg: Any, dst: str | os.PathLike[str], *, fmt: str | None = None, progress: bool = False) -> str:
    """Write every tensor of a package to ``dst``.

    Parameters
    ----------
    pkg
        A :class:`Package` or anything :func:`spherefmt.open` accepts.
    dst
        ``*.safetensors`` (streamed: one tensor in memory at a time), ``*.gguf`` (packages
        converted from GGUF: metadata and tensor types restored, see :mod:`spherefmt.gguf_io`)
        or ``*.pt``/``*.pth``/``*.bin`` (a torch state dict; needs torch and holds the whole model
        in memory while saving).
    fmt
        ``"safetensors"``, ``"gguf"`` or ``"torch"``; default from the suffix of ``dst``.
    """
    dst = Path(dst)
    fmt = fmt or {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch",
                  ".gguf": "gguf"}.get(dst.suffix)
    if fmt not in ("safetensors", "torch", "gguf"):
        raise FormatError(f"{dst}: unknown export format; use a .safetensors, .gguf, .pt, .pth or .bin name")
    own = not isinstance(pkg, Package)
    p = open_package(pkg) if own else pkg
    try:
        # after uneven growth, FFN tensors are padded with zero neurons to one size (the config's)
        infos = [p.tensor_info(n, padded=True) for n in p.keys()]
        from .package import _progress

        with _progress(sum(i.nbytes for i in infos), "export", progress) as bar, bounded_heap():
            if fmt == "gguf":
                from .gguf_io import export_gguf

                export_gguf(p, dst, storage=_LayerReader(p).storage, progress=bar.update)
            elif fmt == "safetensors":
                meta = p.metadata["metadata"]
                write_safetensors(dst, infos, _LayerReader(p).storage, metadata=meta or None, progress=bar.update)
            else:
                import torch

                sd = {}
                for i in infos:
                    sd[i.name] = p.tensor(i.name, "torch", padded=True).clone()
                    bar.update(i.nbytes)
                tmp = dst.with_name(f".{dst.name}.partial")
                torch.save(sd, tmp)
                os.replace(tmp, dst)
    finally:
        if own:
            p.close()
    return str(dst)


class _LayerReader:
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
        if p._entry(name)["where"] != "sphere":
            return p._storage(name, padded=True)
        arr = self._ffn(name)
        if (pad := p._pad_axis(name)) is not None:
            width = [(0, 0)] * arr.ndim
            width[pad[0]] = (0, pad[1] - arr.shape[pad[0]])
            arr = np.pad(arr, width)  # zero bits: zero neurons
        return arr

    def _ffn(self, name: str) -> np.ndarray:
        p = self.pkg
        layer, field = p._owner[name]
        rows = self._layer_rows(layer)
        lay = p._layout
        f = next(fd for fd in lay.fields if fd.name == field)
        shape = tuple(p._tensors[name]["shape"])
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
        lay = p._layout
        depth = p.layer_depth[layer]
        neurons, index, _ = p._shell_arrays(depth)  # index checked: a permutation of the layer's neurons
        t = p._shells[depth]["layers"].index(layer)
        k = index.shape[3]
        # one layer of every expert: zarr reads just that inner chunk of each shard (a byte
        # range, checksum verified), into process memory (no map of the whole shard)
        block = p._read(neurons, (t, slice(None), slice(None), slice(0, k)), f"layer {layer} of {shell_path(depth)}")
        idx = index[t].reshape(-1)
        real = np.flatnonzero(idx >= 0)
        pos = np.empty(lay.neurons[layer], dtype=np.intp)
        pos[idx[real]] = real  # where each original neuron sits in the layer's slots
        rows = block.reshape(-1, lay.row_width)[pos]  # one gather, straight into original order
        del block
        self._rows = (layer, rows)
        return rows
