"""``sphere convert --quantize q4_k``: GGUF ``Q4_K`` blocks in the package, held as blocks by the runtime.

References: the ``gguf`` package's own ``Q4_K`` dequantizer (what llama.cpp and transformers read
the blocks as) for the stored bytes, and ``transformers`` (through ``load_model``, which gives a
``transformers`` model the package's values) for the logits.  gguf has no ``Q4_K`` quantizer;
spherefmt's follows llama.cpp's reference algorithm, and its error is measured here against the
float values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import spherefmt
from spherefmt.format.quant import blocks_width, pad_fields, quantize_q4_k, quantize_rows, unpad_fields
from spherefmt.runtime import Session
from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama, save_hf_folder
from tests.helpers import run_cli, started_backends

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

BACKENDS = started_backends()
IDS = np.random.default_rng(9).integers(0, 512, 20)
Q4_K = gguf.GGMLQuantizationType.Q4_K


def _gguf_values(blocks: np.ndarray) -> np.ndarray:
    """gguf's reading of ``Q4_K`` blocks ``(rows, n)`` as float32 ``(rows, 256 n)``."""
    return gguf.quants.dequantize(np.ascontiguousarray(blocks).view(np.uint8).reshape(blocks.shape[0], -1), Q4_K)


def test_the_quantizer_makes_blocks_gguf_reads_as_ours_with_4_bit_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32) * rng.uniform(0.01, 3, (64, 1)).astype(np.float32)
    x[0] = 0.0  # all zero: zero bytes (empty chunks stay unstored)
    x[1, :256] = 5.0  # constant: no spread to fit
    x[2] = np.abs(x[2])  # no negative values: the min stays at zero
    b = quantize_q4_k(x)
    assert b.dtype.itemsize == 144 and b.shape == (64, 2)
    assert not b[0].view(np.uint8).any()
    values = unpad = spherefmt.format.quant.dequantize(b, "Q4_K")
    np.testing.assert_array_equal(values, _gguf_values(b))
    np.testing.assert_allclose(values[1, :256], 5.0, rtol=2e-3)
    err = np.sqrt(np.mean((unpad[3:] - x[3:]) ** 2, axis=1) / np.mean(x[3:] ** 2, axis=1))
    # 4.5 bits a value: llama.cpp's Q4_K gives about 7% relative RMS error on Gaussian rows
    assert 0.04 < err.mean() < 0.085 and err.max() < 0.1
    # the search over scales is worth it: better than a plain min/max 4-bit grid per sub-block
    sub = x[3:].reshape(-1, 32)
    lo, hi = np.minimum(sub.min(1, keepdims=True), 0), sub.max(1, keepdims=True)
    naive = np.rint((sub - lo) / (hi - lo) * 15) / 15 * (hi - lo) + lo
    assert np.mean((unpad[3:].reshape(-1, 32) - sub) ** 2) < np.mean((naive - sub) ** 2)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    """(arch, source state dict, HF folder, Q4_K package, float package).  The Llama is 256 wide
    (every matrix whole Q4_K blocks), GPT-2 128 wide (its core matrices fall back to Q8_0; its
    neuron fields are padded to a block of 256 each)."""
    tmp = tmp_path_factory.mktemp(f"q4-{request.param}")
    if request.param == "llama":
        cfg = llama_config(num_hidden_layers=2, hidden_size=256, intermediate_size=384, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512)
        cfg["max_position_embeddings"] = 48
        sd = make_llama(cfg, "BF16", seed=4)
    else:
        cfg = gpt2_config(n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=48)
        sd = make_gpt2(cfg, "F32", seed=4)
    src = tmp / "hf"
    save_hf_folder(src, sd, cfg)
    pkg = tmp / "q.sphere"
    from spherefmt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), str(pkg), "--graticule", "2x4", "--quantize", "q4_k", "-q"])
    assert e.value.code in (0, None)
    return request.param, sd, src, pkg, spherefmt.save(src, tmp / "f.sphere", graticule="2x4")


def test_blocks_are_q4_k_and_every_tensor_reads_as_their_values(model):
    arch, sd, _, pkg, f32 = model
    with spherefmt.open(pkg) as p:
        q = p.header.quantization
        assert q["type"] == "Q4_K" and q["sphere"] is True
        attn = "model.layers.1.self_attn.q_proj.weight" if arch == "llama" else "transformer.h.1.attn.c_attn.weight"
        src = sd[attn].astype(np.float32)
        raw = np.asarray(p.group[f"core/{attn}"][...])
        if arch == "llama":  # whole blocks of 256: Q4_K, the quantizer's bytes
            assert "types" not in q and raw.shape == (src.shape[0], src.shape[1] // 256 * 144)
            assert raw.tobytes() == quantize_q4_k(src).tobytes()
            np.testing.assert_array_equal(p.tensor(attn), _gguf_values(raw.view(quantize_q4_k(src).dtype)))
        else:  # rows of 384 values: not whole Q4_K blocks, so Q8_0 (as llama.cpp falls back)
            assert q["types"][attn] == "Q8_0" and raw.shape == (src.shape[0], src.shape[1] // 32 * 34)
            assert raw.tobytes() == gguf.quants.quantize(src, gguf.GGMLQuantizationType.Q8_0).tobytes()
        assert not any("norm" in n or "ln_" in n or n.endswith(".bias") for n in q["core"])
        # FFN tensors rebuilt from Q4_K cells: each neuron's fields padded to 256 and quantized
        layout = p.layout
        widths = {f.name: f.width for f in layout.fields}
        neurons = p.group["sphere/d0/neurons"]
        assert neurons.dtype == np.uint8 and neurons.shape[-1] == blocks_width(widths, "Q4_K") // 256 * 144
        rows = p.layer_rows(0)  # values in original neuron order
        from spherefmt.format.arch import rows_from_tensors

        orig = rows_from_tensors(layout, {n: sd[n].astype(np.float32) for n in layout.layers[0].values()}, 0)
        want = unpad_fields(_gguf_values(quantize_rows(pad_fields(orig, widths, "Q4_K"), "Q4_K")), widths, "Q4_K")
        np.testing.assert_array_equal(rows, want)
        # bytes per neuron row: Llama 3 fields of 256 in 3 blocks (4.5 bits a value against
        # bfloat16's 16); GPT-2's 128 + 1 + 128 float32 values padded to 3 blocks of 256
        row = neurons.shape[-1] / (layout.row_width * (2 if arch == "llama" else 4))
        assert row == (144 / 512 if arch == "llama" else 3 * 144 / (257 * 4)), row


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_holds_q4_k_blocks_and_gives_the_logits_of_the_packages_values(model, backend):
    _, _, src, pkg, _ = model
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ours(torch.as_tensor(IDS)[None]).logits[0].numpy()
    scale = np.abs(ref).max()
    with Session(pkg, backend=backend) as s:
        np.testing.assert_allclose(s.logits(IDS), ref, atol=1e-5 * scale, rtol=0)
    with Session(pkg, backend=backend, budget="60%", weights="stored") as s:
        out = s.logits(IDS)
        st = s.stats()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0)
    assert "Q4_K" in st["weight_formats"] and st["peak_device_bytes"] <= st["budget_bytes"]
    assert st["bytes_uploaded"] > st["stored_bytes"] and st["weight_bytes"] == st["stored_bytes"]
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        orig = hf(torch.as_tensor(IDS)[None]).logits[0].numpy()
    err = np.abs(out - orig).max() / np.abs(orig).max()
    assert 1e-4 < err < 0.2  # 4-bit weights: close to the float model, not equal


def test_info_modify_and_export_of_a_q4_k_package(model, tmp_path, capsys):
    arch, _, _, pkg, _ = model
    code, out, _ = run_cli(capsys, "info", str(pkg), "--json")
    assert code == 0 and json.loads(out)["quantization"]["type"] == "Q4_K"
    import shutil

    copy = tmp_path / "m.sphere"
    shutil.copytree(pkg, copy)
    with spherefmt.open(copy, mode="r+") as p:
        head = next(n for n, t in p.core_types.items() if t == p.header.quantization["type"]) if arch == "llama" \
            else p.header.quantization["core"][0]
        w = p.tensor(head) * 1.5
        p.write_tensor(head, w)
        kind = p.core_types[head]
    with spherefmt.open(copy) as p:
        np.testing.assert_array_equal(p.tensor(head), spherefmt.format.quant.dequantize(quantize_rows(w, kind), kind))
    if arch != "llama":
        return
    out_path = tmp_path / "q.gguf"
    code, _, err = run_cli(capsys, "export", str(pkg), str(out_path), "-q")
    assert code == 0, err
    tensors = {t.name: t for t in gguf.GGUFReader(out_path).tensors}
    assert tensors["blk.0.ffn_gate.weight"].tensor_type == Q4_K
    # ffn_down's rows run along the 384 neurons: not whole blocks of 256, so Q8_0 (as llama.cpp does)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert tensors["output.weight"].tensor_type == Q4_K and tensors["output_norm.weight"].tensor_type.name == "F32"
    with spherefmt.open(pkg) as p:  # the head's blocks, dequantized by gguf, are the package's values
        np.testing.assert_array_equal(
            gguf.quants.dequantize(tensors["output.weight"].data, Q4_K), p.tensor("lm_head.weight"))


def test_auto_on_the_numpy_backend_holds_the_blocks_its_kernels_read(model):
    """With the block kernels, ``weights="auto"`` holds Q4_K as stored on the numpy backend,
    resident and under a budget; without them it widens at load (products of widened pieces cost
    more than the reads the blocks save)."""
    from spherefmt.backends import qkernels

    _, _, _, pkg, _ = model
    for budget in (None, "60%"):
        with Session(pkg, backend="numpy", budget=budget) as s:
            s.logits(IDS[:4])
            held = s.stats()["weight_formats"]
        if qkernels.AVAILABLE:
            assert "Q4_K" in held, budget
        elif budget is None:
            assert held == ["F32"]
