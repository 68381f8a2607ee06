"""The torch backend: CPU, CUDA and ROCm (ROCm builds of torch expose HIP through ``torch.cuda``).

Names: ``torch`` (CUDA/ROCm when a device is visible, else CPU), ``torch:cpu``, ``torch:cuda``,
``torch:cuda:N``.  On a GPU the memory figures are torch's own allocator statistics
(``memory_allocated`` / ``max_memory_allocated``); on the CPU they are counted per tensor.

float16 and bfloat16 weight matrices are held in torch's own half types and widened to float32
a piece of rows at a time right before each product (on a GPU the pieces are large; activations
never round to 16 bits, so the logits are those of the float32 product of the stored values).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spherefmt.backends.base import QUANT_TYPES, Accountant, Backend, weight_format
from spherefmt.errors import BackendUnavailableError

__all__ = ["TorchBackend"]


class _Blocks:
    """A block-quantized matrix on the device (``Q8_0`` or ``Q4_K``): its blocks' bytes
    ``(rows, n, block bytes)`` as ``uint8``, its format and the shape of its values ``(rows, k n)``."""

    __slots__ = ("raw", "shape", "fmt", "__weakref__")

    def __init__(self, raw: Any, shape: tuple[int, int], fmt: str) -> None:
        self.raw, self.shape, self.fmt = raw, shape, fmt

    def blocks(self, a: int, b: int) -> tuple[_Blocks, tuple[int, int] | None]:
        """The whole blocks holding columns ``a .. b`` of the values, in place, and the columns of
        their values to use (``None``: all; a field narrower than a block lies inside one)."""
        k = QUANT_TYPES[self.fmt][0]
        b0, b1 = a // k, -(-b // k)
        part = _Blocks(self.raw[:, b0:b1], (self.shape[0], (b1 - b0) * k), self.fmt)
        return part, ((a - b0 * k, b - b0 * k) if a % k or b % k else None)

    def rows(self, r0: int, r1: int) -> _Blocks:
        return _Blocks(self.raw[r0:r1], (min(r1, self.shape[0]) - r0, self.shape[1]), self.fmt)

    def take(self, idx: Any) -> _Blocks:
        return _Blocks(self.raw[idx], (len(idx), self.shape[1]), self.fmt)

    def float(self) -> Any:
        """The float32 values, computed as GGUF's dequantizer (and the numpy backend) does."""
        import torch

        raw = self.raw
        if self.fmt == "Q8_0":
            d = raw[..., :2].contiguous().view(torch.float16).float()  # (rows, n, 1): each block's scale
            return (raw[..., 2:].view(torch.int8).float() * d).reshape(raw.shape[0], -1)
        d = raw[..., 0:2].contiguous().view(torch.float16).float()
        dmin = raw[..., 2:4].contiguous().view(torch.float16).float()
        lo, mid, hi = raw[..., 4:8], raw[..., 8:12], raw[..., 12:16]
        sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1).float()  # (rows, n, 8)
        mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1).float()
        qs = raw[..., 16:].reshape(*raw.shape[:2], 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=-2).reshape(*raw.shape[:2], 8, 32).float()
        return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(raw.shape[0], -1)


_HINT = "pip install torch==2.13.0 (CPU) or a CUDA/ROCm build from pytorch.org"


class TorchBackend(Backend):
    weight_formats = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_K"})

    def __init__(self, device: str | None = None) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailableError(f"backend torch: torch is not installed ({_HINT})") from e
        self.torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"backend torch:{device}: no CUDA or ROCm device is visible to torch {torch.__version__} "
                    f"({'CPU-only build' if torch.version.cuda is None and torch.version.hip is None else 'no device'})")
            if device == "cuda":
                device = f"cuda:{torch.cuda.current_device()}"
            try:
                idx = int(device.split(":")[1])
            except ValueError:
                raise BackendUnavailableError(f"backend torch:{device}: not a device name") from None
            if not 0 <= idx < torch.cuda.device_count():
                raise BackendUnavailableError(f"backend torch:{device}: only {torch.cuda.device_count()} device(s)")
        elif device != "cpu":
            raise BackendUnavailableError(f"backend torch:{device}: unknown device (cpu, cuda, cuda:N)")
        self.device = torch.device(device)
        self.name = f"torch:{device}"
        self._gpu = self.device.type == "cuda"
        self._acct = None if self._gpu else Accountant()
        # a GPU widens 16-bit weights at full speed; a CPU in software (like numpy)
        self.fast_formats = self.weight_formats if self._gpu else frozenset({"F32"})
        #: elements of a 16-bit weight widened at a time (a CPU core's L2; a GPU's few MiB)
        self.piece = 1 << 22 if self._gpu else 1 << 16
        if self._gpu:
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _out(self, t: Any) -> Any:
        if isinstance(t, _Blocks):
            if self._acct is not None:
                self._acct.track(t, t.raw.numel())
            return t
        if self._acct is not None:
            t = t.contiguous()
            self._acct.track(t, t.numel() * t.element_size())
        return t

    # --- memory ---------------------------------------------------------------------------
    def upload(self, host: np.ndarray) -> Any:
        a = np.ascontiguousarray(host, dtype=np.float32)
        t = self.torch.from_numpy(a)
        t = t.to(self.device, non_blocking=False) if self._gpu else t.clone()
        return self._out(t)

    def adopt(self, host: np.ndarray) -> Any:
        fmt = weight_format(host)
        if fmt in QUANT_TYPES and host.ndim == 2:
            import warnings

            with warnings.catch_warnings():  # a read-only mapped chunk: copied right below
                warnings.simplefilter("ignore", UserWarning)
                values, size = QUANT_TYPES[fmt]
                blocks = self.torch.from_numpy(np.ascontiguousarray(host).view(np.uint8).reshape(host.shape + (size,)))
            blocks = blocks.to(self.device) if self._gpu else blocks.clone()
            return self._out(_Blocks(blocks, (host.shape[0], host.shape[1] * values), fmt))
        if fmt in ("F16", "BF16") and host.ndim == 2:
            from spherefmt.dtypes import to_torch

            raw = np.ascontiguousarray(host).view(np.uint16) if fmt == "BF16" else np.ascontiguousarray(host)
            t = to_torch(raw, fmt)
            t = t.to(self.device) if self._gpu else t.clone()
            return self._out(t)
        if not self._gpu and host.dtype == np.float32 and host.flags.c_contiguous:
            import warnings

            with warnings.catch_warnings():  # read-only mapped chunks: ops never write to weights
                warnings.simplefilter("ignore", UserWarning)
                t = self.torch.from_numpy(host)  # shares the buffer: no copy on the CPU
            if self._acct is not None:
                self._acct.track(t, host.nbytes)
            return t
        return self.upload(host)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self._out(self.torch.zeros(shape, dtype=self.torch.float32, device=self.device))

    def free(self, t: Any) -> None:
        if self._acct is not None:
            self._acct.free(t)
        else:  # drop the storage now, even if a caller still holds the Python object
            (t.raw if isinstance(t, _Blocks) else t).set_()

    def to_host(self, t: Any) -> np.ndarray:
        if isinstance(t, _Blocks):
            t = t.float()
        return t.detach().to("cpu").float().numpy().astype(np.float32, copy=True)

    def synchronize(self) -> None:
        if self._gpu:
            self.torch.cuda.synchronize(self.device)

    def memory_used(self) -> int:
        if self._acct is not None:
            return self._acct.used
        return self.torch.cuda.memory_allocated(self.device) - self._base

    def peak_memory(self) -> int:
        if self._acct is not None:
            return self._acct.peak
        return self.torch.cuda.max_memory_allocated(self.device) - self._base

    def reset_peak(self) -> None:
        if self._acct is not None:
            self._acct.reset_peak()
        else:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def describe(self) -> dict[str, Any]:
        torch = self.torch
        d: dict[str, Any] = {"backend": self.name, "torch": torch.__version__, "threads": torch.get_num_threads()}
        if self._gpu:
            d["device"] = torch.cuda.get_device_name(self.device)
            d["hip" if torch.version.hip else "cuda"] = torch.version.hip or torch.version.cuda
        else:
            d["device"] = "cpu"
        return d

    # --- ops ------------------------------------------------------------------------------
    def matmul(self, x: Any, w: Any, bias: Any = None, *, transpose_w: bool = False,
               cols: tuple[int, int] | None = None) -> Any:
        sub = None
        if cols is not None:
            if isinstance(w, _Blocks):
                w, sub = w.blocks(*cols)
            else:
                w = w[:, cols[0] : cols[1]]
        if isinstance(w, _Blocks) or w.dtype != self.torch.float32:
            y = self._widening_matmul(x, w, transpose_w, sub)
            return self._out(y if bias is None else y.add_(bias))
        w = w.t() if transpose_w else w
        y = x @ w if bias is None else self.torch.addmm(bias, x, w)
        return self._out(y)

    def _widening_matmul(self, x: Any, w: Any, transpose_w: bool, sub: tuple[int, int] | None = None) -> Any:
        """``x @ w`` (or ``x @ w.T``) for a 16-bit, ``Q8_0`` or ``Q4_K`` ``w``, widened a piece of
        rows at a time; ``sub``: the columns of the widened rows to use."""
        rows, width = w.shape
        a, b = sub if sub is not None else (0, width)
        step = max(1, self.piece // max(1, width))

        def piece(r: int) -> Any:
            f = w.rows(r, r + step).float() if isinstance(w, _Blocks) else w[r : r + step].float()
            return f if sub is None else f[:, a:b]

        if transpose_w:
            return self.torch.cat([x @ piece(r).t() for r in range(0, rows, step)], dim=1)
        y = None
        for r in range(0, rows, step):
            part = x[:, r : r + step] @ piece(r)
            y = part if y is None else y.add_(part)
        return y if y is not None else self.torch.zeros((x.shape[0], b - a), device=self.device)

    def add(self, a: Any, b: Any) -> Any:
        return self._out(a + b)

    def mul(self, a: Any, b: Any) -> Any:
        return self._out(a * b)

    def gelu(self, x: Any, approximate: bool = True) -> Any:
        return self._out(self.torch.nn.functional.gelu(x, approximate="tanh" if approximate else "none"))

    def silu(self, x: Any) -> Any:
        return self._out(self.torch.nn.functional.silu(x))

    def layernorm(self, x: Any, w: Any, b: Any, eps: float) -> Any:
        return self._out(self.torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps))

    def rmsnorm(self, x: Any, w: Any, eps: float, heads: int = 1) -> Any:
        g = x.reshape(x.shape[0], heads, -1) if heads > 1 else x
        return self._out((g * self.torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps) * w).reshape(x.shape))

    def gather_rows(self, table: Any, ids: np.ndarray) -> Any:
        idx = self.torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
        if isinstance(table, _Blocks):
            out = table.take(idx.clamp(min=0)).float()
        else:
            out = table[idx.clamp(min=0)].float()
        out[idx < 0] = 0.0
        return self._out(out)

    def rope(self, x: Any, cos: Any, sin: Any, n_heads: int) -> Any:
        t = x.shape[0]
        xh = x.reshape(t, n_heads, -1)
        half = xh.shape[-1] // 2
        rot = self.torch.cat([-xh[..., half:], xh[..., :half]], dim=-1)
        return self._out((xh * cos[:, None, :] + rot * sin[:, None, :]).reshape(t, -1))

    def attention(self, q: Any, k_cache: Any, v_cache: Any, start: int, n_heads: int, n_kv_heads: int,
                  scale: float, window: int = 0) -> Any:
        torch = self.torch
        t = q.shape[0]
        n = start + t
        hd = q.shape[1] // n_heads
        qh = q.reshape(t, n_heads, hd).transpose(0, 1)
        k = k_cache[:n].reshape(n, n_kv_heads, hd).transpose(0, 1)
        v = v_cache[:n].reshape(n, n_kv_heads, hd).transpose(0, 1)
        rep = n_heads // n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        s = (qh @ k.transpose(1, 2)) * scale
        rel = torch.arange(n, device=self.device)[None, :] - (start + torch.arange(t, device=self.device))[:, None]
        hidden = (rel > 0) | (rel <= -window) if window > 0 else rel > 0
        s = s.masked_fill(hidden, -math.inf).softmax(dim=-1)
        return self._out((s @ v).transpose(0, 1).reshape(t, n_heads * hd))

    def write_rows(self, dst: Any, start: int, src: Any) -> None:
        dst[start : start + src.shape[0]] = src
