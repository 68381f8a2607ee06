"""The backend interface of the spherefmt runtime.

Contract (every backend MUST follow it; ``tests/test_backends.py`` is the conformance suite):

- A backend owns *device tensors* of its own type.  The runtime never looks inside one; it
  passes them back to the backend's ops and gets host copies with :meth:`Backend.to_host`.
- Tensors are float32 and 1-D or 2-D (``(rows, cols)``, row-major).  Activations are
  ``(tokens, features)``.  Integer inputs (token ids, row indices) are host numpy arrays.
- *Weight matrices* may stay in the precision they are stored in: a backend lists the formats it
  holds in :attr:`Backend.weight_formats` (names of :data:`WEIGHT_DTYPES`: ``F32``, ``F16``,
  ``BF16``, ``Q8_0``, ``Q4_K``).  :meth:`adopt` keeps a 2-D host matrix of a listed format as it
  is (half the bytes of float32 for the 16-bit ones, 34/128 for ``Q8_0``, 144/1024 for ``Q4_K``)
  and widens anything else to float32.  The ``w`` of :meth:`matmul` and the ``table`` of :meth:`gather_rows` may be such a
  matrix: its values are widened exactly (every 16-bit value is a float32 value; a ``Q8_0``
  value is the float32 product of its block's scale and its integer, a ``Q4_K`` value
  ``(d * sc) * q - (dmin * m)`` in float32, as GGUF's dequantizer computes them) right before they are used, products accumulate in float32, and every output is
  float32.  Nothing else takes such a tensor.
- A ``Q8_0`` matrix of ``(rows, cols)`` values is a host array of ``(rows, cols / 32)`` blocks of
  :data:`Q8_0` (GGUF's ``block_q8_0``: a float16 scale ``d`` and 32 ``int8`` values ``qs``),
  quantized along its rows.  A ``Q4_K`` matrix likewise is ``(rows, cols / 256)`` blocks of
  :data:`Q4_K` (GGUF's ``block_q4_K``).  A ``cols`` range of :meth:`matmul` on such a matrix may
  begin and end inside a block (a field narrower than a block is stored padded to one).
- :meth:`upload` copies a host array in (converting to float32), :meth:`free` gives its memory
  back at once, :meth:`to_host` copies out (float32), :meth:`synchronize` waits for queued work.
- Memory accounting: :meth:`memory_used` is the bytes of live device tensors as held (weights
  in their held format, KV cache and every op's output alike) and :meth:`peak_memory` its high-water mark since
  :meth:`reset_peak`.  Backends with a native allocator report its figures
  (``torch.cuda.max_memory_allocated``); the others count through :class:`Accountant`.
  The runtime's memory budget is checked against these figures.
- Ops return new tensors and never modify their inputs, except :meth:`write_rows`, which writes
  into its destination (the KV cache).
- Ops may be called from two threads (the prefetcher uploads while the forward pass computes);
  :meth:`upload` and :meth:`free` MUST be thread-safe.

A backend is registered by name in :mod:`spherefmt.backends` with a factory; a factory that
cannot start raises :class:`~spherefmt.errors.BackendUnavailableError` with the install hint.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from typing import Any

import ml_dtypes
import numpy as np

from spherefmt.constants import QUANT_TYPES
from spherefmt.dtypes import Q4_K, Q8_0, QBLOCK, QK_K, block_values, dequantize_blocks, dequantize_q8_0, values_shape

__all__ = ["Backend", "Accountant", "AccountedMemory", "WEIGHT_DTYPES", "QUANT_TYPES", "Q8_0", "Q4_K", "QBLOCK",
           "QK_K", "weight_format", "values_shape", "block_values", "dequantize_blocks", "dequantize_q8_0"]

#: weight formats of the interface: name (``spec/FORMAT.md`` section 5) -> numpy dtype of the
#: host matrix :meth:`Backend.adopt` is given (bfloat16 as ``ml_dtypes.bfloat16``; a ``Q8_0``
#: or ``Q4_K`` matrix is an array of blocks)
WEIGHT_DTYPES: dict[str, np.dtype] = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                                      "BF16": np.dtype(ml_dtypes.bfloat16), "Q8_0": Q8_0, "Q4_K": Q4_K}
_FORMAT_OF = {v: k for k, v in WEIGHT_DTYPES.items()}


def weight_format(a: Any) -> str | None:
    """The weight format of a host array (``None``: not one of :data:`WEIGHT_DTYPES`)."""
    return _FORMAT_OF.get(getattr(a, "dtype", None))  # type: ignore[arg-type]


class Accountant:
    """Counts live bytes and the high-water mark for backends without a native allocator.

    Each tracked tensor is counted until it is freed explicitly or garbage-collected, whichever
    comes first (``weakref.finalize`` runs once).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.used = 0
        self.peak = 0
        self._fins: dict[int, weakref.finalize] = {}  # ndarrays take no attributes: keyed by id

    def track(self, t: Any, nbytes: int) -> Any:
        with self._lock:
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self._fins[id(t)] = weakref.finalize(t, self._release, id(t), nbytes)
        return t

    def _release(self, key: int, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
            self._fins.pop(key, None)

    def free(self, t: Any) -> None:
        with self._lock:
            fin = self._fins.get(id(t))
        if fin is not None:
            fin()  # runs once: a later garbage collection does not count it twice

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.used


class Backend(ABC):
    """One compute device.  Subclasses implement the hook methods below; see the module docstring."""

    #: registered name, e.g. ``numpy`` or ``torch:cuda:0``
    name: str = "?"
    #: weight formats :meth:`adopt` keeps as they are (the others are widened to float32)
    weight_formats: frozenset[str] = frozenset({"F32"})
    #: of those, the formats its products read at full speed (``None``: all of them); a runtime
    #: may widen the others on the host when it has the room (CPU backends widen in software)
    fast_formats: frozenset[str] | None = None

    # --- memory ---------------------------------------------------------------------------
    @abstractmethod
    def upload(self, host: np.ndarray) -> Any:
        """A device copy of ``host`` as float32."""

    def adopt(self, host: np.ndarray) -> Any:
        """Like :meth:`upload`, for a host array that nobody will modify while the device holds it
        (it may be read-only, e.g. a view of a memory-mapped chunk): backends whose device memory
        *is* host memory take it without copying, and a 2-D matrix in one of
        :attr:`weight_formats` is kept in that format.  Streaming uses this."""
        return self.upload(host)

    @abstractmethod
    def zeros(self, shape: tuple[int, ...]) -> Any:
        """A float32 device tensor of zeros."""

    @abstractmethod
    def free(self, t: Any) -> None:
        """Give ``t``'s memory back now; ``t`` must not be used afterwards."""

    @abstractmethod
    def to_host(self, t: Any) -> np.ndarray:
        """A float32 numpy copy of ``t``."""

    def synchronize(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Wait until queued work is done (asynchronous devices override this)."""

    @abstractmethod
    def memory_used(self) -> int:
        """Bytes of live device tensors."""

    @abstractmethod
    def peak_memory(self) -> int:
        """High-water mark of :meth:`memory_used` since :meth:`reset_peak`."""

    @abstractmethod
    def reset_peak(self) -> None:
        """Start a new high-water mark at the current use."""

    def describe(self) -> dict[str, Any]:
        """Name, device and library versions (for ``stats()`` and benchmark records)."""
        return {"backend": self.name}

    def decode_step(self, seconds: float) -> None:  # noqa: B027 - an optional hook, not abstract
        """Told the wall time of each decode step (one token through the whole model): a CPU
        backend may tune its thread count to the machine's load with it."""

    # --- ops ------------------------------------------------------------------------------
    @abstractmethod
    def matmul(self, x: Any, w: Any, bias: Any = None, *, transpose_w: bool = False,
               cols: tuple[int, int] | None = None) -> Any:
        """``x @ w (+ bias)``, or ``x @ w.T (+ bias)`` with ``transpose_w``; f32 accumulate.

        ``cols=(a, b)`` uses the column range ``w[:, a:b]`` in place of ``w`` (one expert's rows
        hold several weight matrices side by side; this reads them where they lie)."""

    @abstractmethod
    def add(self, a: Any, b: Any) -> Any:
        """``a + b``; ``b`` may be 1-D (broadcast over rows)."""

    @abstractmethod
    def mul(self, a: Any, b: Any) -> Any:
        """``a * b``; ``b`` may be 1-D (over rows) or ``(rows, 1)`` (one factor per row)."""

    @abstractmethod
    def gelu(self, x: Any, approximate: bool = True) -> Any:
        """GELU, tanh approximation (GPT-2's ``gelu_new``) or the exact erf form."""

    @abstractmethod
    def silu(self, x: Any) -> Any:
        """``x * sigmoid(x)``."""

    @abstractmethod
    def layernorm(self, x: Any, w: Any, b: Any, eps: float) -> Any:
        """Layer norm over the last axis (biased variance, like torch)."""

    @abstractmethod
    def rmsnorm(self, x: Any, w: Any, eps: float, heads: int = 1) -> Any:
        """``x / sqrt(mean(x^2) + eps) * w`` over the last axis; with ``heads > 1``, over each of
        ``heads`` equal slices of it (per-head q/k norms), ``w`` being one slice wide."""

    @abstractmethod
    def gather_rows(self, table: Any, ids: np.ndarray) -> Any:
        """Rows ``table[ids]``; an id of ``-1`` gives a zero row (embedding lookups over vocabulary
        blocks add the per-block results, each token non-zero in exactly one)."""

    @abstractmethod
    def rope(self, x: Any, cos: Any, sin: Any, n_heads: int) -> Any:
        """Rotary embedding, ``rotate_half`` convention: ``x`` is ``(T, n_heads * hd)``; ``cos``
        and ``sin`` are ``(T, hd)``."""

    @abstractmethod
    def attention(self, q: Any, k_cache: Any, v_cache: Any, start: int, n_heads: int, n_kv_heads: int,
                  scale: float, window: int = 0) -> Any:
        """Causal attention of ``q`` ``(T, n_heads * hd)`` at positions ``start .. start+T-1``
        over rows ``0 .. start+T-1`` of the caches ``(max_len, n_kv_heads * hd)``; query head
        ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``.  Softmax in f32.  With
        ``window > 0`` (sliding-window attention) the query at position ``i`` sees only keys
        ``j > i - window``."""

    @abstractmethod
    def write_rows(self, dst: Any, start: int, src: Any) -> None:
        """``dst[start : start + len(src)] = src`` in place."""


class AccountedMemory:
    """Memory figures from an :class:`Accountant` at ``self._acct`` (mixed into backends
    without a native allocator)."""

    _acct: Accountant

    def memory_used(self) -> int:
        return self._acct.used

    def peak_memory(self) -> int:
        return self._acct.peak

    def reset_peak(self) -> None:
        self._acct.reset_peak()
