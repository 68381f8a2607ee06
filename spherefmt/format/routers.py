"""Routers as stored in a package: per layer, a score for each cell of the graticule given the FFN
input of a token.  (Making them is above the format: the centroid router and the oracle in
:mod:`spherefmt.runtime.routing`, training in :mod:`spherefmt.training.routers`.)

A router is stored in the package under ``router/<name>/`` (``spec/FORMAT.md`` section 4.1):
group attributes ``{"kind", "version", "layers", "cells", "hidden", ...}`` and per layer ``l``
the float32 arrays ``router/<name>/<l>/w1`` ``(d, H)``, ``b1`` ``(H,)``, ``w2`` ``(H, P*M)``,
``b2`` ``(P*M,)``.  Scores are ``relu(x @ w1 + b1) @ w2 + b2``; a ``linear`` router has
``H = 0`` (no ``w1``/``b1``; ``x @ w2 + b2``).  Cells are numbered row-major, ``lat * M + lon``;
cells without neurons at a layer are never picked.

Kinds:

- ``centroid`` (training-free): a linear router whose column for a cell is the mean input row of
  the cell's neurons (``w_in`` for GPT-2, ``gate`` for Llama);
- ``learned``: a small MLP per layer trained by distillation to predict how much each cell
  contributes to the FFN output for that token (MoEfication's expert-activation prediction):
  the target distribution is the cells' output norms ``||act_c @ W_out_c||``, normalised.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from spherefmt.errors import FormatError, InputError, ReadOnlyError
from spherefmt.format.package import Package

__all__ = ["ROUTER_VERSION", "Router", "always_on", "k_for_share", "read_router", "router_names", "write_router"]

ROUTER_VERSION = 1
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass
class Router:
    """Per-layer scoring weights (float32 numpy)."""

    kind: str
    layers: list[dict[str, np.ndarray]]
    cells: int
    meta: dict[str, Any] = field(default_factory=dict)

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        """``(T, cells)`` scores of the cells for the FFN inputs ``x`` ``(T, d)``."""
        w = self.layers[layer]
        h = x
        if "w1" in w:
            h = np.maximum(x @ w["w1"] + w["b1"], 0.0)
        return h @ w["w2"] + w["b2"]

    def nbytes(self) -> int:
        return sum(a.nbytes for lay in self.layers for a in lay.values())


def always_on(pkg: Package) -> list[list[int]]:
    """Per layer, the flat cells every token computes under top-k routing (the header's
    ``routing.always_on``, ``spec/FORMAT.md`` 7.3; none when the package has no such member)."""
    r = pkg.header.routing
    n = len(pkg.layer_depth)
    return [list(c) for c in r["always_on"]] if r is not None else [[] for _ in range(n)]


def k_for_share(share: float, cells: int, always: int = 0) -> int:
    """Cells a token computes at ``share`` of a layer's ``cells`` (section 7.3): ``ceil(share *
    cells)``, at least one, never fewer than the ``always`` always-on cells, at most ``cells``."""
    return min(cells, max(1, always, math.ceil(share * cells - 1e-9)))


def router_names(pkg: Package) -> list[str]:
    """Names of the routers stored in the package (from a listing of ``router/``; the group
    metadata of each is checked when it is read)."""
    store = pkg.group.store

    async def names() -> list[str]:
        out = []
        async for entry in store.list_dir("router"):
            name = entry.strip("/").split("/")[-1]
            if _NAME.match(name) and await store.exists(f"router/{name}/zarr.json"):
                out.append(name)
        return out

    try:
        return sorted(set(sync(names())))
    except (FileNotFoundError, KeyError):
        return []


def read_router(pkg: Package, name: str) -> Router:
    """A stored router, validated against the package (shapes, layer count, finite values)."""
    where = f"{pkg.where}: router/{name}"
    if not _NAME.match(name):
        raise FormatError(f"{where}: router names are 1-32 of a-z, 0-9, _ and -")
    try:
        grp = pkg.group[f"router/{name}"]
    except KeyError:
        raise FormatError(f"{pkg.where}: no router {name!r} (stored: {', '.join(router_names(pkg)) or 'none'})") \
            from None
    attrs = dict(grp.attrs)
    p, m = pkg.require_graticule()
    n_layers = len(pkg.layer_depth)
    if attrs.get("version") != ROUTER_VERSION or attrs.get("layers") != n_layers or attrs.get("cells") != p * m:
        raise FormatError(f"{where}: attributes {attrs} do not match the package ({n_layers} layers, {p * m} cells)")
    hidden = attrs.get("hidden")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 0 <= hidden <= 65536:
        raise FormatError(f"{where}: hidden must be an integer in 0..65536")
    config = pkg.config or {}
    width = config.get("n_embd") or config.get("hidden_size")
    if width is None:
        raise FormatError(f"{where}: the model config lacks 'n_embd' (or 'hidden_size')")
    d = int(width)
    want = {"w2": (hidden or d, p * m), "b2": (p * m,)}
    if hidden:
        want.update({"w1": (d, hidden), "b1": (hidden,)})
    layers = []
    for layer in range(n_layers):
        arrays = {}
        for key, shape in want.items():
            path = f"router/{name}/{layer}/{key}"
            arr = pkg.array(path)
            if tuple(arr.shape) != shape or arr.dtype != np.float32:
                raise FormatError(f"{pkg.where}: {path} is {arr.dtype}{tuple(arr.shape)}, want float32{shape}")
            a = pkg.read_array(arr, Ellipsis, path)
            if not np.isfinite(a).all():
                raise FormatError(f"{pkg.where}: {path} holds non-finite values")
            arrays[key] = a
        layers.append(arrays)
    return Router(str(attrs.get("kind", name)), layers, p * m, meta=attrs)


def write_router(pkg: Package, name: str, router: Router) -> None:
    """Store ``router`` as ``router/<name>`` (replacing one of that name); touches nothing else."""
    if pkg.mode == "r":
        raise ReadOnlyError(f"{pkg.where}: opened read-only; open with mode 'r+' to write a router")
    if not _NAME.match(name):
        raise InputError(f"router name {name!r}: use 1-32 of a-z, 0-9, _ and -")
    p, m = pkg.require_graticule()
    if router.cells != p * m or len(router.layers) != len(pkg.layer_depth):
        raise InputError(f"router has {len(router.layers)} layers x {router.cells} cells; the package "
                         f"{len(pkg.layer_depth)} x {p * m}")
    with pkg.transaction():  # the old router stays until the new one is whole
        root = pkg.group
        top = root.require_group("router")
        grp = top.create_group(name, overwrite=True) if name in top else top.create_group(name)
        hidden = int(router.layers[0]["w1"].shape[1]) if "w1" in router.layers[0] else 0
        grp.attrs.update({"kind": router.kind, "version": ROUTER_VERSION, "layers": len(router.layers),
                          "cells": router.cells, "hidden": hidden, **router.meta})
        for layer, arrays in enumerate(router.layers):
            lg = grp.create_group(str(layer))
            for key, a in arrays.items():
                a = np.ascontiguousarray(a, dtype=np.float32)
                z = lg.create_array(key, shape=a.shape, dtype=np.float32, chunks=a.shape or "auto",
                                    compressors=[zarr.codecs.Crc32cCodec()])
                z[...] = a


