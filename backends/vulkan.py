"""The Vulkan backend: WGSL compute shaders through ``wgpu``, on any Vulkan GPU (AMD consumer
cards included) and on lavapipe (Mesa's CPU Vulkan driver) in CI.

Names: ``vulkan`` (the best Vulkan adapter: a discrete GPU, else an integrated one, else any,
lavapipe included; wgpu's own log is kept to errors unless ``$SPHEREFMT_VERBOSE`` is set, as
``sphere -v`` does), ``vulkan:gpu`` (a discrete or integrated GPU only: what the runtime picks
when no backend is named, so it never lands on a CPU emulation), ``vulkan:N`` (the N-th Vulkan
adapter), ``vulkan:f16`` / ``vulkan:N,f16`` (float32 weight matrices stored as float16: half the device
memory and bandwidth per weight, float32 accumulation).  float16 and bfloat16 weights are held
as stored on every adapter: two to a 32-bit word, widened exactly in the shader (core WGSL,
no ``shader-f16`` needed).  Tensors are float32 storage buffers; memory is
counted per buffer (:class:`~.base.Accountant`) and given back with ``buffer.destroy()``.

Each op records one compute pass and submits it; reading back waits for the queue.  The matmul
(f32 accumulate) runs in 16x16 tiles through workgroup memory for 4 rows or more on GPUs, else
one invocation per output (decode's single rows; every matmul on lavapipe, where it is faster); both read weight column ranges in place through a
row stride and a column offset, like the other backends.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import threading
from typing import Any

import numpy as np

from spherefmt.backends.base import (
    QUANT_TYPES,
    WEIGHT_DTYPES,
    Accountant,
    AccountedMemory,
    Backend,
    dequantize_blocks,
    values_shape,
    weight_format,
)
from spherefmt.errors import BackendUnavailableError, InputError

__all__ = ["VulkanBackend"]

#: wgpu adapter types, best first; the runtime's default takes the first two only
_KIND_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
_GPU_KINDS = ("DiscreteGPU", "IntegratedGPU")

_HINT = "pip install wgpu, and a Vulkan driver (Debian: mesa-vulkan-drivers libvulkan1)"
_WG = 64

_COMMON = """
struct P { a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, x: f32, y: f32, z: f32, w: f32 };
@group(0) @binding(0) var<uniform> p: P;
"""

_SHADERS: dict[str, str] = {
    # out[M,N] = x[M,K] @ W (+ bias); W(k, j) = w[k*ld + c0 + j], or w[j*ld + c0 + k] transposed
    "matmul": """
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let M = p.a; let N = p.b; let K = p.c; let ld = p.d; let c0 = p.e; let tr = p.f; let hb = p.g;
  let idx = gid.x + gid.y * 65535u * 64u;
  if (idx >= M * N) { return; }
  let i = idx / N; let j = idx % N;
  var acc: f32 = 0.0;
  if (tr == 1u) {
    let base = j * ld + c0;
    for (var k: u32 = 0u; k < K; k++) { acc += x[i * K + k] * w[base + k]; }
  } else {
    for (var k: u32 = 0u; k < K; k++) { acc += x[i * K + k] * w[k * ld + c0 + j]; }
  }
  if (hb == 1u) { acc += bias[j]; }
  out[idx] = acc;
}""",
    # the same product in 16x16 output tiles through workgroup memory (for more than a few rows)
    "matmul_tiled": """
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
var<workgroup> xs: array<f32, 256>;
var<workgroup> ws: array<f32, 256>;
@compute @workgroup_size(16, 16) fn main(@builtin(workgroup_id) wg: vec3<u32>,
                                         @builtin(local_invocation_id) li: vec3<u32>) {
  let M = p.a; let N = p.b; let K = p.c; let ld = p.d; let c0 = p.e; let tr = p.f; let hb = p.g;
  let row = wg.y * 16u + li.y; let col = wg.x * 16u + li.x;
  var acc: f32 = 0.0;
  for (var t: u32 = 0u; t < K; t += 16u) {
    var xv: f32 = 0.0;
    if (row < M && t + li.x < K) { xv = x[row * K + t + li.x]; }
    xs[li.y * 16u + li.x] = xv;
    let kk = t + li.y;
    var wv: f32 = 0.0;
    if (kk < K && col < N) {
      if (tr == 1u) { wv = w[col * ld + c0 + kk]; } else { wv = w[kk * ld + c0 + col]; }
    }
    ws[li.y * 16u + li.x] = wv;
    workgroupBarrier();
    for (var q: u32 = 0u; q < 16u; q++) { acc += xs[li.y * 16u + q] * ws[q * 16u + li.x]; }
    workgroupBarrier();
  }
  if (row < M && col < N) {
    if (hb == 1u) { acc += bias[col]; }
    out[row * N + col] = acc;
  }
}""",
    # mode 0: same shape, 1: b is a row vector (cols), 2: b is a column (rows, 1); op 0 add, 1 mul
    "binary": """
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let n = p.a; let cols = p.b; let mode = p.c; let op = p.d;
  let i = gid.x + gid.y * 65535u * 64u;
  if (i >= n) { return; }
  var bi: u32 = i;
  if (mode == 1u) { bi = i % cols; } else if (mode == 2u) { bi = i / cols; }
  if (op == 0u) { out[i] = a[i] + b[bi]; } else { out[i] = a[i] * b[bi]; }
}""",
    # op 0 gelu tanh, 1 gelu erf, 2 silu
    "unary": """
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
fn erf_(x: f32) -> f32 {
  let z = abs(x); let t = 1.0 / (1.0 + 0.3275911 * z);
  let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-z * z);
  return select(-y, y, x >= 0.0);
}
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x + gid.y * 65535u * 64u;
  if (i >= p.a) { return; }
  let v = a[i];
  if (p.b == 0u) {
    out[i] = 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
  } else if (p.b == 1u) {
    out[i] = 0.5 * v * (1.0 + erf_(v * 0.7071067811865476));
  } else {
    out[i] = v / (1.0 + exp(-v));
  }
}""",
    # one invocation per row; op 0 layernorm (w, b), 1 rmsnorm (w)
    "norm": """
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let rows = p.a; let cols = p.b; let op = p.c; let eps = p.x;
  let r = gid.x;
  if (r >= rows) { return; }
  let o = r * cols;
  var mean: f32 = 0.0;
  if (op == 0u) {
    for (var j: u32 = 0u; j < cols; j++) { mean += x[o + j]; }
    mean = mean / f32(cols);
  }
  var var_: f32 = 0.0;
  for (var j: u32 = 0u; j < cols; j++) { let d = x[o + j] - mean; var_ += d * d; }
  let inv = 1.0 / sqrt(var_ / f32(cols) + eps);
  for (var j: u32 = 0u; j < cols; j++) {
    if (op == 0u) { out[o + j] = (x[o + j] - mean) * inv * w[j] + b[j]; }
    else { out[o + j] = x[o + j] * inv * w[j]; }
  }
}""",
    "gather": """
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let n = p.a; let cols = p.b;
  let i = gid.x + gid.y * 65535u * 64u;
  if (i >= n) { return; }
  let r = i / cols; let c = i % cols;
  let id = ids[r];
  if (id < 0) { out[i] = 0.0; } else { out[i] = table[u32(id) * cols + c]; }
}""",
    # x (T, H*hd), cos/sin (T, hd); rotate_half convention
    "rope": """
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<f32>;
@group(0) @binding(3) var<storage, read> sn: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let n = p.a; let heads = p.b; let hd = p.c;
  let i = gid.x + gid.y * 65535u * 64u;
  if (i >= n) { return; }
  let width = heads * hd;
  let t = i / width; let k = (i % width) % hd; let hb = i - k;
  let half = hd / 2u;
  var rot: f32;
  if (k < half) { rot = -x[hb + k + half]; } else { rot = x[hb + k - half]; }
  out[i] = x[i] * cs[t * hd + k] + rot * sn[t * hd + k];
}""",
    # one invocation per (query t, head h): causal attention with an online softmax
    "attention": """
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let T = p.a; let H = p.b; let HK = p.c; let hd = p.d; let start = p.e; let scale = p.x;
  let idx = gid.x;
  if (idx >= T * H) { return; }
  let t = idx / H; let h = idx % H;
  let kh = h / (H / HK);
  let qo = t * H * hd + h * hd;
  let last = start + t;
  var first: u32 = 0u;
  if (p.f > 0u && last + 1u > p.f) { first = last + 1u - p.f; }  // sliding window: keys > last - window
  var m: f32 = -3.0e38; var s: f32 = 0.0;
  for (var n: u32 = first; n <= last; n++) {
    var dot: f32 = 0.0;
    let ko = n * HK * hd + kh * hd;
    for (var j: u32 = 0u; j < hd; j++) { dot += q[qo + j] * kc[ko + j]; }
    dot = dot * scale;
    let m2 = max(m, dot);
    let corr = exp(m - m2);
    let e = exp(dot - m2);
    s = s * corr + e;
    for (var j: u32 = 0u; j < hd; j++) { out[qo + j] = out[qo + j] * corr + e * vc[ko + j]; }
    m = m2;
  }
  for (var j: u32 = 0u; j < hd; j++) { out[qo + j] = out[qo + j] / s; }
}""",
}


def _reading(src: str, name: str, helper: str) -> str:
    """``src`` with its float32 buffer ``name`` declared as 32-bit words and every ``name[i]``
    read through ``helper``'s ``name_at(i)`` (the packed weight formats' shaders)."""
    import re

    src = src.replace(f"var<storage, read> {name}: array<f32>;", f"var<storage, read> {name}: array<u32>;")
    return helper + re.sub(rf"\b{name}\[([^\]]+)\]", rf"{name}_at(\1)", src)


def _byte_reader(name: str) -> str:
    return f"fn {name}_byte(i: u32) -> u32 {{ return ({name}[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu; }}\n"


def _packed16_variant(src: str, name: str, fmt: str) -> str:
    """The shader reading ``name`` (a weight) as 16-bit values packed two to a 32-bit word
    (``F16`` or ``BF16``, element ``e`` in the low half of word ``e / 2`` when ``e`` is even),
    widened exactly to float32: core WGSL, no ``shader-f16`` needed."""
    widen = "bitcast<f32>(h << 16u)" if fmt == "BF16" else "unpack2x16float(h).x"
    helper = (f"fn {name}_at(e: u32) -> f32 {{\n  let word = {name}[e >> 1u];\n"
              f"  let h = select(word & 0xffffu, word >> 16u, (e & 1u) == 1u);\n  return {widen};\n}}\n")
    return _reading(src, name, helper)


def _q8_0_variant(src: str, name: str) -> str:
    """The shader reading ``name`` as ``Q8_0`` blocks (34 bytes: a float16 scale, 32 int8 values)
    packed in 32-bit words; element ``e`` of a row-major matrix whose rows are whole blocks is
    value ``e % 32`` of block ``e / 32``, widened to float32 as ``scale * q``."""
    helper = (_byte_reader(name) + f"fn {name}_at(e: u32) -> f32 {{\n  let off = (e >> 5u) * 34u;\n"
              f"  let d = unpack2x16float({name}_byte(off) | ({name}_byte(off + 1u) << 8u)).x;\n"
              f"  let q = bitcast<i32>({name}_byte(off + 2u + (e & 31u)) << 24u) >> 24u;\n"
              f"  return d * f32(q);\n}}\n")
    return _reading(src, name, helper)


def _q4_k_variant(src: str, name: str) -> str:
    """The shader reading ``name`` as ``Q4_K`` blocks (144 bytes, so every block starts on a
    32-bit word: float16 ``d`` and ``dmin`` in its first word, 12 bytes of packed 6-bit scales
    and mins, 128 bytes of 4-bit values); element ``e`` is value ``e % 256`` of block ``e / 256``,
    widened to float32 as ``(d * sc) * q - (dmin * m)`` (llama.cpp's ``get_scale_min_k4``)."""
    helper = (_byte_reader(name) + f"fn {name}_at(e: u32) -> f32 {{\n  let blk = e >> 8u; let i = e & 255u; "
              f"let j = i >> 5u;\n"
              f"  let off = blk * 144u;\n  let dd = unpack2x16float({name}[blk * 36u]);\n"
              f"  var sc: u32; var m: u32;\n"
              f"  if (j < 4u) {{ sc = {name}_byte(off + 4u + j) & 63u; m = {name}_byte(off + 8u + j) & 63u; }}\n"
              f"  else {{ let s = {name}_byte(off + 8u + j);\n"
              f"    sc = (s & 15u) | (({name}_byte(off + j) >> 6u) << 4u);\n"
              f"    m = (s >> 4u) | (({name}_byte(off + 4u + j) >> 6u) << 4u); }}\n"
              f"  let b = {name}_byte(off + 16u + (i >> 6u) * 32u + (i & 31u));\n"
              f"  let q = select(b & 15u, b >> 4u, (j & 1u) == 1u);\n"
              f"  return (dd.x * f32(sc)) * f32(q) - dd.y * f32(m);\n}}\n")
    return _reading(src, name, helper)


_SHADERS["matmul_Q8_0"] = _q8_0_variant(_SHADERS["matmul"], "w")
_SHADERS["gather_Q8_0"] = _q8_0_variant(_SHADERS["gather"], "table")
_SHADERS["matmul_Q4_K"] = _q4_k_variant(_SHADERS["matmul"], "w")
_SHADERS["gather_Q4_K"] = _q4_k_variant(_SHADERS["gather"], "table")

for _fmt in ("F16", "BF16"):
    _SHADERS[f"matmul_{_fmt}"] = _packed16_variant(_SHADERS["matmul"], "w", _fmt)
    _SHADERS[f"gather_{_fmt}"] = _packed16_variant(_SHADERS["gather"], "table", _fmt)


class _T:
    """A device tensor: one storage buffer, its shape and element format (``F32``, or a 16-bit
    weight format)."""

    __slots__ = ("buf", "shape", "nbytes", "fmt", "__weakref__")

    def __init__(self, buf: Any, shape: tuple[int, ...], nbytes: int, fmt: str = "F32") -> None:
        self.buf, self.shape, self.nbytes, self.fmt = buf, shape, nbytes, fmt


class VulkanBackend(AccountedMemory, Backend):
    weight_formats = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_K"})

    def __init__(self, device: str = "") -> None:
        parts = [x for x in device.split(",") if x]
        want_f16 = "f16" in parts
        device = next((x for x in parts if x != "f16"), "")
        if not os.environ.get("XDG_RUNTIME_DIR"):  # Mesa's loaders complain without one
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="spherefmt-xdg-")
        try:
            import wgpu
        except ImportError as e:
            raise BackendUnavailableError(f"backend vulkan: wgpu is not installed ({_HINT})") from e
        self.wgpu = wgpu
        if not os.environ.get("SPHEREFMT_VERBOSE"):  # wgpu warns about adapters on stderr: `sphere -v` shows it
            import logging

            logging.getLogger("wgpu").setLevel(logging.ERROR)
        try:
            # Vulkan adapters only, found by listing them (forcing WGPU_BACKEND_TYPE makes wgpu
            # print a warning on every start), the best kind first
            adapters = sorted((a for a in wgpu.gpu.enumerate_adapters_sync()
                               if str(a.info.get("backend_type", "")).lower() == "vulkan"),
                              key=lambda a: _KIND_RANK.get(str(a.info.get("adapter_type", "")), 9))
            if device == "gpu":
                gpus = [a for a in adapters if str(a.info.get("adapter_type", "")) in _GPU_KINDS]
                if not gpus:
                    cpu = ", ".join(str(a.info.get("device", "?")) for a in adapters) or "none"
                    raise BackendUnavailableError(f"backend vulkan:gpu: no Vulkan GPU (adapters: {cpu}); a CPU "
                                                  "adapter runs only when asked for by name: --backend vulkan")
                adapter = gpus[0]
            elif device:
                adapter = adapters[int(device)]
            else:
                adapter = adapters[0] if adapters else None
        except (IndexError, ValueError):
            raise BackendUnavailableError(f"backend vulkan:{device}: no such Vulkan adapter") from None
        except BackendUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - no driver, no loader: one clear line
            raise BackendUnavailableError(f"backend vulkan: no Vulkan adapter ({str(e)[:120]}; {_HINT})") from None
        if adapter is None:
            raise BackendUnavailableError(f"backend vulkan: no Vulkan adapter ({_HINT})")
        self.adapter = adapter
        limits = {k: adapter.limits[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size")}
        self.f16 = want_f16  # float32 weight matrices stored as float16 (half the bytes; logits change ~1e-3)
        self.dev = adapter.request_device_sync(required_limits=limits)
        self.name = "vulkan" + (f":{device}" if device else "") + ("," if device and want_f16 else "") + \
            (":f16" if want_f16 and not device else ("f16" if want_f16 else ""))
        self._acct = Accountant()
        self._pipes: dict[str, Any] = {}
        self._lock = threading.Lock()  # one queue: submissions from the prefetcher and the forward pass
        self._dummy = self._buffer(4)
        # lavapipe runs a workgroup's invocations as CPU loops, where barriers cost more than the
        # tile saves (measured: 0.44 vs 1.39 GFLOP/s); GPUs get the tiled kernel
        self.tiled = str(adapter.info.get("adapter_type", "")).upper() != "CPU"

    # --- buffers --------------------------------------------------------------------------
    def _buffer(self, nbytes: int, data: Any = None) -> Any:
        u = self.wgpu.BufferUsage
        size = max(16, (nbytes + 15) // 16 * 16)
        buf = self.dev.create_buffer(size=size, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
        if data is not None and nbytes:
            if nbytes % 4:  # copies are in whole 4-byte words (odd-length f16 data)
                data = np.frombuffer(memoryview(data).cast("B").tobytes() + bytes(4 - nbytes % 4), np.uint8)
            with self._lock:
                self.dev.queue.write_buffer(buf, 0, data)
        return buf

    def _new(self, shape: tuple[int, ...], data: Any = None) -> _T:
        nbytes = 4 * math.prod(shape)
        t = _T(self._buffer(nbytes, data), tuple(shape), nbytes)
        return self._acct.track(t, nbytes)

    def upload(self, host: np.ndarray) -> _T:
        a = np.ascontiguousarray(host, dtype=np.float32)
        return self._new(a.shape, a)

    def adopt(self, host: np.ndarray) -> _T:
        fmt = weight_format(host)
        if host.ndim != 2 or fmt is None or (fmt == "F32" and not self.f16):
            return self.upload(host)
        if fmt == "F32":
            fmt, host = "F16", host.astype(np.float16)
        if fmt in QUANT_TYPES:  # the blocks' bytes; the tensor's shape is its values'
            raw = np.ascontiguousarray(host).view(np.uint8)
            t = _T(self._buffer(raw.nbytes, raw), values_shape(host), raw.nbytes, fmt)
            return self._acct.track(t, raw.nbytes)
        a = np.ascontiguousarray(host).view(np.uint16)
        t = _T(self._buffer(a.nbytes, a), a.shape, a.nbytes, fmt)
        return self._acct.track(t, a.nbytes)

    def zeros(self, shape: tuple[int, ...]) -> _T:
        return self._new(tuple(shape))  # wgpu zero-initialises new buffers

    def free(self, t: Any) -> None:
        self._acct.free(t)
        t.buf.destroy()

    def to_host(self, t: Any) -> np.ndarray:
        with self._lock:
            raw = self.dev.queue.read_buffer(t.buf, 0, t.buf.size)
        n = math.prod(t.shape)
        if t.fmt in QUANT_TYPES:
            blocks = np.frombuffer(raw, dtype=np.uint8)[: t.nbytes].view(WEIGHT_DTYPES[t.fmt]).reshape(t.shape[0], -1)
            return dequantize_blocks(blocks)
        if t.fmt == "BF16":
            return (np.frombuffer(raw, dtype=np.uint16)[:n].astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
        dt = np.float16 if t.fmt == "F16" else np.float32
        return np.frombuffer(raw, dtype=dt)[:n].reshape(t.shape).astype(np.float32)

    def synchronize(self) -> None:
        with self._lock:
            self.dev.queue.read_buffer(self._dummy, 0, 4)  # returns when earlier work is done

    def describe(self) -> dict[str, Any]:
        info = self.adapter.info
        return {"backend": self.name, "device": f"{info.get('device', '?')} ({info.get('adapter_type', '?')})",
                "driver": info.get("description", ""), "wgpu": self.wgpu.__version__,
                "shader_f16": "shader-f16" in self.adapter.features}

    # --- dispatch -------------------------------------------------------------------------
    def _pipe(self, name: str) -> Any:
        pipe = self._pipes.get(name)
        if pipe is None:
            src = _SHADERS[name]
            module = self.dev.create_shader_module(code=_COMMON + src)
            pipe = self.dev.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
            self._pipes[name] = pipe
        return pipe

    def _run(self, name: str, ints: tuple[int, ...], floats: tuple[float, ...], bufs: list[Any], n: int,
             grid: tuple[int, int] | None = None) -> None:
        params = struct.pack("8I4f", *(list(ints) + [0] * (8 - len(ints))), *(list(floats) + [0.0] * (4 - len(floats))))
        u = self.wgpu.BufferUsage
        ubuf = self.dev.create_buffer_with_data(data=params, usage=u.UNIFORM)
        pipe = self._pipe(name)
        entries = [{"binding": 0, "resource": {"buffer": ubuf, "offset": 0, "size": len(params)}}]
        entries += [{"binding": i + 1, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(bufs)]
        group = self.dev.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=entries)
        if grid is not None:
            gx, gy = grid
        else:
            groups = max(1, math.ceil(n / _WG))
            gx, gy = min(groups, 65535), math.ceil(groups / 65535)
        with self._lock:
            enc = self.dev.create_command_encoder()
            cp = enc.begin_compute_pass()
            cp.set_pipeline(pipe)
            cp.set_bind_group(0, group)
            cp.dispatch_workgroups(gx, gy, 1)
            cp.end()
            self.dev.queue.submit([enc.finish()])

    # --- ops ------------------------------------------------------------------------------
    def matmul(self, x: Any, w: Any, bias: Any = None, *, transpose_w: bool = False,
               cols: tuple[int, int] | None = None) -> _T:
        m, k = x.shape
        ld = w.shape[1]
        c0, c1 = cols if cols is not None else (0, ld)
        n = w.shape[0] if transpose_w else c1 - c0
        if transpose_w:
            k_w = c1 - c0
        else:
            k_w = w.shape[0]
        if k_w != k:
            raise InputError(f"matmul: x has {k} columns, w gives {k_w}")
        out = self._new((m, n))
        args = ((m, n, k, ld, c0, int(transpose_w), int(bias is not None)), (),
                [x.buf, w.buf, bias.buf if bias is not None else self._dummy, out.buf], m * n)
        if w.fmt != "F32":
            self._run(f"matmul_{w.fmt}", *args)
        elif self.tiled and m >= 4 and math.ceil(m / 16) <= 65535 and math.ceil(n / 16) <= 65535:
            self._run("matmul_tiled", *args, grid=(math.ceil(n / 16), math.ceil(m / 16)))
        else:  # a few rows (decode): one invocation per output, reading weight rows in order
            self._run("matmul", *args)
        return out

    def _binary(self, a: Any, b: Any, op: int) -> _T:
        n = math.prod(a.shape)
        cols = a.shape[-1] if a.shape else 1
        if tuple(b.shape) == tuple(a.shape):
            mode = 0
        elif len(b.shape) == 1 and b.shape[0] == cols:
            mode = 1
        elif len(a.shape) == 2 and tuple(b.shape) == (a.shape[0], 1):
            mode = 2
        else:
            raise InputError(f"cannot broadcast {b.shape} over {a.shape}")
        out = self._new(a.shape)
        self._run("binary", (n, cols, mode, op), (), [a.buf, b.buf, out.buf], n)
        return out

    def add(self, a: Any, b: Any) -> _T:
        return self._binary(a, b, 0)

    def mul(self, a: Any, b: Any) -> _T:
        return self._binary(a, b, 1)

    def _unary(self, x: Any, op: int) -> _T:
        n = math.prod(x.shape)
        out = self._new(x.shape)
        self._run("unary", (n, op), (), [x.buf, out.buf], n)
        return out

    def gelu(self, x: Any, approximate: bool = True) -> _T:
        return self._unary(x, 0 if approximate else 1)

    def silu(self, x: Any) -> _T:
        return self._unary(x, 2)

    def layernorm(self, x: Any, w: Any, b: Any, eps: float) -> _T:
        rows, cols = x.shape
        out = self._new(x.shape)
        self._run("norm", (rows, cols, 0), (eps,), [x.buf, w.buf, b.buf, out.buf], rows)
        return out

    def rmsnorm(self, x: Any, w: Any, eps: float, heads: int = 1) -> _T:
        rows, cols = x.shape  # per-head norms: (T, H * hd) row-major is (T * H, hd)
        out = self._new(x.shape)
        self._run("norm", (rows * heads, cols // heads, 1), (eps,), [x.buf, w.buf, self._dummy, out.buf], rows * heads)
        return out

    def gather_rows(self, table: Any, ids: np.ndarray) -> _T:
        ids32 = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).astype(np.int32))
        cols = table.shape[1]
        out = self._new((len(ids32), cols))
        idbuf = self._buffer(ids32.nbytes, ids32)
        self._run("gather" if table.fmt == "F32" else f"gather_{table.fmt}", (len(ids32) * cols, cols), (), [table.buf, idbuf, out.buf],
                  len(ids32) * cols)
        return out

    def rope(self, x: Any, cos: Any, sin: Any, n_heads: int) -> _T:
        n = math.prod(x.shape)
        out = self._new(x.shape)
        self._run("rope", (n, n_heads, x.shape[1] // n_heads), (), [x.buf, cos.buf, sin.buf, out.buf], n)
        return out

    def attention(self, q: Any, k_cache: Any, v_cache: Any, start: int, n_heads: int, n_kv_heads: int,
                  scale: float, window: int = 0) -> _T:
        t = q.shape[0]
        hd = q.shape[1] // n_heads
        out = self._new(q.shape)
        self._run("attention", (t, n_heads, n_kv_heads, hd, start, window), (scale,),
                  [q.buf, k_cache.buf, v_cache.buf, out.buf], t * n_heads)
        return out

    def write_rows(self, dst: Any, start: int, src: Any) -> None:
        row = 4 * dst.shape[1]
        with self._lock:
            enc = self.dev.create_command_encoder()
            enc.copy_buffer_to_buffer(src.buf, 0, dst.buf, start * row, src.nbytes)
            self.dev.queue.submit([enc.finish()])
