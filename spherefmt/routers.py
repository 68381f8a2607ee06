"""Routers: per layer, a score for each cell of the graticule given the FFN input of a token.

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

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError, InputError, ReadOnlyError

__all__ = ["Router", "OracleRouter", "centroid_router", "read_router", "write_router", "router_names", "train_router",
           "ROUTER_VERSION"]

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


def centroid_router(pkg: Any) -> Router:
    """The training-free router of a package (reads every layer of every expert once)."""
    from spherefmt.runtime.loader import BlockLoader  # noqa: PLC0415 - runtime reads the rows

    field_name = "w_in" if pkg.architecture == "gpt2" else "gate"
    loader = BlockLoader(pkg, {}, {})
    p, m = pkg.graticule
    layers = []
    for layer in range(len(pkg.layer_depth)):
        cells, cent = loader.host_centroids(layer, field_name)
        w2 = np.zeros((cent.shape[1], p * m), np.float32)
        for (lat, lon), c in zip(cells, cent, strict=True):
            w2[:, lat * m + lon] = c
        layers.append({"w2": w2, "b2": np.zeros(p * m, np.float32)})
    return Router("centroid", layers, p * m)


class OracleRouter:
    """The ceiling for any router of this placement (diagnostic, not storable): scores each cell
    by the true norm of its FFN output for the token, computed from the package's rows."""

    kind = "oracle"

    def __init__(self, pkg: Any) -> None:
        from spherefmt.runtime.loader import BlockLoader  # noqa: PLC0415

        self.pkg = pkg
        self.loader = BlockLoader(pkg, {}, {})

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        return _targets(self.pkg, self.loader, layer, x)[0]

    def nbytes(self) -> int:
        return 0


def router_names(pkg: Any) -> list[str]:
    """Names of the routers stored in the package (from a listing of ``router/``; the group
    metadata of each is checked when it is read)."""
    from zarr.core.sync import sync

    store = pkg._group.store

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


def read_router(pkg: Any, name: str) -> Router:
    """A stored router, validated against the package (shapes, layer count, finite values)."""
    where = f"{pkg.where}: router/{name}"
    if not _NAME.match(name):
        raise FormatError(f"{where}: router names are 1-32 of a-z, 0-9, _ and -")
    try:
        grp = pkg._group[f"router/{name}"]
    except KeyError:
        raise FormatError(f"{pkg.where}: no router {name!r} (stored: {', '.join(router_names(pkg)) or 'none'})") \
            from None
    attrs = dict(grp.attrs)
    p, m = pkg.graticule
    n_layers = len(pkg.layer_depth)
    if attrs.get("version") != ROUTER_VERSION or attrs.get("layers") != n_layers or attrs.get("cells") != p * m:
        raise FormatError(f"{where}: attributes {attrs} do not match the package ({n_layers} layers, {p * m} cells)")
    hidden = attrs.get("hidden")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 0 <= hidden <= 65536:
        raise FormatError(f"{where}: hidden must be an integer in 0..65536")
    d = int(pkg.config.get("n_embd") or pkg.config.get("hidden_size"))
    want = {"w2": (hidden or d, p * m), "b2": (p * m,)}
    if hidden:
        want.update({"w1": (d, hidden), "b1": (hidden,)})
    layers = []
    for layer in range(n_layers):
        arrays = {}
        for key, shape in want.items():
            path = f"router/{name}/{layer}/{key}"
            arr = pkg._array(path)
            if tuple(arr.shape) != shape or arr.dtype != np.float32:
                raise FormatError(f"{pkg.where}: {path} is {arr.dtype}{tuple(arr.shape)}, want float32{shape}")
            a = pkg._read(arr, Ellipsis, path)
            if not np.isfinite(a).all():
                raise FormatError(f"{pkg.where}: {path} holds non-finite values")
            arrays[key] = a
        layers.append(arrays)
    return Router(str(attrs.get("kind", name)), layers, p * m, meta=attrs)


def write_router(pkg: Any, name: str, router: Router) -> None:
    """Store ``router`` as ``router/<name>`` (replacing one of that name); touches nothing else."""
    import zarr

    if pkg.mode == "r":
        raise ReadOnlyError(f"{pkg.where}: opened read-only; open with mode 'r+' to write a router")
    if not _NAME.match(name):
        raise InputError(f"router name {name!r}: use 1-32 of a-z, 0-9, _ and -")
    p, m = pkg.graticule
    if router.cells != p * m or len(router.layers) != len(pkg.layer_depth):
        raise InputError(f"router has {len(router.layers)} layers x {router.cells} cells; the package "
                         f"{len(pkg.layer_depth)} x {p * m}")
    with pkg.transaction():  # the old router stays until the new one is whole
        root = pkg._group
        top = root.require_group("router")
        grp = top.create_group(name, overwrite=True) if name in top else top.create_group(name)
        hidden = int(router.layers[0]["w1"].shape[1]) if "w1" in router.layers[0] else 0
        grp.attrs.update({"kind": router.kind, "version": ROUTER_VERSION, "layers": len(router.layers),
                          "cells": router.cells, "hidden": hidden, **router.meta})
        for layer, arrays in enumerate(router.layers):
            lg = grp.create_group(str(layer))
            for key, a in arrays.items():
                a = np.ascontiguousarray(a, dtype=np.float32)
                z = lg.create_array(key, shape=a.shape, dtype=np.float32, chunks=a.shape or None,
                                    compressors=[zarr.codecs.Crc32cCodec()])
                z[...] = a


# --- training (torch) ----------------------------------------------------------------------------
def _ffn_inputs(pkg: Any, ids: np.ndarray, window: int) -> list[np.ndarray]:
    """Per layer, the FFN inputs ``(tokens, d)`` of the dense model on ``ids`` (numpy runtime)."""
    from spherefmt.runtime import Session  # noqa: PLC0415

    captured: list[list[np.ndarray]] = []
    with Session(pkg, backend="numpy", prefetch=False) as s:
        model = s.model
        orig = model.ffn

        def spy(rt: Any, layer: int, m: Any) -> Any:
            while len(captured) <= layer:
                captured.append([])
            captured[layer].append(rt.b.to_host(m))
            return orig(rt, layer, m)

        model.ffn = spy  # type: ignore[method-assign]
        try:
            for st in range(0, len(ids) - 1, window):
                s.logits(ids[st : st + window])
        finally:
            model.ffn = orig  # type: ignore[method-assign]
    return [np.concatenate(c) for c in captured]


def ffn_activations(arch: str, x: np.ndarray, rows: np.ndarray, sl: dict[str, slice]) -> np.ndarray:
    """``(T, n)`` FFN activations of the neurons in ``rows`` (float32 neuron rows) for inputs ``x``:
    GPT-2 ``gelu_new(x w_in + b_in)``, Llama ``silu(x gate) * (x up)``."""
    if arch == "gpt2":
        pre = x @ rows[:, sl["w_in"]].T + rows[:, sl["b_in"]][:, 0]
        return 0.5 * pre * (1 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))
    g = x @ rows[:, sl["gate"]].T
    return g / (1 + np.exp(-g)) * (x @ rows[:, sl["up"]].T)


def _targets(pkg: Any, loader: Any, layer: int, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """``(T, cells)`` output norm of each cell's FFN contribution (0 for empty cells), and the
    layer's placement quality: of the pairs of neurons active together on a token (each token's
    top 10% activations), the share in one cell, and that share for a random balanced placement."""
    p, m = pkg.graticule
    out = np.zeros((x.shape[0], p * m), np.float32)
    sl = loader.slices
    acts = []
    for lat, lon in loader.cells(layer):
        c = loader.load(("cell", layer, lat, lon))
        rows = np.asarray(c["rows"], np.float32)
        act = ffn_activations(pkg.architecture, x, rows, sl)
        y = act @ rows[:, sl["w_out" if pkg.architecture == "gpt2" else "down"]]
        out[:, lat * m + lon] = np.linalg.norm(y, axis=1)
        acts.append(act)
    sizes = np.array([a.shape[1] for a in acts])
    allact = np.concatenate(acts, axis=1)
    thr = np.quantile(allact, 0.9, axis=1, keepdims=True)
    active = [(a > thr).sum(axis=1) for a in acts]  # per cell: active neurons per token
    n_act = np.sum(active, axis=0).astype(np.float64)
    same = np.sum([c * (c - 1) for c in active], axis=0) / 2
    pairs = n_act * (n_act - 1) / 2
    ok = pairs > 0
    n = sizes.sum()
    quality = {"same_cell": float(same[ok].sum() / pairs[ok].sum()) if ok.any() else 0.0,
               "random_balanced": float((sizes * (sizes - 1)).sum() / (n * (n - 1)))}
    return out, quality


def train_router(pkg: Any, ids: np.ndarray, *, steps: int = 300, hidden: int = 128, seed: int = 0,
                 progress: bool = True) -> Router:
    """Distil a ``learned`` router from the package's own dense FFN on token ``ids``."""
    import torch

    from .runtime.loader import BlockLoader

    loader = BlockLoader(pkg, {}, {})
    ctx = int(pkg.config.get("n_positions") or pkg.config.get("max_position_embeddings") or 1024)
    xs = _ffn_inputs(pkg, ids, min(ctx, 256))
    p, m = pkg.graticule
    torch.manual_seed(seed)
    layers = []
    from tqdm.auto import tqdm

    bar = tqdm(total=steps * len(xs), desc="route-train", unit="step", disable=not progress)
    quality = []
    for layer, x in enumerate(xs):
        t, q = _targets(pkg, loader, layer, x)
        quality.append(q)
        occupied = t.sum(axis=0) > 0
        target = torch.from_numpy(t / np.maximum(t.sum(axis=1, keepdims=True), 1e-12))
        xt = torch.from_numpy(x)
        mu, sd = xt.mean(0), xt.std(0) + 1e-6  # folded into w1/b1 afterwards
        d = x.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, p * m))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        mask = torch.from_numpy(np.where(occupied, 0.0, -1e9).astype(np.float32))
        gen = torch.Generator().manual_seed(seed + layer)
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (min(512, len(xt)),), generator=gen)
            logits = net((xt[idx] - mu) / sd) + mask
            loss = -(target[idx] * torch.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
        with torch.no_grad():
            w1 = (net[0].weight / sd).T.contiguous()
            b1 = net[0].bias - (net[0].weight * (mu / sd)).sum(1)
            b2 = net[2].bias + mask
        layers.append({"w1": w1.numpy(), "b1": b1.numpy(), "w2": net[2].weight.T.contiguous().detach().numpy(),
                       "b2": b2.numpy()})
    bar.close()
    same = float(np.mean([q["same_cell"] for q in quality]))
    rand = float(np.mean([q["random_balanced"] for q in quality]))
    meta = {"trained_tokens": int(len(ids)), "steps": steps,
            "placement_quality": {"co_active_pairs_same_cell": same, "random_balanced_placement": rand,
                                  "lift": same / rand if rand else None,
                                  "per_layer": [round(q["same_cell"], 5) for q in quality]}}
    return Router("learned", layers, p * m, meta=meta)
