"""Quality and speed of top-k routing on the project's small trained model (held-out text).

For dense and for 50%, 25% and 12.5% of each layer's cells active, with the learned, centroid and
random routers (and the oracle: true per-cell output norms, the ceiling for this placement),
also with the co-activation placement (`--placement coactivation`, learned and oracle):
perplexity on held-out text, the share of FFN cells (and bytes) read per token,
and decode tokens/s under a 25% budget.  The package is the committed small model on a 4x8
graticule (4 depth shells); the learned router is trained on the first 60% of the held-out text,
perplexity is measured on the rest.  Results: ``bench/results/moe.json``.

    .venv/bin/python bench/bench_moe.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import spherefmt
from spherefmt.format.routers import write_router
from spherefmt.runtime import Session
from spherefmt.runtime.routing import OracleRouter
from spherefmt.tinymodel import default_model
from spherefmt.training.routers import train_router

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    ap.add_argument("--out", default=str(HERE / "results" / "moe.json"))
    a = ap.parse_args()
    t_start = time.perf_counter()
    model = default_model()
    text = (model / "heldout.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.6)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "tiny.sphere"
        spherefmt.save(model, pkg, graticule="4x8", depth=4, codec="none", progress=False)
        with spherefmt.open(pkg, "r+") as p:
            with Session(p, backend="numpy") as s:
                sample = np.asarray(s.encode(text[:cut]), dtype=np.int64)[:12000]
                ids = np.asarray(s.encode(text[cut:]), dtype=np.int64)[: a.tokens]
            t0 = time.perf_counter()
            write_router(p, "learned", train_router(p, sample, steps=300, progress=False))
            train_s = time.perf_counter() - t0
        rows = []
        prompt = ids[:32]
        coact = Path(tmp) / "coact.sphere"
        t0 = time.perf_counter()
        spherefmt.save(model, coact, graticule="4x8", depth=4, codec="none", placement="coactivation",
                       sample=text[:cut], progress=False)
        coact_s = time.perf_counter() - t0
        with spherefmt.open(coact, "r+") as p:
            write_router(p, "learned", train_router(p, sample, steps=300, progress=False))
        plan = [("pca", pkg, None, None)]
        plan += [("pca", pkg, f, r) for f in ("50%", "25%", "12.5%") for r in ("oracle", "learned", "centroid", "random")]
        plan += [("coactivation", coact, f, r) for f in ("50%", "25%", "12.5%") for r in ("oracle", "learned")]
        for placement, path, active, router in plan:
            handle = spherefmt.open(path)
            use = OracleRouter(handle) if router == "oracle" else router
            with Session(handle, backend="numpy", active=active, router=use) as s:
                total, n = s.nll(ids)
                st = s.stats()
            if router == "oracle":  # the ceiling's speed is not a router's: it computes every cell
                dec = {"tokens_per_s": None, "peak_device_bytes": None, "budget_bytes": None}
            else:
                with Session(handle, backend="numpy", active=active, router=router, budget="25%") as s:
                    s.generate(prompt, 48, stop_at_eos=False)
                    dec = s.stats()
            handle.close()
            rows.append({"placement": placement, "active": active or "100% (dense)", "router": router or "-",
                         "ppl": math.exp(total / n), "nll": total / n, "tokens": n,
                         "cells_read_fraction": st["active_cell_fraction"],
                         "decode_tokens_per_s_at_25pct_budget": dec["tokens_per_s"],
                         "decode_peak_device_bytes": dec["peak_device_bytes"], "budget_bytes": dec["budget_bytes"]})
            r = rows[-1]
            tps = r["decode_tokens_per_s_at_25pct_budget"]
            print(f"{placement:<12} {r['active']:>13} {r['router']:<9} ppl {r['ppl']:8.2f}  cells "
                  f"{r['cells_read_fraction']:.3f}  {'-' if tps is None else round(tps, 1)} tok/s @25%", flush=True)
    dense = rows[0]["ppl"]
    learned = {r["active"]: min(x["ppl"] for x in rows if x["router"] == "learned" and x["active"] == r["active"])
               for r in rows if r["router"] == "learned"}
    goals = {"learned_25_within_5pct": {"value": learned["25%"] / dense - 1, "goal": "<= 0.05"},
             "learned_50_within_1pct": {"value": learned["50%"] / dense - 1, "goal": "<= 0.01"}}
    for g in goals.values():
        g["met"] = g["value"] <= float(g["goal"].split()[1])
    doc = {"benchmark": "moe", "model": str(model.relative_to(HERE.parent)), "graticule": "4x8", "depth": 4,
           "router_train_s": train_s, "coactivation_convert_s": coact_s, "eval_tokens": rows[0]["tokens"], "runs": rows, "goals": goals,
           "seconds": time.perf_counter() - t_start}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    for k, g in goals.items():
        print(f"{k}: {g['value']:+.3f} (goal {g['goal']}) {'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
