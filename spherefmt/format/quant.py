"""Block-quantized tensors (``spec/FORMAT.md`` section 5.1): GGUF's ``Q8_0`` and ``Q4_K`` blocks in a package.

A quantized tensor keeps its header entry (dtype ``F32``: the values it reads as) and is stored
as the bytes of its blocks along the last axis, exactly GGUF's: ``Q8_0`` holds 32 values in 34
bytes (a little-endian float16 scale ``d``, then 32 ``int8`` ``q``; value ``d * q``); ``Q4_K``
holds 256 values in 144 bytes (float16 ``d`` and ``dmin``, twelve bytes of packed 6-bit
sub-block scales and mins, 128 bytes of 4-bit values; value ``d * sc * q - dmin * m``).
``Q8_0`` blocks are made by the ``gguf`` package's own quantizer (llama.cpp's reference), so a
package's blocks are the bytes ``llama-quantize`` writes for the same float32 rows; ``Q4_K``
blocks by :func:`quantize_q4_k`, llama.cpp's reference algorithm in numpy (gguf has no ``Q4_K``
quantizer).

A quantized sphere stores each neuron row as its fields one after another, each padded with
zeros to whole blocks (GPT-2's one-wide input bias takes a block of its own), so that every
field is a range of whole blocks that a product reads in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from spherefmt import constants as C
from spherefmt.dtypes import BLOCK_DTYPES, Q4_K, QK_K, dequantize_blocks
from spherefmt.errors import InputError

__all__ = ["QUANT_TYPES", "block_slices", "blocks_width", "dequantize", "quantize_rows", "quantize_q4_k",
           "storage_shape", "pad_fields", "unpad_fields"]

#: quantization types a package may hold: name -> (values per block, bytes per block)
QUANT_TYPES: dict[str, tuple[int, int]] = C.QUANT_TYPES


def storage_shape(shape: tuple[int, ...], qtype: str = C.QUANT_Q8_0) -> tuple[int, ...]:
    """The ``uint8`` shape of a quantized tensor's blocks (the last axis in whole blocks)."""
    n, size = QUANT_TYPES[qtype]
    return shape[:-1] + (shape[-1] // n * size,)


def block_slices(widths: Mapping[str, int], qtype: str = C.QUANT_Q8_0) -> dict[str, slice]:
    """Value ranges of each field in a quantized row: each field starts on a block boundary."""
    n = QUANT_TYPES[qtype][0]
    out, o = {}, 0
    for name, w in widths.items():
        out[name] = slice(o, o + w)
        o += math.ceil(w / n) * n
    return out


def blocks_width(widths: Mapping[str, int], qtype: str = C.QUANT_Q8_0) -> int:
    """Values per quantized row, padding included (a multiple of the block)."""
    n = QUANT_TYPES[qtype][0]
    return sum(math.ceil(w / n) * n for w in widths.values())


def quantize_rows(rows: np.ndarray, qtype: str = C.QUANT_Q8_0) -> np.ndarray:
    """Blocks ``(..., n / block)`` of float32 rows ``(..., n)`` (``n`` a multiple of the block):
    ``Q8_0`` by the ``gguf`` package's quantizer, ``Q4_K`` by :func:`quantize_q4_k`."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == C.QUANT_Q4_K:
        return quantize_q4_k(rows)
    try:
        import gguf
    except ImportError:
        raise InputError("quantizing to Q8_0 needs the gguf package: pip install 'spherefmt[gguf]'") from None
    raw = gguf.quants.quantize(rows.reshape(-1, rows.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    dt = BLOCK_DTYPES[qtype]
    return np.ascontiguousarray(raw).view(dt).reshape(rows.shape[:-1] + (rows.shape[-1] // C.Q8_0_BLOCK,))


def dequantize(raw: np.ndarray, qtype: str = C.QUANT_Q8_0) -> np.ndarray:
    """float32 values of stored blocks' bytes ``(..., size k)`` (or blocks ``(..., k)``)."""
    dt = BLOCK_DTYPES[qtype]
    blocks = raw if raw.dtype == dt else np.ascontiguousarray(raw).view(dt)
    return dequantize_blocks(blocks)


def pad_fields(rows: np.ndarray, widths: Mapping[str, int], qtype: str = C.QUANT_Q8_0) -> np.ndarray:
    """Rows ``(n, F)`` laid out as a quantized row ``(n, blocks_width)``: each field on a block
    boundary, zeros between."""
    out = np.zeros(rows.shape[:-1] + (blocks_width(widths, qtype),), dtype=np.float32)
    o = 0
    for sl in block_slices(widths, qtype).values():
        w = sl.stop - sl.start
        out[..., sl] = rows[..., o : o + w]
        o += w
    return out


def unpad_fields(values: np.ndarray, widths: Mapping[str, int], qtype: str = C.QUANT_Q8_0) -> np.ndarray:
    """The inverse of :func:`pad_fields`: rows ``(n, F)`` of the fields' values."""
    return np.concatenate([values[..., sl] for sl in block_slices(widths, qtype).values()], axis=-1)


# --- Q4_K: llama.cpp's reference quantizer ---------------------------------------------------

def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qkx2_quants`` on every row of ``x`` at once (``(S, 32)`` sub-blocks
    with importance ``w``): the scale, the offset (as a non-negative ``min``) and the integers
    ``0..nmax`` that minimise the weighted squared error over ``nstep + 1`` trial scales."""
    f = np.float32
    lo = np.minimum(x.min(axis=1), f(0))
    hi = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    flat = hi - lo <= 0  # all values equal (and >= 0): integers 0, offset -lo

    def ints(iscale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(f)

    iscale = f(nmax) / np.where(flat, f(1), hi - lo)
    scale = f(1) / iscale
    L = ints(iscale, lo)
    best = (w * np.square(scale[:, None] * L + lo[:, None] - x)).sum(axis=1)
    low = lo.copy()
    for step in range(nstep + 1):
        # as llama.cpp: each trial starts from the best offset found so far (`min` is updated)
        span = hi - low
        span = np.where(flat | (span <= 0), f(1), span)
        la = ints((f(rmin) + f(rdelta) * f(step) + f(nmax)) / span, low)
        wl = w * la
        sum_l, sum_l2, sum_xl = wl.sum(axis=1), (wl * la).sum(axis=1), (wl * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, f(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0  # llama.cpp keeps the offset at or below zero
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f(1)), this_scale)
        this_min = np.where(pos, f(0), this_min)
        err = (w * np.square(this_scale[:, None] * la + this_min[:, None] - x)).sum(axis=1)
        better = ok & (err < best)
        L[better], best[better] = la[better], err[better]
        scale[better], low[better] = this_scale[better], this_min[better]
    scale[flat], L[flat] = 0, 0
    return scale, np.float32(0) - low, L  # not -low: a zero min must be +0.0 (zero rows are zero bytes)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """``Q4_K`` blocks ``(..., n / 256)`` of float32 rows ``(..., n)`` (``n`` a multiple of 256), by
    llama.cpp's reference quantizer (``quantize_row_q4_K_ref``): per 32-value sub-block a scale
    and a min fitted by weighted least squares (importance ``rms + |x|``), both quantized to six
    bits against the super-block's float16 ``d`` and ``dmin``, then each value rounded to four
    bits against its sub-block's quantized scale and min.  Computed with numpy's sums (pairwise,
    no fused multiply-adds), so about 1 block in 80 differs from llama.cpp's where two trial scales
    nearly tie (``bench/bench_precision.py`` compares every block of a 155M model: 98.2% the
    same bytes, the same error); gguf and llama.cpp read the bytes alike (the tests check them
    against gguf's dequantizer)."""
    f = np.float32
    rows = np.ascontiguousarray(rows, dtype=f)
    shape = rows.shape[:-1] + (rows.shape[-1] // QK_K,)
    flat = rows.reshape(-1, QK_K)
    out = np.empty(len(flat), dtype=Q4_K)
    step = 1 << 14  # super-blocks at a time: bounded temporaries (~40 MiB)
    for b0 in range(0, len(flat), step):
        x = flat[b0 : b0 + step]
        n = len(x)
        sub = x.reshape(n * 8, 32)
        av = np.sqrt(np.square(sub).sum(axis=1) / f(32))
        scales, mins, _ = _qkx2(sub, av[:, None] + np.abs(sub), 15, -1.0, 0.1, 20)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
        inv_scale = np.where(max_scale > 0, f(63) / np.where(max_scale > 0, max_scale, f(1)), f(0))
        inv_min = np.where(max_min > 0, f(63) / np.where(max_min > 0, max_min, f(1)), f(0))
        ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
        lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
        blk = out[b0 : b0 + n]
        packed = np.zeros((n, 12), dtype=np.uint8)
        packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
        packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
        packed[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
        blk["scales"] = packed
        blk["d"] = (max_scale / f(63)).astype(np.float16)
        blk["dmin"] = (max_min / f(63)).astype(np.float16)
        d = blk["d"].astype(f)[:, None] * ls
        dm = blk["dmin"].astype(f)[:, None] * lm
        safe = np.where(d == 0, f(1), d)
        q = np.clip(np.rint((x.reshape(n, 8, 32) + dm[..., None]) / safe[..., None]), 0, 15)
        q[d == 0] = 0  # llama.cpp keeps make_qkx2's integers there; they multiply a zero scale
        q = q.astype(np.uint8).reshape(n, 4, 2, 32)
        blk["qs"] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return out.reshape(shape)
