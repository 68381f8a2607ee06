"""Native MoE decode: a Mixtral-shaped model's experts as cells, against llama.cpp, transformers
and accelerate (issue 17).

Model (f32, random weights by ``transformers``' own init, ``save_pretrained``): Mixtral, width
1024, 8 layers, 8 experts of 2816 neurons, top-2, 16 heads (8 KV), vocabulary 512 (2.3 GB).
Every row is its own process and runs once: a 16-token prompt, then 32 greedy tokens (tokens/s
over the 31 decode steps). Rows:

- llama.cpp (``bench/.venv-llama``, ``make bench-deps``) on an F32 GGUF written from the folder
  with ``gguf``'s writer as ``convert_hf_to_gguf.py`` writes Mixtral (stacked ``ffn_*_exps``,
  ``ffn_gate_inp``, the Q/K permutation);
- transformers resident, and accelerate disk offload with a cap of 25% of the weights;
- spherefmt (numpy backend) resident, 50% and 25% budgets, directory and ``.vhd``, codec none, and
  25% from a directory with the default codec;
- the same weights saved in bfloat16: transformers (computing in float32, its reference for the
  checkpoint) and spherefmt resident and at 25% (of the float32 weights), each row's greedy tokens
  compared with that reference.

The router's minimum bytes per token: the picked experts' bytes (top-2 of every layer) plus the
always-on part (attention, norms, router, final norm, LM head), in float32; a run under a budget
reads at most that per decode token when it keeps nothing, less when it keeps hot experts.
Results: ``bench/results/moe_native.json``.

    .venv/bin/python bench/bench_moe_native.py
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_decode as bd  # noqa: E402 - the decode rows' workers are shared
from common import LLAMA_PY, llama_gguf, parser, prompt, result_path, write_result  # noqa: E402

SHAPE: dict[str, Any] = {"hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 2816, "num_local_experts": 8,
         "num_experts_per_tok": 2, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 512,
         "max_position_embeddings": 2048, "tie_word_embeddings": False}


#: ``--smoke``: every row at a tiny size (seconds)
SMOKE = dict(SHAPE, hidden_size=64, num_hidden_layers=4, intermediate_size=256, num_local_experts=8,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)


def _model(root: Path, quick: bool, smoke: bool = False) -> dict[str, Any]:
    import time

    import torch
    import transformers

    import spherefmt

    shape = SMOKE if smoke else dict(SHAPE, num_hidden_layers=2) if quick else SHAPE
    d = root / ("mixtral-smoke" if smoke else "mixtral-quick" if quick else "mixtral")
    paths: dict[str, Any] = {"hf": d / "hf", "none": d / "none.sphere", "vhd": d / "none.vhd",
                             "default": d / "default.sphere", "gguf": d / "f32.gguf", "vocab": shape["vocab_size"]}
    if not (paths["hf"] / "config.json").exists():
        print("making the model ...", flush=True)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**shape)).eval().save_pretrained(
            paths["hf"])
    paths["hf_bf16"], paths["bf16"] = d / "hf-bf16", d / "bf16.sphere"
    if not (paths["hf_bf16"] / "config.json").exists():  # the same weights, rounded to bfloat16
        transformers.AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.bfloat16).save_pretrained(
            paths["hf_bf16"])
    for kind, codec in (("none", "none"), ("vhd", "none"), ("default", "default")):
        if not paths[kind].exists():
            t0 = time.perf_counter()
            spherefmt.save(paths["hf"], paths[kind], codec=codec)
            print(f"  converted {paths[kind].name} in {time.perf_counter() - t0:.1f}s", flush=True)
    if not paths["bf16"].exists():
        spherefmt.save(paths["hf_bf16"], paths["bf16"], codec="none")
    if LLAMA_PY.exists() and not smoke and not paths["gguf"].exists():
        llama_gguf(paths["hf"], paths["gguf"])
    return paths


def _router_minimum(pkg: Path) -> tuple[int, int]:
    """(bytes per decode token the router needs at the least, f32 weight bytes of the package)."""
    from spherefmt.runtime import Session

    with Session(pkg, backend="numpy", budget=None) as s:
        m = s.model
        _, k, _ = m.spec.moe
        always = sum(m.loader.nbytes(key) for key in m.all_blocks() if key[0] not in ("cell", "vocab"))
        always += sum(m.loader.nbytes(("vocab", "head", b)) for b in range(m.loader.table_blocks("head")))
        always += m.loader.nbytes(("vocab", m.embed_table, 0))  # one embedding row's block
        expert = max(m.loader.nbytes(("cell", 0, *c)) for c in m.loader.cells(0))
        return always + k * m.n_layers * expert, s.weight_bytes


def bench(paths: dict[str, Any], smoke: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    vocab = paths["vocab"]
    ids = prompt(vocab, bd.PROMPT)
    llama = LLAMA_PY.exists() and not smoke

    def add(label: str, r: dict[str, Any], **extra: Any) -> None:
        extra.setdefault("dtype", "F32")
        rows.append({"row": label, **extra, **{k: v for k, v in r.items() if k != "tokens"}, "tokens": r["tokens"]})
        print(f"  {label:<44} {r['tokens_per_s']:7.2f} tok/s", flush=True)

    minimum, weight_bytes = _router_minimum(paths["none"])
    if llama:
        add("llama.cpp F32", bd.isolated("llamacpp", {"gguf": str(paths["gguf"]), "vocab": vocab}, False),
            engine="llama.cpp", budget="100%", store="gguf")
    add("transformers resident", bd.anchor("hf_decode", False, model_dir=str(paths["hf"]), prompt_ids=ids,
                                            new_tokens=bd.NEW), engine="transformers", budget="100%", store="hf")
    with tempfile.TemporaryDirectory() as off:
        add("accelerate disk offload 25%",
            bd.anchor("accelerate_offload_decode", False, model_dir=str(paths["hf"]), prompt_ids=ids,
                       new_tokens=bd.NEW, cap_bytes=weight_bytes // 4, offload_dir=off),
            engine="accelerate", budget="25%", store="hf")
    for store, key in (("dir", "none"), ("vhd", "vhd")):
        for share in ("100%", "25%") if smoke else ("100%", "50%", "25%"):
            r = bd.isolated("sphere", {"pkg": str(paths[key]), "vocab": vocab,
                                        "budget": None if share == "100%" else share, "active": None}, False)
            add(f"spherefmt {share}, {store}, codec none", r, engine="spherefmt", budget=share, store=store,
                codec="none")
    r = bd.isolated("sphere", {"pkg": str(paths["default"]), "vocab": vocab, "budget": "25%", "active": None}, False)
    add("spherefmt 25%, dir, default codec", r, engine="spherefmt", budget="25%", store="dir", codec="default")
    # bfloat16: the checkpoint in bf16, computed in float32 by both (transformers' reference for it)
    add("transformers resident, bf16 checkpoint", bd.anchor("hf_decode", False, model_dir=str(paths["hf_bf16"]),
                                                             prompt_ids=ids, new_tokens=bd.NEW),
        engine="transformers", budget="100%", store="hf", dtype="BF16")
    for share in ("100%",) if smoke else ("100%", "25%"):
        r = bd.isolated("sphere", {"pkg": str(paths["bf16"]), "vocab": vocab,
                                    "budget": None if share == "100%" else share, "active": None}, False)
        add(f"spherefmt {share}, dir, bf16 checkpoint", r, engine="spherefmt", budget=share, store="dir",
            codec="none", dtype="BF16")

    def row(**match: Any) -> dict[str, Any]:
        return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))

    ours25 = row(engine="spherefmt", budget="25%", store="dir", codec="none", dtype="F32")
    goals = {
        "resident_vs_transformers": {"value": row(engine="spherefmt", budget="100%", store="dir", dtype="F32")["tokens_per_s"]
                                     / row(engine="transformers", dtype="F32")["tokens_per_s"], "goal": 1.0},
        "budget_25_vs_accelerate_25": {"value": ours25["tokens_per_s"] / row(engine="accelerate")["tokens_per_s"],
                                       "goal": 2.0},
        "bytes_per_token_25_vs_router_minimum": {"value": ours25["decode_bytes_per_token"] / minimum, "goal": 1.3,
                                                 "at_most": True, "router_minimum_bytes": minimum},
    }
    if llama:
        goals["resident_vs_llama_cpp"] = {"value": row(engine="spherefmt", budget="100%", store="dir", dtype="F32")["tokens_per_s"]
                                          / row(engine="llama.cpp")["tokens_per_s"], "goal": None}
    for g in goals.values():
        g["met"] = None if g["goal"] is None else (g["value"] <= g["goal"] if g.get("at_most") else g["value"] >= g["goal"])
    refs = {dt: row(engine="transformers", dtype=dt)["tokens"] for dt in ("F32", "BF16")}
    same = {r["row"]: r["tokens"] == refs[r["dtype"]] for r in rows}
    for r in rows:
        r["tokens"] = r["tokens"][:8]
    return {"model": "mixtral", "shape": SMOKE if smoke else SHAPE, "weight_bytes": weight_bytes, "rows": rows, "goals": goals,
            "same_tokens_as_transformers": same}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 8 (results to bench/out/)")
    args = ap.parse_args()
    paths = _model(ROOT / "bench" / "out" / "moe_native", args.quick, args.smoke)
    res = bench(paths, args.smoke)
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "prompt_tokens": bd.PROMPT, "new_tokens": bd.NEW, "llama_cpp_built": LLAMA_PY.exists(), **res}
    write_result(result_path(args, "moe_native"), doc)
    for k, g in res["goals"].items():
        print(f"{k:<40} {g['value']:6.2f}  (goal {'<=' if g.get('at_most') else '>='} {g['goal']})  "
              f"{'met' if g['met'] else 'NOT met' if g['met'] is False else ''}")
    print("same greedy tokens as transformers:", all(res["same_tokens_as_transformers"].values()))


if __name__ == "__main__":
    main()
