"""Randomly initialised models with the real GPT-2 and Llama tensor names, shapes and dtypes.

Nothing is downloaded: the weights are drawn from N(0, 0.02) (GPT-2's initialiser) with a fixed
seed, so every run makes the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from spherefmt.dtypes import TensorInfo, from_numpy
from spherefmt.interop.safetensors import write_safetensors

__all__ = ["gpt2_config", "llama_config", "make_gpt2", "make_llama", "save_hf_folder"]

_NP = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def gpt2_config(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, vocab_size: int = 96, n_positions: int = 64) -> dict[str, Any]:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": n_layer, "n_embd": n_embd,
            "n_head": n_head, "n_inner": None, "vocab_size": vocab_size, "n_positions": n_positions,
            "n_ctx": n_positions, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


def llama_config(num_hidden_layers: int = 2, hidden_size: int = 32, intermediate_size: int = 88,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = 96) -> dict[str, Any]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": num_hidden_layers,
            "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
            "vocab_size": vocab_size, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False}


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(_NP[dtype])


def make_gpt2(config: dict[str, Any] | None = None, dtype: str = "F32", seed: int = 0) -> dict[str, np.ndarray]:
    """A GPT-2 state dict (Hugging Face ``GPT2LMHeadModel`` names, ``transformer.`` prefix)."""
    c = config or gpt2_config()
    rng = np.random.default_rng(seed)
    d, v, n = c["n_embd"], c["vocab_size"], c.get("n_inner") or 4 * c["n_embd"]
    sd: dict[str, np.ndarray] = {
        "transformer.wte.weight": _rand(rng, (v, d), dtype),
        "transformer.wpe.weight": _rand(rng, (c["n_positions"], d), dtype),
    }
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = np.ones(d, _NP[dtype])
        sd[p + "ln_1.bias"] = np.zeros(d, _NP[dtype])
        sd[p + "attn.c_attn.weight"] = _rand(rng, (d, 3 * d), dtype)
        sd[p + "attn.c_attn.bias"] = _rand(rng, (3 * d,), dtype)
        sd[p + "attn.c_proj.weight"] = _rand(rng, (d, d), dtype)
        sd[p + "attn.c_proj.bias"] = _rand(rng, (d,), dtype)
        sd[p + "ln_2.weight"] = np.ones(d, _NP[dtype])
        sd[p + "ln_2.bias"] = np.zeros(d, _NP[dtype])
        sd[p + "mlp.c_fc.weight"] = _rand(rng, (d, n), dtype)
        sd[p + "mlp.c_fc.bias"] = _rand(rng, (n,), dtype)
        sd[p + "mlp.c_proj.weight"] = _rand(rng, (n, d), dtype)
        sd[p + "mlp.c_proj.bias"] = _rand(rng, (d,), dtype)
    sd["transformer.ln_f.weight"] = np.ones(d, _NP[dtype])
    sd["transformer.ln_f.bias"] = np.zeros(d, _NP[dtype])
    # lm_head.weight is tied to wte, and save_pretrained leaves tied copies out (124M for GPT-2 small)
    return sd


def make_llama(config: dict[str, Any] | None = None, dtype: str = "BF16", seed: int = 0) -> dict[str, np.ndarray]:
    """A Llama state dict (Hugging Face ``LlamaForCausalLM`` names)."""
    c = config or llama_config()
    rng = np.random.default_rng(seed)
    d, v, n = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": _rand(rng, (v, d), dtype)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = np.ones(d, _NP[dtype])
        sd[p + "self_attn.q_proj.weight"] = _rand(rng, (d, d), dtype)
        sd[p + "self_attn.k_proj.weight"] = _rand(rng, (kv, d), dtype)
        sd[p + "self_attn.v_proj.weight"] = _rand(rng, (kv, d), dtype)
        sd[p + "self_attn.o_proj.weight"] = _rand(rng, (d, d), dtype)
        sd[p + "post_attention_layernorm.weight"] = np.ones(d, _NP[dtype])
        sd[p + "mlp.gate_proj.weight"] = _rand(rng, (n, d), dtype)
        sd[p + "mlp.up_proj.weight"] = _rand(rng, (n, d), dtype)
        sd[p + "mlp.down_proj.weight"] = _rand(rng, (d, n), dtype)
    sd["model.norm.weight"] = np.ones(d, _NP[dtype])
    sd["lm_head.weight"] = _rand(rng, (v, d), dtype)
    return sd


def save_hf_folder(folder: str | Path, sd: dict[str, np.ndarray], config: dict[str, Any], shards: int = 1) -> Path:
    """Write a Hugging Face ``save_pretrained``-style folder: config + (sharded) safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    items = [(k, *from_numpy(v)) for k, v in sd.items()]
    groups = [items[i::shards] for i in range(shards)]
    if shards == 1:
        write_safetensors(folder / "model.safetensors", [TensorInfo(k, dt, a.shape) for k, dt, a in items],
                          lambda k: dict((n, a) for n, _, a in items)[k], metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, grp in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        arrays = {k: a for k, _, a in grp}
        write_safetensors(folder / name, [TensorInfo(k, dt, a.shape) for k, dt, a in grp], arrays.__getitem__,
                          metadata={"format": "pt"})
        weight_map.update({k: name for k, _, _ in grp})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
