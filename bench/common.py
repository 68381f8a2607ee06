"""What every benchmark shares: its command line (``--smoke``, ``--out``), where results go, the
``/proc`` readers, the record of the machine, worker processes and a busy neighbour.

Every ``bench/bench_*.py`` builds its parser with :func:`parser` and writes with
:func:`write_result`.  ``--smoke`` runs the benchmark at a tiny size in seconds (tiny models, no
llama.cpp, no timings worth reading) so that ``tests/test_bench.py`` runs every script and checks
that its JSON still has the fields the README's tables read; a smoke run writes to
``bench/out/<name>-smoke.json`` unless ``--out`` says otherwise, never over ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: llama-cpp-python, built by ``make bench-deps``
LLAMA_PY = HERE / ".venv-llama" / "bin" / "python"

__all__ = ["HERE", "REPO", "LLAMA_PY", "INLINE", "parser", "result_path", "write_result", "status_kib", "rss_mib", "loadavg",
           "git_state", "machine", "busy", "run_worker", "prompt", "llama_gguf"]


#: True once ``--smoke`` is parsed: workers run in this process (a fresh interpreter per row costs
#: seconds of imports; a smoke run's figures are not read, its code paths are the same)
INLINE = False


class _Parser(argparse.ArgumentParser):
    def parse_args(self, *args: Any, **kwargs: Any) -> Any:
        global INLINE
        ns = super().parse_args(*args, **kwargs)
        INLINE = bool(getattr(ns, "smoke", False))
        return ns


# --- the command line ----------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: ``--smoke`` and ``--out``."""
    ap = _Parser(description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny size in seconds (the test suite's run; results to bench/out/, not bench/results/)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    return ap


def result_path(args: argparse.Namespace, name: str) -> Path:
    """``--out``, else ``bench/out/<name>-smoke.json`` for a smoke run (or ``--quick``), else
    ``bench/results/<name>.json``."""
    if args.out is not None:
        return Path(args.out)
    if args.smoke or getattr(args, "quick", False):
        return HERE / "out" / f"{name}-smoke.json"
    return HERE / "results" / f"{name}.json"


def write_result(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --- /proc readers and the machine ---------------------------------------------------------------
def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM`` peak, ``VmRSS`` current), or ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib(field: str) -> float:
    """:func:`status_kib` in MiB; raises where ``/proc`` has no such field (Linux only)."""
    kib = status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return kib / 1024


def loadavg() -> str | None:
    """``/proc/loadavg``: other work on the machine during the run makes timings noisy."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def git_state() -> dict[str, Any] | None:
    """The commit measured (spherefmt is installed editable from this checkout) and local edits."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "spherefmt", "backends", "runtime"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head.stdout.strip(), "spherefmt_uncommitted_changes": bool(dirty.stdout.strip())}


def machine() -> dict[str, Any]:
    """CPU, memory, versions, thread settings, load and commit: what a figure depends on."""
    import ml_dtypes
    import numpy
    import safetensors
    import zarr

    import spherefmt

    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "sched_cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu, "mem_gib": mem,
        "platform": platform.platform(), "python": platform.python_version(),
        "spherefmt": spherefmt.__version__, "zarr": zarr.__version__, "numpy": numpy.__version__,
        "torch": None if torch is None else torch.__version__, "safetensors": safetensors.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
                        if k in os.environ},
        "loadavg_at_start": loadavg(),
        "git": git_state(),
    }


# --- processes -----------------------------------------------------------------------------------
@contextmanager
def busy(on: bool = True) -> Iterator[None]:
    """Run the block beside one busy process (``while True: pass``), as on a shared machine."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        if hog is not None:
            time.sleep(0.5)
        yield
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def run_worker(script: str | Path, kind: str, cfg: dict[str, Any], *, python: str | Path | None = None,
               env: dict[str, str] | None = None, passive: bool = True,
               inline: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``script --worker KIND CFG_JSON OUT_JSON`` in its own process (its own peak memory,
    no state shared with the parent) and return the JSON it wrote to ``OUT_JSON``.  ``passive``:
    ``OMP_WAIT_POLICY=PASSIVE`` (torch's threads sleep instead of spinning between products).
    In a smoke run (:data:`INLINE`) the worker function ``inline``, when given, runs here instead
    (not for another Python, nor with environment changes that act at import)."""
    if INLINE and inline is not None and python is None and not env:
        return json.loads(json.dumps(inline(cfg)))  # as JSON would give it back
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        subprocess.run([str(python or sys.executable), str(script), "--worker", kind, json.dumps(cfg), out.name],
                       check=True, env={**os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}),
                                        **(env or {})})
        with open(out.name) as f:
            return json.load(f)


# --- models --------------------------------------------------------------------------------------
def prompt(vocab: int, n: int = 16) -> list[int]:
    """The benchmarks' prompt: ``n`` token ids drawn with seed 0 below ``vocab``."""
    return [int(i) for i in np.random.default_rng(0).integers(0, vocab, n)]


def llama_gguf(hf: Path, out: Path) -> None:
    """An F32 GGUF of a Hugging Face Llama folder: llama.cpp's names, and Q/K rows permuted as
    ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) permutes them for llama.cpp's RoPE."""
    import gguf
    from safetensors.numpy import load_file

    from spherefmt.interop.llamacpp import HF_LAYER, HF_TOP, permute  # llama.cpp's names, the library's table

    cfg = json.loads((hf / "config.json").read_text())
    sd: dict[str, np.ndarray] = {}
    for f in sorted(hf.glob("*.safetensors")):
        sd.update(load_file(f))
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    per = {k: v for k, v in HF_LAYER.items() if not k.startswith("block_sparse_moe")}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(d // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    experts = cfg.get("num_local_experts")
    if experts:  # Mixtral: llama.cpp's stacked expert tensors and the router, as convert_hf_to_gguf.py writes
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        for layer in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{layer}.block_sparse_moe."
            for hf_name, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                sd[f"{pre}{gg}"] = np.stack([sd.pop(f"{pre}experts.{e}.{hf_name}.weight") for e in range(experts)])
        per.update({f"block_sparse_moe.{g}": g for g in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")})
        per["block_sparse_moe.gate.weight"] = "ffn_gate_inp.weight"
    w.add_file_type(0)  # all F32
    vocab = cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    for name, v in sd.items():
        if name in HF_TOP:
            w.add_tensor(HF_TOP[name], np.ascontiguousarray(v, dtype=np.float32))
            continue
        blk, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        if rest == "self_attn.q_proj.weight":
            v = permute(v, heads)
        elif rest == "self_attn.k_proj.weight":
            v = permute(v, kv)
        w.add_tensor(f"blk.{blk}.{per[rest]}" + (".weight" if rest.endswith("_exps") else ""),
                     np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
