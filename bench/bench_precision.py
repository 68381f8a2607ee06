"""Bytes per token by stored precision: float32, bfloat16, float16, Q8_0 and Q4_K packages of one
model, resident and under the same absolute budget (issue 18).

Model: the Llama shape of ``bench_decode.py`` (width 1024, 12 layers, FFN 2816, 16 heads,
vocabulary 512, 155M parameters), random weights by ``transformers``' own init, saved as float32
and cast to bfloat16 and float16 with ``torch`` before ``save_pretrained``, and the float32 one
converted with ``quantize="q8_0"`` and ``quantize="q4_k"``; packages with codec none in a directory.  Every row is its own process and runs once on the numpy backend: a
16-token prompt, then 32 greedy tokens; tokens/s counts the 31 decode steps.  Rows per precision:

- resident (no budget);
- dense at a budget of 25% of the *float32* weights in bytes (the same bytes for every
  precision), with the weights held as stored (``weights="stored"``: a bfloat16 package holds
  half of its weights there, a float32 one a quarter) and as the default holds them on a CPU
  (``"auto"``: widened to float32 when loaded);
- top-k 25% of the cells (centroid router) at that budget, both ways.

Bytes read (from storage) and uploaded (to the backend) are per token through the model
(prompt included: ``stats()["bytes_read"] / stats()["tokens"]``).  Perplexity: the project's
small trained GPT-2 (``spherefmt/data/tiny-gpt2``, stored float16) as float32 (the same values),
bfloat16, Q8_0 and Q4_K, on its held-out text.  llama.cpp (``make bench-deps``) decodes the GGUFs
spherefmt exports from the float32, Q8_0 and Q4_K packages.  Results: ``bench/results/precision.json``.

    .venv/bin/python bench/bench_precision.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import LLAMA_PY, parser, result_path, run_worker, write_result  # noqa: E402

PROMPT, NEW = 16, 32
PRECISIONS = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "q8_0": "float32", "q4_k": "float32"}
QUANTIZED = ("q8_0", "q4_k")


def _models(root: Path, name: str = "llama155m", tags: tuple[str, ...] = tuple(PRECISIONS), smoke: bool = False
            ) -> dict[str, Path]:
    """The packages of one model, made once under ``root``: ``llama155m`` or ``gpt2-small``
    (transformers' GPT-2 config: width 768, 12 layers, vocabulary cut to 512 like the Llama's);
    ``smoke``: the same kinds at width 256 (one Q4_K block), 2 layers."""
    import torch
    import transformers

    import spherefmt

    cfg: Any
    if name == "llama155m":
        cfg = transformers.LlamaConfig(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816,
                                       num_attention_heads=16, num_key_value_heads=16, vocab_size=512,
                                       max_position_embeddings=2048, tie_word_embeddings=False)
        if smoke:
            cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, intermediate_size=2048,
                                           num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                           max_position_embeddings=128, tie_word_embeddings=False)
    else:
        cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=512, n_positions=1024)
        if smoke:
            cfg = transformers.GPT2Config(n_embd=256, n_layer=2, n_head=4, n_inner=2048, vocab_size=512, n_positions=128)
    out = {}
    model = None
    prefix = "" if name == "llama155m" else f"{name}-"
    for tag in tags:
        dtype = PRECISIONS[tag]
        hf, pkg = root / f"{prefix}hf-{'f32' if tag in QUANTIZED else tag}", root / f"{prefix}{tag}.sphere"
        if not (hf / "config.json").exists():
            if model is None:
                print(f"making {name} ...", flush=True)
                torch.manual_seed(0)
                model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
            model.to(getattr(torch, dtype)).save_pretrained(hf)
        if not pkg.exists():
            t0 = time.perf_counter()
            spherefmt.save(hf, pkg, codec="none", quantize=tag if tag in QUANTIZED else None,
                           **({"graticule": "4x4"} if smoke else {}))  # room for a 25% budget
            print(f"  converted {pkg.name} in {time.perf_counter() - t0:.1f}s", flush=True)
        out[tag] = pkg
    return out


def _prompt() -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(0, 512, PROMPT)]


def _decode_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from spherefmt.runtime import Session

    with Session(cfg["pkg"], backend="numpy", budget=cfg["budget"], active=cfg["active"], weights=cfg["weights"]) as s:
        tokens = s.generate(_prompt(), NEW, stop_at_eos=False)
        st = s.stats()
        last = s.logits(_prompt())[-1].tolist() if cfg["budget"] is None else None
    n = st["tokens"]
    return {"tokens_per_s": st["tokens_per_s"], "tokens": tokens[:8], "weight_formats": st["weight_formats"],
            "stored_bytes": st["stored_bytes"], "weight_bytes": st["weight_bytes"], "budget_bytes": st["budget_bytes"],
            "peak_device_bytes": st["peak_device_bytes"], "bytes_read_per_token": st["bytes_read"] / n,
            "bytes_uploaded_per_token": st["bytes_uploaded"] / n, "decode_bytes_per_token": st["decode_bytes_per_token"],
            "cache_hit_rate": st["cache_hit_rate"], "tokens_through": n, "prompt_logits": last}


def _llamacpp_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs under bench/.venv-llama's Python (llama_cpp and numpy only)."""
    import llama_cpp

    # ggml's extra CPU buffer types (AMX and repacked weights) crash this build on this CPU at
    # the first Q8_0 product (a GGUF from llama.cpp's own quantizer too): the plain CPU buffers
    _default = llama_cpp.llama_model_default_params

    def _params() -> Any:
        p = _default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = _params
    llama_cpp.llama.llama_cpp.llama_model_default_params = _params
    llm = llama_cpp.Llama(model_path=cfg["gguf"], n_ctx=128, n_threads=2, n_threads_batch=2, n_batch=64, verbose=False)
    vocab = llm.n_vocab()

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).copy()

    llm.eval(_prompt())
    first = logits()
    tokens = [int(np.argmax(first))]
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        llm.eval([tokens[-1]])
        tokens.append(int(np.argmax(logits())))
    dt = time.perf_counter() - t0
    return {"tokens_per_s": (NEW - 1) / dt, "tokens": tokens[:8], "prompt_logits": first.tolist(),
            "llama_cpp": llama_cpp.__version__}


def _llamacpp_quantize_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs under bench/.venv-llama's Python: llama.cpp's own quantizer (``llama_model_quantize``,
    no importance matrix: ``quantize_row_q4_K_ref``) from an F32 GGUF to ``Q4_K_S``."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 14  # LLAMA_FTYPE_MOSTLY_Q4_K_S
    rc = llama_cpp.llama_model_quantize(cfg["src"].encode(), cfg["dst"].encode(), ctypes.byref(params))
    return {"rc": int(rc)}


def _q4_k_against_llama_cpp(root: Path, f32_gguf: Path) -> dict[str, Any]:
    """spherefmt's ``Q4_K`` quantizer against llama.cpp's on every tensor llama.cpp writes as
    ``Q4_K`` from the same float32 rows: the share of byte-identical blocks and each one's
    relative RMS error against the float32 values."""
    import gguf

    from spherefmt.format.quant import quantize_q4_k

    out = root / "f32-llamacpp-q4_k_s.gguf"
    if not out.exists():
        _isolated("llamacpp_quantize", {"src": str(f32_gguf), "dst": str(out)})
    src = {t.name: t for t in gguf.GGUFReader(f32_gguf).tensors}
    same = total = 0
    err_ours = err_theirs = norm = 0.0
    tensors = 0
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_K:
            continue
        x = np.asarray(src[t.name].data, dtype=np.float32).reshape(-1, 256)
        theirs = np.asarray(t.data).reshape(-1, 144)
        ours = quantize_q4_k(x).view(np.uint8).reshape(-1, 144)
        same += int((ours == theirs).all(axis=1).sum())
        total += len(ours)
        qt = gguf.GGMLQuantizationType.Q4_K
        err_ours += float(np.square(gguf.quants.dequantize(ours, qt).reshape(x.shape) - x, dtype=np.float64).sum())
        err_theirs += float(np.square(gguf.quants.dequantize(theirs, qt).reshape(x.shape) - x, dtype=np.float64).sum())
        norm += float(np.square(x, dtype=np.float64).sum())
        tensors += 1
    return {"tensors": tensors, "blocks": total, "identical_blocks": same / max(1, total),
            "rel_rms_ours": (err_ours / norm) ** 0.5, "rel_rms_llama_cpp": (err_theirs / norm) ** 0.5}


def _ppl_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from spherefmt.runtime import Session

    with Session(cfg["pkg"], backend="numpy") as s:
        ids = s.encode(Path(cfg["text"]).read_text(encoding="utf-8"))[: cfg["tokens"]]
        nll, n = s.nll(ids)
        formats = s.stats()["weight_formats"]
    return {"perplexity": float(np.exp(nll / n)), "tokens": n, "weight_formats": formats}


def _isolated(kind: str, cfg: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    # OpenMP's default wait policy for every row: llama.cpp and numba's kernels both run on
    # OpenMP threads, and OMP_WAIT_POLICY=PASSIVE (which the transformers benchmarks set for
    # torch) costs each about 40% here
    return run_worker(__file__, kind, cfg, python=LLAMA_PY if kind.startswith("llamacpp") else None, env=env,
                      passive=False, inline={"ppl": _ppl_worker, "decode": _decode_worker}.get(kind))


def _tiny(root: Path) -> dict[str, Path]:
    """The small trained GPT-2 as float32 (its float16 values widened) and as bfloat16."""
    import shutil

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    import spherefmt

    src = ROOT / "spherefmt" / "data" / "tiny-gpt2"
    out = {}
    for tag, dt in (("f32", np.float32), ("bf16", ml_dtypes.bfloat16), ("q8_0", np.float32), ("q4_k", np.float32)):
        folder, pkg = root / f"tiny-{'f32' if tag in QUANTIZED else tag}", root / f"tiny-{tag}.sphere"
        if not pkg.exists():
            shutil.copytree(src, folder, dirs_exist_ok=True)
            sd = load_file(src / "model.safetensors")
            save_file({k: v.astype(np.float32).astype(dt) for k, v in sd.items()}, folder / "model.safetensors",
                      metadata={"format": "pt"})
            spherefmt.save(folder, pkg, codec="none", quantize=tag if tag in QUANTIZED else None)
        out[tag] = pkg
    return out


def _decode_rows(model: str, pkgs: dict[str, Path], modes: tuple[tuple[str, str | None, str], ...]) -> list[dict[str, Any]]:
    """Every (precision, mode) row of one model; the quantized ones also with the compiled block
    kernels switched off (``SPHEREFMT_QKERNELS=0``: numpy widens each piece before BLAS), side by side."""
    rows: list[dict[str, Any]] = []
    f32_bytes: int | None = None
    for tag, pkg in pkgs.items():
        for mode, active, weights in modes:
            if tag == "f32" and weights == "stored":
                continue  # float32 is held as stored either way
            budget = None
            if mode != "resident":
                if f32_bytes is None:
                    raise RuntimeError("the float32 package runs first")
                budget = f32_bytes // 4
            variants = [True, False] if tag in QUANTIZED and weights == "stored" else [True]
            for kernels in variants:
                r = _isolated("decode", {"pkg": str(pkg), "budget": budget, "active": active, "weights": weights},
                              None if kernels else {"SPHEREFMT_QKERNELS": "0"})
                if tag == "f32" and mode == "resident":
                    f32_bytes = r["stored_bytes"]
                label = f"{tag} {mode}" + ("" if budget is None else ", 25% of f32 bytes") \
                    + f", weights {weights}" + ("" if kernels else ", no block kernels")
                rows.append({"model": model, "row": label, "precision": tag, "mode": mode, "weights": weights,
                             "kernels": kernels, **r})
                print(f"  {model} {label:<52} {r['tokens_per_s']:7.2f} tok/s  read "
                      f"{r['bytes_read_per_token'] / 2**20:7.1f} MiB/token  uploaded "
                      f"{r['bytes_uploaded_per_token'] / 2**20:7.1f}  held {'+'.join(r['weight_formats'])}", flush=True)
    return rows


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, cfg, out = args.worker
        fn = {"ppl": _ppl_worker, "llamacpp": _llamacpp_worker,
              "llamacpp_quantize": _llamacpp_quantize_worker}.get(kind, _decode_worker)
        Path(out).write_text(json.dumps(fn(json.loads(cfg))))
        return
    smoke = args.smoke
    root = ROOT / "bench" / "out" / ("precision-smoke" if smoke else "precision")
    root.mkdir(parents=True, exist_ok=True)
    pkgs = _models(root, smoke=smoke)
    rows: list[dict[str, Any]] = []
    modes = (("resident", None, "auto"), ("resident", None, "stored"), ("dense", None, "auto"),
             ("dense", None, "stored"), ("top-k 25%", "25%", "auto"), ("top-k 25%", "25%", "stored"))
    rows += _decode_rows("llama155m", pkgs, modes[:4] if smoke else modes)
    # GPT-2 small: float32, bfloat16 and both quantized types, held as stored
    gpt2 = _models(root, "gpt2-small", ("f32", "bf16", "q8_0", "q4_k"), smoke)
    rows += _decode_rows("gpt2-small", gpt2, (("resident", None, "auto"), ("resident", None, "stored"),
                                               ("dense", None, "auto"), ("dense", None, "stored")))
    f32_bytes = next(r["stored_bytes"] for r in rows if r["precision"] == "f32" and r["mode"] == "resident")

    def row(tag: str, mode: str, weights: str = "auto", model: str = "llama155m", kernels: bool = True) -> dict[str, Any]:
        return next(r for r in rows if r["precision"] == tag and r["mode"] == mode and r["weights"] == weights
                    and r["model"] == model and r.get("kernels", True) == kernels)

    llama: dict[str, dict[str, Any]] = {}
    llama_cpp = LLAMA_PY.exists() and not smoke
    if llama_cpp:  # llama.cpp on the GGUFs spherefmt exports from the same packages
        import spherefmt

        for tag in ("f32", "q8_0", "q4_k"):
            gg = root / f"{tag}.gguf"
            if not gg.exists():
                spherefmt.export(pkgs[tag], gg)
            r = _isolated("llamacpp", {"gguf": str(gg)})
            llama[tag] = r
            ours = row(tag, "resident")
            r["max_logit_diff_vs_spherefmt"] = float(np.abs(np.array(r["prompt_logits"]) - np.array(ours["prompt_logits"])).max())
            r["same_tokens_as_spherefmt"] = r["tokens"] == ours["tokens"]
            rows.append({"model": "llama155m", "row": f"llama.cpp {tag} (GGUF exported by spherefmt)", "precision": tag,
                         "mode": "llama.cpp", "weights": "stored", **{k: v for k, v in r.items() if k != "prompt_logits"}})
            print(f"  llama.cpp {tag:<29} {r['tokens_per_s']:7.2f} tok/s  max |logit diff| vs spherefmt "
                  f"{r['max_logit_diff_vs_spherefmt']:.2e}  same tokens {r['same_tokens_as_spherefmt']}", flush=True)
    q4_k_vs_llama_cpp = None
    if llama_cpp:
        q4_k_vs_llama_cpp = _q4_k_against_llama_cpp(root, root / "f32.gguf")
        print(f"  Q4_K quantizer vs llama.cpp's: {q4_k_vs_llama_cpp}", flush=True)
    for r in rows:
        r.pop("prompt_logits", None)
    heldout = ROOT / "spherefmt" / "data" / "tiny-gpt2" / "heldout.txt"
    ppl = {tag: _isolated("ppl", {"pkg": str(p), "text": str(heldout), "tokens": 256 if smoke else 4096})
           for tag, p in _tiny(root).items()}
    for tag, r in ppl.items():
        print(f"  tiny-gpt2 {tag}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens", flush=True)

    goals: dict[str, dict[str, Any]] = {}
    for tag in ("bf16", "f16", "q8_0", "q4_k"):
        r = row(tag, "dense", "stored")
        goals[f"{tag}_25_stored_uploaded_vs_read"] = {"value": r["bytes_uploaded_per_token"] / r["bytes_read_per_token"],
                                                      "goal": 1.05, "at_most": True}
        goals[f"{tag}_25_bytes_read_vs_f32"] = {"value": r["bytes_read_per_token"] / row("f32", "dense")["bytes_read_per_token"],
                                                "goal": None}
        goals[f"{tag}_25_stored_tokens_per_s_vs_f32"] = {
            "value": r["tokens_per_s"] / row("f32", "dense")["tokens_per_s"], "goal": None}
        goals[f"{tag}_25_auto_tokens_per_s_vs_f32"] = {
            "value": row(tag, "dense")["tokens_per_s"] / row("f32", "dense")["tokens_per_s"], "goal": None}
    goals["bf16_perplexity_change"] = {"value": ppl["bf16"]["perplexity"] / ppl["f32"]["perplexity"] - 1, "goal": None}
    q8, f32 = row("q8_0", "dense", "stored"), row("f32", "dense")
    goals["q8_0_25_bytes_read_vs_f32"] = {"value": q8["bytes_read_per_token"] / f32["bytes_read_per_token"],
                                          "goal": 0.3, "at_most": True}
    goals["q8_0_25_bytes_uploaded_vs_f32"] = {"value": q8["bytes_uploaded_per_token"] / f32["bytes_uploaded_per_token"],
                                              "goal": 0.3, "at_most": True}
    goals["q8_0_25_stored_tokens_per_s_vs_f32"] = {"value": q8["tokens_per_s"] / f32["tokens_per_s"], "goal": 2.0}
    goals["q8_0_resident_tokens_per_s_vs_f32"] = {
        "value": row("q8_0", "resident")["tokens_per_s"] / row("f32", "resident")["tokens_per_s"], "goal": None}
    if llama:
        goals["q8_0_resident_vs_llama_cpp_q8_0"] = {
            "value": row("q8_0", "resident")["tokens_per_s"] / llama["q8_0"]["tokens_per_s"], "goal": 0.8}
        goals["f32_llama_cpp_max_logit_diff"] = {"value": llama["f32"]["max_logit_diff_vs_spherefmt"], "goal": 1e-3,
                                                 "at_most": True}
    goals["q8_0_perplexity_change"] = {"value": ppl["q8_0"]["perplexity"] / ppl["f32"]["perplexity"] - 1,
                                       "goal": 0.005, "at_most": True}
    q4 = row("q4_k", "dense", "stored")
    goals["q4_k_25_bytes_read_vs_f32"] = {"value": q4["bytes_read_per_token"] / f32["bytes_read_per_token"],
                                          "goal": 0.17, "at_most": True}
    goals["q4_k_25_bytes_uploaded_vs_f32"] = {"value": q4["bytes_uploaded_per_token"] / f32["bytes_uploaded_per_token"],
                                              "goal": 0.17, "at_most": True}
    goals["q4_k_stored_vs_f32_bytes"] = {"value": q4["stored_bytes"] / f32["stored_bytes"], "goal": None}
    goals["q4_k_resident_tokens_per_s_vs_f32"] = {
        "value": row("q4_k", "resident")["tokens_per_s"] / row("f32", "resident")["tokens_per_s"], "goal": None}
    if llama:
        goals["q4_k_resident_vs_llama_cpp_q4_k"] = {
            "value": row("q4_k", "resident")["tokens_per_s"] / llama["q4_k"]["tokens_per_s"], "goal": None}
    goals["q4_k_perplexity_change"] = {"value": ppl["q4_k"]["perplexity"] / ppl["f32"]["perplexity"] - 1,
                                       "goal": 0.03, "at_most": True}
    for tag in QUANTIZED:  # the same rows with the block kernels off: what they are worth
        for mode, weights in (("resident", "stored"), ("dense", "stored")):
            goals[f"{tag}_{mode}_stored_kernels_vs_widening"] = {
                "value": row(tag, mode, weights)["tokens_per_s"] / row(tag, mode, weights, kernels=False)["tokens_per_s"],
                "goal": None}
        g2, g2_f32 = row(tag, "dense", "stored", model="gpt2-small"), row("f32", "dense", model="gpt2-small")
        goals[f"gpt2_{tag}_25_bytes_read_vs_f32"] = {"value": g2["bytes_read_per_token"] / g2_f32["bytes_read_per_token"],
                                                     "goal": 0.3 if tag == "q8_0" else 0.17, "at_most": True}
        goals[f"gpt2_{tag}_25_stored_tokens_per_s_vs_f32"] = {"value": g2["tokens_per_s"] / g2_f32["tokens_per_s"],
                                                              "goal": 2.0 if tag == "q8_0" else None}
    for g in goals.values():
        g["met"] = None if g["goal"] is None else (g["value"] <= g["goal"] if g.get("at_most") else g["value"] >= g["goal"])
    # a budget changes no token of its own precision's resident run
    same = {f"{r['model']} {r['row']}": r["tokens"] == row(r["precision"], "resident", model=r["model"])["tokens"]
            for r in rows if r["mode"] == "dense"}
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "models": ["llama155m", "gpt2-small"], "prompt_tokens": PROMPT, "new_tokens": NEW, "f32_weight_bytes": f32_bytes,
           "rows": rows, "perplexity": ppl, "goals": goals, "q4_k_quantizer_vs_llama_cpp": q4_k_vs_llama_cpp, "budget_tokens_equal_resident": same}
    write_result(result_path(args, "precision"), doc)
    for k, g in goals.items():
        print(f"{k:<36} {g['value']:7.3f}  {'' if g['met'] is None else ('met' if g['met'] else 'NOT met')}")


if __name__ == "__main__":
    main()
