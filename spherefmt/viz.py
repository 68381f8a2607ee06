"""Pictures of a package: the graticule as a world map per depth shell, and the lightning trees.

Maps use matplotlib's Mollweide projection (equal-area: every cell of a band has its true share
of the sphere).  Colour: neurons per cell (summed over the shell's layers, or one ``layer``), or
how often the router picked each cell for a text (``usage``, an ``(L, P*M)`` count array).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from spherefmt.errors import BackendUnavailableError, InputError
from spherefmt.format.package import Package
from spherefmt.format.placement import cell_centers

__all__ = ["draw_map", "draw_trees", "pyplot"]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (PNG files, no screen)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise BackendUnavailableError("pictures need matplotlib: pip install 'spherefmt[viz]'") from e
    return plt


def _counts(pkg: Package) -> np.ndarray:
    """Real neurons per (layer, cell)."""
    p, m = pkg.require_graticule()
    out = np.zeros((len(pkg.layer_depth), p * m), dtype=np.int64)
    for depth in range(pkg.depth):
        _, index, _ = pkg.shell_arrays(depth)
        for t, layer in enumerate(pkg.shell_layers(depth)):
            out[layer] = (index[t] >= 0).sum(axis=-1).reshape(-1)
    return out


def draw_map(pkg: Package, out: str | Path, layer: int | None = None, usage: np.ndarray | None = None,
             title: str | None = None) -> Path:
    """Write a PNG: one Mollweide panel per depth shell (or one for ``layer``)."""
    plt = pyplot()
    if pkg.graticule is None:
        raise InputError(f"{pkg.where} has no sphere to draw ({pkg.architecture})")
    p, m = pkg.require_graticule()
    n_layers = len(pkg.layer_depth)
    if layer is not None and not 0 <= layer < n_layers:
        raise InputError(f"layer {layer}: the package has layers 0..{n_layers - 1}")
    values = usage if usage is not None else _counts(pkg)
    what = "router picks (token-selections)" if usage is not None else "neurons"
    if layer is not None:
        panels = [(f"layer {layer} (depth {pkg.layer_depth[layer]})", values[layer])]
    else:
        panels = []
        for depth in range(pkg.depth):
            layers = [i for i, dd in enumerate(pkg.layer_depth) if dd == depth]
            panels.append((f"depth {depth}: layers {layers[0]}" + (f"-{layers[-1]}" if len(layers) > 1 else ""),
                           values[layers].sum(axis=0)))
    cols = min(len(panels), 3 if len(panels) > 4 else len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = plt.figure(figsize=(4.6 * cols, 2.7 * rows + 0.6))
    # each cell is drawn as a block of sub-cells so that its edges follow the projection's curves
    kp, km = math.ceil(90 / p), math.ceil(180 / m)
    lon = np.deg2rad(np.linspace(-180, 180, m * km + 1))
    lat = np.deg2rad(np.linspace(90, -90, p * kp + 1))
    vmax = max(1, max(int(v.max()) for _, v in panels))
    mesh = None
    for i, (label, v) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1, projection="mollweide")
        fine = np.repeat(np.repeat(v.reshape(p, m), kp, axis=0), km, axis=1)
        mesh = ax.pcolormesh(lon, lat, fine, cmap="viridis", vmin=0, vmax=vmax, shading="flat")
        ax.set_title(label, fontsize=9)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.grid(True, color="white", alpha=0.3, linewidth=0.5)
    fig.suptitle(title or f"{Path(str(pkg.where)).name}: {p}x{m} graticule, {pkg.depth} depth shells - {what}",
                 fontsize=10)
    if mesh is not None:
        fig.colorbar(mesh, ax=fig.axes, shrink=0.6, label=what)
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def draw_trees(pkg: Package, out: str | Path, neurons: int = 300, seed: int = 0) -> Path:
    """Write a PNG of lightning trees in 3D: each drawn neuron sits at its cell's direction, at a
    radius growing with its layer, joined to its tree parent in the previous layer."""
    plt = pyplot()
    p, m = pkg.require_graticule()
    centers = cell_centers(p, m)
    n_layers = len(pkg.layer_depth)
    where: list[dict[int, int]] = [dict() for _ in range(n_layers)]  # layer -> neuron -> flat cell
    parents: list[dict[int, int]] = [dict() for _ in range(n_layers)]
    for depth in range(pkg.depth):
        _, index, parent = pkg.shell_arrays(depth)
        for t, layer in enumerate(pkg.shell_layers(depth)):
            idx, par = index[t].reshape(p * m, -1), parent[t].reshape(p * m, -1)
            for c in range(p * m):
                for n, pa in zip(idx[c], par[c], strict=True):
                    if n >= 0:
                        where[layer][int(n)] = c
                        parents[layer][int(n)] = int(pa)
    rng = np.random.default_rng(seed)
    fig = plt.figure(figsize=(7, 7))
    ax = fig.add_subplot(projection="3d")
    jitter = rng.normal(0, 0.04, size=(n_layers, max(len(w) for w in where), 3))

    def pos(layer: int, n: int) -> np.ndarray:
        return (0.35 + 0.65 * (layer + 1) / n_layers) * (centers[where[layer][n]] + jitter[layer, n])

    last = n_layers - 1
    for n in rng.choice(sorted(where[last]), size=min(neurons, len(where[last])), replace=False):
        layer, cur = last, int(n)
        colour = plt.cm.twilight(where[last][cur] / max(1, p * m))
        while layer > 0 and parents[layer].get(cur, -1) >= 0:
            par = parents[layer][cur]
            a, b = pos(layer, cur), pos(layer - 1, par)
            ax.plot(*zip(a, b, strict=True), color=colour, linewidth=0.5, alpha=0.6)
            layer, cur = layer - 1, par
    ax.set_box_aspect((1, 1, 1))
    ax.set_axis_off()
    ax.set_title(f"lightning trees of {min(neurons, len(where[last]))} last-layer neurons "
                 f"(radius = layer, direction = cell)", fontsize=9)
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
