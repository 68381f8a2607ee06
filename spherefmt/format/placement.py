"""Placement: where each FFN neuron sits on the sphere, and which expert holds it.

Policy ``lightning-pca-balanced`` version 1 (normative description in ``spec/FORMAT.md``):

1. *Own direction* of a neuron: the top three principal directions of its layer's input
   weights (subspace iteration from a fixed seed, float64), the neuron's projection normalised
   onto the unit sphere.
2. *Lightning tree*: the parent of neuron ``j`` of layer ``l > 0`` is the neuron ``i`` of layer
   ``l - 1`` it is most strongly wired to, ``argmax_i |w_out[l-1, i] . w_in[l, j]|``.
3. Layer ``l > 0`` frames are rotated onto the parents' directions (orthogonal Procrustes), and a
   neuron's direction is its own direction bent toward its parent's:
   ``normalize(bend * own + (1 - bend) * parent)``.
4. *Balanced assignment*: cells of the graticule hold at most ``K = ceil(N / (P * M))``
   neurons; neurons are placed greedily, most confident first, each in the nearest cell with
   room.  Slots inside a cell follow the original neuron order.

Everything is deterministic for a given model and parameters (stable sorts, fixed seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from spherefmt.constants import (
    EARTH_GRATICULE,
    MAX_DEPTH,
    MAX_MERIDIANS,
    MAX_PARALLELS,
    MAX_PLANE_WASTE,
    MIN_PLANE_BYTES,
    TREE_BASIS_ROWS,
    ZSTD_BLOCK,
)
from spherefmt.errors import FormatError, InputError

__all__ = ["Grid", "PlacementPlan", "parse_graticule", "default_grid", "layer_shells", "own_directions", "tree_parents",
           "tree_parents_projected",
           "bend", "assign", "cell_centers", "expert_grid", "expert_cells", "always_on_cells", "routed_cells"]


@dataclass(frozen=True)
class Grid:
    parallels: int
    meridians: int
    depth: int

    @property
    def cells(self) -> int:
        return self.parallels * self.meridians


@dataclass(frozen=True)
class PlacementPlan:
    """Cells chosen above the format, handed to :func:`spherefmt.format.write.save`.

    ``cells`` maps each layer to the flat cell (``lat * M + lon``) of each of its neurons, in
    original neuron order; ``record`` is what the header's ``placement`` member says (policy,
    version and the policy's parameters, ``spec/FORMAT.md`` 7.1)."""

    cells: Mapping[int, np.ndarray]
    record: Mapping[str, Any]


def parse_graticule(text: str) -> tuple[int, int]:
    """Parse ``"18x36"`` or ``"earth"`` into ``(P, M)``; raise :class:`InputError` otherwise."""
    t = text.strip().lower()
    if t == "earth":
        return EARTH_GRATICULE
    parts = t.split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise InputError(f"graticule {text!r}: expected PxM (e.g. 18x36) or 'earth'")
    p, m = int(parts[0]), int(parts[1])
    check_grid(p, m, 1)
    return p, m


def check_grid(p: int, m: int, d: int, n_layers: int | None = None) -> None:
    if not (1 <= p <= MAX_PARALLELS and 1 <= m <= MAX_MERIDIANS):
        raise InputError(f"graticule {p}x{m}: parallels must be 1..{MAX_PARALLELS}, meridians 1..{MAX_MERIDIANS}")
    if not 1 <= d <= MAX_DEPTH:
        raise InputError(f"depth {d}: must be 1..{MAX_DEPTH}")
    if n_layers is not None and d > n_layers:
        raise InputError(f"depth {d}: the model has only {n_layers} layers")


def plane_waste(capacity: int, row_width: int, itemsize: int) -> float:
    """Fraction of a cell-layer chunk's bytes that share a zstd block with the other byte plane.

    After the byte shuffle a chunk is its low-byte plane (mantissa: noise) followed by its
    high-byte plane (sign and exponent: compressible), each ``capacity * row_width`` bytes.  zstd
    codes 128 KiB blocks with one entropy table each, so the block where the planes meet
    compresses like noise.  The smaller this fraction, the closer a chunk gets to the ratio of
    very large chunks.
    """
    if itemsize == 1:
        return 0.0
    plane = capacity * row_width
    r = plane % ZSTD_BLOCK
    return min(r, ZSTD_BLOCK - r) / (plane * itemsize)


def default_grid(n_neurons: int, row_width: int, itemsize: int, n_layers: int) -> Grid:
    """The default graticule and depth for a model (the rule written in ``spec/FORMAT.md`` 7).

    The graticule is the ``P x 2P`` (Earth's aspect, at most 180x360) with the most cells such
    that one cell of one layer (one inner chunk) holds at least ``MIN_PLANE_BYTES`` per byte
    plane and at most ``MAX_PLANE_WASTE`` of its bytes in the block where the planes meet; if
    no graticule meets the second condition, the one with the most cells meeting the first;
    ``1 x 1`` for models too small for either.  Depth is ``min(10, layers)``.
    """
    depth = max(1, min(MAX_DEPTH, n_layers))
    fallback = None
    for p in range(MAX_PARALLELS, 0, -1):
        m = min(2 * p, MAX_MERIDIANS)
        if p * m > n_neurons:
            continue
        k = math.ceil(n_neurons / (p * m))
        if k * row_width < MIN_PLANE_BYTES:
            continue
        if plane_waste(k, row_width, itemsize) <= MAX_PLANE_WASTE:
            return Grid(p, m, depth)
        fallback = fallback or Grid(p, m, depth)
    return fallback or Grid(1, 1, depth)


def expert_grid(experts: int, n_layers: int) -> Grid:
    """The default graticule for native experts: the smallest ``P x 2P`` with a cell for each
    expert of a layer (``spec/FORMAT.md`` 9.0.1); depth as for dense models."""
    p = 1
    while p * min(2 * p, MAX_MERIDIANS) < experts and p < MAX_PARALLELS:
        p += 1
    return Grid(p, min(2 * p, MAX_MERIDIANS), max(1, min(MAX_DEPTH, n_layers)))


def expert_cells(dirs: np.ndarray, experts: int, p: int, m: int) -> np.ndarray:
    """The cell of every neuron of a native-MoE layer: each expert (neurons ``e * f ..``) goes
    whole to the cell nearest its neurons' mean direction, one expert per cell (balanced as
    :func:`assign` places neurons, with capacity one)."""
    f = dirs.shape[0] // experts
    edirs = _normalize(dirs.reshape(experts, f, 3).sum(axis=1))
    return np.repeat(assign(edirs, p, m, capacity=1), f)


def layer_shells(n_layers: int, depth: int) -> list[int]:
    """Depth shell of every layer: proportional, the first layers deepest (shell D-1), the last
    layers at the surface (shell 0), every shell non-empty."""
    return [depth - 1 - (layer * depth) // n_layers for layer in range(n_layers)]


def _top3(x: np.ndarray) -> np.ndarray:
    """Projections of the rows of ``x`` (N, d) on their top three principal directions."""
    x = x.astype(np.float64)  # a copy: centred in place below (one float64 copy, not two)
    x -= x.mean(axis=0, keepdims=True)
    n, d = x.shape
    k = min(3, d)
    rng = np.random.default_rng(0)
    v = rng.standard_normal((d, k))
    for _ in range(24):  # subspace iteration: converges on the top-k subspace
        v, _ = np.linalg.qr(x.T @ (x @ v))
    # order by explained variance, fix each sign by its largest entry (deterministic frame)
    e = x @ v
    order = np.argsort(-np.einsum("ij,ij->j", e, e), kind="stable")
    v = v[:, order]
    signs = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(k)])
    signs[signs == 0] = 1
    e = x @ (v * signs)
    if k < 3:
        e = np.concatenate([e, np.zeros((n, 3 - k))], axis=1)
    return e


def _normalize(v: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    bad = norm[:, 0] < 1e-12
    out = v / np.where(norm < 1e-12, 1.0, norm)
    if bad.any():
        out[bad] = fallback[bad] if fallback is not None else np.array([0.0, 0.0, 1.0])
    return out


def own_directions(w_in_rows: np.ndarray) -> np.ndarray:
    """Unit directions (N, 3) of a layer's neurons from their input weight rows (N, d)."""
    return _normalize(_top3(w_in_rows))


def tree_parents(prev_out_rows: np.ndarray, w_in_rows: np.ndarray, block: int = 1024) -> np.ndarray:
    """Lightning-tree parent of each neuron: ``argmax_i |prev_out[i] . w_in[j]|`` (int32)."""
    a = np.asarray(prev_out_rows, dtype=np.float32)  # no copy when already float32
    out = np.empty(w_in_rows.shape[0], dtype=np.int32)
    for s in range(0, w_in_rows.shape[0], block):
        scores = a @ np.asarray(w_in_rows[s : s + block], dtype=np.float32).T  # (N_prev, b)
        np.abs(scores, out=scores)
        out[s : s + block] = np.argmax(scores, axis=0)
    return out


def tree_parents_projected(prev_out_rows: np.ndarray, w_in_rows: np.ndarray, dims: int, candidates: int,
                           block: int = 512) -> np.ndarray:
    """Lightning-tree parents for placement version 2 (``spec/FORMAT.md`` 7): every pair is
    scored in the ``dims`` principal directions of both layers' rows (subspace iteration from
    seed 0, four rounds, on at most ``TREE_BASIS_ROWS`` evenly spaced rows of each), and each neuron's
    ``candidates`` best are scored again exactly, ``argmax |prev_out[i] . w_in[j]|`` among them
    (ties to the lowest index, as the exact tree).  Cost ``N_prev * N * dims + N * candidates * d``
    against the exact tree's ``N_prev * N * d``: for a width ``d`` and an FFN ``N`` growing
    together, width squared instead of width cubed.  On trained weights the wiring that decides
    a parent lies in few directions (the project's small model: every parent exact at 64)."""
    a = np.asarray(prev_out_rows, dtype=np.float32)
    b_all = np.asarray(w_in_rows, dtype=np.float32)
    d = a.shape[1]
    k = min(dims, d)
    sample = np.concatenate([r[np.linspace(0, len(r) - 1, min(len(r), TREE_BASIS_ROWS)).astype(np.int64)]
                             for r in (a, b_all)])
    v = np.random.default_rng(0).standard_normal((d, k)).astype(np.float32)
    for _ in range(4):  # subspace iteration: the top-k right singular subspace of the sample
        v, _ = np.linalg.qr(sample.T @ (sample @ v))
    v = v.astype(np.float32)
    ap = a @ v  # (N_prev, k)
    t = min(candidates, a.shape[0])
    out = np.empty(b_all.shape[0], dtype=np.int32)
    for s in range(0, b_all.shape[0], block):
        b = b_all[s : s + block]
        approx = (b @ v) @ ap.T  # (blk, N_prev): candidates along the contiguous axis
        np.abs(approx, out=approx)
        cand = np.argpartition(-approx, t - 1, axis=1)[:, :t] if t < a.shape[0] else \
            np.broadcast_to(np.arange(a.shape[0])[None], approx.shape)
        cand = np.sort(cand, axis=1)
        sub = max(1, (1 << 24) // (t * d))  # the gathered candidate rows stay within 64 MiB
        for u in range(0, b.shape[0], sub):
            c = cand[u : u + sub]  # (sub, t)
            exact = np.abs(np.einsum("jtd,jd->jt", a[c], b[u : u + sub]))
            out[s + u : s + u + c.shape[0]] = c[np.arange(c.shape[0]), np.argmax(exact, axis=1)]
    return out


def bend(own: np.ndarray, parent_dirs: np.ndarray, weight: float) -> np.ndarray:
    """Rotate the layer's frame onto its parents, then bend each own direction toward its parent."""
    # orthogonal Procrustes: R minimising sum ||R own_j - parent_j||^2 (reflections allowed,
    # since principal directions have no intrinsic sign)
    u, _, vt = np.linalg.svd(parent_dirs.T @ own)
    rotated = own @ (u @ vt).T
    return _normalize(weight * rotated + (1.0 - weight) * parent_dirs, fallback=parent_dirs)


def cell_centers(p: int, m: int) -> np.ndarray:
    """Unit vectors (P*M, 3) of the cell centres, flat id ``lat * M + lon``; lat 0 is the
    northernmost band, lon 0 starts at -180 degrees."""
    lat = np.deg2rad(90.0 - (np.arange(p) + 0.5) * 180.0 / p)
    lon = np.deg2rad(-180.0 + (np.arange(m) + 0.5) * 360.0 / m)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1).reshape(-1, 3)


def assign(dirs: np.ndarray, p: int, m: int, capacity: int | None = None, candidates: int = 32) -> np.ndarray:
    """Balanced assignment of directions to cells.

    Returns the flat cell id of every neuron; no cell receives more than
    ``capacity`` (default ``ceil(N / (P * M))``) neurons.
    """
    n = dirs.shape[0]
    c = p * m
    k = capacity or math.ceil(n / c)
    if k * c < n:
        raise FormatError(f"{n} neurons do not fit {c} cells of {k}")
    centers = cell_centers(p, m)
    top = min(candidates, c)
    cand = np.empty((n, top), dtype=np.int64)
    best = np.empty(n)
    for s in range(0, n, 256):
        sc = dirs[s : s + 256] @ centers.T  # cosine similarity
        idx = _top_stable(sc, top)
        cand[s : s + 256] = idx
        best[s : s + 256] = np.take_along_axis(sc, idx[:, :1], axis=1)[:, 0]
    counts = np.zeros(c, dtype=np.int64)
    cell = np.empty(n, dtype=np.int64)
    for j in np.argsort(-best, kind="stable"):
        for cc in cand[j]:
            if counts[cc] < k:
                break
        else:  # all nearby cells full: nearest cell with room anywhere
            sc = centers @ dirs[j]
            sc[counts >= k] = -np.inf
            cc = int(np.argmax(sc))
        cell[j] = cc
        counts[cc] += 1
    return cell


def _top_stable(sc: np.ndarray, top: int) -> np.ndarray:
    """Per row, the indices of the ``top`` largest values, largest first, ties to the lower index:
    exactly ``np.argsort(-sc, kind="stable")[:, :top]``, in ``O(C)`` per row instead of
    ``O(C log C)`` (on the 64,800-cell Earth graticule the full sort was half of a conversion)."""
    c = sc.shape[1]
    if top >= c:
        return np.argsort(-sc, axis=1, kind="stable")[:, :top]
    part = np.argpartition(-sc, top - 1, axis=1)[:, :top]
    vals = np.take_along_axis(sc, part, axis=1)
    # order the chosen by value, then index (what the stable full sort does)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    # a tie at the boundary may have let argpartition pick a higher index than the stable sort
    # would: those rows (rare) are sorted in full
    kth = np.take_along_axis(sc, idx[:, -1:], axis=1)
    ties = (sc == kth).sum(axis=1) > (np.take_along_axis(sc, idx, axis=1) == kth).sum(axis=1)
    if ties.any():
        idx[ties] = np.argsort(-sc[ties], axis=1, kind="stable")[:, :top]
    return idx


def balanced_kmeans(x: np.ndarray, clusters: int, capacity: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Cluster the rows of ``x`` (unit vectors) into ``clusters`` groups of at most ``capacity``
    by cosine similarity; each round assigns greedily from the most similar (row, cluster) pair
    down, so the result is balanced (MoEfication's balanced k-means)."""
    n = x.shape[0]
    if capacity * clusters < n:
        raise FormatError(f"{n} neurons do not fit {clusters} cells of {capacity}")
    if n * clusters > 20_000_000:
        raise FormatError(f"co-activation placement of {n} neurons over {clusters} cells is too large; "
                          "use a coarser graticule")
    rng = np.random.default_rng(seed)
    cent = x[rng.choice(n, size=clusters, replace=n < clusters)].copy()
    label = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = x @ cent.T
        order = np.argsort(-sim, axis=None, kind="stable")
        label[:] = -1
        room = np.full(clusters, capacity)
        left = n
        for flat in order:
            i, c = divmod(int(flat), clusters)
            if label[i] < 0 and room[c] > 0:
                label[i] = c
                room[c] -= 1
                left -= 1
                if left == 0:
                    break
        for c in range(clusters):
            members = x[label == c]
            if len(members):
                cent[c] = _normalize(members.mean(axis=0)[None])[0]
    return label


def coactivation_cells(act: np.ndarray, dirs: np.ndarray, p: int, m: int, capacity: int, seed: int = 0) -> np.ndarray:
    """Cells for one layer's neurons from their activations ``act`` ``(tokens, N)`` on sample
    text: neurons whose activation profiles agree are clustered together (balanced), and each
    cluster goes to the cell nearest its neurons' mean direction (``dirs``, ``(N, 3)``), one
    cluster per cell."""
    prof = act / np.maximum(np.linalg.norm(act, axis=0, keepdims=True), 1e-12)
    label = balanced_kmeans(np.ascontiguousarray(prof.T), p * m, capacity, seed=seed)
    cdirs = np.stack([_normalize(dirs[label == c].sum(axis=0)[None])[0] if (label == c).any() else np.zeros(3)
                      for c in range(p * m)])
    cell_of_cluster = assign(cdirs, p, m, capacity=1)
    return cell_of_cluster[label]


def always_on_cells(p: int, m: int, share: float) -> np.ndarray:
    """The always-on cells of policy ``routed-balanced`` (``spec/FORMAT.md`` 7.3): the first
    ``round(share * P * M)`` flat cells, which start at the north pole and run east then south
    (the polar cap), at least one when ``share > 0`` and never every cell."""
    c = p * m
    n = 0 if share <= 0 else min(c - 1, max(1, round(share * c)))
    return np.arange(n, dtype=np.int64)


def routed_cells(weight: np.ndarray, dirs: np.ndarray, p: int, m: int, capacity: int, always_on: np.ndarray,
                 seed: int = 0) -> np.ndarray:
    """Cells for one layer's neurons under policy ``routed-balanced``.

    ``weight`` ``(tokens, N)`` is how much each neuron moves the FFN output on each sample token
    (``|activation| * |out row|``).  The neurons with the largest mean weight fill the
    ``always_on`` cells (every token computes them); the others are grouped by their activation
    profiles (balanced k-means, as ``coactivation-balanced``) into the remaining cells, each
    cluster taking the free cell nearest its neurons' mean direction (``dirs``, ``(N, 3)``)."""
    n, c = weight.shape[1], p * m
    on = np.asarray(always_on, dtype=np.int64)
    rest = np.setdiff1d(np.arange(c), on)
    if capacity * c < n or len(rest) == 0:
        raise FormatError(f"{n} neurons do not fit {c} cells of {capacity} with {len(on)} always on")
    cell = np.full(n, -1, dtype=np.int64)
    hot = np.argsort(-weight.mean(axis=0), kind="stable")[: min(n, capacity * len(on))]
    for j, i in enumerate(hot):
        cell[i] = on[j // capacity]
    cold = np.flatnonzero(cell < 0)
    if len(cold) == 0:
        return cell
    prof = weight[:, cold] - weight[:, cold].mean(axis=0, keepdims=True)
    prof /= np.maximum(np.linalg.norm(prof, axis=0, keepdims=True), 1e-12)
    label = balanced_kmeans(np.ascontiguousarray(prof.T), len(rest), capacity, seed=seed)
    centers = cell_centers(p, m)[rest]
    taken = np.zeros(len(rest), dtype=bool)
    cdirs = [_normalize(dirs[cold][label == k].sum(axis=0)[None])[0] if (label == k).any() else np.zeros(3)
             for k in range(len(rest))]
    sizes = np.bincount(label, minlength=len(rest))
    for k in np.argsort(-sizes, kind="stable"):  # the largest clusters choose their cell first
        sc = centers @ cdirs[k]
        sc[taken] = -np.inf
        j = int(np.argmax(sc))
        taken[j] = True
        cell[cold[label == k]] = rest[j]
    return cell
