"""Error bounds derived from the arithmetic, for float32 results checked against float64 references.

A fixed ``rtol``/``atol`` is a guess: it passes or fails with the data (a long sum of large terms
that nearly cancel misses any relative tolerance) and with the order a CPU or GPU happens to sum
in.  The bounds here are the classical forward-error bounds of floating-point arithmetic
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 2-3), so they hold for
every summation order, with or without fused multiply-add, and still fail on a wrong result:

- one float32 operation on exact inputs is off by at most ``u |result|``, ``u = 2**-24``;
- a sum or dot product of ``n`` terms by at most ``gamma(n) * sum |terms|``,
  ``gamma(n) = n u / (1 - n u)`` (Higham's eq. 3.4, any order of the additions);
- a float32 function of one argument (``exp``, ``tanh``, ``erf``...) that its library promises
  within ``ulps`` units in the last place, composed of roundings of relative size ``ulps * u``,
  by at most ``ulps * u * (|f(x)| + |x f'(x)|)``: its own rounding plus the rounding of its
  argument's intermediates carried through by the condition number ``|x f'(x) / f(x)|``.

Every comparison also allows half of float32's smallest subnormal (results that underflow).

Examples
--------
>>> import numpy as np

from spherefmt.dtypes import Q4_K, Q8_0, QBLOCK, q4_k_scales

#: roundings a block-format product may add on each path besides its ``k`` additions: a kernel
#: may sum a block's ``x * q`` first and scale the sum (one multiply; ``Q4_K`` also multiplies
#: ``sum x`` by ``dmin * m`` and subtracts), or widen each value first (``Q4_K``'s one rounding
#: ``(d * sc) * q - (dmin * m)``, none for ``Q8_0``): the larger of the two
BLOCK_ROUNDINGS = {"Q8_0": 2, "Q4_K": 3}
>>> x, w = np.full((1, 3), 0.1, np.float32), np.full((3, 1), 3.0, np.float32)
>>> got = x @ w  # float32
>>> ref = x.astype(np.float64) @ w
>>> assert_within(got, ref, product_bound(x, w))  # within gamma(3) * sum |x| |w|
>>> assert_within(got + 1e-6, ref, product_bound(x, w))
Traceback (most recent call last):
AssertionError: : 1 of 1 elements outside the derived bound; ...
"""

from __future__ import annotations

import numpy as np

from spherefmt.dtypes import Q4_K, Q8_0, QBLOCK, q4_k_scales

#: roundings a block-format product may add on each path besides its ``k`` additions: a kernel
#: may sum a block's ``x * q`` first and scale the sum (one multiply; ``Q4_K`` also multiplies
#: ``sum x`` by ``dmin * m`` and subtracts), or widen each value first (``Q4_K``'s one rounding
#: ``(d * sc) * q - (dmin * m)``, none for ``Q8_0``): the larger of the two
BLOCK_ROUNDINGS = {"Q8_0": 2, "Q4_K": 3}

__all__ = ["U32", "EPS32", "BLOCK_ROUNDINGS", "gamma", "rounding_bound", "product_bound", "block_magnitudes",
           "assert_within"]

#: float32 machine epsilon (``2**-23``) and unit roundoff (``2**-24``, round to nearest)
EPS32 = float(np.finfo(np.float32).eps)
U32 = EPS32 / 2
#: half of float32's smallest subnormal: a result that underflows is off by at most this much
_TINY = float(np.finfo(np.float32).smallest_subnormal) / 2


def gamma(n: int | float | np.ndarray, u: float = U32) -> np.ndarray:
    """``n u / (1 - n u)``: the relative error of ``n`` successive roundings (Higham, lemma 3.1).

    Raises
    ------
    ValueError
        When ``n u >= 1``: no bound of this form exists.
    """
    nu = np.asarray(n, dtype=np.float64) * u
    if np.any(nu >= 1):
        raise ValueError(f"gamma({n}) is unbounded at unit roundoff {u}")
    return nu / (1 - nu)


def rounding_bound(ref: np.ndarray, roundings: int = 1) -> np.ndarray:
    """Bound for ``roundings`` float32 operations in a row on exact inputs (``a + b``, ``a * b``
    with float32 ``a``, ``b``): ``gamma(roundings) * |ref|``."""
    return gamma(roundings) * np.abs(np.asarray(ref, dtype=np.float64))


def product_bound(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, *,
                  weight_roundings: int = 0) -> np.ndarray:
    """Bound on ``|fl(x @ w + bias) - (x @ w + bias)|`` for float32 accumulation.

    ``x`` is ``(m, k)``, ``w`` is ``(k, n)`` (transpose first for ``x @ w.T``), both holding the
    exact values the device multiplies (float32, or 16-bit/block values widened exactly).  Each
    output is a sum of ``k`` products (and the bias): ``gamma(k + 1 [+ 1]) * (|x| @ |w| + |bias|)``.
    ``weight_roundings`` adds roundings on each path from a weight to the output besides the
    sum's (:data:`BLOCK_ROUNDINGS`); for block formats pass :func:`block_magnitudes` as ``w``:
    a kernel that scales a block's sum works on the pieces of each value, not the value.
    """
    xa = np.abs(np.asarray(x, dtype=np.float64))
    wa = np.abs(np.asarray(w, dtype=np.float64))
    k = xa.shape[-1]
    terms = xa @ wa
    n = k + weight_roundings  # k products and k - 1 additions: gamma(k) (Higham, eq. 3.4)
    if bias is not None:
        terms = terms + np.abs(np.asarray(bias, dtype=np.float64))
        n += 1
    return gamma(n) * terms


def block_magnitudes(blocks: np.ndarray) -> np.ndarray:
    """Per value of ``Q8_0``/``Q4_K`` blocks ``(..., n)``, the magnitude of the pieces it is
    computed from, as float64 ``(..., values)``: ``|d q|`` for ``Q8_0``, ``|d sc q| + |dmin m|``
    for ``Q4_K`` (a value near zero can be the difference of two large pieces, and a kernel
    that subtracts ``dmin * m * sum x`` per sub-block carries the pieces' errors, not the value's)."""
    if blocks.dtype == Q8_0:
        return np.abs(blocks["qs"].astype(np.float64) * blocks["d"].astype(np.float64)[..., None]).reshape(
            *blocks.shape[:-1], -1)
    if blocks.dtype != Q4_K:
        raise ValueError(f"not a block format: {blocks.dtype}")
    sc, mn = q4_k_scales(blocks["scales"])
    qs = blocks["qs"].reshape(blocks.shape + (4, 1, 32))
    q = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(blocks.shape + (8, QBLOCK)).astype(np.float64)
    d = blocks["d"].astype(np.float64)[..., None, None]
    dmin = blocks["dmin"].astype(np.float64)[..., None, None]
    mag = np.abs(d * sc[..., None] * q) + np.abs(dmin * mn[..., None])
    return mag.reshape(*blocks.shape[:-1], -1)


def assert_within(got: np.ndarray, ref: np.ndarray, bound: np.ndarray | float, what: str = "") -> None:
    """Fail unless ``|got - ref| <= bound`` everywhere (shapes must match), naming the worst
    element and how far over its bound it is.

    Raises
    ------
    AssertionError
        On a shape mismatch, a non-finite result where the reference is finite, or an element
        outside its bound.
    """
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if g.shape != r.shape:
        raise AssertionError(f"{what}: shape {g.shape} against the reference's {r.shape}")
    b = np.broadcast_to(np.asarray(bound, dtype=np.float64) + _TINY, r.shape)
    err = np.abs(g - r)
    bad = ~(err <= b)  # NaN counts as outside
    if bad.any():
        ratio = np.where(bad, np.nan_to_num(err / b, nan=np.inf), 0.0)
        i = np.unravel_index(int(np.argmax(ratio)), r.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {r.size} elements outside the derived bound; worst at "
                             f"{tuple(int(j) for j in i)}: got {g[i]!r}, reference {r[i]!r}, error {err[i]:.3g} "
                             f"> bound {b[i]:.3g} ({ratio[i]:.3g}x)")
