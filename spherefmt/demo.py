"""The demo behind ``make demo``: make a small GPT-2, convert it, inspect it, read an expert back,
export it, and run it streaming under a memory budget.

The model is made here (random N(0, 0.02) weights with the real GPT-2 layout, bfloat16, saved as
a Hugging Face folder); nothing is downloaded.  Each step runs the ``sphere`` command and prints
it, so the output doubles as a tutorial.

    python -m spherefmt.demo [--out demo-out]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import spherefmt
from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder
from spherefmt.tinymodel import default_model


def _sphere(*args: str) -> str:
    cmd = [sys.executable, "-m", "spherefmt.cli", *args]
    print(f"\n$ sphere {shlex.join(args)}", flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True)
    sys.stdout.write(r.stdout)
    sys.stdout.write(r.stderr)  # --stats figures and warnings go to stderr
    if r.returncode != 0:
        raise SystemExit(r.returncode)
    return r.stdout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="working folder (default: demo-out)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(exist_ok=True)

    cfg = gpt2_config(n_layer=6, n_embd=256, n_head=8, vocab_size=8192, n_positions=512)
    src = out / "gpt2-6x256"
    if not (src / "config.json").exists():
        print(f"making a GPT-2 (6 layers, width 256, bf16, random weights) in {src}/")
        save_hf_folder(src, make_gpt2(cfg, "BF16", seed=0), cfg, shards=2)
    pkg = out / "gpt2-6x256.sphere"
    _sphere("convert", str(src), str(pkg), "--graticule", "4x8", "--depth", "3", "--overwrite", "-q")
    _sphere("info", str(pkg))
    _sphere("cell", str(pkg), "1", "5", "0")

    print("\n# load -> use -> release one expert from Python")
    with spherefmt.open(pkg) as p:
        t0 = time.perf_counter()
        e = p.expert(1, 5, 0)
        ms = (time.perf_counter() - t0) * 1e3
        x = np.random.default_rng(0).standard_normal(cfg["n_embd"]).astype(np.float32)
        w_in = e.field("w_in")[0].astype(np.float32)  # (K, d) for the expert's first layer
        h = w_in @ x + e.field("b_in")[0, :, 0].astype(np.float32)
        print(f"expert (1, 5, 0): layers {list(e.layers)}, {int(e.counts.sum())} neurons, read in {ms:.1f} ms; "
              f"first layer pre-activations [{', '.join(f'{v:+.3f}' for v in h[:4])}, ...]")
        del e
    back = out / "roundtrip.safetensors"
    _sphere("export", str(pkg), str(back), "--overwrite", "-q")
    import torch
    from safetensors import safe_open

    same, n = True, 0
    with safe_open(str(back), framework="pt") as f:
        for shard in sorted(src.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as g:
                for k in g.keys():
                    same &= torch.equal(f.get_tensor(k).view(torch.int16), g.get_tensor(k).view(torch.int16))
                    n += 1
    print(f"\nexport is bit-exact against the source ({n} tensors): {same}")
    if not same:
        raise SystemExit(1)

    print("\n# streaming inference: the model's weights held to a quarter, dense then top-k")
    ids = out / "prompt.npy"
    np.save(ids, np.arange(1, 17))
    _sphere("run", str(pkg), "--ids", str(ids), "-n", "12", "--budget", "25%", "--backend", "numpy", "--stats")
    _sphere("eval", str(pkg), "--ids", str(ids), "--budget", "25%", "--active", "25%", "--backend", "numpy", "-q")

    tiny = default_model()
    if not (tiny / "model.safetensors").exists():
        print(f"\n(the small trained model is not in {tiny}; build it with python -m spherefmt.tinymodel)")
        return
    print(f"\n# the project's own small GPT-2, trained on Python's standard library ({tiny})")
    tpkg = out / "tiny.sphere"
    held = (tiny / "heldout.txt").read_text(encoding="utf-8")
    sample, evaluation = out / "router-sample.txt", out / "heldout-eval.txt"
    sample.write_text(held[: len(held) * 6 // 10], encoding="utf-8")
    evaluation.write_text(held[len(held) * 6 // 10 :], encoding="utf-8")
    _sphere("convert", str(tiny), str(tpkg), "--graticule", "4x8", "--depth", "4", "--overwrite", "-q")
    _sphere("route-train", str(tpkg), "--text", str(sample), "--steps", "150", "-q")
    # half of its float16 weights as stored: the quarter of their float32 bytes this step always held
    _sphere("run", str(tpkg), "--prompt", "class Queue:\n    def __init__(self", "-n", "40", "--budget", "50%",
            "--temperature", "0.7", "--backend", "numpy")
    _sphere("eval", str(tpkg), "--text", str(evaluation), "--max-tokens", "2000", "--backend", "numpy", "-q")
    _sphere("eval", str(tpkg), "--text", str(evaluation), "--max-tokens", "2000", "--active", "25%",
            "--backend", "numpy", "-q")
    _sphere("map", str(tpkg), "--usage", str(evaluation), "-o", str(out / "tiny-usage.png"))

    sparse = tiny.parent / "tiny-gpt2-sparse.zip"
    if not sparse.exists():
        return
    print("\n# the same model made sparse by `sphere sparsify` (placed for top-k, fine-tuned with the routing in\n"
          "# the loop at 12.5/25/50/100% of cells; the committed result of bench/bench_moe.py): dense, then a quarter")
    spkg = out / "tiny-sparse.zip"
    shutil.copyfile(sparse, spkg)  # sparsify and route-train write in place: work on a copy
    _sphere("info", str(spkg))
    _sphere("eval", str(spkg), "--text", str(evaluation), "--max-tokens", "2000", "--backend", "numpy", "-q")
    _sphere("eval", str(spkg), "--text", str(evaluation), "--max-tokens", "2000", "--active", "25%",
            "--backend", "numpy", "-q")
    # half of its float16 weights (its 2 MiB embedding table is a quarter by itself); a quarter of
    # the FFN cells per token
    _sphere("run", str(spkg), "--prompt", "class Queue:\n    def __init__(self", "-n", "40", "--budget", "50%",
            "--active", "25%", "--backend", "numpy", "--stats")


if __name__ == "__main__":
    main()
