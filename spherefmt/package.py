"""Packages: writing (``save``) and reading (``open``) the sphere format of ``spec/FORMAT.md``."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import Shuffle
from zarr.core.sync import sync

from . import constants as C
from .arch import Field, Layout, detect, rows_from_tensors
from .dtypes import _contig, numpy_view, storage_dtype, to_float32, to_torch
from .containers import create_container
from .errors import ExpertNotFoundError, FormatError, IntegrityError, ReadOnlyError, SpherefmtError
from .fastpath import ChunkError, FastArray, open_arrays, parallel_map, read_many
from .placement import (
    Grid,
    assign,
    bend,
    check_grid,
    default_grid,
    layer_shells,
    own_directions,
    parse_graticule,
    tree_parents,
)
from .safetensors_io import TensorInfo, check_dtype, check_shape
from .sources import TensorSource, open_source
from .store import PackageStore, open_package_store, root_attrs

__all__ = ["Expert", "Package", "PackageSource", "is_package", "open", "save"]

# numcodecs.shuffle is a numcodecs codec registered with zarr, readable by any zarr-python;
# zarr warns that other implementations may lack it, which we document in the spec instead.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)


def core_key(name: str) -> str:
    """Zarr path of a core tensor: the name percent-encoded so it is one safe node name."""
    q = quote(name, safe="._-")
    if q.startswith((".", "__")):  # '.', '..' and '__*' are not valid zarr node names
        q = f"%{ord(q[0]):02X}{q[1:]}"
    return f"{C.CORE_GROUP}/{q}"


def file_key(name: str) -> str:
    return "files/" + core_key(name).split("/", 1)[1]


def shell_path(depth: int) -> str:
    return f"{C.SPHERE_GROUP}/{C.SHELL_GROUP_FMT.format(depth=depth)}"


def _compressors(codec: str, itemsize: int) -> list[Any]:
    if codec == C.CODEC_NONE:
        return [Crc32cCodec()]
    chain: list[Any] = [Shuffle(elementsize=itemsize)] if itemsize > 1 else []
    return [*chain, ZstdCodec(level=C.ZSTD_LEVEL), Crc32cCodec()]


def _core_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    if not shape:
        return ()
    row = max(1, math.prod(shape[1:]) * itemsize)
    return (max(1, min(shape[0], C.CORE_CHUNK_BYTES // row)), *(max(1, s) for s in shape[1:]))


_ARRAY_CONFIG = {"write_empty_chunks": True}  # -0.0 chunks must be stored: bit-exact, not fill


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


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
    placement: str = "pca",
    sample: Any = None,
    storage_options: dict[str, Any] | None = None,
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
        ``"pca"`` (``lightning-pca-balanced``: cells from weight directions) or
        ``"coactivation"`` (``coactivation-balanced``: neurons active together on ``sample``
        share cells, which is what top-k routing needs; ``spec/FORMAT.md`` 7.1).
    sample
        Text (``str``, tokenized with the model's tokenizer) or token ids for ``"coactivation"``.
    storage_options
        fsspec options when ``dst`` is a URL (``endpoint_url``, ``key``...).

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
        raise FormatError(f"codec {codec!r}: expected one of {', '.join(C.CODEC_PRESETS)}")
    if placement not in ("pca", "coactivation"):
        raise FormatError(f"placement {placement!r}: expected pca or coactivation")
    plan = None
    if placement == "coactivation":
        plan = _coactivation_plan(src, config, graticule, depth, sample)
    with open_source(src) as source:
        if config is not None:
            source.config = dict(config)
        infos = {name: source.info(name) for name in source.keys()}
        layout = detect(infos, source.config, source.where)
        if layout.warning:
            warnings.warn(layout.warning, stacklevel=2)
        grid = None
        if layout.arch != C.ARCH_GENERIC:
            n_layers = len(layout.layers)
            auto = default_grid(max(layout.neurons), layout.row_width, C.DTYPES[layout.dtype][1], n_layers)
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
            warnings.warn("graticule/depth ignored: the model has no sphere", stacklevel=2)
        dest = create_container(dst, overwrite=overwrite, vhd_size=vhd_size,
                                content_bytes=sum(i.nbytes for i in infos.values()), storage_options=storage_options)
        try:
            from .sources import bounded_heap

            store = PackageStore(dest, "r+", new=True)
            with bounded_heap(), store.transaction():  # freed arrays go back to the system
                _write(source, infos, layout, grid, codec, store, metadata, progress, plan)
            dest.finish()  # the manifest committed above; this puts the package in place
        except BaseException:
            dest.abort()
            raise
        return dest.where


def _header(source: TensorSource, infos: Mapping[str, TensorInfo], layout: Layout, grid: Grid | None,
            codec: str, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    ffn = layout.ffn_tensors()
    h: dict[str, Any] = {
        "format": C.FORMAT_NAME,
        "version": C.FORMAT_VERSION,
        "state": C.STATE_WRITING,
        "architecture": layout.arch,
        "config": source.config,
        "metadata": {**source.metadata, **(metadata or {})},
        "files": sorted(source.files),
        "codec": codec,
        "tensors": [
            {"name": n, "dtype": i.dtype, "shape": list(i.shape), "where": "sphere" if n in ffn else "core"}
            for n, i in infos.items()
        ],
        "warning": layout.warning,
    }
    if grid is not None:
        shells = layer_shells(len(layout.layers), grid.depth)
        h.update({
            "graticule": [grid.parallels, grid.meridians],
            "depth": grid.depth,
            "layer_depth": shells,
            "shells": [
                {"depth": s, "layers": [lay for lay, sh in enumerate(shells) if sh == s],
                 "capacity": math.ceil(max(n for n, sh in zip(layout.neurons, shells, strict=True) if sh == s)
                                       / grid.cells)}
                for s in range(grid.depth)
            ],
            "neuron_layout": {"dtype": layout.dtype, "row_width": layout.row_width,
                              "fields": [f.to_json() for f in layout.fields],
                              "in_field": layout.in_field, "out_field": layout.out_field},
            "layers": [{"neurons": n, "tensors": t} for n, t in zip(layout.neurons, layout.layers, strict=True)],
            "placement": {"policy": C.PLACEMENT_POLICY, "version": C.PLACEMENT_VERSION, "bend": C.DEFAULT_BEND},
        })
    return h


def _coactivation_plan(src: Any, config: Any, graticule: Any, depth: Any, sample: Any) -> dict[str, Any]:
    """Cells per layer for ``coactivation-balanced``: the model is first placed by PCA in memory,
    run densely on the sample to get each layer's FFN inputs, and each layer's neurons clustered
    by their activation profiles."""
    import hashlib
    import uuid

    from .placement import coactivation_cells
    from .routers import _ffn_inputs, ffn_activations
    from .runtime.tokenizer import load_tokenizer

    if sample is None:
        raise FormatError("coactivation placement needs sample text or token ids")
    tmp = save(src, f"memory://spherefmt-coact-{uuid.uuid4().hex}", config=config, graticule=graticule,
               depth=depth, codec=C.CODEC_NONE)
    pkg = open(tmp)
    try:
        if pkg.graticule is None:
            raise FormatError(f"{pkg.where}: coactivation placement needs a GPT-2 or Llama model")
        if isinstance(sample, str):
            ids = np.asarray(load_tokenizer(pkg).encode(sample), dtype=np.int64)
        else:
            ids = np.asarray(sample, dtype=np.int64).reshape(-1)
        ids = ids[:8192]
        if len(ids) < 64:
            raise FormatError(f"coactivation placement needs at least 64 sample tokens, got {len(ids)}")
        ctx = int((pkg.config or {}).get("n_positions") or (pkg.config or {}).get("max_position_embeddings") or 1024)
        xs = _ffn_inputs(pkg, ids, min(ctx, 256))
        p, m = pkg.graticule
        sl = pkg._layout.slices()
        cells = {}
        for layer, x in enumerate(xs):
            rows = to_float32(pkg.layer_rows(layer), pkg._layout.dtype)
            act = ffn_activations(pkg.architecture, x, rows, sl)
            # a neuron's weight on a token: how much it moves the output, |activation| * |w_out row|
            act = np.abs(act) * np.linalg.norm(rows[:, sl[pkg._layout.out_field or pkg._layout.fields[-1].name]], axis=1)
            cap = pkg._shells[pkg.layer_depth[layer]]["capacity"]
            cells[layer] = coactivation_cells(act, own_directions(rows[:, sl[pkg._layout.fields[0].name]]), p, m, cap)
        record = {"policy": C.PLACEMENT_COACTIVATION, "version": 1, "sample_tokens": len(ids),
                  "sample_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()}
        return {"cells": cells, "placement": record}
    finally:
        pkg.close()
        import fsspec

        fsspec.filesystem("memory").rm(tmp.removeprefix("memory://"), recursive=True)


def _write(source: TensorSource, infos: Mapping[str, TensorInfo], layout: Layout, grid: Grid | None, codec: str,
           store: Any, metadata: Mapping[str, str] | None, progress: bool, plan: dict[str, Any] | None = None) -> None:
    header = _header(source, infos, layout, grid, codec, metadata)
    if plan is not None and grid is not None:
        header["placement"] = plan["placement"]
    root = zarr.open_group(store, mode="w", attributes={C.ROOT_ATTR: header})
    total = sum(i.nbytes for i in infos.values())
    with _progress(total, "convert", progress) as bar:
        for name, blob in sorted(source.files.items()):
            arr = root.create_array(file_key(name), shape=(len(blob),), dtype="uint8", chunks=(max(1, len(blob)),),
                                    compressors=_compressors(codec, 1), fill_value=0, config=_ARRAY_CONFIG,
                                    attributes={"name": name})
            arr[...] = np.frombuffer(blob, dtype=np.uint8)
        ffn = layout.ffn_tensors()
        for name, info in infos.items():
            if name in ffn:
                continue
            st = storage_dtype(info.dtype)
            chunks = _core_chunks(info.shape, st.itemsize)
            arr = root.create_array(core_key(name), shape=info.shape, dtype=st, chunks=chunks,
                                    compressors=_compressors(codec, st.itemsize), fill_value=0, config=_ARRAY_CONFIG,
                                    attributes={"name": name, "dtype": info.dtype})
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
                arr[start:stop] = data
                bar.update(data.nbytes)
        if grid is not None:
            _write_sphere(source, infos, layout, grid, codec, root, header, bar, None if plan is None else plan["cells"])
    header["state"] = C.STATE_COMPLETE  # marked complete last: an interrupted write never looks done
    root.update_attributes({C.ROOT_ATTR: header})


def _check_read(data: np.ndarray, info: TensorInfo, where: str) -> None:
    if data.shape != info.shape or data.dtype != storage_dtype(info.dtype):
        raise FormatError(f"{where}: tensor {info.name!r} read as {data.dtype}{list(data.shape)}, "
                          f"expected {info.dtype}{list(info.shape)}")


def _write_sphere(source: TensorSource, infos: Mapping[str, TensorInfo], layout: Layout, grid: Grid, codec: str,
                  root: zarr.Group, header: dict[str, Any], bar: Any, cells_of: dict[int, np.ndarray] | None = None
                  ) -> None:
    p, m, cells = grid.parallels, grid.meridians, grid.cells
    st = storage_dtype(layout.dtype)
    f = layout.row_width
    sl = layout.slices()
    prev_out = prev_dirs = None
    for shell in sorted(header["shells"], key=lambda s: s["layers"][0]):
        depth, layers, k = shell["depth"], shell["layers"], shell["capacity"]
        g = root.require_group(shell_path(depth))
        neurons = g.create_array(
            C.NEURONS_ARRAY, shape=(len(layers), p, m, k, f), dtype=st, chunks=(1, 1, 1, k, f),
            shards=(len(layers), 1, 1, k, f), compressors=_compressors(codec, st.itemsize), fill_value=0,
            # experts with no neurons (common on fine graticules) are not stored at all
            config={"write_empty_chunks": False}, dimension_names=("layer", "lat", "lon", "slot", "row"),
            attributes={"dtype": layout.dtype, "layers": layers})
        index = np.full((len(layers), cells, k), C.PADDING_INDEX, dtype=np.int32)
        parent = np.full_like(index, C.PADDING_INDEX)
        for t, layer in enumerate(layers):
            tensors = {}
            for name in layout.layers[layer].values():
                tensors[name] = source.read(name)
                _check_read(tensors[name], infos[name], source.where)
            rows = rows_from_tensors(layout, tensors, layer)
            del tensors
            w_in = to_float32(rows[:, sl[layout.in_field]], layout.dtype)
            own = own_directions(w_in)
            if prev_out is None:
                dirs, par = own, np.full(rows.shape[0], C.PADDING_INDEX, dtype=np.int32)
            else:
                par = tree_parents(prev_out, w_in)
                dirs = bend(own, prev_dirs[par], C.DEFAULT_BEND)
            # peak memory is a few copies of one layer's rows: drop each as soon as it is used
            del w_in
            prev_out = None
            prev_out = to_float32(rows[:, sl[layout.out_field]], layout.dtype)
            cell = assign(dirs, p, m, capacity=k) if cells_of is None else cells_of[layer]
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
            # zarr drops chunks that compare equal to the fill value; a float chunk of -0.0 would
            # compare equal to 0 and come back as +0.0, so such layers keep every chunk.
            exact = st.kind != "f" or not np.signbit(block[block == 0]).any()
            target = neurons if exact else neurons.with_config(_ARRAY_CONFIG)
            occupied = np.unique(sorted_cells)
            if occupied.size == cells:
                target[t] = block.reshape(p, m, k, f)
            else:  # sparse (fine graticules): touch only the occupied cells' shards
                _cells_io(target, t, occupied, m, block[occupied])
            del block
            prev_dirs = dirs
            bar.update(rows_nbytes)
        for name, data in ((C.INDEX_ARRAY, index), (C.PARENT_ARRAY, parent)):
            g.create_array(name, shape=(len(layers), p, m, k), dtype=C.INDEX_DTYPE, chunks=(len(layers), p, m, k),
                           compressors=_compressors(codec, 4), fill_value=C.PADDING_INDEX, config=_ARRAY_CONFIG,
                           dimension_names=("layer", "lat", "lon", "slot"))[...] = data.reshape(len(layers), p, m, k)


def _shard_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The shard shape of a sharded array (its chunk shape when not sharded)."""
    return tuple(arr.metadata.chunk_grid.chunk_shape)


def _cells_io(arr: zarr.Array, t: int, cells: np.ndarray, m: int, blocks: np.ndarray) -> None:
    """Write ``blocks`` into layer ``t`` of the given flat cells, concurrently in one event-loop
    round: zarr handles each cell's shard independently."""
    import asyncio

    aa = arr.async_array

    async def run() -> None:
        await asyncio.gather(*(aa.setitem((t, int(c) // m, int(c) % m), b) for c, b in zip(cells, blocks, strict=True)))

    sync(run())


# --------------------------------------------------------------------------------------------
# Reading


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(h: Mapping[str, Any], key: str, typ: type, where: str) -> Any:
    v = h.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError(f"{where}: package header field {key!r} is missing or malformed")
    return v


def _ints(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(_is_int(x) for x in v)


def _validate_header(attrs: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Check the root header of an untrusted package (``spec/FORMAT.md`` section 3); return it."""
    h = (attrs or {}).get(C.ROOT_ATTR) if isinstance(attrs, Mapping) else None
    if not isinstance(h, dict) or h.get("format") != C.FORMAT_NAME:
        raise FormatError(f"{where}: not a spherefmt package (no '{C.ROOT_ATTR}' root attribute)")
    version = _get(h, "version", int, where)
    if version > C.FORMAT_VERSION:
        raise FormatError(f"{where}: package format version {version} is newer than this spherefmt supports "
                          f"({C.FORMAT_VERSION}); upgrade spherefmt")
    if version not in C.SUPPORTED_VERSIONS:
        raise FormatError(f"{where}: package format version {version} is not supported")
    if h.get("state") != C.STATE_COMPLETE:
        raise FormatError(f"{where}: package is incomplete (state {str(h.get('state'))[:20]!r}): "
                          "its conversion was interrupted")
    arch = _get(h, "architecture", str, where)
    if arch not in C.ARCHITECTURES:
        raise FormatError(f"{where}: unknown architecture {arch[:40]!r}")
    if _get(h, "codec", str, where) not in C.CODEC_PRESETS:
        raise FormatError(f"{where}: unknown codec preset {h['codec'][:40]!r}")
    if h.get("config") is not None and not isinstance(h["config"], dict):
        raise FormatError(f"{where}: config must be an object or null")
    files = h.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise FormatError(f"{where}: files must be a list of names")
    seen: set[str] = set()
    for t in _get(h, "tensors", list, where):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"] or t["name"] in seen:
            raise FormatError(f"{where}: malformed or duplicate tensor entry")
        seen.add(t["name"])
        check_dtype(t.get("dtype"), f"{where}: tensor {t['name'][:80]!r}")
        t["shape"] = list(check_shape(t.get("shape"), f"{where}: tensor {t['name'][:80]!r}"))
        if t.get("where") not in ("core", "sphere"):
            raise FormatError(f"{where}: tensor {t['name'][:80]!r} has no valid 'where'")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in _get(h, "metadata", dict, where).items()):
        raise FormatError(f"{where}: metadata must map strings to strings")
    if arch == C.ARCH_GENERIC:
        if any(t["where"] == "sphere" for t in h["tensors"]):
            raise FormatError(f"{where}: a generic package cannot hold sphere tensors")
        return h
    if not _ints(h.get("graticule"), 2):
        raise FormatError(f"{where}: graticule must be two integers")
    p, m = h["graticule"]
    d = _get(h, "depth", int, where)
    try:
        check_grid(p, m, d)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    layers = _get(h, "layers", list, where)
    ld = h.get("layer_depth")
    if not _ints(ld, len(layers)) or not all(0 <= x < d for x in ld):
        raise FormatError(f"{where}: layer_depth must give a shell 0..{d - 1} for each of {len(layers)} layers")
    nl = _get(h, "neuron_layout", dict, where)
    check_dtype(nl.get("dtype"), f"{where}: neuron_layout")
    if nl["dtype"] not in C.SPHERE_DTYPES:
        raise FormatError(f"{where}: neuron_layout dtype {nl['dtype']} cannot be on the sphere")
    fields = nl.get("fields")
    if not isinstance(fields, list) or not fields:
        raise FormatError(f"{where}: neuron_layout.fields malformed")
    for fd in fields:
        if not (isinstance(fd, dict) and isinstance(fd.get("name"), str) and _is_int(fd.get("width"))
                and _is_int(fd.get("axis")) and fd["width"] >= 0 and 0 <= fd["axis"] < C.MAX_NDIM):
            raise FormatError(f"{where}: neuron_layout field {str(fd)[:80]} malformed")
    names = [fd["name"] for fd in fields]
    if len(set(names)) != len(names) or nl.get("in_field") not in names or nl.get("out_field") not in names:
        raise FormatError(f"{where}: neuron_layout field names are duplicated or in/out fields unknown")
    if sum(fd["width"] for fd in fields) != nl.get("row_width") or not _is_int(nl.get("row_width")):
        raise FormatError(f"{where}: neuron_layout.row_width disagrees with its fields")
    tensors = {t["name"]: t for t in h["tensors"]}
    owned: set[str] = set()
    for i, layer in enumerate(layers):
        lt = layer.get("tensors") if isinstance(layer, dict) else None
        if not (isinstance(layer, dict) and _is_int(layer.get("neurons")) and layer["neurons"] >= 1
                and isinstance(lt, dict) and set(lt) == set(names) and all(isinstance(v, str) for v in lt.values())):
            raise FormatError(f"{where}: layer {i} entry malformed")
        for fd in fields:
            t = tensors.get(lt[fd["name"]])
            if t is None or t["where"] != "sphere" or t["name"] in owned or t["dtype"] != nl["dtype"]:
                raise FormatError(f"{where}: layer {i} field {fd['name']!r} names a missing, shared or mistyped tensor")
            owned.add(t["name"])
            shp = t["shape"]
            if fd["axis"] >= len(shp) or shp[fd["axis"]] != layer["neurons"] \
                    or math.prod(shp) != layer["neurons"] * fd["width"]:
                raise FormatError(f"{where}: layer {i} tensor {t['name'][:80]!r} shape {shp} disagrees with its field")
    if owned != {t["name"] for t in h["tensors"] if t["where"] == "sphere"}:
        raise FormatError(f"{where}: some sphere tensors belong to no layer")
    shells = _get(h, "shells", list, where)
    if len(shells) != d or not all(isinstance(s, dict) and _is_int(s.get("depth")) for s in shells) \
            or sorted(s["depth"] for s in shells) != list(range(d)):
        raise FormatError(f"{where}: shells must list depths 0..{d - 1} once each")
    for s in shells:
        want = [i for i, x in enumerate(ld) if x == s["depth"]]
        if s.get("layers") != want or not want or not _is_int(s.get("capacity")) or s["capacity"] < 1 \
                or s["capacity"] * p * m < max(layers[i]["neurons"] for i in want):
            raise FormatError(f"{where}: shell {s['depth']} disagrees with layer_depth or is too small")
    return h


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


def _consistent(fn: Any) -> Any:
    """Run a read method under :meth:`Package.consistent` (re-read when a writer committed)."""

    @functools.wraps(fn)
    def run(self: Package, *args: Any, **kwargs: Any) -> Any:
        return self.consistent(fn, self, *args, **kwargs)

    return run


class Package:
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
        store = self._store
        self._header = _validate_header(root_attrs(store), self.where)
        if store.manifest is None and self._header["version"] >= 2:
            raise FormatError(f"{self.where}: package is incomplete (version {self._header['version']} "
                              "without a manifest): its conversion was interrupted")
        try:
            self._group = zarr.open_group(store, mode="r" if self.mode == "r" else "r+")
        except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
            raise FormatError(f"{self.where}: not a readable Zarr v3 group ({type(e).__name__}: {str(e)[:160]})") \
                from None
        self._tensors = {t["name"]: t for t in self._header["tensors"]}
        self._arrays: dict[str, zarr.Array] = {}
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows_cache: tuple[int, dict[str, np.ndarray]] | None = None
        self._shell_cache: tuple[int, dict[int, list[np.ndarray | None]]] | None = None
        self._inner_index: dict[str, np.ndarray] = {}  # shard key -> its index (cell_layer reads)
        if self.architecture != C.ARCH_GENERIC:
            h = self._header
            self._fields = [Field(f["name"], f.get("suffix", ""), f["axis"], f["width"]) for f in h["neuron_layout"]["fields"]]
            self._layout = Layout(arch=self.architecture, dtype=h["neuron_layout"]["dtype"], fields=self._fields,
                                  layers=[lay["tensors"] for lay in h["layers"]],
                                  neurons=[lay["neurons"] for lay in h["layers"]],
                                  in_field=h["neuron_layout"]["in_field"], out_field=h["neuron_layout"]["out_field"])
            self._owner = {tn: (i, fn) for i, lay in enumerate(h["layers"]) for fn, tn in lay["tensors"].items()}
            self._shells = {s["depth"]: s for s in h["shells"]}

    @property
    def generation(self) -> int | None:
        """The manifest generation this view of the package reads (``None`` for version 1)."""
        return self._store.generation

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
        outer = self._store._txn is None
        try:
            with self._store.transaction():
                if outer and self._store.upgrading:  # a version-1 package gets its manifest now
                    header = copy.deepcopy(self._header)
                    header["version"] = C.FORMAT_VERSION
                    self._group.update_attributes({C.ROOT_ATTR: header})
                yield self
        finally:
            if outer:
                self._load()

    def _commit_header(self, header: dict[str, Any]) -> None:
        """Write a new header inside the current transaction (growth); it is read back when the
        transaction ends."""
        if self._store._txn is None:
            raise ReadOnlyError(f"{self.where}: a header is written inside a transaction")
        self._group.update_attributes({C.ROOT_ATTR: {**header, "version": C.FORMAT_VERSION}})

    # --- header views ---------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the package header (``spec/FORMAT.md`` section 3)."""
        import copy

        return copy.deepcopy(self._header)

    @property
    def architecture(self) -> str:
        return self._header["architecture"]

    @property
    def graticule(self) -> tuple[int, int] | None:
        g = self._header.get("graticule")
        return (g[0], g[1]) if g else None

    @property
    def depth(self) -> int:
        return int(self._header.get("depth") or 0)

    @property
    def layer_depth(self) -> list[int]:
        return list(self._header.get("layer_depth") or [])

    @property
    def config(self) -> dict[str, Any] | None:
        return self._header.get("config")

    def keys(self) -> list[str]:
        """Tensor names in the source's order."""
        return list(self._tensors)

    def tensor_info(self, name: str, *, padded: bool = False) -> TensorInfo:
        """Name, dtype and shape of a tensor; ``padded``: as exported (see :meth:`tensor`)."""
        t = self._entry(name)
        shape = list(t["shape"])
        if padded and (pad := self._pad_axis(name)) is not None:
            shape[pad[0]] = pad[1]
        return TensorInfo(name, t["dtype"], tuple(shape))

    def ffn_size(self) -> int | None:
        """The largest layer's neuron count (``None`` without a sphere): what exports pad to."""
        return max(self._layout.neurons) if self.graticule is not None else None

    def _pad_axis(self, name: str) -> tuple[int, int] | None:
        """``(axis, size)`` when an FFN tensor has fewer neurons than the largest layer (after
        growth); exports pad it with zero neurons, which compute nothing."""
        owner = getattr(self, "_owner", {}).get(name)
        if owner is None:
            return None
        layer, field = owner
        size = self.ffn_size()
        if size is None or self._layout.neurons[layer] == size:
            return None
        return next(f.axis for f in self._layout.fields if f.name == field), size

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
    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            try:
                arr = self._group[path]
            except SpherefmtError:
                raise  # a damaged or missing metadata object, named by the store
            except KeyError:
                if sync(self._group.store.exists(f"{path}/zarr.json")):
                    raise FormatError(f"{self.where}: array {path!r} has malformed metadata") from None
                raise FormatError(f"{self.where}: array {path!r} is missing") from None
            except (ValueError, TypeError) as e:
                raise FormatError(f"{self.where}: array {path!r} has malformed metadata ({str(e)[:120]})") from None
            if not isinstance(arr, zarr.Array):
                raise FormatError(f"{self.where}: {path!r} is not an array")
            self._arrays[path] = arr
        return arr

    def _read(self, arr: zarr.Array, sel: Any, what: str) -> np.ndarray:
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

    def _entry(self, name: str) -> dict[str, Any]:
        t = self._tensors.get(name)
        if t is None:
            raise ExpertNotFoundError(f"{self.where}: no tensor {name!r}")
        return t

    def _shell_arrays(self, depth: int) -> tuple[zarr.Array, np.ndarray, np.ndarray]:
        """The shell's ``neurons`` array and its ``index``/``parent`` (cut to the header's extent).

        The arrays MAY be larger than the header says along the layer and slot axes: growth
        (:mod:`spherefmt.grow`) resizes them before it rewrites the header, and a package whose
        growth was interrupted between the two must still read exactly as before."""
        s = self._shells[depth]
        p, m = self.graticule  # type: ignore[misc]
        shape = (len(s["layers"]), p, m, s["capacity"])
        f = self._header["neuron_layout"]["row_width"]
        neurons = self._array(f"{shell_path(depth)}/{C.NEURONS_ARRAY}")
        ns = neurons.shape
        if (len(ns) != 5 or ns[0] < shape[0] or ns[1:3] != (p, m) or ns[3] < shape[3] or ns[4] != f
                or neurons.dtype != storage_dtype(self._layout.dtype)):
            raise FormatError(f"{self.where}: {shell_path(depth)}/neurons is {neurons.dtype}{ns}, "
                              f"header says {(*shape, f)}")
        if depth not in self._index:
            pair = []
            for name in (C.INDEX_ARRAY, C.PARENT_ARRAY):
                arr = self._array(f"{shell_path(depth)}/{name}")
                if arr.shape[:1] + arr.shape[3:] != ns[:1] + ns[3:4] or arr.shape[1:3] != (p, m) or arr.dtype != np.int32:
                    raise FormatError(f"{self.where}: {shell_path(depth)}/{name} is {arr.dtype}{arr.shape}, want int32{shape}")
                sel: Any = Ellipsis if arr.shape == shape else (slice(0, shape[0]), slice(None), slice(None), slice(0, shape[3]))
                pair.append(self._read(arr, sel, f"{shell_path(depth)}/{name}"))
            for t, layer in enumerate(s["layers"]):
                # neurons numbered past the layer's count were written by a growth that has not
                # committed its header (spherefmt.grow): they are padding until it does
                beyond = pair[0][t] >= self._layout.neurons[layer]
                if beyond.any():
                    pair[0][t][beyond] = C.PADDING_INDEX
                    pair[1][t][beyond] = C.PADDING_INDEX
            self._check_index(depth, pair[0])
            self._index[depth] = (pair[0], pair[1])
        return neurons, *self._index[depth]

    def _slots(self, depth: int) -> int:
        """``K``: neuron slots per cell of a shell (the header's capacity)."""
        return int(self._shells[depth]["capacity"])

    def _single_object(self, neurons: zarr.Array, depth: int) -> bool:
        """True when every expert of the shell is one storage object (one shard spans the
        shell's layers and slots): the case before any growth."""
        s = self._shells[depth]
        shard = _shard_shape(neurons)
        return neurons.shape[0] == shard[0] == len(s["layers"]) and neurons.shape[3] == shard[3] == s["capacity"]

    def expert_keys(self, lat: int, lon: int, depth: int) -> list[str]:
        """Every storage key of expert ``(lat, lon, depth)``: one object, or after growth one per
        block of layers and of slots (absent objects are all padding)."""
        self._check_address(lat, lon, depth)
        neurons = self._array(f"{shell_path(depth)}/{C.NEURONS_ARRAY}")
        shard = _shard_shape(neurons)
        s = self._shells[depth]
        return [f"{shell_path(depth)}/{C.NEURONS_ARRAY}/c/{a}/{lat}/{lon}/{b}/0"
                for a in range(math.ceil(len(s["layers"]) / shard[0])) for b in range(math.ceil(s["capacity"] / shard[3]))]

    def _check_index(self, depth: int, index: np.ndarray) -> None:
        for t, layer in enumerate(self._shells[depth]["layers"]):
            n = self._layout.neurons[layer]
            real = index[t][index[t] >= 0]
            if real.size != n or (real >= n).any() or np.unique(real).size != n:
                raise FormatError(f"{self.where}: {shell_path(depth)}/index layer {layer} is not a permutation of {n} neurons")
            if (index[t] < C.PADDING_INDEX).any():
                raise FormatError(f"{self.where}: {shell_path(depth)}/index has values below -1")

    def _check_address(self, lat: int, lon: int, depth: int) -> None:
        g = self.graticule
        if g is None:
            raise ExpertNotFoundError(f"{self.where}: package has no sphere (architecture {self.architecture})")
        if not (0 <= lat < g[0] and 0 <= lon < g[1] and 0 <= depth < self.depth):
            raise ExpertNotFoundError(f"{self.where}: no expert ({lat}, {lon}, {depth}) in a {g[0]}x{g[1]}x{self.depth} sphere")

    # --- reading --------------------------------------------------------------------------
    @_consistent
    def expert(self, lat: int, lon: int, depth: int, *, layer: int | None = None) -> Expert:
        """Read expert ``(lat, lon, depth)`` (one storage object), or one layer of it.

        Raises
        ------
        ExpertNotFoundError
            The address is outside the sphere, or ``layer`` is not in this depth shell.
        """
        self._check_address(lat, lon, depth)
        neurons, index, parent = self._shell_arrays(depth)
        layers = tuple(self._shells[depth]["layers"])
        k = self._slots(depth)
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
            rows = self._read(neurons, (sel, lat, lon, slice(0, k)), what)
        return Expert(lat, lon, depth, layers, numpy_view(rows, self._layout.dtype), index[sel, lat, lon].copy(),
                      parent[sel, lat, lon].copy(), self._layout.slices())

    @_consistent
    def cell_layer(self, lat: int, lon: int, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One layer of one expert (one inner chunk, read by byte range): its ``(K, F)`` rows in
        the original dtype, their ``(K,)`` neuron indices (``-1`` padding) and the bytes read.

        This is the runtime's unit of streaming.  A chunk that fails its checksum raises
        :class:`FormatError` naming the expert and the object.
        """
        if not 0 <= layer < len(self.layer_depth):
            raise ExpertNotFoundError(f"{self.where}: no layer {layer} (the package has {len(self.layer_depth)})")
        depth = self.layer_depth[layer]
        self._check_address(lat, lon, depth)
        neurons, index, _ = self._shell_arrays(depth)
        t = self._shells[depth]["layers"].index(layer)
        k = self._slots(depth)
        what = f"expert ({lat}, {lon}, {depth}) layer {layer} in {self.where}/{self.shard_key(lat, lon, depth)}"
        fa = FastArray.maybe(neurons)
        shard = _shard_shape(neurons)
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
        return numpy_view(rows, self._layout.dtype), index[t, lat, lon].copy(), nbytes

    def _shell_chunks(self, depth: int) -> dict[int, list[np.ndarray | None]]:
        """Per occupied flat cell of a shell, its ``(K, F)`` rows for each layer of the shell
        (``None``: not stored, all zeros).  For an uncompressed local package these are views of
        the shard's memory map, for others the decoded shards; the last shell read is kept, so
        that reading its layers one by one reads it once."""
        if self._shell_cache is not None and self._shell_cache[0] == depth:
            return self._shell_cache[1]
        self._shell_cache = None
        neurons, index, _ = self._shell_arrays(depth)
        p, m = self.graticule  # type: ignore[misc]
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
        _, index, _ = self._shell_arrays(depth)  # checked: a permutation of the layer's neurons
        t = self._shells[depth]["layers"].index(layer)
        m = self.graticule[1]  # type: ignore[index]
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
                rows = np.zeros((idx.shape[0], self._header["neuron_layout"]["row_width"]),
                                dtype=storage_dtype(self._layout.dtype))
            if real[:n].all():  # real neurons first (spec section 4): a view
                out.append((idx[:n], rows[:n]))
            else:
                out.append((idx[real], rows[real]))
        return out

    @_consistent
    def layer_rows(self, layer: int) -> np.ndarray:
        """All ``(N, F)`` neuron rows of one layer in original neuron order (storage dtype)."""
        cells = self._layer_cells(layer)
        out = np.empty((self._layout.neurons[layer], self._header["neuron_layout"]["row_width"]),
                       dtype=storage_dtype(self._layout.dtype))
        for idx, rows in cells:
            out[idx] = rows
        return out

    def _build_layer(self, layer: int, held: dict[int, Any] | None = None) -> dict[str, np.ndarray]:
        """Every FFN tensor of a layer, rebuilt from its cells: each neuron's slice of a field is
        copied once into place (and a field whose neuron axis is not the first, GPT-2's
        ``c_fc``, Llama's ``down``, transposed once, by blocks)."""
        cells = self._layer_cells(layer, held)
        n = self._layout.neurons[layer]
        st = storage_dtype(self._layout.dtype)
        out = {}
        for f, sl in zip(self._layout.fields, self._layout.slices().values(), strict=True):
            name = self._layout.layers[layer][f.name]
            shape = tuple(self._tensors[name]["shape"])
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

    def _storage(self, name: str, padded: bool = False) -> np.ndarray:
        if padded and (pad := self._pad_axis(name)) is not None:
            arr = self._storage(name)
            width = [(0, 0)] * arr.ndim
            width[pad[0]] = (0, pad[1] - arr.shape[pad[0]])
            return np.pad(arr, width)  # zero bits: zero neurons
        t = self._entry(name)
        shape = tuple(t["shape"])
        if t["where"] == "core":
            arr = self._array(core_key(name))
            if arr.shape != shape or arr.dtype != storage_dtype(t["dtype"]):
                raise FormatError(f"{self.where}: {core_key(name)} is {arr.dtype}{arr.shape}, header says "
                                  f"{t['dtype']}{list(shape)}")
            data = self._read(arr, Ellipsis, core_key(name))
            return data.reshape(shape)  # zarr returns 0-d arrays as shape (1,)
        layer, _ = self._owner[name]
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
            :meth:`ffn_size` (what exports and :mod:`spherefmt.torch` use).
        """
        arr = self._storage(name, padded)
        dtype = self._tensors[name]["dtype"]
        if framework == "numpy":
            return numpy_view(arr, dtype)
        if framework in ("torch", "pt"):
            return to_torch(arr, dtype)
        raise ValueError(f"framework must be 'numpy' or 'torch', not {framework!r}")

    @_consistent
    def state_dict(self, framework: str = "numpy", *, padded: bool = False) -> dict[str, Any]:
        """Every tensor, in the source's order.

        Core tensors are fetched in one concurrent round of reads and decoded on all cores;
        sphere tensors are rebuilt shell by shell, each shell read once.
        """
        if framework not in ("numpy", "torch", "pt"):
            raise ValueError(f"framework must be 'numpy' or 'torch', not {framework!r}")
        core = self._bulk_core([n for n, t in self._tensors.items() if t["where"] == "core"])
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
                    layers = [lay for d in held for lay in self._shells[d]["layers"]]
                    for built in parallel_map(functools.partial(self._build_layer, held=held), layers):
                        ffn.update(built)
                    held, decoded = {}, 0
            self._shell_cache = None
        out = {}
        for name, t in self._tensors.items():
            if name in core:
                arr = core.pop(name)
            elif name in ffn and not (padded and self._pad_axis(name) is not None):
                arr = ffn.pop(name)
            else:
                arr = self._storage(name, padded)
            out[name] = numpy_view(arr, t["dtype"]) if framework == "numpy" else to_torch(arr, t["dtype"])
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
            t = self._tensors[name]
            if arr.shape != tuple(t["shape"]) or arr.dtype != storage_dtype(t["dtype"]):
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
        if name not in self._header.get("files", []):
            raise ExpertNotFoundError(f"{self.where}: no side file {name!r}")
        return self._read(self._array(file_key(name)), Ellipsis, file_key(name)).tobytes()

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
        self._check_address(lat, lon, depth)
        arr, index, _ = self._shell_arrays(depth)
        layers = self._shells[depth]["layers"]
        if layer is not None:
            if layer not in layers:
                raise ExpertNotFoundError(f"{self.where}: layer {layer} is not in depth shell {depth}")
            t = layers.index(layer)
            sel: Any = slice(t, t + 1)
        else:
            sel = slice(0, len(layers))
        data = _as_storage(neurons, self._layout.dtype)
        k = self._slots(depth)
        row = (k, arr.shape[4])
        want = row if layer is not None else (len(layers), *row)
        if data.shape != tuple(want):
            raise FormatError(f"{self.where}: expert ({lat}, {lon}, {depth}) needs rows of shape {tuple(want)}, got {data.shape}")
        data = data.reshape((-1, *row))
        pad = index[sel, lat, lon] < 0
        if data[pad].any():
            raise FormatError(f"{self.where}: padding slots of expert ({lat}, {lon}, {depth}) must stay exact zeros")
        with self.transaction():
            arr[sel, lat, lon, :k] = data

    def write_tensor(self, name: str, data: Any) -> None:
        """Replace a core tensor in place (same shape and dtype); only chunks whose bytes change
        are rewritten.  FFN tensors live in experts: change them with :meth:`write_expert`."""
        if self.mode != "r+":
            raise ReadOnlyError(f"{self.where}: opened read-only; use spherefmt.open(..., mode='r+')")
        t = self._entry(name)
        if t["where"] != "core":
            raise FormatError(f"{self.where}: {name!r} is stored in experts; write it with write_expert")
        new = _as_storage(data, t["dtype"])
        if new.shape != tuple(t["shape"]):
            raise FormatError(f"{self.where}: {name!r} has shape {tuple(t['shape'])}, got {new.shape}")
        arr = self._array(core_key(name))
        old = self._storage(name)
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
        return f"<spherefmt.Package {self.where!r} {self.architecture}{sphere}, {len(self._tensors)} tensors>"

    # --- sizes ----------------------------------------------------------------------------
    def stored_bytes(self, prefix: str = "") -> int:
        """Bytes the package's objects occupy in its container (under ``prefix``; the
        manifests themselves not counted)."""
        return sum(self._store.object_size(k) or 0 for k in self._store.listed(prefix))

    def verify(self, progress: Any = None) -> dict[str, Any]:
        """Read every object of the package whole and check it against the manifest; see
        :meth:`spherefmt.store.PackageStore.verify` (``sphere verify``)."""
        return self._store.verify(progress)

    def object_bytes(self, key: str) -> int:
        size = self._store.object_size(key)
        if size is None:
            raise ExpertNotFoundError(f"{self.where}: no object {key!r}")
        return size

    def shard_key(self, lat: int, lon: int, depth: int) -> str:
        """The storage key of expert ``(lat, lon, depth)`` (one object)."""
        return f"{shell_path(depth)}/{C.NEURONS_ARRAY}/c/0/{lat}/{lon}/0/0"


#: decoded shells ``state_dict`` holds at once before rebuilding their layers in parallel
_HOLD_BYTES = 256 * 1024**2


def _is_mapped(a: np.ndarray) -> bool:
    """True for a view of a memory map (it holds no memory of its own)."""
    import mmap

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
        from .dtypes import from_torch

        name, arr = from_torch(data)
        if name != dtype:
            raise FormatError(f"rows are {name}, the package holds {dtype}")
        return arr
    arr = np.asarray(data)
    st = storage_dtype(dtype)
    if arr.dtype == st or arr.dtype == numpy_view(np.zeros(0, st), dtype).dtype:
        return _contig(arr).view(st)
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
    from .store import is_package as _is

    return _is(url, storage_options)


class PackageSource(TensorSource):
    """A package as a conversion source (to re-place it with other parameters)."""

    def __init__(self, url: Any) -> None:
        self.pkg = open(url)
        self.where = self.pkg.where
        self.config = self.pkg.config
        self.metadata = dict(self.pkg.metadata["metadata"])
        self.files = {n: self.pkg.file(n) for n in self.pkg.metadata.get("files", [])}

    def keys(self) -> list[str]:
        return self.pkg.keys()

    def info(self, name: str) -> TensorInfo:
        return self.pkg.tensor_info(name)

    def read(self, name: str) -> np.ndarray:
        return self.pkg._storage(name)

    def close(self) -> None:
        self.pkg.close()


