"""Growing a package in place: more neurons in cells, more layers as new depth.

Both operations preserve the model's function exactly until it is trained (``spec/FORMAT.md``
section 7.2):

* :func:`grow_neurons` adds neurons to layers.  A new neuron's input weights are drawn at the
  scale of the layer's own (so it has gradients to learn from), its input bias and **output
  weights are zero**, so it adds exactly ``0`` to the residual stream.  Neurons go into free slots
  of the chosen cell (or, spread, of the emptiest cells); when a cell is full the shell's
  capacity grows by whole slot blocks: the ``neurons``/``index``/``parent`` arrays are resized
  along the slot axis, and the new slots live in *new* storage objects, so nothing already
  stored is rewritten except the experts that received neurons in free slots.
* :func:`grow_layers` appends transformer blocks after the last one.  Each copies the last
  block's weights (as LLaMA-Pro's block expansion does) with the **output projections zeroed**
  (attention output and FFN output weights and biases), so the block is the identity on the
  residual stream.  Its neurons sit in the same cells as the neurons they copy.  The new layers
  form a new depth shell while ``D < 10``; at ``D = 10`` they join the surface shell (the shell of
  the last layer), whose arrays grow along the layer axis, again into new objects.

Crash safety: a growth is one transaction (:meth:`spherefmt.Package.transaction`): every
object it writes, arrays' metadata and the header included, becomes visible at once when its
manifest commits, and a process killed before that leaves the package exactly as it was.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import zarr

from spherefmt import constants as C
from spherefmt.dtypes import numpy_view, storage_dtype, to_float32
from spherefmt.errors import FormatError, InputError
from spherefmt.format.arch import Layout
from spherefmt.format.chunks import shard_shape
from spherefmt.format.header import Header, LayerEntry, Shell, TensorEntry
from spherefmt.format.keys import core_key, shell_path
from spherefmt.format.package import Package
from spherefmt.format.package import open as open_package
from spherefmt.format.placement import tree_parents

__all__ = ["grow_layers", "grow_neurons"]

#: Core tensors (by name suffix) that write a block's output into the residual stream: zeroed
#: in a new block so that it adds nothing.  GPT-2, Llama (HF names) and GGUF Llama names.
OUTPUT_PROJECTIONS = ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.bias",
                      "self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.bias",
                      "attn_output.weight", "attn_output.bias")


def _open(pkg: str | Package) -> tuple[Package, bool]:
    if isinstance(pkg, Package):
        if pkg.mode != "r+":
            raise InputError(f"{pkg.where} is open read-only: open it with mode='r+' to grow it")
        opened, own = pkg, False
    else:
        opened, own = open_package(pkg, "r+"), True
    if opened.header.quantization is not None:
        if own:
            opened.close()
        raise InputError(f"{opened.where} is quantized ({opened.header.quantization['type']}): grow the float package it was converted from, "
                         "then quantize it again")
    return opened, own


def _to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    out = np.zeros(values.shape, dtype=storage_dtype(dtype))
    numpy_view(out, dtype)[...] = values  # float32 -> bf16/f16/f32, round to nearest even
    return out


def _ffn_size_key(arch: str) -> str:
    return "n_inner" if arch == C.ARCH_GPT2 else "intermediate_size"


def grow_neurons(pkg: str | Package, n: int, *, cell: tuple[int, int] | None = None, depth: int | None = None,
                 seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Add ``n`` neurons to every layer (of shell ``depth`` when given), function-preserving.

    Parameters
    ----------
    pkg
        A package URL/path, or a :class:`Package` opened ``r+``.
    n
        Neurons to add to each affected layer (``>= 1``).
    cell
        ``(lat, lon)``: put every new neuron in this cell (needs ``depth``).  Default: spread
        over the cells with the fewest neurons, one at a time.
    depth
        Only the layers of this depth shell.
    seed
        Seed of the new input weights.

    Returns
    -------
    dict
        What changed: per shell the new capacity and the experts that received neurons.
    """
    if not isinstance(n, int) or n < 1:
        raise InputError(f"neurons to add must be a positive integer, not {n!r}")
    if cell is not None and depth is None:
        raise InputError("--cell needs --depth: an expert is (lat, lon, depth)")
    p, own = _open(pkg)
    try:
        if p.graticule is None:
            raise InputError(f"{p.where}: the package has no sphere to grow")
        P, M = p.graticule
        if depth is not None and not 0 <= depth < p.depth:
            raise InputError(f"{p.where}: no depth shell {depth} (the package has {p.depth})")
        if cell is not None and depth is not None:
            p.check_address(cell[0], cell[1], depth)
        header = copy.deepcopy(p.header)
        layout, sl = p.layout, p.layout.slices()
        st = storage_dtype(layout.dtype)
        rng = np.random.default_rng(seed)
        report: dict[str, Any] = {"neurons": n, "shells": []}
        counts_of = list(layout.neurons)  # the committed counts: the package reads with these
        cache: dict[int, np.ndarray] = {}

        def layer_rows(layer: int) -> np.ndarray:  # each layer read once (as input, then as parent)
            if layer not in cache:
                if len(cache) > 2:  # only the layer and its predecessor are needed again
                    cache.clear()
                cache[layer] = p.layer_rows(layer)
            return cache[layer]

        with p.transaction():  # all of it commits at once, or none of it
            shells = [depth] if depth is not None else list(range(p.depth))
            for d in shells:
                arr, index, parent = p.shell_arrays(d)
                layers = p.shell_layers(d)
                ls, k = len(layers), p.slots(d)
                k0 = shard_shape(arr)[3]
                counts = (index >= 0).sum(axis=-1).reshape(ls, P * M)
                add = np.zeros((ls, P * M), dtype=np.int64)
                for t in range(ls):
                    if cell is not None:
                        add[t, cell[0] * M + cell[1]] = n
                    else:  # water-filling: each new neuron to the emptiest cell (lowest id on ties)
                        for _ in range(n):
                            add[t, int(np.argmin(counts[t] + add[t]))] += 1
                need = int((counts + add).max())
                k_new = k if need <= k else k + k0 * math.ceil((need - k) / k0)
                # 1. arrays grow first (readers use the header's extent, so this is invisible)
                if k_new > arr.shape[3]:
                    arr.resize((arr.shape[0], P, M, k_new, arr.shape[4]))
                new_index = np.full((ls, P, M, k_new), C.PADDING_INDEX, dtype=np.int32)
                new_parent = new_index.copy()
                new_index[..., :k], new_parent[..., :k] = index, parent
                # 2. rows of the new neurons, written expert by expert, slot block by slot block
                touched = sorted({int(c) for c in np.flatnonzero(add.any(axis=0))})
                writes: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
                for t, layer in enumerate(layers):
                    rows = layer_rows(layer)
                    scale = {f.name: float(to_float32(rows[:, sl[f.name]], layout.dtype).std())
                             for f in layout.fields if f.name != layout.out_field and f.width > 1}
                    prev_out = None
                    if layer > 0:
                        prev_out = to_float32(layer_rows(layer - 1)[:, sl[layout.out_field]], layout.dtype)
                    nxt = counts_of[layer]
                    places = [(c, int(counts[t, c]), int(add[t, c])) for c in touched if add[t, c]]
                    total = sum(a for _, _, a in places)
                    w = np.zeros((total, layout.row_width), dtype=np.float32)
                    for fname, sd in scale.items():
                        w[:, sl[fname]] = rng.standard_normal((total, sl[fname].stop - sl[fname].start)) * sd
                    par = (tree_parents(prev_out, w[:, sl[layout.in_field]]) if prev_out is not None
                           else np.full(total, C.PADDING_INDEX, dtype=np.int32))
                    stored = _to_storage(w, layout.dtype)
                    o = 0
                    for c, first, a in places:
                        lat, lon = divmod(c, M)
                        new_index[t, lat, lon, first:first + a] = np.arange(nxt + o, nxt + o + a, dtype=np.int32)
                        new_parent[t, lat, lon, first:first + a] = par[o:o + a]
                        writes.setdefault((lat, lon), []).append((t, first, stored[o:o + a]))
                        o += a
                    nxt += total
                    header.layers[layer].neurons = nxt
                for (lat, lon), hits_all in sorted(writes.items()):
                    for b in range(k_new // k0):
                        lo, hi = b * k0, (b + 1) * k0
                        hits = [(t, first, w) for t, first, w in hits_all if first < hi and first + len(w) > lo]
                        if not hits:
                            continue
                        # a block is read (zeros when it is new) and written whole: one object
                        block = np.asarray(arr[:ls, lat, lon, lo:hi]) if lo < k else np.zeros((ls, k0, arr.shape[4]), st)
                        for t, first, w in hits:
                            a0, a1 = max(first, lo), min(first + len(w), hi)
                            block[t, a0 - lo:a1 - lo] = w[a0 - first:a1 - first]
                        arr[:ls, lat, lon, lo:hi] = block
                # 3. index and parent (entries >= a layer's old count read as padding until the commit)
                for name, data in ((C.INDEX_ARRAY, new_index), (C.PARENT_ARRAY, new_parent)):
                    ia = p.array(f"{shell_path(d)}/{name}")
                    if ia.shape[3] < k_new:
                        ia.resize((ia.shape[0], P, M, k_new))
                    ia[:ls, :, :, :k_new] = data
                header.shell(d).capacity = k_new
                report["shells"].append({"depth": d, "capacity": [k, k_new],
                                         "experts": [(c // M, c % M, d) for c in touched]})
            # 4. the header: tensor shapes, FFN size in the config, growth log; then commit
            _update_ffn_shapes(header, layout)
            _log_growth(header, {"op": "neurons", "count": n, "depth": depth, "cell": list(cell) if cell else None,
                                 "seed": seed})
            p.write_header(header)
        return report
    finally:
        if own:
            p.close()


def _update_ffn_shapes(header: Header, layout: Layout) -> None:
    tensors = {t.name: t for t in header.tensors}
    for entry in header.layers:
        for f in layout.fields:
            tensors[entry.tensors[f.name]].shape[f.axis] = entry.neurons
    if isinstance(header.config, dict):
        # transformers needs one FFN size: exports pad smaller layers with zero neurons
        header.config[_ffn_size_key(header.architecture)] = max(e.neurons for e in header.layers)


def _log_growth(header: Header, record: dict[str, Any]) -> None:
    """Growth is recorded in the header's placement member (``spec/FORMAT.md`` 7.2)."""
    if header.placement is None:
        header.placement = {}
    header.placement.setdefault("growth", []).append(record)


def grow_layers(pkg: str | Package, n: int, *, progress: bool = False) -> dict[str, Any]:
    """Append ``n`` identity transformer blocks after the last one (function-preserving).

    Each new block copies the last block with its output projections zeroed; its neurons take
    the cells of the neurons they copy.  They form a new depth shell while the sphere has fewer
    than 10, else they join the surface shell.

    Returns
    -------
    dict
        ``{"layers": [new layer indices], "depth": shell id, "new_shell": bool}``.
    """
    if not isinstance(n, int) or n < 1:
        raise InputError(f"layers to add must be a positive integer, not {n!r}")
    p, own = _open(pkg)
    try:
        if p.graticule is None:
            raise InputError(f"{p.where}: the package has no sphere to grow")
        header = copy.deepcopy(p.header)
        layout, sl = p.layout, p.layout.slices()
        n_layers = len(p.layer_depth)
        last = n_layers - 1
        probe = layout.layers[last][layout.in_field]
        mark = f".{last}."
        if mark not in probe:
            raise FormatError(f"{p.where}: cannot find the layer number in tensor name {probe!r}")
        prefix = probe[: probe.index(mark) + 1]
        own_prefix = f"{prefix}{last}."

        def renamed(name: str, layer: int) -> str:
            return f"{prefix}{layer}." + name[len(own_prefix):]

        with p.transaction():  # all of it commits at once, or none of it
            new_layers = list(range(n_layers, n_layers + n))
            root = p.group
            # 1. core tensors of the new blocks (new arrays: invisible until the header names them)
            last_all = [t for t in header.tensors if t.name.startswith(own_prefix)]
            entries: list[TensorEntry] = []
            for layer in new_layers:
                for t in last_all:
                    name = renamed(t.name, layer)
                    entries.append(TensorEntry(name, t.dtype, list(t.shape), t.where))
                    if t.where != "core":
                        continue
                    src = p.array(core_key(t.name))
                    dst = root.create_array(core_key(name), shape=src.shape, dtype=src.dtype, chunks=src.chunks,
                                            compressors=src.compressors, fill_value=0, overwrite=True,
                                            config={"write_empty_chunks": True},
                                            attributes={"name": name, "dtype": t.dtype})
                    zero = t.name.endswith(OUTPUT_PROJECTIONS)
                    if src.shape:
                        dst[...] = np.zeros(src.shape, src.dtype) if zero else p.stored(t.name)
            # 2. neurons: the last layer's rows with the output field zeroed, in the same slots
            d_last = p.layer_depth[last]
            arr_last, index_last, _ = p.shell_arrays(d_last)
            t_last = p.shell_layers(d_last).index(last)
            k = p.slots(d_last)
            P, M = p.graticule
            rows = np.asarray(arr_last[t_last, :, :, :k])  # (P, M, K, F)
            out_cols = sl[layout.out_field]
            rows[..., out_cols] = 0
            idx = index_last[t_last]
            par = np.where(idx >= 0, idx, C.PADDING_INDEX).astype(np.int32)  # a copy's parent: its original
            new_shell = p.depth < C.MAX_DEPTH
            if new_shell:
                d = p.depth
                g = root.require_group(shell_path(d))
                shard = shard_shape(arr_last)
                narr = g.create_array(C.NEURONS_ARRAY, shape=(n, P, M, k, rows.shape[-1]), dtype=arr_last.dtype,
                                      chunks=(1, 1, 1, shard[3], rows.shape[-1]), shards=(n, 1, 1, shard[3], rows.shape[-1]),
                                      compressors=arr_last.compressors, fill_value=0, overwrite=True,
                                      config={"write_empty_chunks": False},
                                      dimension_names=("layer", "lat", "lon", "slot", "row"),
                                      attributes={"dtype": layout.dtype, "layers": new_layers})
                narr[...] = np.broadcast_to(rows, (n, *rows.shape))
                for name, data in ((C.INDEX_ARRAY, idx), (C.PARENT_ARRAY, par)):
                    ia = p.array(f"{shell_path(d_last)}/{name}")
                    g.create_array(name, shape=(n, P, M, k), dtype=C.INDEX_DTYPE, chunks=(n, P, M, k),
                                   compressors=ia.compressors, fill_value=C.PADDING_INDEX, overwrite=True,
                                   config={"write_empty_chunks": True}, dimension_names=("layer", "lat", "lon", "slot")
                                   )[...] = np.broadcast_to(data, (n, *data.shape))
                header.shells.append(Shell(d, list(new_layers), k))
                header.depth = d + 1
            else:  # D = 10: the surface shell grows along its layer axis (new layers, new objects)
                d = d_last
                ls = len(p.shell_layers(d))
                if arr_last.shape[0] < ls + n:
                    arr_last.resize((ls + n, *arr_last.shape[1:]))
                arr_last[ls:ls + n, :, :, :k] = np.broadcast_to(rows, (n, *rows.shape))
                for name, data in ((C.INDEX_ARRAY, idx), (C.PARENT_ARRAY, par)):
                    ia = p.array(f"{shell_path(d)}/{name}")
                    if ia.shape[0] < ls + n:
                        ia.resize((ls + n, *ia.shape[1:]))
                    ia[ls:ls + n, :, :, :k] = np.broadcast_to(data, (n, *data.shape))
                header.shell(d).layers.extend(new_layers)
            # 3. routers: a new layer's router starts as a copy of the last layer's (same cells)
            routers = root.get("router")
            if isinstance(routers, zarr.Group):
                for rname, grp in routers.groups():
                    for layer in new_layers:
                        lg = grp.require_group(str(layer))
                        last_group = grp[str(last)]
                        if not isinstance(last_group, zarr.Group):
                            raise FormatError(f"{p.where}: router/{rname}/{last} is not a group")
                        for key, a in last_group.arrays():
                            lg.create_array(key, shape=a.shape, dtype=a.dtype, chunks=a.chunks, compressors=a.compressors,
                                            overwrite=True)[...] = a[...]
                    grp.attrs["layers"] = n_layers + n
            # 4. the header, then commit
            pos = max(i for i, t in enumerate(header.tensors) if t.name.startswith(own_prefix)) + 1
            for layer in new_layers:
                tensors = {f: renamed(tn, layer) for f, tn in header.layers[last].tensors.items()}
                header.layers.append(LayerEntry(header.layers[last].neurons, tensors))
                header.layer_depth.append(d)
            header.tensors[pos:pos] = entries
            cfg = header.config
            if isinstance(cfg, dict):
                for key in ("n_layer", "num_hidden_layers"):
                    if isinstance(cfg.get(key), int):
                        cfg[key] += n
                for key, v in cfg.items():  # per-layer lists (e.g. layer_types) follow the last layer
                    if isinstance(v, list) and len(v) == n_layers:
                        cfg[key] = v + [copy.deepcopy(v[-1]) for _ in range(n)]
            _log_growth(header, {"op": "layers", "count": n, "depth": d})
            p.write_header(header)
        return {"layers": new_layers, "depth": d, "new_shell": new_shell}
    finally:
        if own:
            p.close()
