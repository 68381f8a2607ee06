"""The derived error bounds of ``spherefmt.testing.tolerance``: they hold for float32 arithmetic
in any order, and they are tight enough to catch a wrong result."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from spherefmt.dtypes import dequantize_blocks
from spherefmt.format.quant import quantize_rows
from spherefmt.testing import tolerance
from spherefmt.testing.tolerance import U32, assert_within, block_magnitudes, gamma, product_bound


def test_doctests():
    assert doctest.testmod(tolerance, optionflags=doctest.ELLIPSIS).failed == 0


def test_gamma():
    assert gamma(1) == pytest.approx(U32 / (1 - U32))
    with pytest.raises(ValueError, match="unbounded"):
        gamma(2**24)


@pytest.mark.parametrize("k", [1, 7, 512, 4096])
def test_product_bound_holds_in_every_summation_order(k):
    """Float32 sums in forward, reverse, pairwise (numpy) and blocked order, with terms that
    nearly cancel, stay inside the bound; the result with one float32 ulp of its largest term
    added does not."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((5, k)) * 100).astype(np.float32)
    w = rng.standard_normal((k, 3)).astype(np.float32)
    w[:, 2] = -w[:, 0]  # columns whose exact sums cancel to leave ~0: relative tolerances fail here
    ref = x.astype(np.float64) @ w.astype(np.float64)
    bound = product_bound(x, w)
    terms = x[:, :, None] * w[None]  # float32 products, (5, k, 3)
    forward = np.zeros((5, 3), np.float32)
    for j in range(k):
        forward += terms[:, j]
    backward = np.zeros((5, 3), np.float32)
    for j in reversed(range(k)):
        backward += terms[:, j]
    blocked = sum((terms[:, j : j + 32].sum(axis=1, dtype=np.float32) for j in range(0, k, 32)),
                  start=np.zeros((5, 3), np.float32))
    for got in (x @ w, forward, backward, blocked):
        assert_within(got, ref, bound)
    with pytest.raises(AssertionError, match="outside the derived bound"):
        assert_within((x @ w) + np.float32(bound.max() * 3), ref, bound)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_block_magnitudes_cover_the_values(fmt):
    rng = np.random.default_rng(3)
    blocks = quantize_rows(rng.standard_normal((4, 512)).astype(np.float32), fmt)
    values = dequantize_blocks(blocks).astype(np.float64)
    mag = block_magnitudes(blocks)
    assert mag.shape == values.shape
    if fmt == "Q8_0":
        np.testing.assert_array_equal(mag, np.abs(values))
    else:  # |d sc q| + |dmin m| >= |d sc q - dmin m|, with equality only where a piece is zero
        assert np.all(mag >= np.abs(values) * (1 - 2 * U32))
        assert np.any(mag > np.abs(values) * 1.5)


def test_assert_within_refuses_nan_and_shape():
    with pytest.raises(AssertionError, match="outside"):
        assert_within(np.array([np.nan]), np.array([1.0]), 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_within(np.zeros(2), np.zeros(3), 1.0)
