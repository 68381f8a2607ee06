"""Streaming decode speed under a memory budget, against Hugging Face transformers and accelerate.

One run measures, on GPT-2-small- and GPT-2-medium-shaped models (f32, random weights made
locally, 16-token prompt, greedy decode):

- spherefmt at budgets 100%, 50% and 25% of the float32 weights, dense and top-k (25% of each
  layer's cells active, centroid router), from a directory package and from a ``.vhd``;
  uncompressed packages (``--codec none``) are the streaming rows, and one row per model shows
  the default (zstd) codec at 25%;
- transformers fully resident, and accelerate disk offload (``device_map="auto"``, ``max_memory``
  at the same cap, ``offload_folder``) as anchors (``bench/anchors.py``).

Every configuration runs in its own process (peak RSS per run), all with
``OMP_WAIT_POLICY=PASSIVE`` (with the default policy, torch's OpenMP threads stall on 2 cores in
about one run in three).  Decode tokens/s excludes the prompt.  Results: ``bench/results/runtime.json``.

    .venv/bin/python bench/bench_runtime.py [--quick] [--backend numpy]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import parser, result_path, rss_mib, run_worker, write_result  # noqa: E402


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One spherefmt decode run (in this fresh process)."""
    import_rss = rss_mib("VmRSS")
    from spherefmt.runtime import Session

    prompt = np.random.default_rng(0).integers(0, cfg["vocab"], cfg["prompt_len"])
    t0 = time.perf_counter()
    with Session(cfg["pkg"], backend=cfg["backend"], budget=cfg["budget"], active=cfg["active"],
                 prefetch=cfg.get("prefetch")) as s:
        open_s = time.perf_counter() - t0
        tokens = s.generate(prompt, cfg["new_tokens"], stop_at_eos=False)
        st = s.stats()
    return {"tokens_per_s": st["tokens_per_s"], "tokens": tokens, "peak_device_bytes": st["peak_device_bytes"],
            "budget_bytes": st["budget_bytes"], "weight_bytes": st["weight_bytes"], "peak_rss_mib": rss_mib("VmHWM"),
            "import_rss_mib": import_rss, "open_s": open_s, "bytes_uploaded_per_token":
            st["bytes_uploaded"] / max(1, st["decode_tokens"] + 1), "cache_hit_rate": st["cache_hit_rate"],
            "experts_loaded": st["experts_loaded"], "prefetch": st["prefetch"],
            "active_cell_fraction": st["active_cell_fraction"], "backend": st["backend"]}


def run_isolated(cfg: dict[str, Any]) -> dict[str, Any]:
    return run_worker(__file__, "sphere", cfg, inline=_worker, passive="OMP_WAIT_POLICY" not in os.environ)


def _ensure_model(root: Path, name: str, cfg: dict[str, Any], graticule: str | None = None) -> dict[str, Path]:
    """HF folder and packages of one model shape, made once and kept under ``root``."""
    import spherefmt
    from spherefmt.testing import make_gpt2, save_hf_folder

    folder = root / name
    paths = {"hf": folder / "hf", "none": folder / "none.sphere", "vhd": folder / "none.vhd",
             "zstd": folder / "zstd.sphere"}
    if not (paths["hf"] / "config.json").exists():
        print(f"making {name} ...", flush=True)
        save_hf_folder(paths["hf"], make_gpt2(cfg, "F32", seed=0), cfg)
    for kind, codec in (("none", "none"), ("vhd", "none"), ("zstd", "default")):
        if not paths[kind].exists():
            t0 = time.perf_counter()
            spherefmt.save(paths["hf"], paths[kind], codec=codec, progress=False,
                           **({"graticule": graticule} if graticule else {}))
            print(f"  converted {paths[kind].name} in {time.perf_counter() - t0:.1f}s", flush=True)
    return paths


def bench_model(name: str, cfg: dict[str, Any], root: Path, backend: str, new_tokens: int, quick: bool,
                smoke: bool = False) -> dict[str, Any]:
    from anchors import run_isolated as anchor

    # (the smoke model is too small for the default graticule to leave a quarter budget room)
    paths = _ensure_model(root, name, cfg, "4x4" if smoke else None)
    prompt_len = 16
    base = {"vocab": cfg["vocab_size"], "prompt_len": prompt_len, "new_tokens": new_tokens, "backend": backend}
    rows: list[dict[str, Any]] = []
    runs = [("dir", "none", b, a) for b in (("100%", "25%") if smoke else ("100%", "50%", "25%")) for a in (None, "25%")]
    runs += [("vhd", "vhd", b, a) for b in (["25%"] if quick or smoke else ["100%", "50%", "25%"])
             for a in ((None,) if smoke else (None, "25%"))]
    runs += [("dir (zstd)", "zstd", "25%", None)] + ([] if smoke else [("dir (zstd)", "zstd", "25%", "25%")])
    for where, kind, budget, active in runs:
        r = run_isolated({**base, "pkg": str(paths[kind]), "budget": None if budget == "100%" else budget,
                          "active": active})
        row = {"model": name, "store": where, "budget": budget, "mode": "dense" if active is None else f"top-k {active}",
               **{k: v for k, v in r.items() if k != "tokens"}, "first_tokens": r["tokens"][:8]}
        rows.append(row)
        print(f"  {where:<11} {budget:>5} {row['mode']:<11} {r['tokens_per_s']:7.2f} tok/s  peak "
              f"{r['peak_device_bytes'] / 2**20:7.1f} MiB (budget {'-' if r['budget_bytes'] is None else round(r['budget_bytes'] / 2**20, 1)})"
              f"  RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    weight_bytes = rows[0]["weight_bytes"]
    ids = [int(i) for i in np.random.default_rng(0).integers(0, cfg["vocab_size"], prompt_len)]
    hf = anchor("hf_decode", model_dir=str(paths["hf"]), prompt_ids=ids, new_tokens=new_tokens)
    print(f"  transformers resident        {hf['tokens_per_s']:7.2f} tok/s  RSS {hf['peak_rss_mib']:.0f} MiB", flush=True)
    acc = {}
    for frac in ("25%",) if smoke else ("25%", "50%"):
        with tempfile.TemporaryDirectory() as off:
            acc[frac] = anchor("accelerate_offload_decode", model_dir=str(paths["hf"]), prompt_ids=ids,
                               new_tokens=new_tokens, cap_bytes=int(weight_bytes * float(frac[:-1]) / 100),
                               offload_dir=off)
        print(f"  accelerate offload {frac:>5}     {acc[frac]['tokens_per_s']:7.2f} tok/s  offloaded "
              f"{acc[frac]['offloaded_fraction']:.2f}  RSS {acc[frac]['peak_rss_mib']:.0f} MiB", flush=True)

    def tps(store: str, budget: str, mode: str) -> float:
        return next(r["tokens_per_s"] for r in rows if (r["store"], r["budget"], r["mode"]) == (store, budget, mode))

    resident = tps("dir", "100%", "dense")
    goals: dict[str, dict[str, Any]] = {
        "resident_vs_transformers": {"value": resident / hf["tokens_per_s"], "goal": ">= 1.0"},
        "dense_25_vs_accelerate_25": {"value": tps("dir", "25%", "dense") / acc["25%"]["tokens_per_s"], "goal": ">= 1.0"},
        "topk_25_vs_accelerate_25": {"value": tps("dir", "25%", "top-k 25%") / acc["25%"]["tokens_per_s"],
                                     "goal": ">= 2.0"},
        "topk_25_vs_resident": {"value": tps("dir", "25%", "top-k 25%") / resident, "goal": ">= 0.5"},
        "vhd_dense_25_vs_dir": {"value": tps("vhd", "25%", "dense") / tps("dir", "25%", "dense"), "goal": "(info)"},
    }
    for g in goals.values():
        g["met"] = None if g["goal"] == "(info)" else g["value"] >= float(g["goal"].split()[1])
    same = all(r["first_tokens"] == hf["tokens"][:8] for r in rows if r["mode"] == "dense")
    return {"model": name, "config": {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")},
            "weight_bytes": weight_bytes, "runs": rows,
            "anchors": {"transformers_resident": {k: v for k, v in hf.items() if k != "tokens"},
                        **{f"accelerate_offload_{f}": {k: v for k, v in a.items() if k != "tokens"}
                           for f, a in acc.items()}},
            "dense_tokens_equal_transformers": same, "goals": goals}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":  # --worker KIND CFG OUT (common.run_worker)
        res = _worker(json.loads(sys.argv[3]))
        Path(sys.argv[4]).write_text(json.dumps(res))
        return
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="GPT-2 small only, fewer .vhd rows")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--models", default=str(HERE / "out" / "runtime-models"),
                    help="where the generated models and packages are kept between runs")
    args = ap.parse_args()
    from spherefmt.testing import gpt2_config

    shapes = {"gpt2-small": gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
              "gpt2-medium": gpt2_config(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)}
    if args.quick:
        shapes.pop("gpt2-medium")
    if args.smoke:  # a tiny GPT-2, a few rows
        shapes = {"gpt2-smoke": {**gpt2_config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=128),
                                 "n_inner": 1024}}
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for name, cfg in shapes.items():
        print(f"{name}:", flush=True)
        results.append(bench_model(name, cfg, root, args.backend, new_tokens=32 if name == "gpt2-small" else 16,
                                   quick=args.quick, smoke=args.smoke))
    doc = {"benchmark": "runtime", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                 "platform": platform.platform()},
           "backend": args.backend, "omp_wait_policy": "PASSIVE", "seconds": time.perf_counter() - t0,
           "models": results}
    out = result_path(args, "runtime")
    write_result(out, doc)
    print(f"wrote {out} ({doc['seconds']:.0f}s)")
    for m in results:
        for k, g in m["goals"].items():
            print(f"  {m['model']:<12} {k:<28} {g['value']:.2f}  goal {g['goal']}  {'' if g['met'] is None else ('met' if g['met'] else 'NOT met')}")


if __name__ == "__main__":
    main()
