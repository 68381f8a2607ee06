"""Golden packages written by earlier versions stay readable, bit for bit (numcodecs-style
backward-compatibility check)."""

from __future__ import annotations

import pytest

import spherefmt

from .fixtures.make_fixtures import FIXTURES, HERE


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_golden_package_reads_bit_exact(name):
    make, cfg, grat, depth = FIXTURES[name]
    sd = make()
    pkg = spherefmt.open(HERE / name)
    assert pkg.config == cfg and pkg.graticule == tuple(int(x) for x in grat.split("x")) and pkg.depth == depth
    assert pkg.keys() == list(sd)
    for k, v in sd.items():
        got = pkg.tensor(k)
        assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), k
    for address in pkg.experts():
        e = pkg.expert(*address)
        assert (e.neurons[e.index < 0].view("uint16") == 0).all()
