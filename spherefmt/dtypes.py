"""Data types: the safetensors spelling, the Zarr storage dtype, and framework views.

Packages store every tensor as its *storage* array (bfloat16 and float8 as raw words, since
Zarr v3 has no such types) and record the original dtype.  Users get real dtypes back: numpy
arrays use ``ml_dtypes`` for bfloat16/float8, torch tensors their native dtypes; the bytes are
never converted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from spherefmt.constants import DTYPES, MAX_NDIM
from spherefmt.errors import FormatError

__all__ = ["Q8_0", "Q4_K", "QBLOCK", "QK_K", "BLOCK_DTYPES", "block_values", "dequantize_blocks", "dequantize_q8_0",
           "dequantize_q4_k", "values_shape", "TensorInfo", "check_dtype", "check_shape", "contiguous", "storage_dtype", "numpy_view", "from_numpy", "from_torch", "to_torch", "to_float32", "from_float32"]

_NUMPY_USER = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_FROM_NUMPY = {np.dtype(v[0]): k for k, v in DTYPES.items() if k not in ("BF16", "U16", "F8_E4M3", "F8_E5M2", "U8")}
_FROM_NUMPY.update({v: k for k, v in _NUMPY_USER.items()})
_FROM_NUMPY[np.dtype("uint16")] = "U16"
_FROM_NUMPY[np.dtype("uint8")] = "U8"


#: values per block of GGUF's ``Q8_0`` (``spec/FORMAT.md`` section 5.1)
QBLOCK = 32
#: GGUF's ``block_q8_0``: 34 bytes, a float16 scale then 32 int8 values (value = d * q)
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (QBLOCK,))])
#: values per k-quant super-block (GGUF's ``QK_K``)
QK_K = 256
#: GGUF's ``block_q4_K``: 144 bytes for 256 values in 8 sub-blocks of 32.  ``d`` and ``dmin``
#: (float16) scale each sub-block's 6-bit scale and 6-bit min, packed in ``scales``; ``qs``
#: holds 4-bit values, two per byte.  value = d * sc[j] * q - dmin * m[j]
Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK_K // 2,))])
#: block formats a host array may hold: name -> numpy dtype of one block
BLOCK_DTYPES: dict[str, np.dtype] = {"Q8_0": Q8_0, "Q4_K": Q4_K}
_BLOCK_VALUES = {Q8_0: QBLOCK, Q4_K: QK_K}


def block_values(dtype: Any) -> int:
    """Values per element of an array of ``dtype``: a block format's block size, else 1."""
    return _BLOCK_VALUES.get(dtype, 1)


def values_shape(a: np.ndarray) -> tuple[int, ...]:
    """The shape of the values a host array holds (a ``Q8_0`` array holds 32 per block, ``Q4_K`` 256)."""
    k = block_values(a.dtype)
    return a.shape[:-1] + (a.shape[-1] * k,) if k > 1 else a.shape


def dequantize_q8_0(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of ``Q8_0`` blocks ``(..., n)`` as ``(..., 32 n)`` (into ``out`` if given),
    each the float32 product of its block's scale and its integer, as GGUF's dequantizer."""
    if out is None:
        out = np.empty(values_shape(blocks), dtype=np.float32)
    np.multiply(blocks["qs"], blocks["d"].astype(np.float32)[..., None], out=out.reshape(blocks.shape + (QBLOCK,)))
    return out


def q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins ``(..., 8)`` of ``Q4_K`` blocks' packed ``scales`` ``(..., 12)``
    (llama.cpp's ``get_scale_min_k4``): sub-blocks 0-3 in the low six bits of bytes 0-3 and 4-7,
    sub-blocks 4-7 in the nibbles of bytes 8-11 with their top two bits above bytes 0-7."""
    lo, mid, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def dequantize_q4_k(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of ``Q4_K`` blocks ``(..., n)`` as ``(..., 256 n)`` (into ``out`` if given),
    computed as GGUF's dequantizer does: ``(d * sc) * q - (dmin * m)`` in float32."""
    if out is None:
        out = np.empty(values_shape(blocks), dtype=np.float32)
    sc, mn = q4_k_scales(blocks["scales"])
    scale = (blocks["d"].astype(np.float32)[..., None] * sc)[..., None]  # (..., 8, 1)
    low = (blocks["dmin"].astype(np.float32)[..., None] * mn)[..., None]
    qs = blocks["qs"].reshape(blocks.shape + (4, 1, 32))  # 4 runs of 32 bytes: 64 values each
    q = np.empty(blocks.shape + (4, 2, 32), dtype=np.uint8)  # sub-block 2r: low nibbles, 2r+1: high
    np.bitwise_and(qs, 15, out=q[..., 0:1, :])
    np.right_shift(qs, 4, out=q[..., 1:2, :])
    o = out.reshape(blocks.shape + (8, 32))
    np.multiply(scale, q.reshape(blocks.shape + (8, 32)), out=o)
    o -= low
    return out


_DEQUANTIZE = {Q8_0: dequantize_q8_0, Q4_K: dequantize_q4_k}


def dequantize_blocks(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of an array of ``Q8_0`` or ``Q4_K`` blocks (into ``out`` if given)."""
    return _DEQUANTIZE[blocks.dtype](blocks, out)


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype (safetensors spelling), shape and byte size of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def check_shape(shape: object, where: str) -> tuple[int, ...]:
    """Validate a shape from untrusted input; return it as a tuple of ints."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise FormatError(f"{where}: shape must be a list of at most {MAX_NDIM} integers")
    out = []
    for s in shape:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0 or s > 2**48:
            raise FormatError(f"{where}: bad shape entry {s!r}")
        out.append(s)
    return tuple(out)


def check_dtype(dtype: object, where: str) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    return dtype


def contiguous(arr: np.ndarray) -> np.ndarray:
    """C-contiguous array of the same shape (``np.ascontiguousarray`` turns 0-d into 1-d)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def storage_dtype(dtype: str) -> np.dtype:
    """Zarr storage dtype for a safetensors dtype name."""
    return np.dtype(DTYPES[dtype][0])


def numpy_view(arr: np.ndarray, dtype: str) -> np.ndarray:
    """View a storage array with its real numpy dtype (no copy)."""
    user = _NUMPY_USER.get(dtype)
    return arr.view(user) if user is not None else arr


def from_numpy(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Return ``(dtype name, storage array)`` for a numpy array (ml_dtypes types included)."""
    name = _FROM_NUMPY.get(arr.dtype)
    if name is None:
        raise FormatError(f"numpy dtype {arr.dtype} has no safetensors equivalent")
    arr = contiguous(arr)
    return name, arr.view(storage_dtype(name))


def _torch_table() -> dict[Any, str]:
    import torch

    table = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for tname, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                        ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, tname):
            table[getattr(torch, tname)] = name
    return table


def from_torch(t: Any) -> tuple[str, np.ndarray]:
    """Return ``(dtype name, storage array)`` for a torch tensor, bytes unchanged."""
    import torch

    name = _torch_table().get(t.dtype)
    if name is None:
        raise FormatError(f"torch dtype {t.dtype} is not supported")
    t = t.detach().to("cpu").contiguous()
    item = DTYPES[name][1]
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[item]
    raw = t.view(ints).numpy() if t.dtype != torch.bool else t.numpy()
    return name, raw.view(storage_dtype(name))


def to_torch(arr: np.ndarray, dtype: str) -> Any:
    """A torch tensor with the real dtype over the bytes of a storage array."""
    import torch

    inv = {v: k for k, v in _torch_table().items()}
    want = inv.get(dtype)
    if want is None:
        raise FormatError(f"dtype {dtype} has no torch equivalent in this torch build")
    arr = contiguous(arr)
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:  # torch lacks from_numpy for uint16..64
        arr = arr.view(f"int{arr.dtype.itemsize * 8}")
    t = torch.from_numpy(arr)
    return t.view(want) if t.dtype != want else t


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a floating storage array as float32 (for placement arithmetic only)."""
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F32", "F16", "F64"):
        return arr.astype(np.float32)
    raise FormatError(f"dtype {dtype} cannot be placed on the sphere")


def from_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the storage array of ``dtype`` (``BF16`` rounds to nearest even): what
    training writes back."""
    if dtype == "BF16":
        import ml_dtypes  # noqa: PLC0415 - only bfloat16 needs it

        return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(a).astype(storage_dtype(dtype))
