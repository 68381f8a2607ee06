"""Reference decode speeds ("anchors") of Hugging Face ``transformers`` on CPU.

Two anchors, on a local Hugging Face folder (``config.json`` + ``model.safetensors``):

* :func:`hf_decode` - the whole model resident in RAM (f32).
* :func:`accelerate_offload_decode` - ``device_map="auto"`` with at most ``cap_bytes`` of weights
  in RAM; accelerate puts the rest on ``"disk"`` and reloads those weights on every forward pass.

Both greedy-decode with the KV cache in a hand-written loop, so that only the token steps are
timed: the prompt's forward pass (prefill) produces the first new token and is not timed; the
remaining ``new_tokens - 1`` single-token steps are, and ``tokens_per_s`` is their rate.

Peak RSS is per run only when each run has its own process, so call them through
:func:`run_isolated`.  It reports ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: on Linux
``ru_maxrss`` survives ``execve``, so a child started by a big parent inherits the parent's peak.

Usage (from the repository root)::

    .venv/bin/python bench/anchors.py              # tiny GPT-2 smoke test, seconds
    .venv/bin/python bench/anchors.py --gpt2-small # GPT-2 small shape in /tmp/anchor-gpt2s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import common
from common import rss_mib  # bench/ is on the path: this file runs as a script or is imported from bench/


def _greedy(model: Any, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode with the KV cache; returns (new token ids, seconds spent in the token steps)."""
    import torch

    with torch.inference_mode():
        # Prefill: one pass over the prompt, not timed; its last logits give the first new token.
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            # `cache` is the transformers-5.24 name (`past_key_values` now raises a FutureWarning).
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))  # int() syncs, so the step is really finished when timed
        return tokens, time.perf_counter() - t0


def _decode_result(model: Any, prompt_ids: list[int], new_tokens: int, load_s: float) -> dict[str, Any]:
    """The shared return fields of both anchors, measured on a loaded model."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2: the first token comes from the untimed prefill")
    tokens, secs = _greedy(model, prompt_ids, new_tokens)
    return {"tokens_per_s": (new_tokens - 1) / secs, "decode_s": secs, "tokens": tokens,
            "peak_rss_mib": rss_mib("VmHWM"), "load_s": load_s}


def hf_decode(model_dir: str, prompt_ids: list[int], new_tokens: int, *, threads: int = 2) -> dict[str, Any]:
    """Greedy decode with the whole model resident on CPU.

    Parameters
    ----------
    model_dir : str
        Hugging Face model folder (``config.json`` + safetensors).
    prompt_ids : list of int
        Prompt token ids.
    new_tokens : int
        Tokens to generate (>= 2); the first comes from the untimed prefill.
    threads : int, optional
        ``torch.set_num_threads`` value.

    Returns
    -------
    dict
        ``tokens_per_s`` (decode steps only), ``decode_s``, ``tokens`` (generated ids),
        ``peak_rss_mib`` (this process's ``VmHWM``; per run only under :func:`run_isolated`),
        ``load_s`` (``from_pretrained`` wall time).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # `dtype` is the transformers-5 name of the deprecated `torch_dtype` argument.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu").eval()
    return _decode_result(model, prompt_ids, new_tokens, time.perf_counter() - t0)


def accelerate_offload_decode(model_dir: str, prompt_ids: list[int], new_tokens: int, *, cap_bytes: int,
                              offload_dir: str, threads: int = 2) -> dict[str, Any]:
    """Greedy decode with at most ``cap_bytes`` of weights in RAM, the rest disk-offloaded by accelerate.

    Parameters
    ----------
    model_dir, prompt_ids, new_tokens, threads
        As in :func:`hf_decode`.
    cap_bytes : int
        ``max_memory={"cpu": cap_bytes}``: bytes of weights accelerate may keep resident.  It
        also keeps room for the largest layer, so it keeps less than that resident.  For GPT-2
        small (tied wte/lm_head = 31% of the bytes), any cap up to ~35% puts the whole model on disk.
    offload_dir : str
        ``offload_folder``.  transformers 5 leaves it empty for safetensors checkpoints: the
        offloaded weights are read straight from the model's own ``.safetensors`` file.

    Returns
    -------
    dict
        The fields of :func:`hf_decode` plus ``offloaded_fraction`` (fraction of the parameters
        whose module ``hf_device_map`` puts on ``"disk"``) and ``device_map_counts``.

    Raises
    ------
    RuntimeError
        If nothing was offloaded (the cap was too large to test offloading).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # On a CPU-only machine "cpu" is the only memory key; whatever does not fit goes to "disk".
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map="auto", max_memory={"cpu": int(cap_bytes)},
        offload_folder=offload_dir).eval()
    load_s = time.perf_counter() - t0
    dmap: dict[str, Any] = model.hf_device_map

    def placed(name: str) -> Any:  # device of the longest hf_device_map prefix of a parameter name
        keys = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
        return dmap[max(keys, key=len)]

    # named_parameters() lists tied weights (GPT-2 wte / lm_head) once, so nothing is counted twice.
    sizes = [(placed(n), p.numel()) for n, p in model.named_parameters()]
    frac = sum(s for d, s in sizes if d == "disk") / sum(s for _, s in sizes)
    if frac == 0:
        raise RuntimeError(f"nothing offloaded to disk with cap_bytes={cap_bytes}: {dmap}")
    return {**_decode_result(model, prompt_ids, new_tokens, load_s), "offloaded_fraction": frac,
            "device_map_counts": dict(Counter(str(d) for d in dmap.values()))}


_FNS: dict[str, Callable[..., dict[str, Any]]] = {"hf_decode": hf_decode, "accelerate_offload_decode": accelerate_offload_decode}


def run_isolated(fn_name: str, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`hf_decode` or :func:`accelerate_offload_decode` in a fresh Python process.

    A fresh process (this file with ``--worker``) makes ``peak_rss_mib`` this run's only, imports
    included.  The result comes back in a JSON file, so library output on stdout cannot corrupt it.
    The child gets ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it: on a 2-vCPU machine,
    libgomp's default spin-then-sleep made about 1 process in 3 run every step ~30 ms slower
    (GPT-2 small: 4 instead of 25 tok/s), and PASSIVE removed those outliers.

    Parameters
    ----------
    fn_name : str
        ``"hf_decode"`` or ``"accelerate_offload_decode"``.
    **kwargs
        Keyword arguments of that function (JSON-serialisable).

    Returns
    -------
    dict
        The function's result, plus ``import_rss_mib`` (RSS after importing torch/transformers,
        before loading the model), ``wall_s`` (the child's whole life, as seen by the parent) and
        ``omp_wait_policy``.
    """
    if fn_name not in _FNS:
        raise ValueError(f"unknown anchor {fn_name!r}; one of {sorted(_FNS)}")
    if common.INLINE:  # a smoke run: in this process
        t0 = time.perf_counter()
        res = json.loads(json.dumps(_FNS[fn_name](**kwargs)))
        return {**res, "import_rss_mib": rss_mib("VmRSS"), "wall_s": time.perf_counter() - t0,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        # check=False: on failure we raise ourselves, with the child's stderr in the message
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", fn_name, json.dumps(kwargs), out],
                              check=False, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{fn_name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return {**json.load(f), "wall_s": wall, "omp_wait_policy": env["OMP_WAIT_POLICY"]}


def _worker(fn_name: str, kwargs_json: str, out: str) -> None:
    import torch  # noqa: F401  imported before the baseline so that it counts as import cost
    import transformers  # noqa: F401

    base = rss_mib("VmRSS")
    res = _FNS[fn_name](**json.loads(kwargs_json))
    with open(out, "w") as f:
        json.dump({**res, "import_rss_mib": base}, f)


def _anchors(model_dir: str, cfg: dict[str, Any], prompt_len: int, new_tokens: int, cap_frac: float) -> dict[str, Any]:
    """Both anchors on one model folder, each in its own process."""
    weight_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                       if f.endswith(".safetensors"))
    prompt = [(7 * i + 1) % cfg["vocab_size"] for i in range(prompt_len)]  # fixed, arbitrary ids
    common = {"model_dir": model_dir, "prompt_ids": prompt, "new_tokens": new_tokens, "threads": 2}
    resident = run_isolated("hf_decode", **common)
    with tempfile.TemporaryDirectory() as off:
        offload = run_isolated("accelerate_offload_decode", cap_bytes=int(cap_frac * weight_bytes),
                               offload_dir=off, **common)
    return {"weight_bytes": weight_bytes, "cap_fraction": cap_frac, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "same_tokens": resident["tokens"] == offload["tokens"],
            "transformers": resident, "accelerate_offload": offload}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:])
        sys.exit(0)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
    from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder

    if "--gpt2-small" in sys.argv:  # GPT-2 small shape, 124M parameters, ~500 MB f32
        cfg = gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        folder = "/tmp/anchor-gpt2s"
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            save_hf_folder(folder, make_gpt2(cfg, "F32", seed=0), cfg)
        print(json.dumps(_anchors(folder, cfg, prompt_len=16, new_tokens=32, cap_frac=0.25), indent=2))
    else:  # smoke test
        cfg = gpt2_config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_folder(tmp, make_gpt2(cfg, "F32", seed=0), cfg)
            # 0.6, not 0.25: accelerate keeps room for the largest layer, so at <= 0.5 this tiny
            # model goes wholly to disk and the cpu/disk split would go untested
            print(json.dumps(_anchors(tmp, cfg, prompt_len=8, new_tokens=8, cap_frac=0.6), indent=2))
