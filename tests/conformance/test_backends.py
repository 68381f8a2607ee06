"""The backend conformance suite: every backend that starts here passes the same tests.

References are written here in float64 numpy, independently of ``backends/numpy.py``; shapes
include sizes that are not multiples of typical workgroup/tile sizes (1, 7, 33, 65).
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest

from spherefmt.backends import get_backend, names, probe
from spherefmt.errors import BackendUnavailableError, UnknownBackendError
from spherefmt.testing.tolerance import (
    BLOCK_ROUNDINGS,
    U32,
    assert_within,
    block_magnitudes,
    gamma,
    product_bound,
    rounding_bound,
)

# every registered backend; one that does not start here skips with its reason
CANDIDATES = [c for c in ("numpy", "torch:cpu", "torch:cuda", "vulkan") if c.partition(":")[0] in names()]


def _started(name: str):
    try:
        return get_backend(name)
    except (BackendUnavailableError, UnknownBackendError) as e:
        pytest.skip(f"{name}: {e}")


@pytest.fixture(params=CANDIDATES, scope="module")
def be(request):
    return _started(request.param)


@pytest.fixture(autouse=True)
def _rng(request):
    """Each test draws from its own generator, seeded by its name (and ``SPHEREFMT_TEST_SEED``,
    0 unless set, to try other data): the same data whatever ran before it (pytest-randomly
    shuffles the order) and on every worker."""
    global RNG
    RNG = np.random.default_rng([zlib.crc32(request.node.nodeid.encode()), int(os.environ.get("SPHEREFMT_TEST_SEED", 0))])
    yield
    RNG = None


RNG: np.random.Generator | None = None


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def close(be, t, ref, bound, what: str = "") -> None:
    """The device's result against the float64 reference, within the bound the arithmetic gives."""
    assert_within(be.to_host(t), ref, bound, what or be.name)


def prod(x, w, bias=None, *, transpose_w=False, weight_roundings=0):
    """The float64 product and its float32 error bound (``spherefmt.testing.tolerance``)."""
    w64 = np.asarray(w, np.float64).T if transpose_w else np.asarray(w, np.float64)
    ref = np.asarray(x, np.float64) @ w64 + (0.0 if bias is None else np.asarray(bias, np.float64))
    return ref, product_bound(x, w64, bias, weight_roundings=weight_roundings)


def check_product(be, t, x, w, bias=None, **kw) -> None:
    ref, bound = prod(x, w, bias, **kw)
    close(be, t, ref, bound)


def erf_error(be) -> float:
    """Absolute error of the erf inside a backend's exact GELU, before float32 rounding: the
    numpy and Vulkan backends evaluate Abramowitz & Stegun 7.1.26, whose bound is 1.5e-7; ATen's
    vectorized CPU GELU states no bound and is seen at 6.3e-7 (x = 3.478), so torch is allowed
    1e-6, still 470x below the 4.7e-4 that tells the tanh form from the exact one."""
    return 1e-6 if be.name.startswith("torch") else 1.5e-7


def library_ulps(be, arg: np.ndarray) -> np.ndarray:
    """Documented accuracy of one float32 ``exp``/``tanh`` of argument ``arg``, in ulps: WGSL
    allows ``3 + 2|x|`` for ``exp`` (tanh inherits it); numpy's and torch's SIMD float32 math
    (SLEEF, numpy's own) promise at most 4."""
    return 3 + 2 * np.abs(arg) if be.name.startswith("vulkan") else np.full_like(arg, 4.0)


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (7, 33, 65), (33, 64, 1), (65, 17, 130)])
def test_matmul(be, m, k, n):
    x, w, wt, b = rand(m, k), rand(k, n), rand(n, k), rand(n)
    X, W, WT, B = be.upload(x), be.upload(w), be.upload(wt), be.upload(b)
    check_product(be, be.matmul(X, W), x, w)
    check_product(be, be.matmul(X, W, B), x, w, b)
    check_product(be, be.matmul(X, WT, transpose_w=True), x, wt, transpose_w=True)
    check_product(be, be.matmul(X, WT, B, transpose_w=True), x, wt, b, transpose_w=True)
    # a column range of a wider matrix (an expert's rows hold several matrices side by side)
    wide = rand(k, n + 9)
    WIDE = be.upload(wide)
    check_product(be, be.matmul(X, WIDE, B, cols=(4, 4 + n)), x, wide[:, 4 : 4 + n], b)
    rows = rand(n, 2 * k + 3)
    ROWS = be.upload(rows)
    check_product(be, be.matmul(X, ROWS, B, transpose_w=True, cols=(k + 3, 2 * k + 3)), x, rows[:, k + 3 :], b,
                  transpose_w=True)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (33, 65)])
def test_elementwise(be, shape):
    a, b, v, col = rand(*shape), rand(*shape), rand(shape[1]), rand(shape[0], 1)
    A, B, V, COL = (be.upload(t) for t in (a, b, v, col))
    a64 = a.astype(np.float64)
    for got, ref in ((be.add(A, B), a64 + b), (be.add(A, V), a64 + v), (be.mul(A, B), a64 * b),
                     (be.mul(A, V), a64 * v), (be.mul(A, COL), a64 * col)):
        close(be, got, ref, rounding_bound(ref))  # one rounding of an exact result
    x = (a * 3).astype(np.float64)  # exactly float32
    X = be.upload(x)
    # Each is a short chain of float32 steps; each step's rounding (at most `steps` of them, u
    # each) and the library's exp/tanh error are carried to the result by the sensitivity of the
    # result to that intermediate (Higham 3.1's running error):
    # gelu_tanh = 0.5 x (1 + t), t = tanh(y), y = c (x + 0.044715 x^3)
    y = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    t = np.tanh(y)
    tanh = 0.5 * x * (1 + t)
    sech2 = 1 - t * t
    steps = 8  # x*x, *x, *0.044715, +x, *c, +1, *x, *0.5 (exact)
    bound = U32 * (steps * (np.abs(tanh) + np.abs(0.5 * x * sech2 * y) + np.abs(0.5 * x))
                   + library_ulps(be, 2 * y) * np.abs(0.5 * x * t))
    close(be, be.gelu(X), tanh, bound, "gelu tanh")
    # gelu_erf = 0.5 x (1 + erf(z)), z = x / sqrt(2): erf is Abramowitz & Stegun 7.1.26 on the
    # numpy and Vulkan backends, 1.5e-7 absolute (erf_error); rounding its result near 1 adds
    # 2u absolute; its float32 Horner steps (5 multiply-adds over
    # coefficients whose magnitudes sum to 4.5: gamma(10) * 4.5 < 50 u) scale exp(-z^2), whose
    # library error and argument (z * z from a rounded z: 3 roundings, times z^2) add to it;
    # z's own rounding moves erf by erf'(z) z u < 1.2 |z| exp(-z^2) u; 4 roundings after.
    z = x / math.sqrt(2)
    erf = 0.5 * x * (1 + np.vectorize(math.erf)(z))
    gauss = np.exp(-z * z)
    bound = (np.abs(0.5 * x) * (erf_error(be) + 2 * U32
                                + U32 * gauss * (50 + library_ulps(be, z * z) + 3 * z * z + 1.2 * np.abs(z)))
             + U32 * 4 * np.abs(erf))
    close(be, be.gelu(X, approximate=False), erf, bound, "gelu erf")
    # silu = x / (1 + exp(-x)): exp's error, the addition and the division
    e = np.exp(-x)
    silu = x / (1 + e)
    bound = U32 * (3 * np.abs(silu) + library_ulps(be, x) * np.abs(silu) * e / (1 + e))
    close(be, be.silu(X), silu, bound, "silu")


@pytest.mark.parametrize("t,d", [(1, 8), (5, 33), (17, 64)])
def test_norms(be, t, d):
    x, w, b = rand(t, d) * 2 + 0.5, rand(d), rand(d)
    X, W, B = be.upload(x), be.upload(w), be.upload(b)
    x64 = x.astype(np.float64)
    ref, bound = _layernorm_ref(x64, w, b, 1e-5)
    close(be, be.layernorm(X, W, B, 1e-5), ref, bound, "layernorm")
    ref, bound = _rmsnorm_ref(x64, w, 1e-6)
    close(be, be.rmsnorm(X, W, 1e-6), ref, bound, "rmsnorm")


def _layernorm_ref(x, w, b, eps):
    """LayerNorm in float64 and its float32 error bound: the mean of ``d`` terms is off by
    ``gamma(d+1) mean|x|``; each centred value by that plus one rounding; the variance (a mean of
    squares of centred values, or ``E[x^2] - mu^2``: ``gamma(d+3)`` of the mean of squares covers
    both) plus twice the centring error times
    ``mean|x - mu|``; the square root and the division round once or twice more (half the
    variance's relative error reaches the scale); then ``* w + b`` rounds twice."""
    d = x.shape[-1]
    mu = x.mean(-1, keepdims=True)
    c = x - mu
    var = (c * c).mean(-1, keepdims=True)
    e_mu = gamma(d + 1) * np.abs(x).mean(-1, keepdims=True)
    e_c = e_mu + U32 * np.abs(c).max(-1, keepdims=True)
    rel_var = (gamma(d + 3) * (var + mu * mu) + 2 * e_c * np.abs(c).mean(-1, keepdims=True) + e_c**2) / (var + eps)
    sd = np.sqrt(var + eps)
    n = c / sd
    e_n = (U32 * np.abs(c) + e_mu) / sd + np.abs(n) * (rel_var / 2 + gamma(3))
    ref = n * w + b
    return ref, np.abs(w) * e_n + gamma(2) * (np.abs(n * w) + np.abs(b))


def _rmsnorm_ref(x, w, eps, heads=1):
    """RMSNorm (per head when ``heads`` > 1) in float64 and its float32 error bound: the mean
    of squares is off by ``gamma(d+2)`` of itself, half of which reaches the scale, plus the
    square root's, the division's and ``* w``'s roundings."""
    t = x.shape[0]
    g = x.reshape(t, heads, -1)
    ms = (g * g).mean(-1, keepdims=True)
    n = g / np.sqrt(ms + eps)
    rel = gamma(g.shape[-1] + 2) * ms / (ms + eps) / 2 + gamma(4)
    return (n * w).reshape(t, -1), (np.abs(n * w) * rel).reshape(t, -1)


@pytest.mark.parametrize("t,heads,hd", [(1, 2, 8), (5, 3, 16), (4, 4, 5)])
def test_rmsnorm_per_head(be, t, heads, hd):
    """Per-head norms (Qwen3's q/k norms): each head's slice is normalised on its own."""
    x, w = rand(t, heads * hd) * 2 + 0.5, rand(hd)
    ref, bound = _rmsnorm_ref(x.astype(np.float64), w, 1e-6, heads)
    close(be, be.rmsnorm(be.upload(x), be.upload(w), 1e-6, heads=heads), ref, bound)


def test_gather_rows(be):
    table = rand(37, 9)
    ids = np.array([0, 36, -1, 5, 5, -1])
    out = be.to_host(be.gather_rows(be.upload(table), ids))
    ref = np.where((ids >= 0)[:, None], table[np.maximum(ids, 0)], 0.0)
    np.testing.assert_array_equal(out, ref)


def test_rope(be):
    t, h, hd = 5, 3, 8
    x = rand(t, h * hd)
    ang = RNG.uniform(-3, 3, (t, hd // 2))
    emb = np.concatenate([ang, ang], axis=1)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    xh = x.reshape(t, h, hd).astype(np.float64)
    rot = np.concatenate([-xh[..., hd // 2 :], xh[..., : hd // 2]], axis=-1)
    a, b = xh * cos[:, None], rot * sin[:, None]
    ref = (a + b).reshape(t, -1)  # two products and a sum of float32 values: gamma(2) of the terms
    close(be, be.rope(be.upload(x), be.upload(cos), be.upload(sin), h), ref,
          (gamma(2) * (np.abs(a) + np.abs(b))).reshape(t, -1))


def _attention_ref(q, k, v, start, h, hk, scale, window=0, be=None):
    """Causal attention in float64 and (with ``be``) its float32 error bound on that backend:
    each score is a product of ``hd`` terms and a scale (``gamma(hd+1)`` of ``|q| |k| scale``);
    shifting by the row's maximum moves the argument of ``exp`` by two such errors and one
    rounding; each weight ``p_j`` then has relative error at most twice that plus
    ``gamma(n (L + 3))`` for the ``n`` exponentials of ``L`` ulps, their sum, the division and
    any running rescaling (a streaming softmax multiplies by up to ``n`` further exponentials);
    the output ``sum_j p_j v_j`` is off by that times ``sum_j p_j |v_j|`` plus ``gamma(n + 1)``
    of the same sum."""
    t, n = q.shape[0], start + q.shape[0]
    hd = q.shape[1] // h
    out = np.zeros((t, h * hd))
    bound = np.zeros((t, h * hd))
    for head in range(h):
        kh = head // (h // hk)
        qq = q[:, head * hd : (head + 1) * hd].astype(np.float64)
        kk = k[:n, kh * hd : (kh + 1) * hd].astype(np.float64)
        vv = v[:n, kh * hd : (kh + 1) * hd].astype(np.float64)
        s = qq @ kk.T * scale
        for i in range(t):
            s[i, start + i + 1 :] = -np.inf
            if window:
                s[i, : max(0, start + i + 1 - window)] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[:, head * hd : (head + 1) * hd] = p @ vv
        if be is not None:
            live = np.isfinite(s)
            e_s = gamma(hd + 1) * (np.abs(qq) @ np.abs(kk).T) * scale
            shift = np.where(live, s - s.max(1, keepdims=True), 0.0)
            delta = 2 * np.where(live, e_s, 0).max(1, keepdims=True) + U32 * np.abs(shift).max(1, keepdims=True)
            ulps = library_ulps(be, np.abs(shift).max(1, keepdims=True))
            rel = 2 * delta + gamma(n * (ulps + 3))
            bound[:, head * hd : (head + 1) * hd] = (rel + gamma(n + 1)) * (p @ np.abs(vv))
    return (out, bound) if be is not None else out


@pytest.mark.parametrize("t,start,h,hk,hd", [(1, 0, 2, 2, 4), (1, 9, 4, 2, 8), (7, 0, 3, 1, 5), (6, 5, 4, 4, 16)])
def test_attention_with_cache(be, t, start, h, hk, hd):
    max_len = start + t + 3  # rows past the end hold garbage that must be ignored
    q = rand(t, h * hd)
    k, v = rand(max_len, hk * hd), rand(max_len, hk * hd)
    kc, vc = be.zeros((max_len, hk * hd)), be.zeros((max_len, hk * hd))
    be.write_rows(kc, 0, be.upload(k))
    be.write_rows(vc, 0, be.upload(v))
    out = be.attention(be.upload(q), kc, vc, start, h, hk, 1 / math.sqrt(hd))
    close(be, out, *_attention_ref(q, k, v, start, h, hk, 1 / math.sqrt(hd), be=be))


@pytest.mark.parametrize("t,start,window", [(1, 9, 4), (7, 0, 3), (6, 5, 1), (3, 2, 50)])
def test_sliding_window_attention(be, t, start, window):
    """Mistral's sliding window: the query at position i sees keys j > i - window only."""
    h, hk, hd = 4, 2, 8
    q, k, v = rand(t, h * hd), rand(start + t, hk * hd), rand(start + t, hk * hd)
    kc, vc = be.upload(k), be.upload(v)
    out = be.attention(be.upload(q), kc, vc, start, h, hk, 0.3, window=window)
    ref, bound = _attention_ref(q, k, v, start, h, hk, 0.3, window, be=be)
    close(be, out, ref, bound)
    if window < start + t:  # and the window changes the answer (the test can fail)
        assert not np.allclose(ref, _attention_ref(q, k, v, start, h, hk, 0.3), atol=1e-4)


def test_write_rows_in_place(be):
    dst = be.zeros((6, 4))
    src = rand(2, 4)
    be.write_rows(dst, 3, be.upload(src))
    ref = np.zeros((6, 4), np.float32)
    ref[3:5] = src
    np.testing.assert_array_equal(be.to_host(dst), ref)


def test_ops_do_not_modify_inputs(be):
    x, w = rand(4, 6), rand(6, 6)
    X, W = be.upload(x), be.upload(w)
    for _ in (be.matmul(X, W, be.upload(w[0])), be.add(X, X), be.mul(X, X), be.gelu(X), be.silu(X),
              be.layernorm(X, be.upload(w[0]), be.upload(w[1]), 1e-5)):
        pass
    np.testing.assert_array_equal(be.to_host(X), x)
    np.testing.assert_array_equal(be.to_host(W), w)


def test_upload_converts_to_float32(be):
    for a in (np.arange(6, dtype=np.float64).reshape(2, 3), np.arange(6, dtype=np.float16)):
        out = be.to_host(be.upload(a))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, a.astype(np.float32))


def test_memory_accounting(be):
    be.synchronize()
    base = be.memory_used()
    be.reset_peak()
    t = be.upload(np.ones((256, 256), np.float32))
    be.synchronize()
    assert be.memory_used() - base >= 256 * 256 * 4
    y = be.matmul(t, t)
    be.synchronize()
    assert be.memory_used() - base >= 2 * 256 * 256 * 4
    assert be.peak_memory() >= be.memory_used()
    be.free(t)
    be.free(y)
    del t, y
    be.synchronize()
    assert be.memory_used() - base < 256 * 256 * 4
    assert be.peak_memory() - base >= 2 * 256 * 256 * 4
    be.reset_peak()
    assert be.peak_memory() - be.memory_used() < 256 * 256 * 4


def test_describe_names_the_backend(be):
    d = be.describe()
    assert d["backend"] == be.name and "device" in d


def test_registry_errors():
    with pytest.raises(UnknownBackendError, match="known: .*numpy.*torch"):
        get_backend("tpu")
    with pytest.raises(BackendUnavailableError, match="CPU only"):
        get_backend("numpy:cuda")
    assert "numpy" in names()


def test_env_var_picks_backend(monkeypatch):
    monkeypatch.setenv("SPHEREFMT_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("SPHEREFMT_BACKEND", "nope")
    with pytest.raises(UnknownBackendError):
        get_backend()


def test_default_is_a_real_gpu_or_the_fastest_cpu_backend(monkeypatch):
    """With no backend named: CUDA/ROCm, then a Vulkan *GPU*, then numpy; a CPU Vulkan adapter
    (lavapipe here) only when asked for by name, and starting it prints nothing."""
    import subprocess
    import sys

    monkeypatch.delenv("SPHEREFMT_BACKEND", raising=False)
    rows = {r["name"]: r for r in probe()}
    gpu = rows.get("torch:cuda", {}).get("available") or "(CPU)" not in rows.get("vulkan", {}).get("device", "(CPU)")
    if not gpu:
        assert get_backend().name == "numpy"
        if rows.get("vulkan", {}).get("available"):
            with pytest.raises(BackendUnavailableError, match="no Vulkan GPU .*asked for by name"):
                get_backend("vulkan:gpu")
    if rows.get("vulkan", {}).get("available"):
        run = subprocess.run([sys.executable, "-c", "from spherefmt.backends import get_backend; get_backend('vulkan')"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout == "" and run.stderr == "", run.stderr


def test_probe_reports_every_backend():
    rows = {r["name"]: r for r in probe()}
    assert rows["numpy"]["available"] is True
    for r in rows.values():
        assert r["available"] or r["reason"]


def test_vulkan_tiled_matmul_path():
    """The tiled kernel (used on GPUs) against numpy, forced on whatever adapter is here."""
    be = _started("vulkan")
    old = be.tiled
    be.tiled = True
    try:
        for m, k, n in [(4, 7, 5), (17, 33, 65), (40, 64, 3)]:
            x, w, wide, b = rand(m, k), rand(k, n), rand(n, k + 5), rand(n)
            check_product(be, be.matmul(be.upload(x), be.upload(w), be.upload(b)), x, w, b)
            check_product(be, be.matmul(be.upload(x), be.upload(wide), transpose_w=True, cols=(5, k + 5)),
                          x, wide[:, 5:], transpose_w=True)
    finally:
        be.tiled = old


def test_vulkan_f16_weights():
    """``vulkan:f16`` keeps weight matrices as float16 (half the bytes), accumulates in float32."""
    be = _started("vulkan:f16")
    x, w, wide = rand(5, 33), rand(33, 17), rand(17, 40)
    base = be.memory_used()
    W = be.adopt(w)
    assert be.memory_used() - base == w.size * 2
    w16 = w.astype(np.float16).astype(np.float64)
    check_product(be, be.matmul(be.upload(x), W), x, w16)
    wide16 = wide.astype(np.float16).astype(np.float64)
    check_product(be, be.matmul(be.upload(x), be.adopt(wide), transpose_w=True, cols=(5, 38)), x, wide16[:, 5:38],
                  transpose_w=True)
    np.testing.assert_array_equal(be.to_host(be.gather_rows(W, np.array([3, -1]))),
                                  np.stack([w16[3], np.zeros(17)]).astype(np.float32))
    v = rand(17)
    np.testing.assert_array_equal(be.to_host(be.adopt(v)), v)  # vectors (norms, biases) stay float32


def test_numpy_blas_threads_follow_the_measured_decode_speed():
    """Small products run on one BLAS thread; large decode products on the thread count the
    decode steps measured faster, alternated first, then re-tried now and then."""
    from spherefmt.backends.numpy import PROBE, REPROBE, SMALL_WEIGHTS, _BlasThreads

    t = _BlasThreads()
    if not t._libs or t.full < 2:
        pytest.skip("numpy's BLAS is not threaded here")
    t.product(1, SMALL_WEIGHTS // 2)
    assert t.now == 1
    t.product(64, SMALL_WEIGHTS * 4)
    assert t.now == t.full  # prefill: every thread
    slow = {t.full: 0.02, 1: 0.01}  # as beside a busy process: one thread is faster
    seen = []
    for _ in range(PROBE + 2 * REPROBE):
        seen.append(t.big)
        t.step(slow[t.big])
    assert set(seen[:PROBE]) == {1, t.full}  # both tried at first
    after = seen[PROBE:]
    assert after.count(1) > len(after) * 0.8 and t.full in after  # the faster kept, the other re-tried
    t.product(1, SMALL_WEIGHTS * 4)
    assert t.now == t.big
    for _ in range(3 * REPROBE):  # the load goes away: all threads win again
        t.step({t.full: 0.005, 1: 0.01}[t.big])
    assert t.big == t.full


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (7, 33, 65), (3, 64, 1)])
def test_weights_held_in_their_stored_precision(be, fmt, m, k, n):
    """A 16-bit weight matrix stays 16-bit on the device (half the bytes counted) and every
    product reads it as the exact float32 of its stored values, accumulating in float32."""
    from spherefmt.backends.base import WEIGHT_DTYPES

    assert fmt in be.weight_formats
    dt = WEIGHT_DTYPES[fmt]
    w, wt, wide, b = (a.astype(dt) for a in (rand(k, n), rand(n, k), rand(n, 2 * k + 3), rand(n)))
    x = rand(m, k)
    be.synchronize()
    base = be.memory_used()
    W = be.adopt(w)
    be.synchronize()
    assert be.memory_used() - base == w.size * 2  # held as stored, not widened
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    B = be.upload(b.astype(np.float32))
    check_product(be, be.matmul(be.upload(x), W), x, w64)
    check_product(be, be.matmul(be.upload(x), W, B), x, w64, b64)
    check_product(be, be.matmul(be.upload(x), be.adopt(wt), transpose_w=True), x, wt.astype(np.float64), transpose_w=True)
    check_product(be, be.matmul(be.upload(x), be.adopt(wide), B, transpose_w=True, cols=(k + 3, 2 * k + 3)),
                  x, wide.astype(np.float64)[:, k + 3 :], b64, transpose_w=True)
    big = rand(k, 3 * n + 2).astype(dt)  # a column range read in place, not transposed
    check_product(be, be.matmul(be.upload(x), be.adopt(big), cols=(n + 1, 2 * n + 1)), x,
                  big.astype(np.float64)[:, n + 1 : 2 * n + 1])
    np.testing.assert_array_equal(be.to_host(W), w.astype(np.float32))
    rows = be.to_host(be.gather_rows(W, np.array([k - 1, -1, 0])))
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, np.stack([w[k - 1].astype(np.float32), np.zeros(n, np.float32),
                                                  w[0].astype(np.float32)]))
    v = rand(n).astype(dt)
    np.testing.assert_array_equal(be.to_host(be.adopt(v)), v.astype(np.float32))  # vectors are widened


def test_16_bit_weights_widen_exactly_at_the_edges_of_their_range(be):
    """Subnormals, the largest finite values and signed zeros of both formats come out as the
    float32 of the stored value (a product with one-hot rows reads single weights)."""
    from spherefmt.backends.base import WEIGHT_DTYPES

    for fmt, vals in (("F16", [6e-8, -6e-5, 65504.0, -0.0, 1.0009765625, 3.0e-6]),
                      ("BF16", [1e-40, -3.0e38, 9.2e-41, -0.0, 1.0078125, 2.0e-39])):
        w = np.array(vals, dtype=np.float32).astype(WEIGHT_DTYPES[fmt]).reshape(2, 3)
        want = w.astype(np.float32)
        eye = np.eye(2, dtype=np.float32)
        got = be.to_host(be.matmul(be.upload(eye), be.adopt(w)))
        np.testing.assert_array_equal(got, want, err_msg=fmt)


def _blocks(fmt: str, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``a`` and their values as the ``gguf`` package's dequantizer reads them (the
    reference): ``Q8_0`` by gguf's own quantizer, ``Q4_K`` by spherefmt's (gguf has none)."""
    gguf = pytest.importorskip("gguf")
    from spherefmt.backends.base import WEIGHT_DTYPES
    from spherefmt.format.quant import quantize_q4_k

    qt = gguf.GGMLQuantizationType[fmt]
    raw = gguf.quants.quantize(a, qt) if fmt == "Q8_0" else quantize_q4_k(a).view(np.uint8).reshape(a.shape[0], -1)
    return raw.view(WEIGHT_DTYPES[fmt]), gguf.quants.dequantize(raw, qt).astype(np.float64)


@pytest.mark.parametrize("fmt,m,blocks,n", [("Q8_0", 1, 2, 5), ("Q8_0", 7, 3, 33), ("Q8_0", 3, 1, 1), ("Q8_0", 9, 2, 5),
                                            ("Q4_K", 1, 1, 5), ("Q4_K", 7, 2, 33), ("Q4_K", 3, 1, 1), ("Q4_K", 9, 1, 5)])
def test_quantized_weights_are_held_as_blocks(be, fmt, m, blocks, n):
    """GGUF ``Q8_0`` blocks (34 bytes per 32 values) and ``Q4_K`` blocks (144 bytes per 256,
    6-bit scales and mins unpacked in the product) stay blocks on the device; products read the
    values GGUF's dequantizer gives, in float32, whole column blocks in place, and ranges that
    begin and end inside blocks (a field narrower than a block is padded to one)."""
    assert fmt in be.weight_formats
    size, nbytes = {"Q8_0": (32, 34), "Q4_K": (256, 144)}[fmt]
    k = blocks * size
    a = rand(n, k) * np.linspace(0.01, 1.0, k, dtype=np.float32)  # Q4_K's sub-block scales over 6 bits
    a[0, :32] = 0.0  # a zero (sub-)block
    a[-1, 32:64] = np.abs(a[-1, 32:64]) + 1.0  # one that needs no offset
    wt, wt64 = _blocks(fmt, a)  # (n, k): quantized along its rows, as GGUF's matrices
    wide, wide64 = _blocks(fmt, rand(n, 3 * k))
    wt_mag, wide_mag = block_magnitudes(wt), block_magnitudes(wide)
    x = rand(m, k)
    be.synchronize()
    base = be.memory_used()
    WT = be.adopt(wt)
    be.synchronize()
    assert be.memory_used() - base == wt.nbytes == n * k // size * nbytes
    b = rand(n)
    def check(t, x, w64, mag, bias=None, transpose_w=False):
        # a kernel may scale a block's sum or widen each value first (spherefmt.testing.tolerance)
        ref = x.astype(np.float64) @ (w64.T if transpose_w else w64) + (0.0 if bias is None else bias)
        bound = product_bound(x, mag.T if transpose_w else mag, bias, weight_roundings=BLOCK_ROUNDINGS[fmt])
        close(be, t, ref, bound, f"{be.name} {fmt}")

    check(be.matmul(be.upload(x), WT, transpose_w=True), x, wt64, wt_mag, transpose_w=True)
    check(be.matmul(be.upload(x), be.adopt(wide), be.upload(b), transpose_w=True, cols=(k, 2 * k)),
          x, wide64[:, k : 2 * k], wide_mag[:, k : 2 * k], b, transpose_w=True)
    h = rand(m, n)  # an expert's down rows: (neurons, d), read untransposed, a block range of columns
    check(be.matmul(be.upload(h), be.adopt(wide), cols=(2 * k, 3 * k)), h, wide64[:, 2 * k :], wide_mag[:, 2 * k :])
    lo, hi = k + 5, 2 * k + 21  # inside blocks at both ends
    xs = rand(m, hi - lo)
    check(be.matmul(be.upload(xs), be.adopt(wide), transpose_w=True, cols=(lo, hi)),
          xs, wide64[:, lo:hi], wide_mag[:, lo:hi], transpose_w=True)
    check(be.matmul(be.upload(h), be.adopt(wide), cols=(lo, hi)), h, wide64[:, lo:hi], wide_mag[:, lo:hi])
    np.testing.assert_array_equal(be.to_host(WT), wt64.astype(np.float32))
    rows = be.to_host(be.gather_rows(WT, np.array([n - 1, -1, 0])))
    want = np.stack([wt64[n - 1], np.zeros(k), wt64[0]])
    if fmt == "Q8_0":  # one product per value: exact everywhere
        np.testing.assert_array_equal(rows, want.astype(np.float32))
    else:  # GPUs may fuse Q4_K's multiply and subtract: within a rounding of the exact values
        assert_within(rows, want, rounding_bound(want), "Q4_K rows")


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_numpy_block_kernels_read_the_values_ggufs_dequantizer_gives(fmt):
    """The compiled decode-size products (backends/qkernels.py) against float64 products of the
    dequantized values, both orientations, column ranges of whole blocks, 1..7 activation rows,
    on one thread and on all: the same results as the widening path to float32 rounding."""
    from spherefmt.backends import qkernels
    from spherefmt.dtypes import dequantize_blocks
    from spherefmt.format.quant import quantize_rows

    if not qkernels.AVAILABLE:
        pytest.skip("numba is not installed (pip install 'spherefmt[fast]')")
    k = 32 if fmt == "Q8_0" else 256
    blocks = quantize_rows(rand(37, 6 * k) * np.linspace(0.05, 2.0, 6 * k, dtype=np.float32), fmt)
    raw = blocks.view(np.uint8)
    wide = dequantize_blocks(blocks).astype(np.float64)
    mag = block_magnitudes(blocks)
    for threads in (1, 2):
        qkernels.set_threads(threads)
        for t in (1, 3, 7):
            for a, b in ((0, 6 * k), (k, 4 * k), (5 * k, 6 * k)):
                x = rand(t, b - a)
                wr = BLOCK_ROUNDINGS[fmt]  # block sums scaled after (spherefmt.testing.tolerance)
                got = qkernels.matmul_blocks(x, raw, fmt, (a, b), True)
                ref = x.astype(np.float64) @ wide[:, a:b].T
                assert_within(got, ref, product_bound(x, mag[:, a:b].T, weight_roundings=wr), f"{fmt} x @ w.T")
                h = rand(t, 37)
                got = qkernels.matmul_blocks(h, raw, fmt, (a, b), False)
                ref = h.astype(np.float64) @ wide[:, a:b]
                assert_within(got, ref, product_bound(h, mag[:, a:b], weight_roundings=wr), f"{fmt} h @ w")
