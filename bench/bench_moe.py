"""Top-k routing on the project's small trained model: the original dense model against the same
model made sparse by ``sphere sparsify`` (its defaults), on held-out text.

Every perplexity is on text never used for placement, fine-tuning or routers, and is compared
with the **original dense** model on the same text: ``heldout`` is the tail of the model's
``heldout.txt`` (the text the 77.37 reference was measured on), ``unseen`` the held-out standard
library files that ``heldout.txt`` does not include (text the project has never used).  The
sparsify text and every router's text is the model's training side of the standard library.

Rows, for 12.5%, 25%, 50% and 100% of each layer's cells active: the original package (placed
by PCA on the same 8x16 graticule, with a learned router trained on the same text) and the
sparsified one (its learned router).  Decode tokens/s (numpy, 2 cores) under a budget of a
quarter of the float32 weights (held as float32), dense and top-k 25%.
``--commit`` writes the sparsified package to ``spherefmt/data/tiny-gpt2-sparse.zip`` (what
``make demo`` shows).  Results: ``bench/results/moe.json``.

    .venv/bin/python bench/bench_moe.py [--tokens 4096] [--steps 400] [--commit]
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)

import spherefmt
from spherefmt.format.routers import write_router
from spherefmt.runtime import Session
from spherefmt.tinymodel import corpus, default_model
from spherefmt.training.routers import train_router

HERE = Path(__file__).resolve().parent
COMMITTED = HERE.parent / "spherefmt" / "data" / "tiny-gpt2-sparse.zip"
SHARES = ("12.5%", "25%", "50%", None)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score per text")
    ap.add_argument("--steps", type=int, help="sparsify steps (default: the command's default)")
    ap.add_argument("--package", help="measure this sparsified package instead of making one")
    ap.add_argument("--commit", action="store_true", help=f"copy the sparsified package to {COMMITTED}")
    a = ap.parse_args()
    out = result_path(a, "moe")
    if a.smoke:  # a few tokens, a few steps of everything: the code path, not the figures
        a.tokens, a.steps = 64, a.steps or 2
    t_start = time.perf_counter()
    model = default_model()
    train_texts, held_texts = corpus()
    held = (model / "heldout.txt").read_text(encoding="utf-8")
    texts = {"heldout": held[int(len(held) * 0.6):], "unseen": "".join(held_texts[3:])}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        train_file = t / "train.txt"
        train_file.write_text("".join(train_texts), encoding="utf-8")
        orig = t / "orig.sphere"
        spherefmt.save(model, orig, graticule="8x16", depth=4, progress=False)
        with spherefmt.open(orig, "r+") as p:
            with Session(p, backend="numpy") as s:
                sample = np.asarray(s.encode("".join(train_texts)[: 4000 if a.smoke else 200_000]),
                                    dtype=np.int64)[:20000]
                evals = {k: np.asarray(s.encode(v), dtype=np.int64)[: a.tokens] for k, v in texts.items()}
            write_router(p, "learned", train_router(p, sample, steps=5 if a.smoke else 300, progress=False))
        sparse = t / "sparse.zip"
        sparsify_s = None
        record: dict = {}
        if a.package:
            shutil.copy(a.package, sparse)
        else:
            spherefmt.save(model, sparse, progress=False)  # the default conversion, as a user has it
            cmd = [sys.executable, "-m", "spherefmt.cli", "sparsify", str(sparse), "--text", str(train_file), "--json",
                   "--plot", str(out.with_name("sparsify-loss.png" if out.parent == HERE / "results"
                                               else f"{out.stem}-sparsify-loss.png"))]
            if a.smoke:
                cmd += ["--router-steps", "2", "--router-tokens", "256", "--seq", "32", "--batch", "2", "--cells", "32"]
            if a.steps:
                cmd += ["--steps", str(a.steps)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            sparsify_s = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(r.stderr)
            record = json.loads(r.stdout)
            plot = Path(record["plot"]).resolve()
            record["plot"] = str(plot.relative_to(HERE.parent) if plot.is_relative_to(HERE.parent) else plot)
            print(f"sparsify: {sparsify_s:.0f} s, kept step {record['best_step']}", flush=True)
        with spherefmt.open(sparse) as p:
            routing = p.header.routing
            f32_bytes = sum(4 * math.prod(p.tensor_info(n).shape) for n in p.keys())
        rows: list[dict[str, Any]] = []
        for name, path in (("original", orig), ("sparsified", sparse)):
            for active in SHARES[1:] if a.smoke else SHARES:  # (smoke: the shares the goals read)
                row: dict[str, Any] = {"package": name, "active": active or "100% (dense)"}
                for text, ids in evals.items():
                    with Session(path, backend="numpy", active=active) as s:
                        total, n = s.nll(ids)
                        st = s.stats()
                    row[f"{text}_ppl"] = math.exp(total / n)
                    row[f"{text}_tokens"] = n
                row["cells_read_fraction"] = st["active_cell_fraction"] if active else 1.0
                if active in ("25%", None):
                    # a quarter of the float32 weights, held as float32 (the float16 package's
                    # own quarter cannot hold its 2 MiB embedding table beside the KV cache)
                    with Session(path, backend="numpy", active=active, budget=f32_bytes // 4, weights="float32") as s:
                        s.generate(evals["heldout"][: 8 if a.smoke else 32], 4 if a.smoke else 48, stop_at_eos=False)
                        dec = s.stats()
                    row.update({"decode_tokens_per_s_at_25pct_budget": dec["tokens_per_s"],
                                "decode_peak_device_bytes": dec["peak_device_bytes"], "budget_bytes": dec["budget_bytes"]})
                rows.append(row)
                print(f"{name:<10} {row['active']:>13}  heldout ppl {row['heldout_ppl']:8.3f}  unseen ppl "
                      f"{row['unseen_ppl']:8.3f}" + (f"  {row['decode_tokens_per_s_at_25pct_budget']:.1f} tok/s @25%"
                                                     if "decode_tokens_per_s_at_25pct_budget" in row else ""), flush=True)
        if a.commit:
            shutil.copy(sparse, COMMITTED)
            print(f"wrote {COMMITTED}")

    def ppl(pkg: str, active: str, text: str) -> float:
        return next(r[f"{text}_ppl"] for r in rows if r["package"] == pkg and r["active"] == active)

    goals = {}
    for text in evals:
        base = ppl("original", "100% (dense)", text)
        for key, active, bound in (("25", "25%", 0.03), ("50", "50%", 0.01), ("dense", "100% (dense)", 0.01)):
            v = ppl("sparsified", active, text) / base - 1
            goals[f"{text}_sparsified_{key}_within_{round(bound * 100)}pct"] = {"value": v, "goal": f"<= {bound}",
                                                                               "met": v <= bound}
    dense_tps = next(r for r in rows if r["package"] == "sparsified" and r["active"] == "100% (dense)")
    top_tps = next(r for r in rows if r["package"] == "sparsified" and r["active"] == "25%")
    speed = top_tps["decode_tokens_per_s_at_25pct_budget"] / dense_tps["decode_tokens_per_s_at_25pct_budget"]
    goals["topk25_decode_vs_dense_at_25pct_budget"] = {"value": speed, "goal": ">= 2", "met": speed >= 2}
    doc = {"benchmark": "moe", "model": str(model.relative_to(HERE.parent)),
           "sparsify": {"seconds": sparsify_s, "command": "sphere sparsify PKG --text TRAIN.txt (defaults)"
                        + (f" --steps {a.steps}" if a.steps else ""), "result": record,
                        "trained": (routing or {}).get("trained")},
           "original": "8x16 graticule, PCA placement, learned router on the same text",
           "texts": {k: {"chars": len(v), "tokens": int(len(evals[k]))} for k, v in texts.items()},
           "runs": rows, "goals": goals, "seconds": time.perf_counter() - t_start}
    write_result(out, doc)
    for k, g in goals.items():
        print(f"{k}: {g['value']:+.4f} (goal {g['goal']}) {'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
