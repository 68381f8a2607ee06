"""Backends side by side: matmul GFLOP/s and decode tokens/s for numpy, torch and Vulkan.

On this machine the Vulkan backend runs on lavapipe (Mesa's Vulkan driver on the CPU), which is
slow by nature; the figures are recorded as they are.  Decode is the project's small trained
model (4 layers, width 256; uncompressed package, resident), greedy, 16-token prompt.
Results: ``bench/results/backends.json``.

    .venv/bin/python bench/bench_backends.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)

import spherefmt
from spherefmt.backends import get_backend
from spherefmt.errors import SpherefmtError
from spherefmt.runtime import Session
from spherefmt.tinymodel import default_model

HERE = Path(__file__).resolve().parent
SHAPES = [(1, 768, 3072), (16, 768, 768), (64, 768, 3072)]


def gflops(be, m: int, k: int, n: int, repeat: int) -> float:
    rng = np.random.default_rng(0)
    # weights go in the way streaming puts them (adopt: float16 on vulkan:f16)
    x, w = be.upload(rng.standard_normal((m, k), dtype=np.float32)), be.adopt(rng.standard_normal((k, n), dtype=np.float32))
    be.matmul(x, w)
    be.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        y = be.matmul(x, w)
    be.synchronize()
    be.to_host(y)
    return 2 * m * k * n * repeat / (time.perf_counter() - t0) / 1e9


def main() -> None:
    args = parser(__doc__).parse_args()
    shapes = [(1, 64, 96), (4, 64, 64)] if args.smoke else SHAPES
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "tiny.sphere"
        spherefmt.save(default_model(), pkg, graticule="4x8", depth=4, codec="none")
        prompt = np.arange(1, 17)
        for name in ("numpy", "torch:cpu", "vulkan", "vulkan:f16", "torch:cuda"):
            try:
                be = get_backend(name)
            except SpherefmtError as e:
                rows.append({"backend": name, "available": False, "reason": str(e)})
                continue
            row = {"backend": name, "available": True, **be.describe(),
                   "matmul_gflops": {f"{m}x{k}x{n}": gflops(be, m, k, n, 3 if name.startswith("vulkan") else 20)
                                     for m, k, n in shapes}}
            with Session(pkg, backend=be, prefetch=False) as s:
                s.generate(prompt, 8, stop_at_eos=False)
            with Session(pkg, backend=be, prefetch=False) as s:
                tokens = s.generate(prompt, 8 if args.smoke else 32, stop_at_eos=False)
                row["decode_tokens_per_s"] = s.stats()["tokens_per_s"]
                row["first_tokens"] = tokens[:8]
            rows.append(row)
            print(name, {k: round(v, 2) for k, v in row["matmul_gflops"].items()},
                  f"decode {row['decode_tokens_per_s']:.1f} tok/s", flush=True)
    same = len({tuple(r["first_tokens"]) for r in rows if r.get("available") and not r["backend"].endswith("f16")}) == 1
    doc = {"benchmark": "backends", "cpus": os.cpu_count(), "rows": rows, "same_tokens_on_every_backend": same}
    write_result(result_path(args, "backends"), doc)
    print("same greedy tokens on every float32 backend:", same)


if __name__ == "__main__":
    main()
