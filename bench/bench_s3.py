"""Streaming evaluation from a real S3-compatible server (moto on loopback) against local disk.

The same package, converted once into a local directory and once straight into the bucket,
scored on the same tokens with the same budget, side by side in one run.  Two models: the
project's small trained GPT-2 (4x256, f16) and a GPT-2-small-shaped one (124M, bf16, random
weights made locally).  Budgets: unlimited and 40% of the weights.  GET requests are counted at
the client (s3fs), so the table also shows that streaming reads byte ranges, not whole objects.
Results: ``bench/results/s3.json``.

    .venv/bin/python bench/bench_s3.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)

import spherefmt
from spherefmt.runtime import Session
from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder
from spherefmt.testing.s3 import S3Server
from spherefmt.tinymodel import default_model

HERE = Path(__file__).resolve().parent


def counting_gets() -> list[int]:
    """Patch s3fs to count GET requests and bytes (client side); returns the live counters."""
    import s3fs

    counts = [0, 0]
    orig = s3fs.S3FileSystem._cat_file

    async def spy(self, path, version_id=None, start=None, end=None, **kw):  # noqa: ANN001, ANN202
        out = await orig(self, path, version_id=version_id, start=start, end=end, **kw)
        counts[0] += 1
        counts[1] += len(out)
        return out

    s3fs.S3FileSystem._cat_file = spy
    return counts


def score(url: str, ids: np.ndarray, budget: str | None, counts: list[int]) -> dict:
    before = list(counts)
    t0 = time.perf_counter()
    with Session(url, "numpy", budget=budget, prefetch=False) as s:
        nll, n = s.nll(ids)
        stats = s.stats()
    secs = time.perf_counter() - t0
    return {"budget": budget or "unlimited", "seconds": secs, "tokens_per_s": n / secs, "nll": nll / n,
            "bytes_read": stats["bytes_read"], "get_requests": counts[0] - before[0],
            "get_bytes": counts[1] - before[1]}


def main() -> None:
    args = parser(__doc__).parse_args()
    srv = S3Server()
    rows: list[dict[str, Any]] = []
    try:
        srv.use()
        counts = counting_gets()
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            cfg = gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
            if args.smoke:  # the same two kinds of model, the second tiny
                cfg = gpt2_config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
            save_hf_folder(tmp / "small", make_gpt2(cfg, "BF16", 0), cfg)
            tiny = default_model()
            ids_tiny = np.asarray(spherefmt.runtime.tokenizer.load_tokenizer(spherefmt.open(
                spherefmt.save(tiny, tmp / "probe.sphere"))).encode((tiny / "heldout.txt").read_text()[:3000]))
            for name, src, ids in (("tiny-gpt2 (4x256, f16)", tiny, ids_tiny[: 32 if args.smoke else 256]),
                                   ("gpt2-small shape (124M, bf16)", tmp / "small",
                                    np.arange(1, 129) * 389 % cfg["vocab_size"])):
                local = tmp / f"{len(rows)}.sphere"
                remote = f"s3://models/m{len(rows)}"
                t0 = time.perf_counter()
                spherefmt.save(src, local)
                t_local = time.perf_counter() - t0
                t0 = time.perf_counter()
                spherefmt.save(src, remote)
                t_remote = time.perf_counter() - t0
                for budget in (None,) if args.smoke else (None, "40%"):
                    a = score(str(local), ids, budget, counts)
                    b = score(remote, ids, budget, counts)
                    if abs(a["nll"] - b["nll"]) > 0:
                        raise SystemExit(f"{name}: S3 and local disagree ({a['nll']} vs {b['nll']})")
                    rows.append({"model": name, "tokens": int(len(ids)), "convert_local_s": t_local,
                                 "convert_s3_s": t_remote, "local": a, "s3": b,
                                 "s3_over_local_time": b["seconds"] / a["seconds"]})
                    print(f"{name} budget {a['budget']}: local {a['seconds']:.2f}s, s3 {b['seconds']:.2f}s "
                          f"({b['get_requests']} GETs, {b['get_bytes'] / 2**20:.1f} MiB); convert local "
                          f"{t_local:.1f}s, s3 {t_remote:.1f}s", flush=True)
    finally:
        srv.kill()
    write_result(result_path(args, "s3"), {"benchmark": "s3", "server": "moto (loopback)", "rows": rows})


if __name__ == "__main__":
    main()
