"""Llama-shaped GGUF files written by the ``gguf`` package's own writer (tests, benchmarks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["make_llama_gguf"]


def make_llama_gguf(path: str | Path, *, layers: int = 2, d: int = 64, ff: int = 128, vocab: int = 256,
                    quantized_ffn: bool | str = False, seed: int = 0, experts: int = 0,
                    shared_ff: int = 0, rope_freqs: bool = True, k_quants: bool = False) -> Path:
    """A random-weight Llama GGUF with llama.cpp's tensor names and keys: F16 embeddings, a Q8_0
    output head, F32 attention and norms, a BF16 extra tensor, FFN in F32 (or Q8_0 with
    ``quantized_ffn``; ``"Q4_K_M"``: gate and up ``Q4_K``, down ``Q6_K``), and metadata of several value types (string arrays included).
    With ``experts``, every layer is a Mixtral-style MoE as llama.cpp names it: the router
    ``ffn_gate_inp`` ``(E, d)`` and stacked ``ffn_{gate,up}_exps`` ``(E, ff, d)`` and
    ``ffn_down_exps`` ``(E, d, ff)`` (top-2); ``shared_ff`` adds a Qwen2-MoE shared expert of that
    size as llama.cpp names it (``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp``).
    Without ``rope_freqs`` the file has no ``rope_freqs.weight`` (llama.cpp's RoPE factors).
    With ``k_quants`` (``d`` a multiple of 256), as in a ``Q4_K_M`` file: ``attn_q`` and
    ``attn_output`` are ``Q4_K`` (spherefmt's quantizer), ``attn_k``, ``attn_v`` and ``output``
    ``Q6_K`` (random 6-bit values under a small float16 scale: gguf has no k-quant quantizer).
    Tensors are written one at a time."""
    import gguf
    import ml_dtypes

    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def q4_k(a: np.ndarray) -> np.ndarray:
        from spherefmt.format.quant import quantize_q4_k

        return quantize_q4_k(a).view(np.uint8).reshape(a.shape[0], -1)

    def q6_k(rows: int, cols: int) -> np.ndarray:
        blocks = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
        blocks[..., 192:208] = rng.integers(-32, 32, (rows, cols // 256, 16), dtype=np.int8).view(np.uint8)
        d = np.full((rows, cols // 256), 2e-5, np.float16) * rng.uniform(0.5, 1.5, (rows, cols // 256))
        blocks[..., 208:210] = d.astype(np.float16)[..., None].view(np.uint8)
        return blocks.reshape(rows, -1)

    def attn(name: str, rows: int) -> tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]:
        if not k_quants:
            return name, r(rows, d), None
        if name.endswith(("attn_q.weight", "attn_output.weight")):
            return name, q4_k(r(rows, d)), gguf.GGMLQuantizationType.Q4_K
        return name, q6_k(rows, d), gguf.GGMLQuantizationType.Q6_K

    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = [
        ("token_embd.weight", r(vocab, d).astype(np.float16), None),
        ("output_norm.weight", np.ones(d, np.float32), None),
        ("output.weight", q6_k(vocab, d), gguf.GGMLQuantizationType.Q6_K) if k_quants else
        ("output.weight", gguf.quants.quantize(r(vocab, d), q8), q8),
    ]
    if rope_freqs:
        tensors.append(("rope_freqs.weight", r(d // 8).astype(ml_dtypes.bfloat16).view(np.uint16),
                        gguf.GGMLQuantizationType.BF16))
    for la in range(layers):
        p = f"blk.{la}."
        tensors += [(p + "attn_norm.weight", np.ones(d, np.float32), None),
                    attn(p + "attn_q.weight", d), attn(p + "attn_k.weight", d // 2),
                    attn(p + "attn_v.weight", d // 2), attn(p + "attn_output.weight", d),
                    (p + "ffn_norm.weight", np.ones(d, np.float32), None)]
        ffn: list[tuple[str, tuple[int, ...]]] = [("ffn_gate.weight", (ff, d)), ("ffn_up.weight", (ff, d)),
                                                  ("ffn_down.weight", (d, ff))]
        if experts:
            tensors.append((p + "ffn_gate_inp.weight", r(experts, d), None))
            ffn = [("ffn_gate_exps.weight", (experts, ff, d)), ("ffn_up_exps.weight", (experts, ff, d)),
                   ("ffn_down_exps.weight", (experts, d, ff))]
            if shared_ff:
                tensors.append((p + "ffn_gate_inp_shexp.weight", r(d), None))
                ffn += [("ffn_gate_shexp.weight", (shared_ff, d)), ("ffn_up_shexp.weight", (shared_ff, d)),
                        ("ffn_down_shexp.weight", (d, shared_ff))]
        for name, shape in ffn:
            t = r(*shape)
            if quantized_ffn == "Q4_K_M":
                if "down" in name:
                    tensors.append((p + name, q6_k(math.prod(shape[:-1]), shape[-1]).reshape(*shape[:-1], -1),
                                    gguf.GGMLQuantizationType.Q6_K))
                else:
                    tensors.append((p + name, q4_k(t.reshape(-1, shape[-1])).reshape(*shape[:-1], -1),
                                    gguf.GGMLQuantizationType.Q4_K))
            else:
                tensors.append((p + name, gguf.quants.quantize(t, q8), q8) if quantized_ffn else (p + name, t, None))
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
        if shared_ff:
            w.add_expert_shared_feed_forward_length(shared_ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_scores([float(i) / 3 for i in range(vocab)])
    w.add_bool("spherefmt.test.flag", True)
    w.add_int32("spherefmt.test.negative", -7)
    w.add_uint64("spherefmt.test.big", 2**40 + 3)
    w.add_float64("spherefmt.test.pi", 3.141592653589793)
    w.add_array("spherefmt.test.ints", [1, 2, 3])
    for name, data, raw in tensors:
        w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data, _ in tensors:
        w.write_tensor_data(data)
    w.close()
    return Path(path)
