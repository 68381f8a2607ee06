"""Decode-size products with GGUF block-quantized weights on the CPU, compiled by numba (optional).

The numpy backend widens a block-quantized matrix to float32 piece by piece before BLAS reads it:
exact, but the widening costs more than reading float32 (0.7 ns a value for ``Q8_0`` here).
These kernels read the blocks where they lie and widen each block in registers right before its
products, as llama.cpp's do, so a product moves about 1.06 bytes a value (``Q8_0``) or 0.56
(``Q4_K``) instead of 4.  Activations stay float32 and every weight value is the one GGUF's
dequantizer gives (``d * q``; ``(d * sc) * q - dmin * m``); the sums run in float32 in an order
of their own (32 lanes, then the lanes; ``fastmath`` lets the compiler vectorise them), so
results agree with the widening path to float32 rounding, not bit for bit.

Contract: ``raw`` is a C-contiguous ``uint8`` matrix ``(rows, bytes per row)`` of whole blocks,
``x`` C-contiguous float32 ``(T, ...)``, and the column range covers whole blocks (the numpy
backend keeps its widening path otherwise, and for products of many rows, where BLAS on widened
pieces is faster).  Each kernel runs in parallel over output rows or block columns (numba's
``prange``) on the threads :func:`set_threads` last gave.  Compiled on first use and cached
beside this file (``cache=True``): the first run in a fresh checkout spends a few seconds
compiling.  Without numba, :data:`AVAILABLE` is false and nothing here runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["AVAILABLE", "matmul_blocks", "set_threads"]

_nb: Any
try:  # an optional speed-up: pip install 'spherefmt[fast]'
    import numba as _nb
except ImportError:  # pragma: no cover - exercised where numba is absent
    _nb = None

#: whether the kernels run here (numba importable, and not switched off by
#: ``SPHEREFMT_QKERNELS=0``, which benchmarks use to measure the widening path beside them)
AVAILABLE = _nb is not None and os.environ.get("SPHEREFMT_QKERNELS", "1") != "0"

#: float32 value of every float16 bit pattern (256 KiB; a lookup is cheaper than the arithmetic)
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

prange = _nb.prange if _nb is not None else range  # numba parallelises loops over this name


def _jit(fn: Any) -> Any:
    return _nb.njit(cache=True, parallel=True, fastmath=True)(fn) if _nb is not None else fn


def set_threads(n: int) -> None:
    """Threads of the kernels (at most numba's pool size)."""
    if _nb is not None:
        _nb.set_num_threads(max(1, min(int(n), _nb.config.NUMBA_NUM_THREADS)))


@_jit
def _q8_0_t(x: Any, raw: Any, b0: int, b1: int, f16: Any, y: Any) -> None:
    """``y = x @ W.T`` over blocks ``b0 .. b1`` of each row of ``Q8_0`` bytes ``raw``."""
    q = raw.view(np.int8)
    for r in prange(raw.shape[0]):
        # rows sliced to the blocks used, so every index below counts up from zero: numba then
        # emits no negative-index wraparound in the inner loops (which made them 8x slower)
        row = q[r][b0 * 34 : b1 * 34]
        urow = raw[r][b0 * 34 : b1 * 34]
        lanes = np.empty(32, np.float32)
        for t in range(x.shape[0]):
            xt = x[t]
            lanes[:] = 0.0
            for b in range(b1 - b0):
                o = b * 34
                d = f16[np.int32(urow[o]) | (np.int32(urow[o + 1]) << 8)]
                for j in range(32):
                    lanes[j] += (d * np.float32(row[o + 2 + j])) * xt[b * 32 + j]
            y[t, r] = lanes.sum()


#: Q8_0 blocks of output columns per parallel task of ``_q8_0_p`` (256 outputs: 1 KiB of sums)
_Q8_0_CHUNK = 8


@_jit
def _q8_0_p(x: Any, raw: Any, b0: int, b1: int, f16: Any, y: Any) -> None:
    """``y = x @ W`` over blocks ``b0 .. b1`` (output columns) of ``Q8_0`` bytes ``raw``: each
    parallel task owns a run of blocks and streams that run of every row of ``W``, two rows at a
    time (half the read-modify-writes of its sums)."""
    q = raw.view(np.int8)
    nblk = b1 - b0
    rows = raw.shape[0]
    for task in prange((nblk + _Q8_0_CHUNK - 1) // _Q8_0_CHUNK):
        first = task * _Q8_0_CHUNK
        count = min(_Q8_0_CHUNK, nblk - first)
        lo, hi = (b0 + first) * 34, (b0 + first + count) * 34  # rows sliced: indices from zero (_q8_0_t)
        lanes = np.empty(_Q8_0_CHUNK * 32, np.float32)
        for t in range(x.shape[0]):
            xt = x[t]
            lanes[:] = 0.0
            r = 0
            while r + 2 <= rows:
                u0, u1, q0, q1 = raw[r][lo:hi], raw[r + 1][lo:hi], q[r][lo:hi], q[r + 1][lo:hi]
                x0, x1 = xt[r], xt[r + 1]
                for b in range(count):
                    o = b * 34
                    s0 = x0 * f16[np.int32(u0[o]) | (np.int32(u0[o + 1]) << 8)]
                    s1 = x1 * f16[np.int32(u1[o]) | (np.int32(u1[o + 1]) << 8)]
                    for j in range(32):
                        lanes[b * 32 + j] += s0 * np.float32(q0[o + 2 + j]) + s1 * np.float32(q1[o + 2 + j])
                r += 2
            if r < rows:
                u0, q0, x0 = raw[r][lo:hi], q[r][lo:hi], xt[r]
                for b in range(count):
                    o = b * 34
                    s0 = x0 * f16[np.int32(u0[o]) | (np.int32(u0[o + 1]) << 8)]
                    for j in range(32):
                        lanes[b * 32 + j] += s0 * np.float32(q0[o + 2 + j])
            for j in range(count * 32):
                y[t, first * 32 + j] = lanes[j]


@_jit
def _q4_k_t(x: Any, raw: Any, b0: int, b1: int, f16: Any, y: Any) -> None:
    """``y = x @ W.T`` over blocks ``b0 .. b1`` of each row of ``Q4_K`` bytes ``raw``."""
    for r in prange(raw.shape[0]):
        urow = raw[r][b0 * 144 : b1 * 144]  # indices from zero (see _q8_0_t)
        lanes = np.empty(32, np.float32)
        sc = np.empty(8, np.float32)
        mn = np.empty(8, np.float32)
        for t in range(x.shape[0]):
            xt = x[t]
            lanes[:] = 0.0
            for b in range(b1 - b0):
                o = b * 144
                d = f16[np.int32(urow[o]) | (np.int32(urow[o + 1]) << 8)]
                dmin = f16[np.int32(urow[o + 2]) | (np.int32(urow[o + 3]) << 8)]
                for j in range(4):
                    sc[j] = d * np.float32(urow[o + 4 + j] & 63)
                    mn[j] = dmin * np.float32(urow[o + 8 + j] & 63)
                    sc[j + 4] = d * np.float32((urow[o + 12 + j] & 15) | ((urow[o + 4 + j] >> 6) << 4))
                    mn[j + 4] = dmin * np.float32((urow[o + 12 + j] >> 4) | ((urow[o + 8 + j] >> 6) << 4))
                c = b * 256
                for p in range(4):  # 32 bytes: sub-block 2p in the low nibbles, 2p + 1 in the high
                    base = o + 16 + 32 * p
                    s0, m0, s1, m1 = sc[2 * p], mn[2 * p], sc[2 * p + 1], mn[2 * p + 1]
                    xo = c + 64 * p
                    for j in range(32):
                        v = urow[base + j]
                        lanes[j] += (s0 * np.float32(v & 15) - m0) * xt[xo + j] \
                            + (s1 * np.float32(v >> 4) - m1) * xt[xo + 32 + j]
            y[t, r] = lanes.sum()


@_jit
def _q4_k_p(x: Any, raw: Any, b0: int, b1: int, f16: Any, y: Any) -> None:
    """``y = x @ W`` over blocks ``b0 .. b1`` (output columns) of ``Q4_K`` bytes ``raw``: each
    parallel task owns one block of 256 output columns."""
    for b in prange(b1 - b0):
        c = b * 256
        lanes = np.empty(256, np.float32)
        for t in range(x.shape[0]):
            xt = x[t]
            lanes[:] = 0.0
            for r in range(raw.shape[0]):
                blk = raw[r][(b0 + b) * 144 : (b0 + b + 1) * 144]  # indices from zero (see _q8_0_t)
                xr = xt[r]
                d = xr * f16[np.int32(blk[0]) | (np.int32(blk[1]) << 8)]
                dmin = xr * f16[np.int32(blk[2]) | (np.int32(blk[3]) << 8)]
                for p in range(4):
                    j0, j1 = 2 * p, 2 * p + 1
                    if p < 2:
                        s0 = d * np.float32(blk[4 + j0] & 63)
                        m0 = dmin * np.float32(blk[8 + j0] & 63)
                        s1 = d * np.float32(blk[4 + j1] & 63)
                        m1 = dmin * np.float32(blk[8 + j1] & 63)
                    else:
                        s0 = d * np.float32((blk[8 + j0] & 15) | ((blk[j0] >> 6) << 4))
                        m0 = dmin * np.float32((blk[8 + j0] >> 4) | ((blk[4 + j0] >> 6) << 4))
                        s1 = d * np.float32((blk[8 + j1] & 15) | ((blk[j1] >> 6) << 4))
                        m1 = dmin * np.float32((blk[8 + j1] >> 4) | ((blk[4 + j1] >> 6) << 4))
                    base = 16 + 32 * p
                    for j in range(32):
                        v = blk[base + j]
                        lanes[64 * p + j] += s0 * np.float32(v & 15) - m0
                        lanes[64 * p + 32 + j] += s1 * np.float32(v >> 4) - m1
            for j in range(256):
                y[t, c + j] = lanes[j]


#: (format, transposed) -> (kernel, values per block)
_KERNELS = {("Q8_0", True): (_q8_0_t, 32), ("Q8_0", False): (_q8_0_p, 32),
            ("Q4_K", True): (_q4_k_t, 256), ("Q4_K", False): (_q4_k_p, 256)}


def matmul_blocks(x: np.ndarray, raw: np.ndarray, fmt: str, cols: tuple[int, int], transpose_w: bool) -> np.ndarray:
    """``x @ W[:, a:b]`` (or ``x @ W[:, a:b].T``) for ``W`` a ``Q8_0``/``Q4_K`` matrix given as its
    blocks' bytes ``raw`` (see the module docstring for what the arguments must be)."""
    kernel, k = _KERNELS[(fmt, transpose_w)]
    a, b = cols
    y = np.empty((x.shape[0], raw.shape[0] if transpose_w else b - a), dtype=np.float32)
    kernel(x, raw, a // k, b // k, _F16, y)
    return y
