"""Block-quantized tensors (``spec/FORMAT.md`` section 5.1): GGUF's ``Q8_0`` blocks in a package.

A quantized tensor keeps its header entry (dtype ``F32``: the values it reads as) and is stored
as the bytes of its ``Q8_0`` blocks: 32 consecutive values along the last axis per 34-byte block
(a little-endian float16 scale ``d``, then 32 ``int8`` ``q``; value ``d * q``), exactly GGUF's
``block_q8_0``.  Blocks are made by the ``gguf`` package's own quantizer (llama.cpp's reference),
so a package's blocks are the bytes ``llama-quantize`` writes for the same float32 rows.

A quantized sphere stores each neuron row as its fields one after another, each padded with
zeros to whole blocks (GPT-2's one-wide input bias takes a block of its own), so that every
field is a range of whole blocks that a product reads in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from spherefmt import constants as C
from spherefmt.dtypes import Q8_0, dequantize_q8_0
from spherefmt.errors import InputError

__all__ = ["QUANT_TYPES", "block_slices", "blocks_width", "dequantize", "quantize_rows", "storage_shape"]

#: quantization types a package may hold: name -> (values per block, bytes per block)
QUANT_TYPES: dict[str, tuple[int, int]] = {C.QUANT_Q8_0: (C.Q8_0_BLOCK, C.Q8_0_BYTES)}


def storage_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The ``uint8`` shape of a quantized tensor's blocks (the last axis in whole blocks)."""
    return shape[:-1] + (shape[-1] // C.Q8_0_BLOCK * C.Q8_0_BYTES,)


def block_slices(widths: Mapping[str, int]) -> dict[str, slice]:
    """Value ranges of each field in a quantized row: each field starts on a block boundary."""
    out, o = {}, 0
    for name, w in widths.items():
        out[name] = slice(o, o + w)
        o += math.ceil(w / C.Q8_0_BLOCK) * C.Q8_0_BLOCK
    return out


def blocks_width(widths: Mapping[str, int]) -> int:
    """Values per quantized row, padding included (a multiple of the block)."""
    return sum(math.ceil(w / C.Q8_0_BLOCK) * C.Q8_0_BLOCK for w in widths.values())


def quantize_rows(rows: np.ndarray) -> np.ndarray:
    """``Q8_0`` blocks ``(..., n / 32)`` of float32 rows ``(..., n)`` (``n`` a multiple of 32), by
    the ``gguf`` package's quantizer."""
    try:
        import gguf
    except ImportError:
        raise InputError("quantizing needs the gguf package: pip install 'spherefmt[gguf]'") from None
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    raw = gguf.quants.quantize(rows.reshape(-1, rows.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    return np.ascontiguousarray(raw).view(Q8_0).reshape(rows.shape[:-1] + (rows.shape[-1] // C.Q8_0_BLOCK,))


def dequantize(raw: np.ndarray) -> np.ndarray:
    """float32 values of stored ``Q8_0`` bytes ``(..., 34 k)`` (or blocks ``(..., k)``)."""
    blocks = raw if raw.dtype == Q8_0 else np.ascontiguousarray(raw).view(Q8_0)
    return dequantize_q8_0(blocks)


def pad_fields(rows: np.ndarray, widths: Mapping[str, int]) -> np.ndarray:
    """Rows ``(n, F)`` laid out as a quantized row ``(n, blocks_width)``: each field on a block
    boundary, zeros between."""
    out = np.zeros(rows.shape[:-1] + (blocks_width(widths),), dtype=np.float32)
    o = 0
    for sl in block_slices(widths).values():
        w = sl.stop - sl.start
        out[..., sl] = rows[..., o : o + w]
        o += w
    return out


def unpad_fields(values: np.ndarray, widths: Mapping[str, int]) -> np.ndarray:
    """The inverse of :func:`pad_fields`: rows ``(n, F)`` of the fields' values."""
    return np.concatenate([values[..., sl] for sl in block_slices(widths).values()], axis=-1)
