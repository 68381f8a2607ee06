"""VHD packages against plain directory packages, same content, one run.

Measures on a GPT-2-small-shaped bf16 model (124M parameters, random weights, made locally):
read every expert from the ``.vhd`` vs from a directory package (throughput ratio; goal >= 0.8),
one-expert read latency from the ``.vhd`` vs a raw ``pread`` of the same bytes (goal <= 2x; the
expert read also verifies and decompresses, so the directory package's latency is given too),
the ``.vhd`` file size over the directory's stored bytes, and the time to rewrite one expert in
place inside the ``.vhd``.  Results: ``bench/results/vhd.json``.

    .venv/bin/python bench/bench_vhd.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)

import spherefmt
from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def read_all(url: str) -> tuple[float, int]:
    with spherefmt.open(url) as pkg:
        addrs = list(pkg.experts())
        pkg.expert(*addrs[0])  # metadata and index warm
        t = time.perf_counter()
        n = sum(pkg.expert(*a).neurons.nbytes for a in addrs)
        return time.perf_counter() - t, n


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="a small GPT-2 (results to bench/out/)")
    args = ap.parse_args()
    args.quick = args.quick or args.smoke
    cfg = gpt2_config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000) if args.quick else \
        gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = save_hf_folder(tmp / "hf", make_gpt2(cfg, "BF16"), cfg)
        t = time.perf_counter()
        d = spherefmt.save(src, tmp / "m.sphere")
        t_dir = time.perf_counter() - t
        t = time.perf_counter()
        v = spherefmt.save(src, tmp / "m.vhd")
        t_vhd = time.perf_counter() - t
        res: dict = {"model": "GPT-2-small shape, bf16, random N(0, 0.02)" if not args.quick else "quick",
                     "convert_s": {"dir": round(t_dir, 2), "vhd": round(t_vhd, 2)},
                     "size_bytes": {"dir": dir_bytes(Path(d)), "vhd_file": os.path.getsize(v)}}
        res["size_bytes"]["vhd_over_dir"] = round(res["size_bytes"]["vhd_file"] / res["size_bytes"]["dir"], 3)
        runs: dict[str, list[float]] = {"dir": [], "vhd": []}
        for _ in range(3):
            for kind, url in (("dir", d), ("vhd", v)):
                s, n = read_all(url)
                runs[kind].append(n / s / 1e6)
        res["read_all_experts_MBps"] = {k: round(statistics.median(x), 1) for k, x in runs.items()}
        res["read_all_ratio_vhd_over_dir"] = round(res["read_all_experts_MBps"]["vhd"] / res["read_all_experts_MBps"]["dir"], 3)
        # one expert: .vhd vs a raw pread of the same stored bytes (the directory's shard file)
        with spherefmt.open(v) as pv, spherefmt.open(d) as pd:
            addrs = list(pv.experts())
            rng = np.random.default_rng(0)
            pick = [addrs[i] for i in rng.integers(0, len(addrs), 30)]
            pv.expert(*pick[0])
            pd.expert(*pick[0])
            lat_v, lat_raw, lat_d = [], [], []
            for a in pick:
                t = time.perf_counter()
                pv.expert(*a)
                lat_v.append(time.perf_counter() - t)
                t = time.perf_counter()
                pd.expert(*a)
                lat_d.append(time.perf_counter() - t)
                path = Path(d) / pv.shard_key(*a)
                t = time.perf_counter()
                fd = os.open(path, os.O_RDONLY)
                os.pread(fd, os.fstat(fd).st_size, 0)
                os.close(fd)
                lat_raw.append(time.perf_counter() - t)
        res["one_expert_ms"] = {"vhd": round(statistics.median(lat_v) * 1e3, 3),
                                "dir": round(statistics.median(lat_d) * 1e3, 3),
                                "raw_pread_of_stored_bytes": round(statistics.median(lat_raw) * 1e3, 3)}
        res["one_expert_ratio_vhd_over_pread"] = round(statistics.median(lat_v) / statistics.median(lat_raw), 1)
        res["one_expert_ratio_vhd_over_dir"] = round(statistics.median(lat_v) / statistics.median(lat_d), 2)
        with spherefmt.open(v, "r+") as pv:
            e = pv.expert(*addrs[1])
            t = time.perf_counter()
            pv.write_expert(*addrs[1], e.neurons)
            res["rewrite_one_expert_in_vhd_s"] = round(time.perf_counter() - t, 3)
            res["expert_raw_bytes"] = int(e.neurons.nbytes)
    res["goals"] = {"read_all_ratio_min": 0.8, "one_expert_ratio_max": 2.0,
                    "met": {"read_all": res["read_all_ratio_vhd_over_dir"] >= 0.8,
                            "one_expert": res["one_expert_ratio_vhd_over_pread"] <= 2.0}}
    res["machine"] = {"nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_result(result_path(args, "vhd"), res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
