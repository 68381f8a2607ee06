"""Small models of every architecture the runtime claims, made by ``transformers`` itself.

Each entry is a ``transformers`` config class and the fields that make it that model (RoPE
scaling, sliding windows, multipliers, ...).  :func:`save_zoo_model` builds it with
``transformers``' own random init and writes it with ``save_pretrained`` (sharded), exactly as a
user's checkpoint would be: the conformance table (``tests/test_hf_conformance.py``) converts
each one and compares the runtime's logits with ``from_pretrained`` on the same folder.

Weights are drawn wider than ``transformers``' default (``initializer_range`` 0.1 rather than
0.02), so that a feature the runtime got wrong (a RoPE scaling, a window, a norm) moves the
logits far past the tolerance instead of hiding under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ZOO", "MOE", "REFUSED", "save_zoo_model"]

_SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 64, "initializer_range": 0.1,
          "tie_word_embeddings": False}
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

#: name -> (transformers config class, fields beyond the small shape); every one runs exactly
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 320, "n_positions": 64,
                            "initializer_range": 0.1, "bos_token_id": 0, "eos_token_id": 0}),
    "llama2": ("LlamaConfig", {}),
    "llama-theta-500k": ("LlamaConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    "llama3": ("LlamaConfig", {"rope_parameters": _LLAMA3}),
    "llama-linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 4.0}}),
    "llama-yarn": ("LlamaConfig", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 16}}),
    "llama-longrope": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i for i in range(8)]}}),
    "llama-dynamic": ("LlamaConfig", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                          "factor": 2.0}}),
    "llama-attention-bias": ("LlamaConfig", {"attention_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-sliding": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": True}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 6.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.1, "logits_scaling": 4.0}),
    "olmo2": ("Olmo2Config", {}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "eos_token_id": 1}),
    "phi3-longrope": ("Phi3Config", {"pad_token_id": 0, "eos_token_id": 1, "original_max_position_embeddings": 8,
                                     "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                         "long_factor": [1.0 + 0.5 * i for i in range(8)]}}),
}

_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "intermediate_size": 48}
_OLMOE = {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48, "eos_token_id": 1, "pad_token_id": 0}
#: native-MoE models: every expert a cell, the model's own router (``spherefmt.interop.experts``)
MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48,
                                  "sliding_window": 6}),
    "qwen2_moe": ("Qwen2MoeConfig", {**_MOE, "shared_expert_intermediate_size": 80}),
    "qwen3_moe": ("Qwen3MoeConfig", {**_MOE, "head_dim": 16, "norm_topk_prob": True}),
    "olmoe": ("OlmoeConfig", {**_OLMOE}),
}

#: name -> (config class, fields, what the refusal must name): models the runtime refuses
REFUSED: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama-mlp-bias": ("LlamaConfig", {"mlp_bias": True}, "mlp_bias"),
    "llama-partial-rotary": ("LlamaConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5}},
                             "partial_rotary_factor"),
    "olmoe-clip-qkv": ("OlmoeConfig", {**_OLMOE, "clip_qkv": 2.0}, "clip_qkv"),
    # MoE architectures this version stores generic (bit-exact, every tensor in core/) and refuses to run
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48,
                                 "head_dim": 16}, "generic.*gpt_oss"),
    "deepseek_v3": ("DeepseekV3Config", {"moe_intermediate_size": 48, "num_key_value_heads": 4, "n_routed_experts": 4,
                                         "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 0,
                                         "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1},
                    "generic.*deepseek_v3"),
    "qwen2_moe-dense-layer": ("Qwen2MoeConfig", {**_MOE, "shared_expert_intermediate_size": 80,
                                                "mlp_only_layers": [1]}, "generic"),
}


def save_zoo_model(name: str, folder: str | Path, *, dtype: str = "float32", seed: int = 0,
                   max_shard_size: str = "100KB") -> Path:
    """Build zoo model ``name`` (from :data:`ZOO`, :data:`MOE` or :data:`REFUSED`) with ``transformers``'
    random init and ``save_pretrained`` it (sharded) into ``folder``."""
    import torch
    import transformers

    cls, extra = ZOO[name] if name in ZOO else MOE[name] if name in MOE else REFUSED[name][:2]
    cfg = getattr(transformers, cls)(**(extra if cls == "GPT2Config" else {**_SMALL, **extra}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder
