"""The lightning tree at scale: the exact tree (placement version 1) against version 2's
projected tree, per layer pair, from GPT-2 small to Llama-70B widths.

For each shape (width ``d``, FFN ``N``): the time of one layer pair's tree, exact and projected
(``spec/FORMAT.md`` 7, version 2), and the quality the projected tree keeps: the share of
neurons whose parent is the exact argmax, and the mean of ``|score of the chosen parent| /
|score of the exact parent|``.  Weights: ``structured`` rows with a decaying spectrum (a
power-law low-rank part plus N(0, 0.02) noise, as trained FFN weights have), and ``random``
N(0, 0.02) rows (no structure: the worst case, where every parent is noise); plus the project's
own trained small model (every layer pair).  The exact tree is skipped where it would take more
than ``--exact-limit`` multiply-adds.  Results: ``bench/results/placement.json``.

    .venv/bin/python bench/bench_placement.py [--exact-limit 6e11]
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)
from safetensors.numpy import load_file

from spherefmt import constants as C
from spherefmt.format.placement import tree_parents, tree_parents_projected
from spherefmt.tinymodel import default_model

HERE = Path(__file__).resolve().parent
SHAPES = [("gpt2-small", 768, 3072), ("gpt2-medium", 1024, 4096), ("gpt2-large", 1280, 5120),
          ("gpt2-xl", 1600, 6400), ("llama-7b", 4096, 11008), ("llama-13b", 5120, 13824),
          ("llama-70b", 8192, 28672)]
#: ``--smoke``: two small widths (the growth exponent still has two points)
SMOKE_SHAPES = [("smoke-128", 128, 512), ("smoke-256", 256, 1024)]


def rows(n: int, d: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``(n, d)`` float32 neuron rows."""
    noise = rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.02)
    if kind == "random":
        return noise
    r = min(256, d)  # a power-law spectrum over 256 directions shared by the layer pair
    basis = SHARED.setdefault(d, np.linalg.qr(np.random.default_rng(7).standard_normal((d, r)))[0].astype(np.float32))
    scale = (0.2 / np.arange(1, r + 1) ** 0.7).astype(np.float32)
    return noise + (rng.standard_normal((n, r), dtype=np.float32) * scale) @ basis.T


SHARED: dict[int, np.ndarray] = {}


def quality(a: np.ndarray, b: np.ndarray, exact: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    best = np.abs(np.einsum("jd,jd->j", a[exact], b))
    got = np.abs(np.einsum("jd,jd->j", a[approx], b))
    return {"parent_exact_share": float((exact == approx).mean()),
            "score_ratio_mean": float(np.mean(got / np.maximum(best, 1e-30))),
            "score_ratio_min": float(np.min(got / np.maximum(best, 1e-30)))}


def timed(fn, *args):  # noqa: ANN001, ANN202 - a bench helper
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--exact-limit", type=float, default=6e11, help="skip exact trees above this many MACs")
    a = ap.parse_args()
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    t_start = time.perf_counter()
    rows_out = []
    sd = load_file(str(default_model() / "model.safetensors"))
    for layer in range(1, 4):
        prev = sd[f"transformer.h.{layer - 1}.mlp.c_proj.weight"].astype(np.float32)
        cur = sd[f"transformer.h.{layer}.mlp.c_fc.weight"].astype(np.float32).T.copy()
        ex, te = timed(tree_parents, prev, cur)
        pr, tp = timed(tree_parents_projected, prev, cur, C.TREE_DIMS, C.TREE_CANDIDATES)
        rows_out.append({"shape": f"tiny-gpt2 layers {layer - 1}->{layer}", "weights": "trained", "d": 256, "N": 1024,
                         "exact_s": te, "projected_s": tp, **quality(prev, cur, ex, pr)})
        print(rows_out[-1], flush=True)
    for name, d, n in shapes:
        for kind in ("structured", "random"):
            rng = np.random.default_rng(0)
            prev, cur = rows(n, d, kind, rng), rows(n, d, kind, rng)
            pr, tp = timed(tree_parents_projected, prev, cur, C.TREE_DIMS, C.TREE_CANDIDATES)
            row = {"shape": name, "weights": kind, "d": d, "N": n, "exact_macs": n * n * d, "projected_s": tp,
                   "exact_s": None}
            if n * n * d <= a.exact_limit:
                ex, te = timed(tree_parents, prev, cur)
                row.update({"exact_s": te, **quality(prev, cur, ex, pr)})
            rows_out.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del prev, cur
    # growth with width of the projected tree (structured rows): slope of log time on log width
    st = [r for r in rows_out if r["weights"] == "structured"]
    slope = float(np.polyfit(np.log([r["d"] for r in st]), np.log([r["projected_s"] for r in st]), 1)[0])
    ex_rows = [r for r in st if r["exact_s"]]
    ex_slope = float(np.polyfit(np.log([r["d"] for r in ex_rows]), np.log([r["exact_s"] for r in ex_rows]), 1)[0])
    goals = {"projected_time_exponent_in_width": {"value": slope, "goal": "<= 2.2 (width^2 x log)",
                                                  "met": slope <= 2.2},
             "trained_parent_exact_share_min": {
                 "value": min(r["parent_exact_share"] for r in rows_out if r["weights"] == "trained"),
                 "goal": ">= 0.99", "met": min(r["parent_exact_share"] for r in rows_out if r["weights"] == "trained") >= 0.99}}
    doc = {"benchmark": "placement", "tree_dims": C.TREE_DIMS, "tree_candidates": C.TREE_CANDIDATES,
           "tree_exact_max_macs": C.TREE_EXACT_MAX_MACS, "rows": rows_out,
           "exact_time_exponent_in_width": ex_slope, "goals": goals, "seconds": time.perf_counter() - t_start}
    write_result(result_path(a, "placement"), doc)
    for k, g in goals.items():
        print(f"{k}: {g['value']:.3f} (goal {g['goal']}) {'met' if g['met'] else 'NOT met'}")
    print(f"exact tree time exponent in width: {ex_slope:.2f}; {math.ceil(time.perf_counter() - t_start)} s")


if __name__ == "__main__":
    main()
