"""GGUF for llama.cpp from a Llama-family package converted from Hugging Face (or trained, grown,
quantized): what ``convert_hf_to_gguf.py`` writes for the ``llama`` architecture.

- **Names.** llama.cpp's (``token_embd``, ``blk.N.attn_q``, ``blk.N.ffn_gate``, ``output``...);
  Mixtral's experts stacked as ``blk.N.ffn_{gate,up,down}_exps`` with the router as
  ``blk.N.ffn_gate_inp``.
- **Q/K permutation.** llama.cpp applies RoPE to interleaved pairs where transformers rotates
  halves, so the rows of ``q_proj``/``k_proj`` are permuted per head exactly as
  ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does.
- **Metadata.** The ``llama.*`` keys llama.cpp reads (context, widths, heads, norm epsilon, RoPE
  base, expert counts, ``general.file_type``).  A config this writer cannot express for
  llama.cpp (RoPE scaling, sliding windows, attention or MLP biases, another ``model_type``) is
  refused by name, never written approximately.
- **Tokenizer.** A byte-level BPE ``tokenizer.json`` (GPT-2 and Llama 3 style) becomes
  ``tokenizer.ggml.model = "gpt2"`` with its tokens, merges and token types; without one the
  file gets placeholder tokens (llama.cpp then runs token ids) and a warning says so.
- **Types.** Vectors are F32.  Matrices keep their float dtype (F32, F16, BF16), or with
  ``quantize="q8_0"`` (the default for a quantized package) are ``Q8_0`` blocks made by the
  ``gguf`` quantizer from the package's values.  A quantized package's blocks come back
  unchanged (quantizing ``Q8_0`` values again gives the same blocks), except ``ffn_down``,
  whose blocks llama.cpp wants along the neuron axis: it is quantized again from its values
  (the package quantizes each neuron's column).  ``quantize="q4_k"`` (the default for a ``Q4_K``
  package) writes ``Q4_K`` blocks by :func:`spherefmt.format.quant.quantize_q4_k` where rows are
  whole blocks of 256, else ``Q8_0``; quantizing ``Q4_K`` values again is close to, not always
  exactly, the same blocks (the fit of each sub-block's scale and min starts over).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spherefmt import constants as C
from spherefmt.dtypes import numpy_view
from spherefmt.errors import FormatError, InputError
from spherefmt.format.quant import quantize_rows
from spherefmt.interop.base import written_in_place

if TYPE_CHECKING:
    from spherefmt.format.package import Package

__all__ = ["export_llama_cpp", "HF_TOP", "HF_LAYER", "permute", "unpermute"]

_FAMILY = ("llama", "mistral", "mixtral")
#: config keys that change the computation in a way the ``llama`` GGUF cannot say
_REFUSE = {"attention_bias": True, "mlp_bias": True}

#: transformers' names -> llama.cpp's: the top-level tensors, and a layer's (after ``model.layers.N.``)
HF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
HF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
            "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_EXPS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}


def _rope_theta(cfg: dict[str, Any], where: str) -> float:
    rp = cfg.get("rope_parameters") or {}
    kind = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    if cfg.get("rope_scaling") or kind != "default":
        raise FormatError(f"{where}: RoPE scaling {kind!r} is not written to llama.cpp GGUF by this exporter")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)) if isinstance(rp, dict) else 10000.0)


def _check(cfg: dict[str, Any], where: str) -> None:
    mt = cfg.get("model_type")
    if mt not in _FAMILY:
        raise FormatError(f"{where}: model_type {mt!r}: the llama.cpp exporter writes {', '.join(_FAMILY)}")
    for key, bad in _REFUSE.items():
        if cfg.get(key) == bad:
            raise FormatError(f"{where}: {key} is not written to llama.cpp GGUF by this exporter")
    window = cfg.get("sliding_window")
    if window and window < int(cfg.get("max_position_embeddings", 0)):
        raise FormatError(f"{where}: a sliding window of {window} is not written to llama.cpp's llama GGUF")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        raise FormatError(f"{where}: head_dim {cfg['head_dim']} differs from hidden_size / heads")


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute``: per head, halves to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute`: llama.cpp's Q/K rows (RoPE pairs interleaved per head)
    in transformers' order (halves)."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _tokenizer(w: Any, pkg: Package, cfg: dict[str, Any], vocab: int) -> None:
    tok = None
    if "tokenizer.json" in pkg.header.files:
        try:
            tok = json.loads(pkg.file("tokenizer.json").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            tok = None
    model = (tok or {}).get("model") or {}
    if model.get("type") == "BPE" and isinstance(model.get("vocab"), dict):
        tokens = [f"[PAD{i}]" for i in range(vocab)]
        types = [5] * vocab  # unused
        for t, i in model["vocab"].items():
            if isinstance(i, int) and 0 <= i < vocab:
                tokens[i], types[i] = t, 1
        for added in (tok or {}).get("added_tokens") or []:
            i = added.get("id")
            if isinstance(i, int) and 0 <= i < vocab:
                tokens[i], types[i] = added.get("content", tokens[i]), 3 if added.get("special") else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    else:
        warnings.warn(f"{pkg.where}: no byte-level BPE tokenizer.json; the GGUF gets placeholder tokens "
                      "(llama.cpp runs token ids)", stacklevel=3)
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<tok{i}>" for i in range(vocab)])
        w.add_token_scores([0.0] * vocab)
        w.add_token_types([1] * vocab)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        v: Any = cfg.get(key)
        if isinstance(v, int) and 0 <= v < vocab:
            add(v)


def export_llama_cpp(pkg: Package, dst: str | os.PathLike[str], storage: Callable[[str], np.ndarray] | None = None,
                     progress: Callable[[int], Any] | None = None, *, quantize: str | None = None) -> None:
    """Write a Llama-family package as a llama.cpp GGUF (see the module docstring)."""
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the gguf package: pip install 'spherefmt[gguf]'") from None
    cfg = dict(pkg.config or {})
    where = pkg.where
    _check(cfg, where)
    if quantize is None and pkg.header.quantization is not None:
        quantize = str(pkg.header.quantization["type"])
    qtype = {"q8_0": "Q8_0", "q4_k": "Q4_K"}.get(str(quantize).lower()) if quantize is not None else None
    if quantize is not None and qtype is None:
        raise InputError(f"quantize {quantize!r}: expected q8_0 or q4_k")
    read = storage if storage is not None else (lambda n: pkg.stored(n, padded=True))
    heads, kv, d = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), cfg["hidden_size"]
    names = pkg.keys()
    vocab = pkg.tensor_info("model.embed_tokens.weight").shape[0]
    experts = int(cfg.get("num_local_experts") or 0)
    qt = gguf.GGMLQuantizationType

    def values(name: str) -> np.ndarray:
        return numpy_view(np.asarray(read(name)), pkg.tensor_info(name, padded=True).dtype)

    # (GGUF name, source tensors, heads to permute by: 0 none) in llama.cpp's order; several
    # sources are a layer's experts, stacked
    plan: list[tuple[str, list[str], int]] = []
    stacked: dict[tuple[int, str], list[str]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m:
            stacked.setdefault((int(m[1]), _EXPS[m[3]]), []).append(name)
            continue
        if name in HF_TOP:
            plan.append((HF_TOP[name], [name], 0))
            continue
        parts = name.split(".")
        rest = ".".join(parts[3:])
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or rest not in HF_LAYER:
            raise FormatError(f"{where}: tensor {name!r} has no llama.cpp name")
        by = heads if rest == "self_attn.q_proj.weight" else kv if rest == "self_attn.k_proj.weight" else 0
        plan.append((f"blk.{parts[2]}.{HF_LAYER[rest]}", [name], by))
    for (layer, gname), group in sorted(stacked.items()):
        order = sorted(group, key=lambda n: int(_EXPERT.match(n)[2]))  # type: ignore[index]
        if len(order) != experts:
            raise FormatError(f"{where}: layer {layer} has {len(order)} experts for {gname}, config says {experts}")
        plan.append((f"blk.{layer}.{gname}", order, 0))

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(str(cfg.get("_name_or_path") or Path(str(where)).stem))
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(d)
    w.add_block_count(len(pkg.layer_depth) if pkg.layer_depth else int(cfg["num_hidden_layers"]))
    ffn = pkg.ffn_size() or int(cfg["intermediate_size"]) * max(1, experts)
    w.add_feed_forward_length(int(ffn // max(1, experts)))
    w.add_rope_dimension_count(d // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(_rope_theta(cfg, where))
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    file_type = {None: gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S}[qtype]
    w.add_file_type(int(file_type))
    _tokenizer(w, pkg, cfg, vocab)
    with written_in_place(w, tmp, dst):
        for gname, sources, by in plan:
            arr = np.stack([values(n) for n in sources]) if len(sources) > 1 else values(sources[0])
            if by:
                arr = permute(arr, by)
            router = gname.endswith("ffn_gate_inp.weight")
            if arr.ndim >= 2 and qtype and not router and arr.shape[-1] % 32 == 0:
                kind = qtype if arr.shape[-1] % C.QUANT_TYPES[qtype][0] == 0 else "Q8_0"
                data = quantize_rows(np.ascontiguousarray(arr, dtype=np.float32), kind)
                data = data.view(np.uint8).reshape(*arr.shape[:-1], -1)
                w.add_tensor(gname, data, raw_dtype=qt[kind])
            elif arr.ndim >= 2 and arr.dtype.name == "bfloat16" and not router:
                w.add_tensor(gname, np.ascontiguousarray(arr).view(np.uint16), raw_dtype=qt.BF16)
            elif arr.ndim >= 2 and arr.dtype == np.float16 and not router:
                w.add_tensor(gname, np.ascontiguousarray(arr), raw_dtype=qt.F16)
            else:
                w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
            if progress is not None:
                progress(int(arr.size * 4))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
