"""Scale benchmark: conversion, export and streaming stay bounded in memory up to GPT-2 XL.

For each GPT-2 shape (``vocab_size=50257, n_positions=1024``)

======  =======  ======  ============
name    n_layer  n_embd  parameters
======  =======  ======  ============
small   12       768     124M
medium  24       1024    355M
large   36       1280    774M
xl      48       1600    1.56B
======  =======  ======  ============

a random-weight **bfloat16** checkpoint is written locally as a Hugging Face
``save_pretrained``-style folder (``config.json`` + ``model.safetensors``, or shards of at most
``--shard-size`` bytes plus ``model.safetensors.index.json`` when larger, shard names and index
as ``save_pretrained`` writes them, tensors sorted by name inside a shard as the ``safetensors``
library does).  Tensors are generated one at a time (seeded per tensor, N(0, 0.02) drawn in
float32 slabs of a few MiB and cast to bf16 with ``ml_dtypes``; layer norms 1/0) and streamed
to disk with :func:`spherefmt.interop.safetensors.write_safetensors`, so the model is never in memory
whole.  Names are those of ``GPT2LMHeadModel.save_pretrained`` (``transformer.h.N.mlp.c_fc.weight``
..., ``lm_head.weight`` tied to ``wte`` and left out).

Then, each step in a fresh child process (this script re-invoked with ``--worker``), so that a
step's peak RSS (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` is not used because Linux
carries it across ``exec`` from the forking parent) is its own:

1. **convert** - ``spherefmt.save(folder, pkg_dir)`` with default settings (codec ``default``:
   shuffle + zstd level 1 + crc32c; default graticule and depth; placement ``pca``).
2. **export** - ``spherefmt.export(pkg_dir, out.safetensors)``.
3. **verify** - (not timed as a figure) every tensor of the export is compared with the source:
   same names, dtypes, shapes and bytes (tensor by tensor, one in memory at a time).
4. **experts** - open the package and read every expert once (``pkg.expert(lat, lon, depth)``).
5. **session** - ``Session(pkg, "numpy", budget=--budget)`` (default ``25%`` of the float32
   weights), ``nll`` of 32 random token ids: one dense prefill pass that streams every block.

Memory bound: for convert, export and the expert scan, peak RSS (``VmHWM``, imports included)
is compared with ``2 x largest tensor + constant``; the constant is reported as the largest
excess over all sizes (``peak - 2 x largest``), and the bound holds when that excess does not
grow with the model (``excess(largest model) - excess(smallest model) <= --tolerance``, default
64 MiB).  The session is bounded by its budget instead: its process memory (peak ``RssAnon``)
<= budget + constant.  Its ``VmHWM`` also counts the package objects the runtime reads through
read-only memory maps (``RssFile``: page cache, shared and reclaimable), reported beside it.
Time should grow linearly with the parameter count: seconds per billion parameters are reported
per size, and "time growth / param growth" = (t_largest / t_smallest) / (params ratio).

Checkpoints, packages and exports live in a temporary folder (``--tmp``, default under
``/tmp``) and are deleted after each size unless ``--keep``.

Usage
-----
From the repository root::

    .venv/bin/python bench/bench_scale.py                      # all four sizes, about 5 min
    .venv/bin/python bench/bench_scale.py --sizes small,medium # quick run

Results: ``bench/results/scale.json`` (``--out``); a Markdown table is printed to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import common
from common import (  # shared /proc readers and the machine record
    git_state,
    loadavg,
    machine,
    parser,
    result_path,
    status_kib,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARK = "@@BENCH@@"
MIB = 2**20

SHAPES: dict[str, dict[str, int]] = {
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
}
#: ``--smoke``: two tiny GPT-2s (seconds; the growth analysis still has two sizes)
SMOKE_SHAPES: dict[str, dict[str, int]] = {"tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4},
                                           "tiny2": {"n_layer": 4, "n_embd": 64, "n_head": 4}}
VOCAB, N_POSITIONS = 50257, 1024
DTYPE = "BF16"
SLAB_BYTES = 8 * MIB  # float32 bytes drawn at a time while generating one tensor


# ------------------------------------------------------------------------------------------
# helpers


def gpt2_config(name: str) -> dict[str, Any]:
    s = SHAPES[name]
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": s["n_layer"], "n_embd": s["n_embd"],
            "n_head": s["n_head"], "n_inner": None, "vocab_size": VOCAB, "n_positions": N_POSITIONS,
            "n_ctx": N_POSITIONS, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def gpt2_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, init)`` of every tensor ``GPT2LMHeadModel.save_pretrained`` writes, in
    state-dict order; init is ``normal``, ``ones`` or ``zeros``."""
    d, v, n = cfg["n_embd"], cfg["vocab_size"], 4 * cfg["n_embd"]
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("transformer.wte.weight", (v, d), "normal"), ("transformer.wpe.weight", (cfg["n_positions"], d), "normal")]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (d,), "ones"), (p + "ln_1.bias", (d,), "zeros"),
                (p + "attn.c_attn.weight", (d, 3 * d), "normal"), (p + "attn.c_attn.bias", (3 * d,), "normal"),
                (p + "attn.c_proj.weight", (d, d), "normal"), (p + "attn.c_proj.bias", (d,), "normal"),
                (p + "ln_2.weight", (d,), "ones"), (p + "ln_2.bias", (d,), "zeros"),
                (p + "mlp.c_fc.weight", (d, n), "normal"), (p + "mlp.c_fc.bias", (n,), "normal"),
                (p + "mlp.c_proj.weight", (n, d), "normal"), (p + "mlp.c_proj.bias", (d,), "normal")]
    out += [("transformer.ln_f.weight", (d,), "ones"), ("transformer.ln_f.bias", (d,), "zeros")]
    return out


def n_params(cfg: dict[str, Any]) -> int:
    import math

    return sum(math.prod(s) for _, s, _ in gpt2_tensors(cfg))


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for suf, mul in (("GIB", 2**30), ("MIB", 2**20), ("GB", 10**9), ("MB", 10**6), ("B", 1)):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mul)
    return int(t)


# ------------------------------------------------------------------------------------------
# workers (child processes)


class _Sampler:
    """Peaks of ``RssAnon`` (process memory) and ``RssFile`` (mapped file pages: page cache the
    process has mapped, e.g. package objects read through ``mmap``) of ``/proc/self/status``,
    sampled every 5 ms in a thread; ``VmHWM`` is their exact sum's peak."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        self.anon = max(self.anon, status_kib("RssAnon") or 0)
        self.file = max(self.file, status_kib("RssFile") or 0)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


_SAMPLER: _Sampler | None = None


def _start() -> int | None:
    """RSS after imports (kB); starts the RssAnon/RssFile sampler."""
    global _SAMPLER
    gc.collect()
    _SAMPLER = _Sampler()
    return status_kib("VmRSS")


def _finish(out: dict[str, Any], rss0: int | None) -> dict[str, Any]:
    hwm = status_kib("VmHWM")
    out.update({"peak_rss_bytes": hwm * 1024 if hwm else None,
                "rss_after_imports_bytes": rss0 * 1024 if rss0 else None})
    if _SAMPLER is not None:
        _SAMPLER.stop()
        out.update({"peak_anon_rss_bytes": _SAMPLER.anon * 1024, "peak_file_rss_bytes": _SAMPLER.file * 1024})
    return out


def worker_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the random bf16 checkpoint folder, one tensor in memory at a time."""
    import ml_dtypes
    import numpy as np

    from spherefmt.dtypes import TensorInfo
    from spherefmt.interop.safetensors import write_safetensors

    rss0 = _start()
    t0 = time.perf_counter()
    cfg, folder, seed, max_shard = spec["config"], Path(spec["folder"]), spec["seed"], spec["shard_size"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = gpt2_tensors(cfg)
    init = {n: (s, i) for n, s, i in tensors}

    def make(name: str) -> np.ndarray:
        shape, how = init[name]
        if how != "normal":
            return np.full(shape, 1.0 if how == "ones" else 0.0, dtype=ml_dtypes.bfloat16).view(np.uint16)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out = np.empty(shape, dtype=ml_dtypes.bfloat16)
        flat = out.reshape(-1)
        step = max(1, SLAB_BYTES // 4)
        for s in range(0, flat.size, step):
            x = rng.standard_normal(min(step, flat.size - s), dtype=np.float32)
            x *= 0.02
            flat[s : s + x.size] = x.astype(ml_dtypes.bfloat16)
        return out.view(np.uint16)

    # shards as save_pretrained makes them: state-dict order, a new shard when the next tensor
    # would pass max_shard_size
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape, _ in tensors:
        nb = int(np.prod(shape)) * 2
        if shards[-1] and size + nb > max_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    files = []
    weight_map = {}
    for i, grp in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        grp = sorted(grp)  # the safetensors library writes a file's tensors sorted by name (one dtype)
        write_safetensors(folder / fname, [TensorInfo(n, DTYPE, s) for n, s in grp], make, metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n, _ in grp})
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * 2 for _, s, _ in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return _finish({"seconds": time.perf_counter() - t0, "files": files,
                    "bytes": sum((folder / f).stat().st_size for f in files)}, rss0)


def worker_convert(spec: dict[str, Any]) -> dict[str, Any]:
    import spherefmt
    from spherefmt import constants as C

    rss0 = _start()
    t0 = time.perf_counter()
    spherefmt.save(spec["src"], spec["dst"])
    dt = time.perf_counter() - t0
    with spherefmt.open(spec["dst"]) as pkg:
        info = {"graticule": list(pkg.graticule or ()), "depth": pkg.depth, "codec": pkg.metadata["codec"],
                "placement": pkg.metadata.get("placement", {}).get("policy"),
                "experts": sum(1 for _ in pkg.experts())}
    stored = sum(p.stat().st_size for p in Path(spec["dst"]).rglob("*") if p.is_file())
    return _finish({"seconds": dt, "default_codec": C.CODEC_DEFAULT, "stored_bytes": stored, **info}, rss0)


def worker_export(spec: dict[str, Any]) -> dict[str, Any]:
    import spherefmt

    rss0 = _start()
    t0 = time.perf_counter()
    spherefmt.export(spec["pkg"], spec["dst"])
    return _finish({"seconds": time.perf_counter() - t0, "bytes": Path(spec["dst"]).stat().st_size}, rss0)


def worker_verify(spec: dict[str, Any]) -> dict[str, Any]:
    """Compare every tensor of the export with the source: names, dtypes, shapes, bytes."""
    import numpy as np

    from spherefmt.interop.registry import open_source
    from spherefmt.interop.safetensors import SafetensorsFile

    t0 = time.perf_counter()
    bad: list[str] = []
    with open_source(spec["src"]) as src, SafetensorsFile(spec["exported"]) as out:
        a, b = sorted(src.keys()), sorted(out.keys())
        if a != b:
            bad.append(f"names differ: {sorted(set(a) ^ set(b))[:5]}")
        for name in a:
            if name not in b:
                continue
            ia, ib = src.info(name), out.info(name)
            if (ia.dtype, ia.shape) != (ib.dtype, ib.shape):
                bad.append(f"{name}: {ia.dtype}{ia.shape} vs {ib.dtype}{ib.shape}")
                continue
            x, y = src.read(name), out.read(name)
            if x.nbytes != y.nbytes or not np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)):
                bad.append(f"{name}: bytes differ")
            del x, y
        meta_same = src.metadata == out.metadata
    return {"seconds": time.perf_counter() - t0, "tensors": len(a), "identical": not bad and meta_same,
            "metadata_identical": meta_same, "mismatches": bad[:10]}


def worker_experts(spec: dict[str, Any]) -> dict[str, Any]:
    import spherefmt

    rss0 = _start()
    t0 = time.perf_counter()
    n = nbytes = biggest = 0
    with spherefmt.open(spec["pkg"]) as pkg:
        for lat, lon, d in pkg.experts():
            e = pkg.expert(lat, lon, d)
            n += 1
            nbytes += e.neurons.nbytes
            biggest = max(biggest, e.neurons.nbytes)
            del e
    return _finish({"seconds": time.perf_counter() - t0, "experts": n, "bytes_decoded": nbytes,
                    "largest_expert_bytes": biggest}, rss0)


def worker_session(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from spherefmt.runtime import Session

    rss0 = _start()
    t0 = time.perf_counter()
    ids = np.random.default_rng(0).integers(0, VOCAB, size=spec["tokens"] + 1)
    with Session(spec["pkg"], backend="numpy", budget=spec["budget"]) as s:
        t1 = time.perf_counter()
        nll, n = s.nll(ids)
        t2 = time.perf_counter()
        st = s.stats()
    return _finish({"seconds": t2 - t0, "open_s": t1 - t0, "nll_s": t2 - t1, "tokens": n, "nll_per_token": nll / n,
                    "budget_bytes": st["budget_bytes"], "weight_bytes_f32": st["weight_bytes"],
                    "peak_device_bytes": st["peak_device_bytes"], "bytes_read": st["bytes_read"],
                    "blocks_loaded": st["blocks_loaded"], "blocks_evicted": st["blocks_evicted"]}, rss0)


WORKERS = {"generate": worker_generate, "convert": worker_convert, "export": worker_export, "verify": worker_verify,
           "experts": worker_experts, "session": worker_session}


def run_worker(kind: str, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    t0 = time.perf_counter()
    if common.INLINE:  # a smoke run: in this process (its memory figures are not this step's alone)
        out = json.loads(json.dumps(WORKERS[kind](spec)))
        out["process_wall_s"] = round(time.perf_counter() - t0, 3)
        return out
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout, cwd=str(REPO), check=False)
    if r.returncode != 0:
        raise RuntimeError(f"worker {kind} failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    line = next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith(MARK))
    out = json.loads(line[len(MARK):])
    out["process_wall_s"] = round(time.perf_counter() - t0, 3)
    return out


# ------------------------------------------------------------------------------------------
# parent


STEPS = ("convert", "export", "experts", "session")
BOUNDED = ("convert", "export", "experts")  # compared with 2 x largest tensor + constant


def bench_size(name: str, tmp: Path, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    cfg = gpt2_config(name)
    d, v = cfg["n_embd"], cfg["vocab_size"]
    largest = max(int(__import__("math").prod(s)) for _, s, _ in gpt2_tensors(cfg)) * 2
    res: dict[str, Any] = {"config": {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")},
                           "parameters": n_params(cfg), "dtype": DTYPE, "largest_tensor": "transformer.wte.weight",
                           "largest_tensor_bytes": largest, "largest_tensor_shape": [v, d]}
    folder, pkg, exported = tmp / f"{name}-hf", tmp / f"{name}.sphere", tmp / f"{name}-export.safetensors"
    try:
        log(f"{name}: generating {res['parameters'] / 1e6:.0f}M parameters")
        res["generate"] = run_worker("generate", {"config": cfg, "folder": str(folder), "seed": args.seed,
                                                  "shard_size": args.shard_size})
        res["checkpoint_bytes"] = res["generate"]["bytes"]
        res["checkpoint_files"] = res["generate"]["files"]
        log(f"{name}: convert")
        res["convert"] = run_worker("convert", {"src": str(folder), "dst": str(pkg)})
        log(f"{name}: export")
        res["export"] = run_worker("export", {"pkg": str(pkg), "dst": str(exported)})
        log(f"{name}: verify")
        res["verify"] = run_worker("verify", {"src": str(folder), "exported": str(exported)})
        exported.unlink()
        log(f"{name}: expert scan")
        res["experts"] = run_worker("experts", {"pkg": str(pkg)})
        log(f"{name}: session")
        res["session"] = run_worker("session", {"pkg": str(pkg), "budget": args.budget, "tokens": args.tokens})
    finally:
        if not args.keep:
            for p in (folder, pkg, exported):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    p = res["parameters"] / 1e9
    for step in STEPS:
        r = res[step]
        r["seconds_per_billion_params"] = round(r["seconds"] / p, 2)
        r["excess_over_2x_largest_bytes"] = r["peak_rss_bytes"] - 2 * largest
    ss = res["session"]
    ss["peak_rss_minus_budget_bytes"] = ss["peak_rss_bytes"] - ss["budget_bytes"]
    ss["peak_anon_rss_minus_budget_bytes"] = ss["peak_anon_rss_bytes"] - ss["budget_bytes"]
    return res


def analyse(results: dict[str, Any], tolerance: int) -> dict[str, Any]:
    names = [n for n in SHAPES if n in results]
    out: dict[str, Any] = {}
    for step in STEPS:
        spb = [results[n][step]["seconds_per_billion_params"] for n in names]
        key = "excess_over_2x_largest_bytes" if step in BOUNDED else "peak_anon_rss_minus_budget_bytes"
        exc = [results[n][step][key] for n in names]
        a = {"seconds_per_billion_params": dict(zip(names, spb, strict=True)),
             "time_growth_vs_params": None, "constant_bytes": max(exc),
             "excess_growth_bytes": exc[-1] - exc[0] if len(exc) > 1 else 0}
        if len(names) > 1:
            # ratio of time ratio to parameter ratio, smallest -> largest model: 1.0 = linear
            r0, r1 = results[names[0]], results[names[-1]]
            a["time_growth_vs_params"] = round((r1[step]["seconds"] / r0[step]["seconds"])
                                               / (r1["parameters"] / r0["parameters"]), 3)
        a["bound"] = ("peak RSS <= 2 x largest tensor + constant" if step in BOUNDED
                      else "peak anonymous RSS <= budget + constant")
        a["bounded"] = a["excess_growth_bytes"] <= tolerance
        out[step] = a
    out["export_identical"] = all(results[n]["verify"]["identical"] for n in names)
    out["tolerance_bytes"] = tolerance
    return out


def _mib(b: float | None) -> str:
    return "" if b is None else f"{b / MIB:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    res, an = doc["results"], doc["analysis"]
    lines = [("| model | params | checkpoint MiB | largest tensor MiB | convert s | convert peak RSS MiB | export s "
              "| export peak RSS MiB | expert scan s | expert scan peak RSS MiB | session nll s | session budget MiB "
              "| session peak RSS MiB (anon + mapped files) | export identical |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, r in res.items():
        ss = r["session"]
        lines.append(
            f"| gpt2-{n} ({r['config']['n_layer']}x{r['config']['n_embd']}) | {r['parameters'] / 1e6:,.0f}M "
            f"| {_mib(r['checkpoint_bytes'])} | {_mib(r['largest_tensor_bytes'])} "
            f"| {r['convert']['seconds']:.1f} | {_mib(r['convert']['peak_rss_bytes'])} "
            f"| {r['export']['seconds']:.1f} | {_mib(r['export']['peak_rss_bytes'])} "
            f"| {r['experts']['seconds']:.1f} | {_mib(r['experts']['peak_rss_bytes'])} "
            f"| {ss['nll_s']:.1f} | {_mib(ss['budget_bytes'])} | {_mib(ss['peak_rss_bytes'])} "
            f"({_mib(ss['peak_anon_rss_bytes'])} + {_mib(ss['peak_file_rss_bytes'])}) "
            f"| {r['verify']['identical']} |")
    lines += ["", "| step | s per 1B params (" + ", ".join(res) + ") | time growth / param growth | bound "
              "| constant MiB | excess growth MiB | bounded |", "|---|---|---:|---|---:|---:|---|"]
    for step in STEPS:
        a = an[step]
        spb = ", ".join(f"{v:.1f}" for v in a["seconds_per_billion_params"].values())
        g = "" if a["time_growth_vs_params"] is None else f"{a['time_growth_vs_params']:.2f}"
        lines.append(f"| {step} | {spb} | {g} | {a['bound']} | {_mib(a['constant_bytes'])} "
                     f"| {_mib(a['excess_growth_bytes'])} | {a['bounded']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--sizes", default=None, help=f"comma-separated subset of {','.join(SHAPES)} (default all)")
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"),
                    help="max bytes per safetensors shard of the generated checkpoints (default 1GB)")
    ap.add_argument("--budget", default="25%", help="Session budget (default 25%% of the float32 weights)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens scored by the session step (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=parse_size, default=64 * MIB,
                    help="allowed growth of the excess over the bound from smallest to largest model (default 64MiB)")
    ap.add_argument("--tmp", type=Path, default=None, help="working folder (default a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints, packages and exports")
    args = ap.parse_args(argv)
    if args.smoke:
        SHAPES.clear()
        SHAPES.update(SMOKE_SHAPES)
    sizes = [s.strip() for s in (args.sizes or ",".join(SHAPES)).split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {','.join(SHAPES)}")
    sizes = [s for s in SHAPES if s in sizes]
    full = sizes == list(SHAPES) and not args.smoke
    out = args.out or (result_path(args, "scale") if full or args.smoke else REPO / "bench" / f"out/scale-{'-'.join(sizes)}.json")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.tmp:
        args.tmp.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="spherefmt-scale-", dir=args.tmp or "/tmp"))
    log(f"working in {tmp}")
    doc: dict[str, Any] = {
        "benchmark": "bench/bench_scale.py",
        "command": " ".join([".venv/bin/python", "bench/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "model": {"label": "GPT-2 shapes, random N(0, 0.02) weights, bfloat16, made locally",
                  "source": "Hugging Face save_pretrained-style folder written tensor by tensor "
                            "(bench_scale.worker_generate)", "shard_size_bytes": args.shard_size},
        "settings": {"convert": "spherefmt.save(folder, dir) with defaults (codec default = shuffle + zstd 1 + "
                                "crc32c, default graticule and depth, placement pca)",
                     "export": "spherefmt.export(dir, file.safetensors), then every tensor compared with the source",
                     "experts": "spherefmt.open(dir) and pkg.expert(lat, lon, depth) for every expert",
                     "session": f"Session(dir, 'numpy', budget={args.budget!r}).nll({args.tokens} random ids + 1)",
                     "peak_rss": "VmHWM of the child process (one child per step)",
                     "tolerance_bytes": args.tolerance},
        "results": {},
    }
    try:
        for name in sizes:
            doc["results"][name] = bench_size(name, tmp, args, log)
            doc["results"][name]["loadavg_after"] = loadavg()
            r = doc["results"][name]
            log(f"{name}: convert {r['convert']['seconds']:.1f}s {_mib(r['convert']['peak_rss_bytes'])} MiB, "
                f"export {r['export']['seconds']:.1f}s {_mib(r['export']['peak_rss_bytes'])} MiB, "
                f"experts {r['experts']['seconds']:.1f}s {_mib(r['experts']['peak_rss_bytes'])} MiB, "
                f"session {r['session']['seconds']:.1f}s {_mib(r['session']['peak_rss_bytes'])} MiB, "
                f"identical {r['verify']['identical']}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["analysis"] = analyse(doc["results"], args.tolerance)
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    doc["loadavg_at_end"] = loadavg()
    doc["git_at_end"] = git_state()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print(MARK + json.dumps(result), flush=True)
        sys.exit(0)
    sys.exit(main())
