"""Placement: balanced, complete, deterministic, following the documented rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import spherefmt
from spherefmt.format.placement import (
    assign,
    cell_centers,
    default_grid,
    layer_shells,
    own_directions,
    tree_parents,
    tree_parents_projected,
)
from tests.helpers import model


@pytest.mark.parametrize("n,p,m", [(100, 3, 4), (3072, 4, 8), (50, 10, 20), (7, 1, 1)])
def test_assignment_is_balanced_and_complete(n, p, m):
    rng = np.random.default_rng(n)
    dirs = rng.standard_normal((n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cell = assign(dirs, p, m)
    k = math.ceil(n / (p * m))
    counts = np.bincount(cell, minlength=p * m)
    assert counts.sum() == n and counts.max() <= k
    assert np.array_equal(cell, assign(dirs, p, m))


def test_assignment_prefers_nearby_cells():
    # directions clustered around 6 cell centres land in those cells
    p, m = 2, 3
    centres = cell_centers(p, m)
    rng = np.random.default_rng(0)
    dirs = np.repeat(centres, 10, axis=0) + rng.normal(0, 0.05, (60, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    assert np.array_equal(assign(dirs, p, m), np.repeat(np.arange(6), 10))


def test_default_grid_rule():
    from spherefmt.constants import MAX_PLANE_WASTE, MIN_PLANE_BYTES
    from spherefmt.format.placement import Grid, plane_waste

    assert default_grid(3072, 1537, 2, 12) == Grid(3, 6, 10)  # GPT-2 small, as the spec says
    for n, f, item, layers in [(3072, 1537, 2, 12), (6400, 3201, 2, 48), (11008, 12288, 2, 32), (4096, 2049, 4, 24)]:
        g = default_grid(n, f, item, layers)
        k = math.ceil(n / g.cells)
        assert g.meridians == 2 * g.parallels and g.depth == min(10, layers)
        assert k * f >= MIN_PLANE_BYTES and plane_waste(k, f, item) <= MAX_PLANE_WASTE
        # no 2:1 graticule with more cells meets both conditions
        for p in range(g.parallels + 1, 181):
            kk = math.ceil(n / (2 * p * p)) if 2 * p * p <= n else 0
            assert not kk or kk * f < MIN_PLANE_BYTES or plane_waste(kk, f, item) > MAX_PLANE_WASTE
    assert default_grid(16, 9, 4, 1) == Grid(1, 1, 1)
    assert default_grid(10**6, 10**6, 2, 100) == Grid(180, 360, 10)
    assert plane_waste(96, 1537, 2) > 0.05 > plane_waste(171, 1537, 2)


@pytest.mark.parametrize("layers,depth", [(12, 10), (3, 2), (48, 10), (5, 5), (7, 1)])
def test_layer_shells_proportional(layers, depth):
    shells = layer_shells(layers, depth)
    assert shells[0] == depth - 1 and shells[-1] == 0
    assert sorted(set(shells)) == list(range(depth))
    assert all(a >= b for a, b in zip(shells, shells[1:], strict=False))  # outward like lightning
    sizes = np.bincount(shells)
    assert sizes.max() - sizes.min() <= 1


def test_tree_parent_is_the_strongest_wire():
    rng = np.random.default_rng(0)
    prev_out = rng.standard_normal((20, 8))
    w_in = rng.standard_normal((30, 8))
    par = tree_parents(prev_out, w_in, block=7)
    assert np.array_equal(par, np.argmax(np.abs(prev_out @ w_in.T), axis=0))


def test_projected_tree_finds_the_exact_parents_of_low_rank_wiring():
    """Version 2's tree: where the wiring lies in few directions (as in trained models) every
    parent is the exact one; with every candidate rescored it is the exact tree."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((96, 8)))[0]
    prev_out = rng.standard_normal((300, 8)) @ basis.T + rng.normal(0, 0.01, (300, 96))
    w_in = rng.standard_normal((400, 8)) @ basis.T + rng.normal(0, 0.01, (400, 96))
    exact = tree_parents(prev_out, w_in)
    assert np.array_equal(tree_parents_projected(prev_out, w_in, 16, 8, block=64), exact)
    assert np.array_equal(tree_parents_projected(prev_out, w_in, 2, 300), exact)  # all rescored
    noise = tree_parents_projected(rng.standard_normal((300, 96)), rng.standard_normal((400, 96)), 16, 8)
    assert noise.dtype == np.int32 and noise.min() >= 0 and noise.max() < 300


def test_large_layers_record_the_projected_tree(tmp_path, monkeypatch):
    from spherefmt import constants as C

    sd, cfg = model("gpt2", "F32")
    monkeypatch.setattr(C, "TREE_EXACT_MAX_MACS", 0)  # every layer past the first is "large"
    pkg = spherefmt.open(spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x2", depth=3))
    pl = pkg.header.placement
    assert pl["version"] == 2 and pl["tree"]["method"] == "projected" and pl["tree"]["layers"] == [1, 2]
    monkeypatch.setattr(C, "TREE_EXACT_MAX_MACS", 2**39)
    small = spherefmt.open(spherefmt.save(sd, tmp_path / "s.sphere", config=cfg, graticule="2x2", depth=3))
    assert small.header.placement == {"policy": "lightning-pca-balanced", "version": 1, "bend": 0.5}
    assert np.array_equal(pkg.tensor("transformer.h.1.mlp.c_fc.weight"), sd["transformer.h.1.mlp.c_fc.weight"])


def test_candidate_cells_are_exactly_the_stable_sort():
    """assign's O(C) choice of candidate cells equals the full stable sort, ties included."""
    from spherefmt.format.placement import _top_stable

    rng = np.random.default_rng(0)
    for trial in range(20):
        sc = rng.standard_normal((17, 300))
        if trial % 2:
            sc = np.round(sc, 1)  # many ties, some at the boundary
        for top in (1, 7, 32, 299, 300, 400):
            assert np.array_equal(_top_stable(sc, top), np.argsort(-sc, axis=1, kind="stable")[:, :top])


def test_own_directions_group_similar_neurons():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 16)) * 5
    w_in = np.repeat(base, 20, axis=0) + rng.normal(0, 0.1, (60, 16))
    d = own_directions(w_in)
    assert np.allclose(np.linalg.norm(d, axis=1), 1)
    cos = d @ d.T
    same = np.repeat(np.arange(3), 20)
    assert cos[same[:, None] == same[None, :]].min() > 0.9


def test_package_records_tree_and_index(tmp_path):
    sd, cfg = model("llama", "F32")
    pkg = spherefmt.open(spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x2", depth=3))
    h = pkg.metadata
    assert h["layer_depth"] == [2, 1, 0]
    for lat, lon, d in pkg.experts():
        e = pkg.expert(lat, lon, d)
        layer = e.layers[0]
        real = e.index[0] >= 0
        if layer == 0:
            assert (e.parent[0] == -1).all()
            continue
        gate = sd[f"model.layers.{layer}.mlp.gate_proj.weight"].astype(np.float64)
        down = sd[f"model.layers.{layer - 1}.mlp.down_proj.weight"].astype(np.float64)
        want = np.argmax(np.abs(down.T @ gate.T), axis=0)
        assert np.array_equal(e.parent[0][real], want[e.index[0][real]])
