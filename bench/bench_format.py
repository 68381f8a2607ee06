"""Benchmark the spherefmt package format against the safetensors file it was made from.

What is measured, on a randomly initialised GPT-2-small-shaped model (124M parameters,
``n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024``, made with
:mod:`spherefmt.testing`), once stored in bf16 and once in f32, all in one run:

1. **convert** - wall time of ``spherefmt.save(hf_folder, pkg_dir, codec=...)`` for the codecs
   ``"default"`` and ``"none"`` (default graticule and depth) and the conversion's peak RSS.
   Every conversion runs in a fresh child process that reports its own ``VmHWM`` (and
   ``ru_maxrss``), and its RSS after imports, so the number belongs to that conversion only.
   The largest tensor's size is recorded beside it.
2. **size** - stored bytes of the package (sum of the sizes of every file under the package
   directory) over the size of the ``.safetensors`` file.
3. **full load** - every byte materialised: ``safetensors.torch.load_file(path)`` versus
   ``spherefmt.open(pkg).state_dict(framework="torch")``, then ``t.sum()`` of every tensor (the
   same native-dtype reduction on both sides).  *Warm*: one untimed run, then 3 timed runs with
   the files in the page cache.  *Cold*: ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each
   of 3 runs (needs root; when writing ``drop_caches`` fails, cold figures are ``null`` with the
   reason).  Ratios are spherefmt / safetensors of the medians.
4. **one-expert read** - open the package once, read one expert (``pkg.expert(lat, lon, depth)``)
   at 20 random addresses (warm, after one untimed read per depth shell, which loads that
   shell's index), median and p90 in ms, plus the expert's raw and stored bytes.
5. **machine** - nproc, CPU model, Python/zarr/numpy/torch/safetensors versions, date.

Every measurement runs in a child process (this script re-invoked with ``--worker``) so that
imports, allocator state and memory peaks of one measurement never leak into another.  Thread
counts are left at their defaults (recorded in the output).

Usage
-----
From the repository root::

    .venv/bin/python bench/bench_format.py            # full run, several minutes
    .venv/bin/python bench/bench_format.py --quick    # tiny model (n_layer=2, n_embd=128), seconds

Options: ``--out PATH`` (default ``bench/results/format.json``; ``--quick`` defaults to
``bench/out/format-quick.json``), ``--runs N`` timed runs per mode (default 3), ``--experts N``
addresses for the expert latency (default 20), ``--keep`` keeps the temporary folder under
``/tmp``.  The JSON is pretty-printed; a markdown summary is printed to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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

FULL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
QUICK = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1000, "n_positions": 128}
DTYPES = ("BF16", "F32")
CODECS = ("default", "none")
GOALS = {
    "size_ratio_bf16_default_max": 0.69,
    "warm_load_ratio_codec_none_max": 1.1,
    "cold_load_ratio_codec_default_max": 1.5,
}
MARK = "@@BENCH@@"
#: load measurement variants: name -> torch.set_num_threads value (None: leave the default)
LOAD_VARIANTS = {"default_threads": None, "one_thread": 1}


# ------------------------------------------------------------------------------------------
# helpers shared by parent and workers


def drop_caches() -> str | None:
    """Flush dirty pages and drop the page cache; return ``None`` on success, else the reason."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as e:
        return f"cannot write /proc/sys/vm/drop_caches: {e.strerror or e} (uid {os.getuid()})"


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of ``paths`` now in the page cache (util-linux ``fincore``), or ``None``."""
    exe = shutil.which("fincore")
    if not exe or not paths:
        return None
    total = 0
    for i in range(0, len(paths), 200):
        r = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths[i:i + 200])],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
        total += sum(int(x) for x in r.stdout.split())
    return total


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def stored_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def _pct(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _summary(xs: list[float]) -> dict[str, Any]:
    return {"runs_s": [round(x, 4) for x in xs], "best_s": round(min(xs), 4), "median_s": round(statistics.median(xs), 4)}


# ------------------------------------------------------------------------------------------
# workers (child processes)


def worker_convert(spec: dict[str, Any]) -> dict[str, Any]:
    import spherefmt

    gc.collect()
    rss0 = status_kib("VmRSS")
    hwm0 = status_kib("VmHWM")
    t0 = time.perf_counter()
    spherefmt.save(spec["src"], spec["dst"], codec=spec["codec"])
    dt = time.perf_counter() - t0
    import resource

    return {"seconds": dt, "rss_after_imports_kib": rss0, "hwm_after_imports_kib": hwm0,
            "vmhwm_kib": status_kib("VmHWM"), "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _loader(fmt: str, path: str) -> Any:
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return lambda: load_file(path)
    import spherefmt

    def load() -> dict[str, Any]:
        with spherefmt.open(path) as pkg:
            return pkg.state_dict(framework="torch")

    return load


def worker_load(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    load = _loader(spec["fmt"], spec["path"])
    files = [Path(p) for p in spec["files"]]

    def once(copy: bool = False) -> tuple[float, float, float, int]:
        t0 = time.perf_counter()
        sd = load()
        t1 = time.perf_counter()
        total = 0.0
        nbytes = 0
        for t in sd.values():
            if copy:  # the floor of any loader that copies once into private memory
                t = t.clone()
            total += float(t.sum())  # native dtype: every element is read, no conversion copy
            nbytes += t.numel() * t.element_size()
        t2 = time.perf_counter()
        del sd
        gc.collect()
        return t2 - t0, t1 - t0, total, nbytes

    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    first = once()  # untimed: imports, first-touch of code paths, warms the page cache
    out["checksum"], out["bytes_materialised"] = first[2], first[3]
    warm = [once() for _ in range(spec["runs"])]
    out["warm"] = {**_summary([w[0] for w in warm]), "load_only": _summary([w[1] for w in warm])}
    if spec.get("copy_floor"):
        once(copy=True)
        out["warm_one_copy"] = _summary([once(copy=True)[0] for _ in range(spec["runs"])])
    if spec["cold"]:
        cold, resid = [], []
        for _ in range(spec["runs"]):
            why = drop_caches()
            if why:
                out["cold"] = None
                out["cold_reason"] = why
                break
            resid.append(resident_bytes(files))
            cold.append(once())
        else:
            out["cold"] = {**_summary([c[0] for c in cold]), "load_only": _summary([c[1] for c in cold]),
                           "resident_bytes_after_drop": resid}
    else:
        out["cold"] = None
        out["cold_reason"] = spec.get("cold_reason")
    out["vmhwm_kib"] = status_kib("VmHWM")
    return out


def worker_experts(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    import spherefmt

    rng = np.random.default_rng(spec["seed"])
    t0 = time.perf_counter()
    pkg = spherefmt.open(spec["path"])
    open_ms = (time.perf_counter() - t0) * 1e3
    p, m = pkg.graticule
    d = pkg.depth
    first = {}
    for depth in range(d):  # one untimed-in-the-stats read per shell: loads and checks its index
        t0 = time.perf_counter()
        pkg.expert(0, 0, depth)
        first[depth] = round((time.perf_counter() - t0) * 1e3, 3)
    lat = rng.integers(0, p, spec["n"])
    lon = rng.integers(0, m, spec["n"])
    dep = rng.integers(0, d, spec["n"])
    ms, raw, stored, shapes = [], [], [], set()
    for a, b, c in zip(lat.tolist(), lon.tolist(), dep.tolist(), strict=True):
        t0 = time.perf_counter()
        e = pkg.expert(a, b, c)
        ms.append((time.perf_counter() - t0) * 1e3)
        raw.append(int(e.neurons.nbytes))
        stored.append(pkg.object_bytes(pkg.shard_key(a, b, c)))
        shapes.add(tuple(e.neurons.shape))
    pkg.close()
    return {
        "graticule": [p, m], "depth": d, "open_ms": round(open_ms, 3), "first_read_per_depth_ms": first,
        "n": spec["n"], "addresses": [list(x) for x in zip(lat.tolist(), lon.tolist(), dep.tolist(), strict=True)],
        "latency_ms": [round(x, 3) for x in ms], "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(_pct(ms, 90), 3), "expert_shapes": sorted(list(s) for s in shapes),
        "raw_bytes_median": int(statistics.median(raw)), "stored_bytes_median": int(statistics.median(stored)),
        "stored_over_raw_median": round(statistics.median(s / r for s, r in zip(stored, raw, strict=True)), 4),
    }


WORKERS = {"convert": worker_convert, "load": worker_load, "experts": worker_experts}


def run_worker(kind: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return its JSON result."""
    t0 = time.perf_counter()
    if common.INLINE:  # a smoke run: in this process (its memory figures are not this step's alone)
        out = json.loads(json.dumps(WORKERS[kind](spec)))
        out["process_wall_s"] = round(time.perf_counter() - t0, 3)
        return out
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    line = next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith(MARK))
    out = json.loads(line[len(MARK):])
    out["process_wall_s"] = round(wall, 3)
    return out


# ------------------------------------------------------------------------------------------
# parent


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def bench_dtype(dtype: str, cfg: dict[str, Any], tmp: Path, args: argparse.Namespace, cold_ok: str | None,
                log: Any) -> dict[str, Any]:
    import numpy as np

    from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder

    res: dict[str, Any] = {"dtype": dtype}
    hf = tmp / f"hf-{dtype.lower()}"
    t0 = time.perf_counter()
    sd = make_gpt2(gpt2_config(**cfg), dtype=dtype, seed=0)
    save_hf_folder(hf, sd, gpt2_config(**cfg))
    params = int(sum(a.size for a in sd.values()))
    big = max(sd.items(), key=lambda kv: kv[1].nbytes)[0]
    res["model"] = {"params": params, "tensors": len(sd),
                    "largest_tensor": {"name": big, "shape": list(sd[big].shape), "bytes": int(sd[big].nbytes)},
                    "make_s": round(time.perf_counter() - t0, 2)}
    del sd
    gc.collect()
    st = hf / "model.safetensors"
    st_bytes = st.stat().st_size
    res["safetensors"] = {"bytes": st_bytes}
    log(f"[{dtype}] model written: {params / 1e6:.1f}M params, {st_bytes / 2**20:.1f} MiB safetensors")

    # 1+2. conversions and sizes
    res["codecs"] = {}
    for codec in CODECS:
        pkg = tmp / f"pkg-{dtype.lower()}-{codec}"
        c = run_worker("convert", {"src": str(hf), "dst": str(pkg), "codec": codec})
        size = stored_bytes(pkg)
        import spherefmt

        with spherefmt.open(pkg) as p:
            parts = {"core": p.stored_bytes("core"), "sphere": p.stored_bytes("sphere"), "files": p.stored_bytes("files")}
            grid = {"graticule": list(p.graticule), "depth": p.depth}
        peak = c["vmhwm_kib"] * 1024
        base = c["rss_after_imports_kib"] * 1024
        res["codecs"][codec] = {
            "path": str(pkg), **grid,
            "convert": {"seconds": round(c["seconds"], 3), "process_wall_s": c["process_wall_s"],
                        "mb_per_s": round(st_bytes / 1e6 / c["seconds"], 1),
                        "peak_rss_bytes": peak, "rss_after_imports_bytes": base,
                        "peak_rss_above_imports_bytes": peak - base,
                        "ru_maxrss_bytes": c["ru_maxrss_kib"] * 1024,
                        "peak_over_largest_tensor": round((peak - base) / res["model"]["largest_tensor"]["bytes"], 2),
                        "peak_over_model": round((peak - base) / st_bytes, 3)},
            "size": {"stored_bytes": size, "files": len(files_under(pkg)), "ratio_vs_safetensors": round(size / st_bytes, 4),
                     "parts_bytes": parts},
        }
        log(f"[{dtype}/{codec}] convert {c['seconds']:.1f}s, peak RSS {peak / 2**20:.0f} MiB, "
            f"size ratio {size / st_bytes:.3f}")

    # 3. full loads, once with torch's default thread count (the headline) and once with the
    # reduction single-threaded (libgomp's wake-up cost per parallel op can dominate t.sum()
    # on small VMs; see the report)
    def load(fmt: str, path: Path, threads: int | None) -> dict[str, Any]:
        return run_worker("load", {"fmt": fmt, "path": str(path), "runs": args.runs, "cold": cold_ok is None,
                                   "cold_reason": cold_ok, "files": [str(p) for p in files_under(path)],
                                   "threads": threads, "copy_floor": fmt == "safetensors"})

    def ratio(ld: dict[str, Any], base: dict[str, Any], mode: str, stat: str) -> float | None:
        if not ld.get(mode) or not base.get(mode):
            return None
        return _ratio(ld[mode][stat], base[mode][stat])

    res["safetensors"]["load"] = {}
    for codec in CODECS:
        res["codecs"][codec]["load"] = {}
        res["codecs"][codec]["load_ratio"] = {}
    for variant, threads in LOAD_VARIANTS.items():
        base = load("safetensors", st, threads)
        base["one_copy_over_mmap"] = _ratio(base["warm_one_copy"]["median_s"], base["warm"]["median_s"])
        res["safetensors"]["load"][variant] = base
        log(f"[{dtype}/safetensors/{variant}] load warm {base['warm']['median_s']:.3f}s"
            + (f", cold {base['cold']['median_s']:.3f}s" if base.get("cold") else "")
            + f", one-copy floor {base['warm_one_copy']['median_s']:.3f}s")
        for codec in CODECS:
            entry = res["codecs"][codec]
            ld = load("spherefmt", Path(entry["path"]), threads)
            ld["checksum_matches_safetensors"] = bool(np.isclose(ld["checksum"], base["checksum"], rtol=1e-3, atol=1e-3))
            entry["load"][variant] = ld
            r = {
                "warm_median": ratio(ld, base, "warm", "median_s"),
                "warm_best": ratio(ld, base, "warm", "best_s"),
                "warm_median_vs_one_copy_floor": _ratio(ld["warm"]["median_s"], base["warm_one_copy"]["median_s"]),
                "cold_median": ratio(ld, base, "cold", "median_s"),
                "cold_best": ratio(ld, base, "cold", "best_s"),
            }
            entry["load_ratio"][variant] = r
            log(f"[{dtype}/{codec}/{variant}] load warm {ld['warm']['median_s']:.3f}s (x{r['warm_median']})"
                + (f", cold {ld['cold']['median_s']:.3f}s (x{r['cold_median']})" if ld.get("cold") else ""))

    # 4. one-expert latency
    for codec in CODECS:
        entry = res["codecs"][codec]
        entry["expert"] = run_worker("experts", {"path": entry["path"], "n": args.experts, "seed": 0})
        log(f"[{dtype}/{codec}] expert median {entry['expert']['median_ms']:.2f} ms, p90 {entry['expert']['p90_ms']:.2f} ms")
    if not args.keep:
        shutil.rmtree(hf, ignore_errors=True)
        for codec in CODECS:
            shutil.rmtree(res["codecs"][codec]["path"], ignore_errors=True)
    return res


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Goal checks; load goals use the default-thread medians, the one-thread value is given beside."""
    out: dict[str, Any] = {}
    bf = results.get("BF16")
    if bf:
        r = bf["codecs"]["default"]["size"]["ratio_vs_safetensors"]
        out["size_ratio_bf16_default"] = {"value": r, "goal_max": GOALS["size_ratio_bf16_default_max"],
                                          "met": r <= GOALS["size_ratio_bf16_default_max"]}
    for dtype, res in results.items():
        for key, codec, stat, goal in (("warm_load_ratio_none", "none", "warm_median", "warm_load_ratio_codec_none_max"),
                                       ("cold_load_ratio_default", "default", "cold_median",
                                        "cold_load_ratio_codec_default_max")):
            lr = res["codecs"][codec]["load_ratio"]
            v = lr["default_threads"][stat]
            out[f"{key}_{dtype.lower()}"] = {"value": v, "value_one_thread_reduction": lr["one_thread"][stat],
                                              "goal_max": GOALS[goal], "met": None if v is None else v <= GOALS[goal]}
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _s(d: dict[str, Any] | None) -> str:
    return "n/a" if not d else f"{d['median_s']:.3f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"spherefmt format benchmark - {doc['model']['label']} ({m['date']}; {m['cpu_model']}, {m['nproc']} CPUs, "
        f"{m['mem_gib']} GiB; Python {m['python']}, torch {m['torch']}, zarr {m['zarr']}, numpy {m['numpy']}; "
        f"spherefmt @ {((m.get('git') or {}).get('commit') or '?')[:7]}; "
        f"loadavg at start {(m['loadavg_at_start'] or '?').split(' ')[0]}, at end {(doc['loadavg_at_end'] or '?').split(' ')[0]})",
        "",
        "Conversion, size, one-expert read:",
        "",
        "| dtype | package | convert s | conv. peak RSS MiB | largest tensor MiB | size MiB | size / safetensors "
        "| expert read ms p50 / p90 | expert raw / stored KiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, res in doc["results"].items():
        big = res["model"]["largest_tensor"]["bytes"]
        lines.append(f"| {dtype} | safetensors | - | - | {_mib(big)} | {_mib(res['safetensors']['bytes'])} | 1.000 | - | - |")
        for codec, e in res["codecs"].items():
            c, ex = e["convert"], e["expert"]
            lines.append(
                f"| {dtype} | sphere `{codec}` ({e['graticule'][0]}x{e['graticule'][1]}x{e['depth']}) "
                f"| {c['seconds']:.1f} | {_mib(c['peak_rss_bytes'])} (+{_mib(c['peak_rss_above_imports_bytes'])}) "
                f"| {_mib(big)} | {_mib(e['size']['stored_bytes'])} | {e['size']['ratio_vs_safetensors']:.3f} "
                f"| {ex['median_ms']:.2f} / {ex['p90_ms']:.2f} "
                f"| {ex['raw_bytes_median'] / 1024:.0f} / {ex['stored_bytes_median'] / 1024:.0f} |")
    lines += ["", "Full load (open + every tensor + `t.sum()` of each), seconds (median of "
              f"{doc['settings']['runs']}) and ratio to safetensors:", "",
              "| dtype | format | warm s | warm x | cold s | cold x | warm s, 1-thread sum | x | cold s, 1-thread sum | x |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype, res in doc["results"].items():
        sl = res["safetensors"]["load"]
        d, o = sl["default_threads"], sl["one_thread"]
        lines.append(f"| {dtype} | safetensors (mmap) | {_s(d['warm'])} | 1.00 | {_s(d['cold'])} | 1.00 "
                     f"| {_s(o['warm'])} | 1.00 | {_s(o['cold'])} | 1.00 |")
        lines.append(f"| {dtype} | safetensors + one private copy | {_s(d['warm_one_copy'])} | {_x(d['one_copy_over_mmap'])} "
                     f"| - | - | {_s(o['warm_one_copy'])} | {_x(o['one_copy_over_mmap'])} | - | - |")
        for codec, e in res["codecs"].items():
            ld, lr = e["load"], e["load_ratio"]
            lines.append(
                f"| {dtype} | sphere `{codec}` | {_s(ld['default_threads']['warm'])} | {_x(lr['default_threads']['warm_median'])} "
                f"| {_s(ld['default_threads']['cold'])} | {_x(lr['default_threads']['cold_median'])} "
                f"| {_s(ld['one_thread']['warm'])} | {_x(lr['one_thread']['warm_median'])} "
                f"| {_s(ld['one_thread']['cold'])} | {_x(lr['one_thread']['cold_median'])} |")
    lines += ["", "Peak RSS: the conversion child's VmHWM (in brackets: above its RSS after imports). "
              "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run. "
              "1-thread sum: `torch.set_num_threads(1)` in the loading process.", "",
              "| goal | value (default threads) | value (1-thread sum) | target | met |", "|---|---:|---:|---:|---|"]
    for name, g in doc["goals"].items():
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {name} | {g['value']} | {g.get('value_one_thread_reduction', '-')} | <= {g['goal_max']} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model (n_layer=2, n_embd=128), results to bench/out/")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per load mode (default 3)")
    ap.add_argument("--experts", type=int, default=20, help="random expert addresses (default 20)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of BF16,F32")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder under /tmp")
    args = ap.parse_args(argv)
    if args.smoke:  # the quick model, one run per mode, two experts
        args.quick, args.runs, args.experts = True, 1, 2
    out = result_path(args, "format")
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    cold_ok = drop_caches()  # None when dropping the page cache works here
    if cold_ok:
        log(f"cold runs disabled: {cold_ok}")
    tmp = Path(tempfile.mkdtemp(prefix="spherefmt-bench-", dir="/tmp"))
    log(f"working in {tmp}")
    doc: dict[str, Any] = {
        "benchmark": "bench/bench_format.py",
        "command": " ".join([".venv/bin/python", "bench/bench_format.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "model": {"label": "GPT-2-small shape, random N(0, 0.02) weights" if not args.quick else "quick GPT-2 (tiny)",
                  "config": cfg, "source": "spherefmt.testing.make_gpt2 + save_hf_folder (one model.safetensors)"},
        "settings": {"runs": args.runs, "experts": args.experts, "codecs": list(CODECS),
                     "graticule": "default", "depth": "default",
                     "cold": "sync; echo 3 > /proc/sys/vm/drop_caches before each cold run" if cold_ok is None else None,
                     "cold_disabled_reason": cold_ok,
                     "reduction": "float(t.sum()) in the tensor's own dtype, same on both sides",
                     "isolation": "each measurement in a fresh child process (this script --worker)"},
        "goals_spec": GOALS,
        "results": {},
    }
    try:
        for dtype in args.dtypes.split(","):
            doc["results"][dtype] = bench_dtype(dtype, cfg, tmp, args, cold_ok, log)
            doc["results"][dtype]["loadavg_after"] = loadavg()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["goals"] = goals(doc["results"])
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    doc["loadavg_at_end"] = loadavg()
    doc["git_at_end"] = git_state()
    if doc["git_at_end"] != doc["machine"]["git"]:
        log("warning: the checkout changed during the run; the figures may mix two versions")
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
