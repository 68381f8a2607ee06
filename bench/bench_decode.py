"""Decode speed against llama.cpp and transformers, idle and beside a busy process, and the
speed-for-memory trade-off under a budget (issue 16).

Models (f32, random weights made locally by ``transformers``' own init):

- ``llama155m``: Llama, width 1024, 12 layers, FFN 2816, 16 heads, vocabulary 512 (155M params);
- ``gpt2-small``: GPT-2 small's shape (124M params, vocabulary 50257).

Every row is its own process and runs once: a 16-token prompt, then 32 greedy tokens; tokens/s
counts the 31 decode steps.  Rows:

- llama.cpp (llama-cpp-python built from its sdist in ``bench/.venv-llama``: ``make bench-deps``)
  on an F32 GGUF written from the Hugging Face folder with ``gguf``'s writer and the Q/K
  permutation ``convert_hf_to_gguf.py`` applies (its logits agree with transformers to 5e-4);
  Llama only (its GPT-2 needs a tokenizer this random model does not have);
- transformers resident (``bench/anchors.py``), and accelerate disk offload at 25%;
- spherefmt (numpy backend) resident, then at budgets 100% .. 15% of the f32 weights, dense and
  top-k 25% (centroid router), from a directory and from a ``.vhd``, codec none, and at 25%
  with the default codec;
- resident rows once on an idle machine and once beside one busy process (``while True: pass``,
  started by this benchmark).

The default codec's bound: the package's FFN chunks decoded with blosc on all cores, in this
run, gives decode bytes/s; the bound on tokens/s is that over the bytes a 25% run decodes per
token.  Results: ``bench/results/decode.json`` and ``bench/results/decode-budget.png``.

    .venv/bin/python bench/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import LLAMA_PY, busy, llama_gguf, parser, prompt, result_path, rss_mib, run_worker, write_result  # noqa: E402

PROMPT, NEW = 16, 32


# --- the models ----------------------------------------------------------------------------------
def _models(root: Path, quick: bool, smoke: bool = False) -> dict[str, dict[str, Any]]:
    """Hugging Face folders, packages and the GGUF, made once under ``root``."""
    import torch
    import transformers

    import spherefmt

    shapes: dict[str, Any] = {"llama155m": transformers.LlamaConfig(
        hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False)}
    if smoke:
        shapes = {"llama-smoke": transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=64, max_position_embeddings=128, tie_word_embeddings=False)}
    if not quick and not smoke:
        shapes["gpt2-small"] = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    out = {}
    for name, cfg in shapes.items():
        d = root / name
        paths: dict[str, Any] = {"hf": d / "hf", "none": d / "none.sphere", "vhd": d / "none.vhd",
                                 "default": d / "default.sphere", "vhd_default": d / "default.vhd", "gguf": d / "f32.gguf"}
        if not (paths["hf"] / "config.json").exists():
            print(f"making {name} ...", flush=True)
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(paths["hf"])
        for kind, codec in (("none", "none"), ("vhd", "none"), ("default", "default"), ("vhd_default", "default")):
            if not paths[kind].exists():
                t0 = time.perf_counter()
                # (the smoke model is too small for the default graticule to leave budgets room)
                spherefmt.save(paths["hf"], paths[kind], codec=codec, **({"graticule": "4x4"} if smoke else {}))
                print(f"  converted {paths[kind].name} in {time.perf_counter() - t0:.1f}s", flush=True)
        if name.startswith("llama") and not smoke and not paths["gguf"].exists():
            llama_gguf(paths["hf"], paths["gguf"])
        paths["vocab"] = cfg.vocab_size
        out[name] = paths
    return out


# --- the rows, each in its own process -----------------------------------------------------------
def _sphere_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from spherefmt.runtime import Session

    with Session(cfg["pkg"], backend="numpy", budget=cfg["budget"], active=cfg["active"]) as s:
        tokens = s.generate(prompt(cfg["vocab"], PROMPT), NEW, stop_at_eos=False)
        st = s.stats()
        fused = s.model.fused_ffn
    return {"tokens_per_s": st["tokens_per_s"], "tokens": tokens, "peak_device_bytes": st["peak_device_bytes"],
            "budget_bytes": st["budget_bytes"], "weight_bytes": st["weight_bytes"], "peak_rss_mib": rss_mib("VmHWM"),
            "bytes_read_per_token": st["bytes_read"] / (st["decode_tokens"] + 1), "fused_ffn": fused,
            "cache_hit_rate": st["cache_hit_rate"], "decode_bytes_per_token": st["decode_bytes_per_token"],
            "experts_loaded": st["experts_loaded"], "decode_tokens": st["decode_tokens"]}


def _llamacpp_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs under bench/.venv-llama's Python: llama_cpp and numpy only."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=cfg["gguf"], n_ctx=128, n_threads=2, n_threads_batch=2, n_batch=64,
                          verbose=False)
    vocab = llm.n_vocab()

    def last() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    llm.eval(prompt(cfg["vocab"], PROMPT))
    tokens = [last()]
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        llm.eval([tokens[-1]])
        tokens.append(last())
    dt = time.perf_counter() - t0
    return {"tokens_per_s": (NEW - 1) / dt, "tokens": tokens, "llama_cpp": llama_cpp.__version__}


def isolated(kind: str, cfg: dict[str, Any], beside_busy: bool) -> dict[str, Any]:
    """One row in its own process (``kind``: ``sphere`` or ``llamacpp``, under llama.cpp's venv)."""
    with busy(beside_busy):
        return run_worker(__file__, kind, cfg, python=LLAMA_PY if kind == "llamacpp" else None,
                          inline=_sphere_worker if kind == "sphere" else None)


def anchor(fn: str, beside_busy: bool, **kw: Any) -> dict[str, Any]:
    """A transformers / accelerate row (``bench/anchors.py``) in its own process."""
    import anchors

    with busy(beside_busy):
        return anchors.run_isolated(fn, **kw)


def _codec_decode_bps(pkg: Path) -> float:
    """Bytes/s of the package's codec chain (blosc + crc32c, what the runtime decodes) on every
    expert shard of a package, on all cores: the objects are read into memory first, then only
    decoding is timed, one shard per task, as many tasks at once as there are cores."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    from spherefmt.format.chunks import FastArray

    g = zarr.open_group(str(pkg), mode="r")
    work = []
    sphere = g["sphere"]
    if not isinstance(sphere, zarr.Group):
        raise RuntimeError(f"{pkg}: sphere is not a group")
    for k in sorted(sphere.group_keys()):
        fa = FastArray.maybe(g[f"sphere/{k}/neurons"])
        if fa is None:
            raise RuntimeError(f"{pkg}: sphere/{k}/neurons has no fast path")
        for i in range(fa.arr.shape[1]):
            for j in range(fa.arr.shape[2]):
                key = fa.key((0, i, j, 0, 0))
                blob = (pkg / key).read_bytes()
                work.append((fa, blob, key))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        raw = sum(ex.map(lambda w: w[0].decode_object(w[1], w[2]).nbytes, work))
    return raw / (time.perf_counter() - t0)


def bench(name: str, paths: dict[str, Any], quick: bool, smoke: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    vocab = paths["vocab"]
    llama = name.startswith("llama") and LLAMA_PY.exists() and not smoke
    tags = ("idle",) if smoke else ("idle", "busy")

    def add(label: str, r: dict[str, Any], **extra: Any) -> None:
        row = {"row": label, **extra, **{k: v for k, v in r.items() if k != "tokens"}, "tokens": r["tokens"][:8]}
        rows.append(row)
        print(f"  {label:<44} {r['tokens_per_s']:7.2f} tok/s", flush=True)

    for tag in tags:
        hog = tag == "busy"
        if llama:
            add(f"llama.cpp F32 ({tag})", isolated("llamacpp", {"gguf": str(paths["gguf"]), "vocab": vocab}, hog),
                engine="llama.cpp", load=tag, budget="100%", mode="dense", store="gguf")
        hf = anchor("hf_decode", hog, model_dir=str(paths["hf"]), prompt_ids=prompt(vocab, PROMPT), new_tokens=NEW)
        add(f"transformers resident ({tag})", hf, engine="transformers", load=tag, budget="100%", mode="dense",
            store="hf")
        add(f"spherefmt resident, dir, codec none ({tag})",
            isolated("sphere", {"pkg": str(paths["none"]), "vocab": vocab, "budget": None, "active": None}, hog),
            engine="spherefmt", load=tag, budget="100%", mode="dense", store="dir")
    weight_bytes = next(r["weight_bytes"] for r in rows if r["engine"] == "spherefmt")
    shares = ["100%", "25%"] if smoke else ["100%", "50%", "25%"] if quick else ["100%", "50%", "35%", "25%", "15%"]
    for store in ("dir", "vhd"):
        for share in shares:
            for active in (None,) if smoke else (None, "25%"):
                if store == "dir" and share == "100%" and active is None:
                    continue  # the resident idle row above
                pkg = paths["none" if store == "dir" else "vhd"]
                try:
                    r = isolated("sphere", {"pkg": str(pkg), "vocab": vocab, "budget": None if share == "100%" else share,
                                             "active": active}, False)
                except subprocess.CalledProcessError:
                    print(f"  {store} {share} {active}: does not run at this budget", flush=True)
                    continue
                add(f"spherefmt {share}, {'dense' if active is None else 'top-k 25%'}, {store}, codec none", r,
                    engine="spherefmt", load="idle", budget=share, mode="dense" if active is None else "top-k 25%",
                    store=store, codec="none")
    for store, key in (("dir", "default"), ("vhd", "vhd_default")):
        add(f"spherefmt 25%, dense, {store}, default codec",
            isolated("sphere", {"pkg": str(paths[key]), "vocab": vocab, "budget": "25%", "active": None}, False),
            engine="spherefmt", load="idle", budget="25%", mode="dense", store=store, codec="default")
    with tempfile.TemporaryDirectory() as off:
        acc = anchor("accelerate_offload_decode", False, model_dir=str(paths["hf"]), prompt_ids=prompt(vocab, PROMPT),
                      new_tokens=NEW, cap_bytes=weight_bytes // 4, offload_dir=off)
    add("accelerate disk offload 25%", acc, engine="accelerate", load="idle", budget="25%", mode="dense", store="hf")
    decode_bps = _codec_decode_bps(paths["default"])

    def tps(**match: Any) -> float:
        return next(r["tokens_per_s"] for r in rows if all(r.get(k) == v for k, v in match.items()))

    codec25 = next(r for r in rows if r.get("codec") == "default" and r["store"] == "dir")
    bound = decode_bps / codec25["bytes_read_per_token"]
    goals: dict[str, dict[str, Any]] = {}
    for tag in tags:
        ours = tps(engine="spherefmt", load=tag, budget="100%")
        goals[f"resident_vs_transformers_{tag}"] = {"value": ours / tps(engine="transformers", load=tag), "goal": 1.0}
        if llama:
            goals[f"resident_vs_llama_cpp_{tag}"] = {"value": ours / tps(engine="llama.cpp", load=tag), "goal": 0.9}
    goals["dense_25_vs_accelerate_25"] = {"value": tps(engine="spherefmt", budget="25%", mode="dense", store="dir",
                                                       codec="none") / acc["tokens_per_s"], "goal": 1.5}
    goals["default_codec_25_vs_decode_bound"] = {"value": codec25["tokens_per_s"] / bound, "goal": 0.8,
                                                 "decode_gb_per_s": decode_bps / 1e9, "bound_tokens_per_s": bound}
    goals["vhd_25_vs_dir_25"] = {"value": tps(engine="spherefmt", budget="25%", mode="dense", store="vhd", codec="none")
                                 / tps(engine="spherefmt", budget="25%", mode="dense", store="dir", codec="none"),
                                 "goal": 0.8}
    for g in goals.values():
        g["met"] = g["value"] >= g["goal"]
    ref = next(r["tokens"] for r in rows if r["engine"] == "transformers")
    same = {r["row"]: r["tokens"] == ref for r in rows if r["mode"] == "dense"}
    return {"model": name, "weight_bytes": weight_bytes, "rows": rows, "goals": goals,
            "dense_tokens_equal_transformers": same}


def _plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for store, mode, style in (("dir", "dense", "o-"), ("dir", "top-k 25%", "s-"), ("vhd", "dense", "o--"),
                                   ("vhd", "top-k 25%", "s--")):
            pts = sorted((float(r["budget"].rstrip("%")), r["tokens_per_s"]) for r in res["rows"]
                         if r["engine"] == "spherefmt" and r["load"] == "idle" and r.get("codec", "none") == "none"
                         and r["store"] == store and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"spherefmt {mode}, {store}")
        for r in res["rows"]:
            if r["engine"] != "spherefmt" and r["load"] == "idle":
                ax.axhline(r["tokens_per_s"], ls=":", lw=1, color={"llama.cpp": "C3", "transformers": "C4",
                                                                   "accelerate": "C5"}[r["engine"]])
                ax.annotate(r["row"].replace(" (idle)", ""), (0.5, r["tokens_per_s"]), xycoords=("axes fraction", "data"),
                            fontsize=7, va="bottom", ha="center")
        ax.set_xlabel("memory budget (% of the f32 weights)")
        ax.set_ylabel("decode tokens/s (numpy backend, 2 cores)")
        ax.set_title(f"{res['model']}: speed for memory")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="the Llama shape only, fewer budgets")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, cfg, out = args.worker
        fn = _llamacpp_worker if kind == "llamacpp" else _sphere_worker
        Path(out).write_text(json.dumps(fn(json.loads(cfg))))
        return
    root = ROOT / "bench" / "out" / "decode"
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for name, paths in _models(root, args.quick, args.smoke).items():
        print(f"{name}:", flush=True)
        results.append(bench(name, paths, args.quick, args.smoke))
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "prompt_tokens": PROMPT, "new_tokens": NEW, "llama_cpp_built": LLAMA_PY.exists(), "results": results}
    out = result_path(args, "decode")
    write_result(out, doc)
    _plot(results, out.with_name(out.stem.replace("decode", "decode-budget") + ".png"))
    for res in results:
        for k, g in res["goals"].items():
            print(f"{res['model']:<11} {k:<36} {g['value']:6.2f}  (goal >= {g['goal']})  {'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
