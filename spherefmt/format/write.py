"""Writing a package (``save``): a model's tensors placed on the sphere, chunked and compressed.

The pipeline streams the source tensor by tensor (bounded memory): side files, core tensors in
slabs of whole chunks, then each depth shell's experts, layer by layer.  Everything is written in
one transaction of the package store, so a conversion that stops leaves no package
(``spec/FORMAT.md`` section 10).  Where the neurons go is decided by
:mod:`spherefmt.format.placement` (``lightning-pca-balanced``), or handed in as a
:class:`~spherefmt.format.placement.PlacementPlan` computed above the format (co-activation
placement runs the model: :mod:`spherefmt.runtime.coactivation`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.sync import sync

from spherefmt import constants as C
from spherefmt.containers import create_container
from spherefmt.dtypes import TensorInfo, storage_dtype, to_float32
from spherefmt.errors import FormatError, InputError
from spherefmt.format.arch import Layout, detect, rows_from_tensors
from spherefmt.format.header import Header, new_header
from spherefmt.format.keys import core_key, file_key, shell_path
from spherefmt.format.placement import (
    Grid,
    PlacementPlan,
    assign,
    bend,
    check_grid,
    default_grid,
    expert_cells,
    expert_grid,
    own_directions,
    parse_graticule,
    tree_parents,
    tree_parents_projected,
)
from spherefmt.format.quant import blocks_width, dequantize, pad_fields, quantize_rows, storage_shape
from spherefmt.format.store import PackageStore
from spherefmt.interop.base import TensorSource, bounded_heap
from spherefmt.interop.experts import join_experts
from spherefmt.interop.fused import split_fused
from spherefmt.interop.registry import open_source
from spherefmt.progress import progress_bar

__all__ = ["save"]

def _compressors(codec: str, itemsize: int, chunk_bytes: int) -> list[Any]:
    """The codec chain after ``bytes`` (``spec/FORMAT.md`` section 6).  ``default`` is blosc
    (a core Zarr v3 codec every reader has: zarr-python, tensorstore, zarrs, zarrita.js) with
    zstd, byte shuffle and one block per chunk: the same bytes as shuffle + zstd over the
    whole chunk, decoded faster."""
    if codec == C.CODEC_NONE:
        return [Crc32cCodec()]
    blosc = BloscCodec(cname="zstd", clevel=C.ZSTD_LEVEL, shuffle="shuffle" if itemsize > 1 else "noshuffle",
                       typesize=itemsize, blocksize=max(1, min(chunk_bytes, C.BLOSC_MAX_BLOCK)))
    return [blosc, Crc32cCodec()]


def _core_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    if not shape:
        return ()
    row = max(1, math.prod(shape[1:]) * itemsize)
    return (max(1, min(shape[0], C.CORE_CHUNK_BYTES // row)), *(max(1, s) for s in shape[1:]))


_ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}  # -0.0 chunks must be stored: bit-exact, not fill


def save(
    src: Any,
    dst: Any,
    *,
    config: Mapping[str, Any] | None = None,
    graticule: str | tuple[int, int] | None = None,
    depth: int | None = None,
    codec: str = C.CODEC_DEFAULT,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
    vhd_size: int | None = None,
    placement: str | PlacementPlan = "pca",
    storage_options: dict[str, Any] | None = None,
    quantize: str | None = None,
) -> str:
    """Convert a model to a sphere package.

    Parameters
    ----------
    src
        A state dict (numpy arrays or torch tensors), a ``.safetensors`` file, a torch
        ``.pt``/``.bin`` file, a Hugging Face folder, or another package.
    dst
        Package location: a directory, a ``.zip`` path, an fsspec URL or a zarr ``Store``.
    config
        The model's ``config.json`` as a dict (overrides one found beside ``src``).
    graticule
        ``"PxM"``, ``"earth"`` or ``(P, M)``; default adapts to the model (``spec/FORMAT.md``).
    depth
        Number of depth shells, ``1..10``; default ``min(10, layers)``.
    codec
        ``"default"`` (shuffle + zstd + crc32c) or ``"none"`` (crc32c only).
    overwrite
        Replace a package already at ``dst``.  Anything that is not a package is never replaced.
    metadata
        Extra string-to-string metadata, merged over the source's.
    progress
        Show a progress bar.
    vhd_size
        Virtual size in bytes of a new ``.vhd`` package (default: the larger of 4 GiB and 8x
        the model's raw size; the file on disk is about the size of the content).
    placement
        ``"pca"`` (``lightning-pca-balanced``: cells from weight directions), or a
        :class:`~spherefmt.format.placement.PlacementPlan` made above the format (the
        co-activation plan of :func:`spherefmt.runtime.coactivation.coactivation_plan`, which
        :func:`spherefmt.save` makes for ``placement="coactivation"``).
    storage_options
        fsspec options when ``dst`` is a URL (``endpoint_url``, ``key``...).
    quantize
        ``"q8_0"``: store the sphere's neuron rows and the core's weight matrices (attention,
        embeddings, LM head; not norms, biases or MoE routers) as GGUF ``Q8_0`` blocks made by
        the ``gguf`` package's quantizer (``spec/FORMAT.md`` 5.1): 34 bytes per 32 values.
        ``"q4_k"``: the same as GGUF ``Q4_K`` blocks (144 bytes per 256 values, llama.cpp's
        reference quantizer), core matrices whose rows are not whole blocks of 256 as ``Q8_0``.
        The package's values are then the quantized ones (they read as float32).

    Returns
    -------
    str
        Where the package was written.

    Raises
    ------
    FormatError
        Malformed input, or parameters out of range.
    PackageExistsError
        ``dst`` is taken.

    Examples
    --------
    >>> import numpy as np, spherefmt
    >>> spherefmt.save({"w": np.ones(3, np.float32)}, "memory://doc-example")
    'memory://doc-example'
    """
    if codec not in C.CODEC_PRESETS:
        raise InputError(f"codec {codec!r}: expected one of {', '.join(C.CODEC_PRESETS)}")
    if isinstance(placement, PlacementPlan):
        plan: PlacementPlan | None = placement
    elif placement == "pca":
        plan = None
    else:
        raise InputError(f"placement {placement!r}: expected 'pca' or a PlacementPlan (spherefmt.save makes the "
                         "'coactivation' one)")
    with open_source(src) as source:
        if config is not None:
            source.config = dict(config)
        # a GGUF whose FFN is quantized blocks: its values go onto a sphere quantized again,
        # the rest of the file stays as it is (raw blocks, float tensors)
        requantize = getattr(source, "sphere_quantize", None) if quantize is None else None
        source = split_fused(source)  # Phi-3's fused projections, as their parts
        source = join_experts(source)  # a MoE layer's per-expert tensors, as one FFN
        infos = {name: source.info(name) for name in source.keys()}
        layout = detect(infos, source.config, source.where)
        if layout.warning:
            warnings.warn(layout.warning, stacklevel=3)  # the caller of spherefmt.save
        grid = None
        if layout.experts and plan is not None:
            raise InputError(f"{source.where}: native experts keep their own cells; a placement plan cannot move them")
        quantized: dict[str, str] = {}
        qtype: str | None = None
        values = None  # what the header lists when quantizing: quantized tensors read as float32
        if requantize is not None and layout.arch != C.ARCH_GENERIC:
            quantize = requantize
        if quantize is not None:
            qtype, quantized = _quantized_tensors(quantize, infos, layout, source.where)
            if requantize is not None:
                quantized = {}  # only the sphere: core tensors keep their own types
            layout = replace(layout, dtype="F32")
            values = {n: TensorInfo(n, "F32", i.shape) if n in quantized or n in layout.ffn_tensors() else i
                      for n, i in infos.items()}
        if layout.arch != C.ARCH_GENERIC:
            n_layers = len(layout.layers)
            auto = (expert_grid(layout.experts, n_layers) if layout.experts else
                    default_grid(max(layout.neurons), layout.row_width, C.DTYPES[layout.dtype][1], n_layers))
            if graticule is None:
                p, m = auto.parallels, auto.meridians
            elif isinstance(graticule, str):
                p, m = parse_graticule(graticule)
            else:
                p, m = (int(graticule[0]), int(graticule[1]))
            d = auto.depth if depth is None else int(depth)
            check_grid(p, m, d, n_layers)
            grid = Grid(p, m, d)
        elif graticule is not None or depth is not None:
            warnings.warn("graticule/depth ignored: the model has no sphere", stacklevel=3)
        dest = create_container(dst, overwrite=overwrite, vhd_size=vhd_size,
                                content_bytes=sum(i.nbytes for i in infos.values()), storage_options=storage_options)
        try:
            store = PackageStore(dest, "r+", new=True)
            with bounded_heap(), store.transaction():  # freed arrays go back to the system
                err = _write(source, infos, layout, grid, codec, store, metadata, progress, plan, values, quantized,
                             qtype)
                if requantize is not None and err is not None:
                    warnings.warn(f"{source.where}: the FFN's quantized blocks were quantized again onto the sphere as "
                                  f"{qtype} (ffn_down's blocks run along the neurons): relative RMS change of the "
                                  f"FFN weights {err}", stacklevel=3)
            dest.finish()  # the manifest committed above; this puts the package in place
        except BaseException:
            dest.abort()
            raise
        return dest.where


_ROUTER_SUFFIXES = (".block_sparse_moe.gate.weight", ".mlp.gate.weight", ".shared_expert_gate.weight",
                    ".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def _quantized_tensors(quantize: str, infos: Mapping[str, TensorInfo], layout: Layout, where: str
                       ) -> tuple[str, dict[str, str]]:
    """The type ``--quantize`` names and the core tensors it stores as blocks, each with its
    type: floating matrices whose rows are whole blocks, except MoE routers (llama.cpp keeps
    ``ffn_gate_inp`` unquantized too: a router's few rows decide which experts run).  Under
    ``q4_k`` a matrix whose rows are not whole blocks of 256 takes ``Q8_0`` (llama.cpp too falls
    back to another type for such rows)."""
    qtype = {t.lower(): t for t in C.QUANT_TYPES}.get(str(quantize).lower())
    if qtype is None:
        raise InputError(f"quantize {quantize!r}: expected one of {', '.join(t.lower() for t in C.QUANT_TYPES)}")
    if layout.arch == C.ARCH_GENERIC:
        raise InputError(f"{where}: only a model with a sphere (GPT-2 or Llama family) can be quantized")
    ffn = layout.ffn_tensors()
    out = {}
    for n, i in infos.items():
        if n in ffn or i.dtype not in C.SPHERE_DTYPES or len(i.shape) != 2 or n.endswith(_ROUTER_SUFFIXES):
            continue
        for t in (qtype, C.QUANT_Q8_0):
            if i.shape[1] % C.QUANT_TYPES[t][0] == 0:
                out[n] = t
                break
    return qtype, out


def _write(source: TensorSource, infos: Mapping[str, TensorInfo], layout: Layout, grid: Grid | None, codec: str,
           store: Any, metadata: Mapping[str, str] | None, progress: bool, plan: PlacementPlan | None = None,
           values: Mapping[str, TensorInfo] | None = None, quantized: Mapping[str, str] | None = None,
           qtype: str | None = None) -> str | None:
    """Write the package's objects; returns the relative RMS change of the neuron rows' values
    when the sphere is quantized (also recorded in the header's metadata)."""
    values = infos if values is None else values
    err: str | None = None
    quantized = quantized or {}
    header = new_header(layout=layout, grid=grid, infos=values, config=source.config,
                        metadata={**source.metadata, **(metadata or {})}, files=list(source.files), codec=codec,
                        placement=None if plan is None else dict(plan.record),
                        fused=getattr(source, "fused", None), joined=getattr(source, "joined", None))
    if qtype is not None:
        header.quantization = {"type": qtype, "core": sorted(quantized), "sphere": grid is not None,
                               "types": {n: t for n, t in quantized.items() if t != qtype}}
    root = zarr.open_group(store, mode="w", attributes={C.ROOT_ATTR: header.to_json()})
    total = sum(i.nbytes for i in infos.values())
    with progress_bar(total, "convert", progress) as bar:
        for name, blob in sorted(source.files.items()):
            arr = root.create_array(file_key(name), shape=(len(blob),), dtype="uint8", chunks=(max(1, len(blob)),),
                                    compressors=_compressors(codec, 1, len(blob)), fill_value=0, config=_ARRAY_CONFIG,
                                    attributes={"name": name})
            arr[...] = np.frombuffer(blob, dtype=np.uint8)
        ffn = layout.ffn_tensors()
        for name, info in infos.items():
            if name in ffn:
                continue
            q = quantized.get(name)
            st = np.dtype(np.uint8) if q else storage_dtype(info.dtype)
            shape = storage_shape(info.shape, q) if q else info.shape
            chunks = _core_chunks(shape, st.itemsize)
            arr = root.create_array(core_key(name), shape=shape, dtype=st, chunks=chunks,
                                    compressors=_compressors(codec, st.itemsize, math.prod(chunks) * st.itemsize),
                                    fill_value=0, config=_ARRAY_CONFIG,
                                    attributes={"name": name, "dtype": values[name].dtype,
                                                **({"quantized": q} if q else {})})
            if not info.shape or info.shape[0] == 0:
                data = source.read(name)
                _check_read(data, info, source.where)
                if data.size:
                    arr[...] = data
                bar.update(info.nbytes)
                continue
            # large tensors go in slabs of whole chunks, read by row range: memory stays bounded
            step = chunks[0] * C.CORE_SLAB_CHUNKS
            for start in range(0, info.shape[0], step):
                stop = min(start + step, info.shape[0])
                data = source.read_rows(name, start, stop)
                _check_read(data, TensorInfo(name, info.dtype, (stop - start, *info.shape[1:])), source.where)
                if q:
                    data = quantize_rows(to_float32(data, info.dtype), q).view(np.uint8)
                arr[start:stop] = data
                bar.update(data.nbytes)
        if grid is not None:
            change = _write_sphere(source, infos, layout, grid, codec, root, header, bar,
                                   None if plan is None else plan.cells, qtype=qtype)
            if change is not None:  # the values changed by quantizing (again): measured, recorded
                err = header.metadata["spherefmt.quantization_rel_rms"] = f"{change:.3e}"
    header.state = C.STATE_COMPLETE  # marked complete last: an interrupted write never looks done
    root.update_attributes({C.ROOT_ATTR: header.to_json()})
    return err


def _check_read(data: np.ndarray, info: TensorInfo, where: str) -> None:
    if data.shape != info.shape or data.dtype != storage_dtype(info.dtype):
        raise FormatError(f"{where}: tensor {info.name!r} read as {data.dtype}{list(data.shape)}, "
                          f"expected {info.dtype}{list(info.shape)}")


def _check_finite(values: np.ndarray, name: str, where: str) -> None:
    """Refuse an FFN tensor with a NaN or an infinity (a broken fine-tune, or block data whose
    type byte lies): placement's directions and trees are not defined on them.  The message
    names the tensor, the first bad index and how many there are."""
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), values.shape))
        raise InputError(f"{where}: FFN tensor {name!r} holds {int(bad.sum())} non-finite value(s), the first "
                         f"{values[first]} at index {list(first)}: placement needs finite weights (fix or drop "
                         f"them before converting)")


def _write_sphere(source: TensorSource, infos: Mapping[str, TensorInfo], layout: Layout, grid: Grid, codec: str,
                  root: zarr.Group, header: Header, bar: Any, cells_of: Mapping[int, np.ndarray] | None = None,
                  qtype: str | None = None) -> float | None:
    """The shells; with ``qtype`` the source rows are widened to float32 and each cell's
    rows stored as ``Q8_0`` or ``Q4_K`` blocks, every field padded to whole blocks (section 5.1).
    Returns, when quantizing, the relative RMS change of the neuron rows' values (over all)."""
    sq_err = sq_sum = 0.0
    quantized = qtype is not None
    p, m, cells = grid.parallels, grid.meridians, grid.cells
    st = storage_dtype(layout.dtype)
    f = layout.row_width
    widths = {fd.name: fd.width for fd in layout.fields}
    stored_st, stored_f = st, f
    if qtype is not None:
        stored_st, stored_f = np.dtype(np.uint8), storage_shape((1, blocks_width(widths, qtype)), qtype)[1]
    sl = layout.slices()
    prev_out: np.ndarray | None = None
    prev_dirs: np.ndarray | None = None  # set with prev_out, after the first layer
    projected: list[int] = []  # layers whose tree is version 2's projected one
    for shell in sorted(header.shells, key=lambda s: s.layers[0]):
        depth, layers, k = shell.depth, shell.layers, shell.capacity
        g = root.require_group(shell_path(depth))
        neurons = g.create_array(
            C.NEURONS_ARRAY, shape=(len(layers), p, m, k, stored_f), dtype=stored_st, chunks=(1, 1, 1, k, stored_f),
            shards=(len(layers), 1, 1, k, stored_f),
            compressors=_compressors(codec, stored_st.itemsize, k * stored_f * stored_st.itemsize),
            fill_value=0,
            # experts with no neurons (common on fine graticules) are not stored at all
            config={"write_empty_chunks": False}, dimension_names=("layer", "lat", "lon", "slot", "row"),
            attributes={"dtype": layout.dtype, "layers": layers, **({"quantized": qtype} if quantized else {})})
        index = np.full((len(layers), cells, k), C.PADDING_INDEX, dtype=np.int32)
        parent = np.full_like(index, C.PADDING_INDEX)
        for t, layer in enumerate(layers):
            tensors = {}
            # the tensors placement computes with (and, when quantizing, every one: a block's scale
            # is not defined over a NaN) must be finite; any other keeps its values bit for bit
            placed = {layout.layers[layer][f] for f in (layout.in_field, layout.out_field) if f in layout.layers[layer]}
            for name in layout.layers[layer].values():
                tensors[name] = source.read(name)
                _check_read(tensors[name], infos[name], source.where)
                if quantized or name in placed:
                    wide = to_float32(tensors[name], infos[name].dtype)
                    # (float64 checked as read: a finite value beyond float32's range is no error)
                    _check_finite(tensors[name] if infos[name].dtype == "F64" else wide, name, source.where)
                    if quantized:
                        tensors[name] = wide
                    del wide
            rows = rows_from_tensors(layout, tensors, layer)
            del tensors
            w_in = to_float32(rows[:, sl[layout.in_field]], layout.dtype)
            own = own_directions(w_in)
            if prev_out is None or prev_dirs is None:
                dirs, par = own, np.full(rows.shape[0], C.PADDING_INDEX, dtype=np.int32)
            else:
                if prev_out.shape[0] * w_in.shape[0] * w_in.shape[1] > C.TREE_EXACT_MAX_MACS:
                    # version 2: the exact tree grows with width cubed (GPT-2 XL: about half the
                    # conversion); pairs scored in a few principal directions, the best rescored
                    par = tree_parents_projected(prev_out, w_in, C.TREE_DIMS, C.TREE_CANDIDATES)
                    projected.append(layer)
                else:
                    par = tree_parents(prev_out, w_in)
                dirs = bend(own, prev_dirs[par], C.DEFAULT_BEND)
            # peak memory is a few copies of one layer's rows: drop each as soon as it is used
            del w_in
            prev_out = None
            prev_out = to_float32(rows[:, sl[layout.out_field]], layout.dtype)
            if cells_of is not None:
                cell = cells_of[layer]
            elif layout.experts:
                cell = expert_cells(dirs, layout.experts, p, m)
            else:
                cell = assign(dirs, p, m, capacity=k)
            order = np.lexsort((np.arange(rows.shape[0]), cell))  # by cell, then original index
            sorted_cells = cell[order]
            first = np.searchsorted(sorted_cells, np.arange(cells))
            slot = np.arange(rows.shape[0]) - first[sorted_cells]
            slot_of = np.empty_like(slot)
            slot_of[order] = slot  # each neuron's slot, in original order
            block = np.zeros((cells, k, f), dtype=st)
            block[cell, slot_of] = rows  # scattered in place (no sorted copy of the rows)
            rows_nbytes = rows.nbytes
            del rows
            index[t, sorted_cells, slot] = order
            parent[t, sorted_cells, slot] = par[order]
            if qtype is not None:  # zero padding rows quantize to zero bytes (scale 0, every q 0)
                padded = pad_fields(block, widths, qtype)
                del block
                q = quantize_rows(padded, qtype)
                sq_err += float(np.square(dequantize(q, qtype) - padded, dtype=np.float64).sum())
                sq_sum += float(np.square(padded, dtype=np.float64).sum())
                del padded
                block = q.view(np.uint8).reshape(cells, k, stored_f)
            # zarr drops chunks that compare equal to the fill value; a float chunk of -0.0 would
            # compare equal to 0 and come back as +0.0, so such layers keep every chunk.
            exact = block.dtype.kind != "f" or not np.signbit(block[block == 0]).any()
            target = neurons if exact else neurons.with_config(_ARRAY_CONFIG)
            occupied = np.unique(sorted_cells)
            if occupied.size == cells:
                target[t] = block.reshape(p, m, k, stored_f)
            else:  # sparse (fine graticules): touch only the occupied cells' shards
                _cells_io(target, t, occupied, m, block[occupied])
            del block
            prev_dirs = dirs
            bar.update(rows_nbytes)
        for name, data in ((C.INDEX_ARRAY, index), (C.PARENT_ARRAY, parent)):
            g.create_array(name, shape=(len(layers), p, m, k), dtype=C.INDEX_DTYPE, chunks=(len(layers), p, m, k),
                           compressors=_compressors(codec, 4, index.nbytes), fill_value=C.PADDING_INDEX,
                           config=_ARRAY_CONFIG,
                           dimension_names=("layer", "lat", "lon", "slot"))[...] = data.reshape(len(layers), p, m, k)
    if projected:  # the header says which trees are version 2's (written with the complete state)
        rec = dict(header.placement or {})
        if rec.get("policy") == C.PLACEMENT_POLICY:
            rec["version"] = C.PLACEMENT_VERSION_PROJECTED
        rec["tree"] = {"method": "projected", "dims": C.TREE_DIMS, "candidates": C.TREE_CANDIDATES,
                       "basis_rows": C.TREE_BASIS_ROWS, "layers": projected}
        header.placement = rec
    return None if qtype is None else float(np.sqrt(sq_err / sq_sum)) if sq_sum > 0 else 0.0


def _cells_io(arr: zarr.Array, t: int, cells: np.ndarray, m: int, blocks: np.ndarray) -> None:
    """Write ``blocks`` into layer ``t`` of the given flat cells, concurrently in one event-loop
    round: zarr handles each cell's shard independently."""
    import asyncio

    aa = arr.async_array

    async def run() -> None:
        await asyncio.gather(*(aa.setitem((t, int(c) // m, int(c) % m), b) for c, b in zip(cells, blocks, strict=True)))

    sync(run())

