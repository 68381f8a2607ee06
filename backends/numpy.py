"""The numpy backend: the reference implementation of every op, on the CPU.

Memory is counted by :class:`~spherefmt.backends.base.Accountant` (live output arrays and
uploads); numpy's internal temporaries inside one op are not counted.

Small products (a few rows times a small weight block: one cell of one layer while decoding)
run on one BLAS thread, larger ones on all of numpy's: waking OpenBLAS's other threads for each
small call cost more than the call itself, and far more when another process keeps a core busy,
while a whole layer's weights read by two cores come 1.3-1.6x faster (measured here: 1x1024 by
1024x2816 in 422 us on one thread, 343 us on two; 1024x88 in 8 us either way).  The thread
count is set through ``threadpoolctl`` on numpy's own BLAS only.

How many threads the large products get is measured, not assumed: on an idle machine all
cores read a layer fastest, but beside one busy process one thread decodes about twice as fast
as two (the second thread waits for a core).  :meth:`NumpyBackend.decode_step` times the decode
steps, alternating the two settings for the first steps, then keeps the faster and tries the
other now and then (after :data:`REPROBE` steps, twice as long after each try that lost, up to
:data:`MAX_REPROBE`: beside a busy process one step on two threads costs 4-6 on one), so a
change of load is followed.

Weights in float16 and bfloat16 stay as they are (half the bytes held and read): a product
widens the matrix :data:`PIECE` elements at a time into a float32 buffer that stays in the
core's cache and multiplies each piece with BLAS, so float32 is never materialised for a whole
matrix.  bfloat16 widens by a 16-bit shift of its bits (exact), float16 by numpy's cast.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from spherefmt.backends import qkernels
from spherefmt.backends.base import (
    WEIGHT_DTYPES,
    Accountant,
    AccountedMemory,
    Backend,
    block_values,
    dequantize_blocks,
    values_shape,
    weight_format,
)

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


#: products of fewer rows than this over fewer weight bytes than SMALL_WEIGHTS run on one thread
SMALL_ROWS = 8
SMALL_WEIGHTS = 1 << 20
#: decode steps that alternate the thread settings before one is chosen; then one step tries the
#: other after REPROBE steps, the wait doubling after each try that lost, up to MAX_REPROBE
PROBE, REPROBE, MAX_REPROBE = 4, 16, 256


#: elements of a 16-bit weight matrix widened to float32 at a time (256 KiB: in a core's L2)
PIECE = 1 << 16
_BF16 = WEIGHT_DTYPES["BF16"]
_BLOCKS = (WEIGHT_DTYPES["Q8_0"], WEIGHT_DTYPES["Q4_K"])


def _widen(src: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = src``'s values for a float16/bfloat16/Q8_0/Q4_K ``src`` (``out`` float32,
    C-contiguous, of :func:`values_shape`)."""
    if src.dtype == _BF16:
        np.left_shift(src.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif src.dtype in _BLOCKS:
        dequantize_blocks(src, out)
    else:
        np.copyto(out, src, casting="same_kind")


#: BLAS threads numpy's library had when this module first looked (its default, all cores)
_DEFAULT_THREADS: list[int] = []


def _numpy_blas() -> list[Any]:
    """threadpoolctl's controllers of numpy's own BLAS (not torch's), or none without it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an optional speed-up: without it every product uses BLAS's default
        return []
    home = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy/ and numpy.libs/
    libs = [lib for lib in ThreadpoolController().lib_controllers
            if lib.user_api == "blas" and os.path.abspath(lib.filepath).startswith(home)
            and "numpy" in os.path.relpath(lib.filepath, home).split(os.sep)[0]]
    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(max((lib.num_threads for lib in libs), default=1))
    return libs


class _BlasThreads:
    """numpy's BLAS thread count, switched per product (about 1 us a switch)."""

    def __init__(self) -> None:
        self._libs = _numpy_blas()
        # the thread count BLAS started with in this process: another backend may have left it
        # at one thread, so the current setting is read, not taken for the full one
        self.full = _DEFAULT_THREADS[0] if _DEFAULT_THREADS else 1
        self.now = max((lib.num_threads for lib in self._libs), default=1)
        #: threads of large products while decoding (tuned by :meth:`step`)
        self.big = self.full
        self._times: dict[int, list[float]] = {self.full: [], 1: []}
        self._steps = 0
        self._wait, self._next, self._trying = REPROBE, PROBE + REPROBE, False

    def want(self, rows: int, weight_bytes: int) -> int:
        """Threads for a product of ``rows`` activation rows over ``weight_bytes`` of float32 weights."""
        return 1 if weight_bytes < SMALL_WEIGHTS and rows < SMALL_ROWS else (self.big if rows < SMALL_ROWS else self.full)

    def product(self, rows: int, weight_bytes: int) -> None:
        want = self.want(rows, weight_bytes)
        if want != self.now and self._libs:
            for lib in self._libs:
                lib.set_num_threads(want)
            self.now = want

    def step(self, seconds: float) -> None:
        """One decode step took ``seconds`` with :attr:`big` threads: choose the next setting."""
        if self.full == 1 or not self._libs:
            return
        times = self._times[self.big]
        self._steps += 1
        other = 1 if self.big == self.full else self.full
        if self._trying:  # that step re-tried the setting that had lost: did it win now?
            self._trying = False
            rival = self._times[other]
            won = bool(rival) and seconds < float(np.median(rival))
            times[:] = [seconds] if won else (times + [seconds])[-3:]
            self._wait = REPROBE if won else min(MAX_REPROBE, 2 * self._wait)
            self._next = self._steps + self._wait
            self.big = self.big if won else other
            return
        times.append(seconds)
        del times[:-3]
        if self._steps < PROBE or not self._times[other]:
            self.big = other  # alternate: a change of load hits both settings alike
            return
        best = min(self._times, key=lambda k: float(np.median(self._times[k])))
        if self._steps >= self._next:  # now and then, one step on the other setting
            self._trying = True
            self.big = 1 if best == self.full else self.full
            return
        self.big = best


class NumpyBackend(AccountedMemory, Backend):
    name = "numpy"
    weight_formats = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_K"})
    # with numba, decode-size products read Q8_0/Q4_K blocks in place at about float32's speed
    # per value and a quarter to an eighth of its bytes (backends/qkernels.py)
    fast_formats = frozenset({"F32", "Q8_0", "Q4_K"}) if qkernels.AVAILABLE else frozenset({"F32"})

    def __init__(self) -> None:
        self._acct = Accountant()
        self._blas = _BlasThreads()
        self._kernel_threads = 0

    def _out(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=_F32)
        return self._acct.track(a, a.nbytes)

    # --- memory ---------------------------------------------------------------------------
    def upload(self, host: np.ndarray) -> np.ndarray:
        return self._out(np.array(host, dtype=_F32, copy=True, order="C"))

    def adopt(self, host: np.ndarray) -> np.ndarray:
        fmt = weight_format(host)
        if fmt in self.weight_formats and (fmt == "F32" or host.ndim == 2) and host.flags.c_contiguous:
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
        if t.dtype in _BLOCKS:
            return dequantize_blocks(t)
        return np.array(t, dtype=_F32, copy=True)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": "cpu", "numpy": np.__version__}

    def decode_step(self, seconds: float) -> None:
        self._blas.step(seconds)

    # --- ops ------------------------------------------------------------------------------
    def matmul(self, x: Any, w: Any, bias: Any = None, *, transpose_w: bool = False,
               cols: tuple[int, int] | None = None) -> np.ndarray:
        sub = None
        whole = w  # the kernels take the whole matrix and a column range (no strided copy)
        if cols is not None:
            q = block_values(w.dtype)  # a quantized matrix is sliced by whole blocks, then by values
            b0, b1 = cols[0] // q, -(-cols[1] // q)
            w = w[:, b0:b1]  # a row-strided view: BLAS reads it in place
            if q > 1 and (cols[0] % q or cols[1] % q):
                sub = (cols[0] - b0 * q, cols[1] - b0 * q)
        f32_bytes = w.nbytes if w.dtype == _F32 else 4 * w.shape[0] * values_shape(w)[1]
        if sub is None and w.dtype in _BLOCKS and qkernels.AVAILABLE and x.shape[0] < SMALL_ROWS:
            # every decode-size kernel product on the tuned thread count (a cell's too: numba's
            # threads wait spinning between products, so waking them costs little, unlike BLAS's)
            threads = self._blas.big
            if threads != self._kernel_threads:
                qkernels.set_threads(threads)
                self._kernel_threads = threads
            fmt = "Q8_0" if w.dtype == _BLOCKS[0] else "Q4_K"
            span = cols if cols is not None else (0, values_shape(w)[1])
            y = qkernels.matmul_blocks(np.ascontiguousarray(x, dtype=_F32),
                                       np.ascontiguousarray(whole).view(np.uint8), fmt, span, transpose_w)
            if bias is not None:
                y += bias
            return self._out(y)
        self._blas.product(x.shape[0], f32_bytes)
        if w.dtype == _F32:
            y = x @ (w.T if transpose_w else w)
        else:
            y = self._widening_matmul(x, w, transpose_w, sub)
        if bias is not None:
            y += bias
        return self._out(y)

    @staticmethod
    def _widening_matmul(x: np.ndarray, w: np.ndarray, transpose_w: bool,
                         sub: tuple[int, int] | None = None) -> np.ndarray:
        """``x @ w`` (or ``x @ w.T``) for a 16-bit, ``Q8_0`` or ``Q4_K`` ``w``, widened piece by
        piece (rows of ``w``); ``sub``: the columns of the widened rows to use (a field narrower
        than a block lies inside one)."""
        rows, width = values_shape(w)
        a, b = sub if sub is not None else (0, width)
        step = max(1, PIECE // max(1, width))
        buf = np.empty(min(rows, step) * width, dtype=_F32)
        if transpose_w:  # each piece of rows gives a range of output columns
            y = np.empty((x.shape[0], rows), dtype=_F32)
            for r in range(0, rows, step):
                piece = w[r : r + step]
                f = buf[: piece.shape[0] * width].reshape(piece.shape[0], width)
                _widen(piece, f)
                y[:, r : r + piece.shape[0]] = x @ f[:, a:b].T
            return y
        y = np.zeros((x.shape[0], b - a), dtype=_F32)  # each piece adds its rows' share
        for r in range(0, rows, step):
            piece = w[r : r + step]
            f = buf[: piece.shape[0] * width].reshape(piece.shape[0], width)
            _widen(piece, f)
            y += x[:, r : r + piece.shape[0]] @ f[:, a:b]
        return y

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
        if out.dtype != _F32:
            wide = np.empty(values_shape(out), dtype=_F32)
            _widen(out, wide)
            out = wide
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
