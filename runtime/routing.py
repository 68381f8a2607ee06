"""Routing on the runtime side: the training-free centroid router, the oracle, and the FFN
activations and per-cell targets that router training and co-activation placement learn from
(the FFN inputs themselves come from :meth:`spherefmt.runtime.session.Session.ffn_inputs`).

Router *storage* is part of the format (:mod:`spherefmt.format.routers`); everything here runs
the model or reads every expert, so it sits above the format, beside the session.
"""

from __future__ import annotations

import numpy as np

from spherefmt.format.package import Package
from spherefmt.format.routers import Router
from spherefmt.runtime.loader import BlockLoader

__all__ = ["OracleRouter", "centroid_router", "cell_targets", "ffn_activations"]


def centroid_router(pkg: Package) -> Router:
    """The training-free router of a package (reads every layer of every expert once)."""
    field_name = "w_in" if pkg.architecture == "gpt2" else "gate"
    loader = BlockLoader(pkg, {}, {})
    p, m = pkg.require_graticule()
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

    def __init__(self, pkg: Package) -> None:
        self.pkg = pkg
        self.loader = BlockLoader(pkg, {}, {})

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        return cell_targets(self.pkg, self.loader, layer, x)[0]

    def nbytes(self) -> int:
        return 0


def ffn_activations(arch: str, x: np.ndarray, rows: np.ndarray, sl: dict[str, slice]) -> np.ndarray:
    """``(T, n)`` FFN activations of the neurons in ``rows`` (float32 neuron rows) for inputs ``x``:
    GPT-2 ``gelu_new(x w_in + b_in)``, Llama ``silu(x gate) * (x up)``."""
    if arch == "gpt2":
        pre = x @ rows[:, sl["w_in"]].T + rows[:, sl["b_in"]][:, 0]
        return 0.5 * pre * (1 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))
    g = x @ rows[:, sl["gate"]].T
    return g / (1 + np.exp(-g)) * (x @ rows[:, sl["up"]].T)


def cell_targets(pkg: Package, loader: BlockLoader, layer: int, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """``(T, cells)`` output norm of each cell's FFN contribution (0 for empty cells), and the
    layer's placement quality: of the pairs of neurons active together on a token (each token's
    top 10% activations), the share in one cell, and that share for a random balanced placement."""
    p, m = pkg.require_graticule()
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


