"""What a Llama-family config asks of the forward pass, read strictly.

The runtime is exact on every config it accepts and refuses the rest: each ``model_type`` has
an allow-list of the config keys it understands, and a key outside it (a feature the runtime
does not implement, or a field a newer ``transformers`` added) is a :class:`FormatError` naming
the key, never silently ignored.  Keys that cannot change a forward pass (token ids, dropout,
initialisation, cache flags) are allowed everywhere; keys whose default is the only value
implemented must hold that value.

RoPE follows ``transformers.modeling_rope_utils``: ``rope_parameters`` (transformers 5) or
``rope_theta`` + ``rope_scaling`` (transformers 4), with the ``default``, ``linear``,
``dynamic``, ``yarn``, ``longrope`` and ``llama3`` types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from spherefmt.errors import FormatError

__all__ = ["DecoderSpec", "Rope", "check_gpt2_config", "read_decoder_config", "RUNTIME_MODEL_TYPES", "INERT_KEYS"]

#: keys that cannot change a forward pass in inference (ids, dropout, init, bookkeeping)
INERT_KEYS = frozenset({
    "transformers_version", "architectures", "model_type", "_name_or_path", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "initializer_range",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "tie_word_embeddings",
    "pruned_heads", "tf_legacy_loss", "tie_encoder_decoder", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "diversity_penalty", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "pretraining_tp",
    "source_format",  # "gguf": the tensors have llama.cpp's names (runtime/models.py maps them)
})

#: keys every Llama-family config may carry, read by :func:`read_decoder_config`
_BASE = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
                   "rope_parameters", "rope_theta", "rope_scaling", "head_dim", "attention_bias"})

#: keys every native-MoE config may carry: the router's training loss, its outputs, and its
#: jitter (transformers multiplies the input by noise ``if self.training`` only) are inert
_MOE = frozenset({"num_local_experts", "num_experts", "num_experts_per_tok", "router_aux_loss_coef",
                  "output_router_logits", "router_jitter_noise"})
#: Qwen-MoE: every layer sparse (dense layers between would be a second FFN kind per package)
_ALL_SPARSE: dict[str, tuple[Any, ...]] = {"decoder_sparse_step": (1, None), "mlp_only_layers": ([], None)}

#: per model type: the keys it understands beyond :data:`_BASE`, and keys that must hold one value
_TYPES: dict[str, tuple[frozenset[str], dict[str, tuple[Any, ...]]]] = {
    "llama": (frozenset({"mlp_bias"}), {"mlp_bias": (False, None)}),
    "mistral": (frozenset({"sliding_window"}), {}),
    "qwen2": (frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}), {}),
    "qwen3": (frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}), {}),
    "gemma": (frozenset({"hidden_activation", "use_bidirectional_attention"}),
              {"use_bidirectional_attention": (False, None)}),
    "granite": (frozenset({"mlp_bias", "embedding_multiplier", "residual_multiplier", "attention_multiplier",
                           "logits_scaling"}), {"mlp_bias": (False, None)}),
    "olmo2": (frozenset(), {}),
    # converted with its fused qkv_proj / gate_up_proj split into Llama's projections
    "phi3": (frozenset({"sliding_window", "original_max_position_embeddings", "partial_rotary_factor"}), {}),
    # native experts (spherefmt.interop.experts): each expert a cell, the model's own router
    "mixtral": (frozenset({"sliding_window"}) | _MOE, {}),
    "qwen2_moe": (frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "qkv_bias",
                             "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                             "decoder_sparse_step", "mlp_only_layers"}) | _MOE, _ALL_SPARSE),
    "qwen3_moe": (frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
                             "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"})
                  | _MOE, _ALL_SPARSE),
    "olmoe": (frozenset({"norm_topk_prob", "clip_qkv"}) | _MOE, {"clip_qkv": (None,)}),
}
#: model types the runtime runs (each in the conformance table of ``tests/test_hf_conformance.py``)
RUNTIME_MODEL_TYPES = ("gpt2", *_TYPES)

#: GPT-2: the keys :class:`spherefmt.runtime.models.GPT2` reads, and the sequence-summary head's
#: (a classification head the causal LM does not run)
_GPT2 = frozenset({"vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner",
                   "activation_function", "layer_norm_epsilon", "scale_attn_weights",
                   "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
                   "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                   "summary_first_dropout", "hidden_size", "num_attention_heads"})


def _refuse_unknown(c: dict[str, Any], known: frozenset[str], mt: str, where: str) -> None:
    for key in sorted(c):
        if key in INERT_KEYS or key in known or c[key] is None:
            continue
        raise FormatError(f"{where}: config field {key!r} ({str(c[key])[:60]}) is not implemented by the runtime for "
                          f"{mt!r}; refusing rather than run an approximation")


def check_gpt2_config(config: dict[str, Any], where: str) -> None:
    """Refuse a GPT-2 config with a key the runtime does not implement (see the module docstring)."""
    c = dict(config or {})
    _refuse_unknown(c, _GPT2, "gpt2", where)
    if c.get("add_cross_attention"):
        raise FormatError(f"{where}: config field 'add_cross_attention' is set; the runtime runs decoder-only GPT-2")

_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "factor", "original_max_position_embeddings", "attention_factor"},
}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding tables as ``transformers`` computes them."""

    kind: str
    theta: float
    dim: int
    params: dict[str, Any]
    max_positions: int

    def _inv_freq(self, seq_len: int) -> tuple[np.ndarray, float]:
        """(inverse frequencies, attention factor) in float32 for a forward over ``seq_len`` positions."""
        p, dim, base = self.params, self.dim, self.theta
        expo = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        if self.kind == "dynamic" and seq_len > self.max_positions:
            f = float(p["factor"])
            base = base * ((f * seq_len / self.max_positions) - (f - 1)) ** (dim / (dim - 2))
        inv = (1.0 / (np.float32(base) ** expo)).astype(np.float32)
        factor = 1.0
        if self.kind == "linear":
            inv = inv / np.float32(p["factor"])
        elif self.kind == "llama3":
            f, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old = float(p["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo, inv / np.float32(f), inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / np.float32(f) + smooth * scaled
            medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        elif self.kind == "yarn":
            inv, factor = self._yarn()
        elif self.kind == "longrope":
            old = int(p["original_max_position_embeddings"])
            f = p.get("factor") or self.max_positions / old
            given = p.get("attention_factor")
            factor = float(given) if given is not None else (
                1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(old)))
            ext = np.asarray(p["long_factor"] if seq_len > old else p["short_factor"], dtype=np.float32)
            inv = (1.0 / (ext * (np.float32(self.theta) ** expo))).astype(np.float32)
        return inv.astype(np.float32), float(factor)

    def _yarn(self) -> tuple[np.ndarray, float]:
        p, dim, base = self.params, self.dim, self.theta
        old = float(p["original_max_position_embeddings"])
        f = p.get("factor") or self.max_positions / old

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        factor = p.get("attention_factor")
        if factor is None:
            factor = (mscale(f, p["mscale"]) / mscale(f, p["mscale_all_dim"]) if p.get("mscale") and
                      p.get("mscale_all_dim") else mscale(f))
        fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def corr(rot: float) -> float:
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr(fast), corr(slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        extra = 1 - ramp
        inv = (1.0 / (np.float32(f) * pos)) * (1 - extra) + (1.0 / pos) * extra
        return inv.astype(np.float32), float(factor)

    def tables(self, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(cos, sin)`` of shape ``(t, dim)`` for positions ``start .. start + t - 1`` (a
        forward over them sees ``start + t`` positions, which the dynamic and longrope types use)."""
        inv, factor = self._inv_freq(start + t)
        pos = np.arange(start, start + t, dtype=np.float32)
        freqs = np.outer(pos, inv).astype(np.float32)
        emb = np.concatenate([freqs, freqs], axis=1)
        return (np.cos(emb) * np.float32(factor)).astype(np.float32), (np.sin(emb) * np.float32(factor)).astype(np.float32)


@dataclass(frozen=True)
class DecoderSpec:
    """The forward pass a Llama-family config describes."""

    model_type: str
    d: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    context: int
    #: "silu" or "gelu_tanh" (Gemma)
    act: str
    rope: Rope
    #: per layer: sliding-window length, 0 for full attention
    windows: tuple[int, ...]
    #: "" none, "head" per-head q/k RMSNorm (Qwen3), "full" over the whole projection (OLMo2)
    qk_norm: str
    #: added to every RMSNorm weight (Gemma normalises by ``1 + w``)
    norm_offset: float
    embed_scale: float
    residual_scale: float
    attn_scale: float
    #: Granite: logits are divided by ``logits_scaling``
    logit_divisor: float
    #: OLMo2: no norm before attention and FFN; their outputs are normed before the residual add
    post_norms: bool
    #: native experts: ``(experts, top_k, renormalise the top-k weights)``; ``None`` for dense FFNs
    moe: tuple[int, int, bool] | None = None


def _get(c: dict[str, Any], key: str, default: Any = None, *, where: str) -> Any:
    v = c.get(key)
    if v is None:
        if default is None:
            raise FormatError(f"{where}: model config lacks {key!r}")
        return default
    return v


def _rope(c: dict[str, Any], head_dim: int, where: str) -> Rope:
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise FormatError(f"{where}: config field 'rope_parameters' must be an object, not {params!r}")
    if "original_max_position_embeddings" in c and params.get("rope_type", params.get("type")) in ("longrope", "yarn"):
        params = {"original_max_position_embeddings": c["original_max_position_embeddings"], **params}  # Phi-3
    if any(isinstance(v, dict) for v in params.values()):
        raise FormatError(f"{where}: config field 'rope_parameters' is per layer type ({sorted(params)}); the runtime "
                          "implements one RoPE for every layer")
    kind = str(params.get("rope_type", params.get("type", "default")))
    if kind not in _ROPE_KEYS:
        raise FormatError(f"{where}: config field 'rope_parameters' has rope_type {kind!r}; the runtime implements "
                          f"{', '.join(_ROPE_KEYS)}")
    extra = set(params) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if extra:
        raise FormatError(f"{where}: config field 'rope_parameters' has {sorted(extra)} for rope_type {kind!r}, "
                          "which the runtime does not implement")
    prf = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise FormatError(f"{where}: config field 'partial_rotary_factor' is {prf}; the runtime rotates whole heads only")
    theta = float(params.get("rope_theta", c.get("rope_theta") or 10000.0))
    for need in sorted(_ROPE_KEYS[kind] & {"factor", "low_freq_factor", "high_freq_factor", "short_factor",
                                           "long_factor", "original_max_position_embeddings"}):
        if need in ("factor",) and kind in ("yarn", "longrope"):
            continue
        if params.get(need) is None:
            raise FormatError(f"{where}: config field 'rope_parameters' lacks {need!r} for rope_type {kind!r}")
    if kind == "longrope" and not len(params["short_factor"]) == len(params["long_factor"]) == head_dim // 2:
        raise FormatError(f"{where}: config field 'rope_parameters' needs short_factor and long_factor of "
                          f"{head_dim // 2} values")
    return Rope(kind=kind, theta=theta, dim=head_dim, params=dict(params),
                max_positions=int(_get(c, "max_position_embeddings", 2048, where=where)))


def read_decoder_config(config: dict[str, Any], n_layers: int, where: str) -> DecoderSpec:
    """The :class:`DecoderSpec` of a Llama-family config, or a :class:`FormatError` naming the
    first key the runtime does not implement."""
    c = dict(config or {})
    mt = str(c.get("model_type") or "llama").lower()
    if mt not in _TYPES:
        raise FormatError(f"{where}: the runtime runs Llama-family models of type {', '.join(RUNTIME_MODEL_TYPES)} "
                          f"exactly; model_type {mt!r} is not one of them (it still converts, and "
                          "spherefmt.interop.hf.load_model runs it in transformers)")
    extra_keys, fixed = _TYPES[mt]
    _refuse_unknown(c, _BASE | extra_keys, mt, where)
    for key, allowed in fixed.items():
        if key in c and c[key] not in allowed:
            raise FormatError(f"{where}: config field {key!r} is {c[key]!r}; the runtime implements only "
                              f"{allowed[0]!r} for {mt!r}")
    if c.get("pretraining_tp") not in (None, 1):
        raise FormatError(f"{where}: config field 'pretraining_tp' is {c['pretraining_tp']!r}; only 1 is implemented")
    d = int(_get(c, "hidden_size", where=where))
    n_heads = int(_get(c, "num_attention_heads", where=where))
    n_kv = int(_get(c, "num_key_value_heads", n_heads, where=where))
    head_dim = int(_get(c, "head_dim", d // n_heads, where=where))
    if n_heads % n_kv:
        raise FormatError(f"{where}: {n_heads} heads do not group over {n_kv} KV heads")
    act = str(c.get("hidden_activation") or c.get("hidden_act") or "silu")
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"} if mt == "gemma" else {"silu": "silu"}
    if act not in acts:
        raise FormatError(f"{where}: config field 'hidden_act' is {act!r}; the runtime implements {sorted(acts)} "
                          f"for {mt!r}")
    windows = [0] * n_layers
    sw = c.get("sliding_window")
    if mt in ("mistral", "phi3", "mixtral") and sw is not None:
        windows = [int(sw)] * n_layers
    elif mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        sw = sw if c.get("use_sliding_window") else None
        types = c.get("layer_types") or ["sliding_attention" if sw is not None and i >= int(c.get("max_window_layers")
                                                                                               or 0)
                                         else "full_attention" for i in range(n_layers)]
        if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
            raise FormatError(f"{where}: config field 'layer_types' {types!r} does not give full or sliding attention "
                              f"for each of {n_layers} layers")
        if "sliding_attention" in types and sw is None:
            raise FormatError(f"{where}: config field 'layer_types' has sliding layers but no sliding_window")
        windows = [int(sw) if t == "sliding_attention" and sw is not None else 0 for t in types]
    if any(w < 0 for w in windows):
        raise FormatError(f"{where}: config field 'sliding_window' must not be negative")
    granite = mt == "granite"
    moe = None
    if mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        e = c.get("num_local_experts") if mt == "mixtral" else c.get("num_experts", c.get("num_local_experts"))
        k = c.get("num_experts_per_tok")
        if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
            raise FormatError(f"{where}: config gives {e!r} experts and {k!r} experts per token")
        moe = (e, k, True if mt == "mixtral" else bool(c.get("norm_topk_prob", False)))
    return DecoderSpec(
        model_type=mt, d=d, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        eps=float(_get(c, "rms_norm_eps", 1e-6, where=where)),
        context=int(_get(c, "max_position_embeddings", 2048, where=where)), act=acts[act],
        rope=_rope(c, head_dim, where), windows=tuple(windows),
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmo2": "full", "olmoe": "full"}.get(mt, ""), norm_offset=1.0 if mt == "gemma" else 0.0,
        embed_scale=(float(c.get("embedding_multiplier", 1.0)) if granite
                     else float(np.float32(math.sqrt(d))) if mt == "gemma" else 1.0),
        residual_scale=float(c.get("residual_multiplier", 1.0)) if granite else 1.0,
        attn_scale=float(c.get("attention_multiplier", 1.0)) if granite else 1.0 / math.sqrt(head_dim),
        logit_divisor=float(c.get("logits_scaling", 1.0)) if granite else 1.0,
        post_norms=mt == "olmo2", moe=moe)
