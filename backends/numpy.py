"""The numpy backend: the reference implementation of every op, on the CPU.

Memory is counted by :class:`~spherefmt.backends.base.Accountant` (live output arrays and
uploads); numpy's internal temporaries inside one op are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spherefmt.backends.base import Accountant, AccountedMemory, Backend

__all__ = ["NumpyBackend"]

_F32 = np.float32
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), below float32 resolution near 1;
    computed in float64 so that numpy needs no scipy."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(_F32)


class NumpyBackend(AccountedMemory, Backend):
    name = "numpy"

    def __init__(self) -> None:
        self._acct = Accountant()

    def _out(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=_F32)
        return self._acct.track(a, a.nbytes)

    # --- memory ---------------------------------------------------------------------------
    def upload(self, host: np.ndarray) -> np.ndarray:
        return self._out(np.array(host, dtype=_F32, copy=True, order="C"))

    def adopt(self, host: np.ndarray) -> np.ndarray:
        if host.dtype == _F32 and host.flags.c_contiguous:
            # a fresh array, or a read-only view of a mapped chunk: counted, not copied.  A view
            # gets its own array object so that the accounting follows this tensor alone.
            t = host if host.base is None else host.view()
            return self._acct.track(t, t.nbytes)
        return self.upload(host)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._out(np.zeros(shape, dtype=_F32))

    def free(self, t: Any) -> None:
        self._acct.free(t)

    def to_host(self, t: Any) -> np.ndarray:
        return np.array(t, dtype=_F32, copy=True)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": "cpu", "numpy": np.__version__}

    # --- ops ------------------------------------------------------------------------------
    def matmul(self, x: Any, w: Any, bias: Any = None, *, transpose_w: bool = False,
               cols: tuple[int, int] | None = None) -> np.ndarray:
        if cols is not None:
            w = w[:, cols[0] : cols[1]]  # a row-strided view: BLAS reads it in place
        y = x @ (w.T if transpose_w else w)
        if bias is not None:
            y += bias
        return self._out(y)

    def add(self, a: Any, b: Any) -> np.ndarray:
        return self._out(a + b)

    def mul(self, a: Any, b: Any) -> np.ndarray:
        return self._out(a * b)

    def gelu(self, x: Any, approximate: bool = True) -> np.ndarray:
        if approximate:
            return self._out(0.5 * x * (1.0 + np.tanh(_F32(_SQRT_2_OVER_PI) * (x + _F32(0.044715) * x**3))))
        return self._out(0.5 * x * (1.0 + _erf(x / _F32(math.sqrt(2.0)))))

    def silu(self, x: Any) -> np.ndarray:
        return self._out(x / (_F32(1.0) + np.exp(-x)))

    def layernorm(self, x: Any, w: Any, b: Any, eps: float) -> np.ndarray:
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        return self._out(xc / np.sqrt(var + _F32(eps)) * w + b)

    def rmsnorm(self, x: Any, w: Any, eps: float, heads: int = 1) -> np.ndarray:
        g = x.reshape(x.shape[0], heads, -1) if heads > 1 else x
        ms = (g * g).mean(axis=-1, keepdims=True)
        return self._out((g / np.sqrt(ms + _F32(eps)) * w).reshape(x.shape))

    def gather_rows(self, table: Any, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = table[np.maximum(ids, 0)]
        out[ids < 0] = 0.0
        return self._out(out)

    def rope(self, x: Any, cos: Any, sin: Any, n_heads: int) -> np.ndarray:
        t = x.shape[0]
        xh = x.reshape(t, n_heads, -1)
        half = xh.shape[-1] // 2
        rot = np.concatenate([-xh[..., half:], xh[..., :half]], axis=-1)
        return self._out((xh * cos[:, None, :] + rot * sin[:, None, :]).reshape(t, -1))

    def attention(self, q: Any, k_cache: Any, v_cache: Any, start: int, n_heads: int, n_kv_heads: int,
                  scale: float, window: int = 0) -> np.ndarray:
        t = q.shape[0]
        n = start + t
        hd = q.shape[1] // n_heads
        qh = q.reshape(t, n_heads, hd).transpose(1, 0, 2)  # (H, T, hd)
        k = k_cache[:n].reshape(n, n_kv_heads, hd).transpose(1, 0, 2)
        v = v_cache[:n].reshape(n, n_kv_heads, hd).transpose(1, 0, 2)
        rep = n_heads // n_kv_heads
        if rep > 1:
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = (qh @ k.transpose(0, 2, 1)) * _F32(scale)  # (H, T, n)
        rel = np.arange(n)[None, :] - (start + np.arange(t))[:, None]  # key minus query position
        s[:, (rel > 0) | (rel <= -window if window > 0 else False)] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return self._out((s @ v).transpose(1, 0, 2).reshape(t, n_heads * hd))

    def write_rows(self, dst: Any, start: int, src: Any) -> None:
        dst[start : start + src.shape[0]] = src
