"""``sphere convert --quantize q8_0``: GGUF Q8_0 blocks in the package, held as blocks by the runtime.

References: the ``gguf`` package's own quantizer and dequantizer (llama.cpp's reference,
bit for bit) for the stored bytes, and ``transformers`` (through ``load_model``, which gives a
``transformers`` model the package's values) for the logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import spherefmt
from spherefmt.errors import FormatError, InputError
from spherefmt.runtime import Session
from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama, save_hf_folder
from tests.helpers import run_cli, started_backends

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

BACKENDS = started_backends()

IDS = np.random.default_rng(7).integers(0, 512, 20)
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _reference_q8_0(values: np.ndarray) -> np.ndarray:
    """What llama.cpp stores for these float32 rows, read back as values."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(values, np.float32), Q8_0), Q8_0)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    """(arch, source state dict, HF folder, quantized package, float package)."""
    tmp = tmp_path_factory.mktemp(f"q-{request.param}")
    if request.param == "llama":
        cfg = llama_config(num_hidden_layers=3, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512)
        cfg["max_position_embeddings"] = 48
        sd = make_llama(cfg, "BF16", seed=3)
    else:
        cfg = gpt2_config(n_layer=3, n_embd=128, n_head=4, vocab_size=512, n_positions=48)
        sd = make_gpt2(cfg, "F32", seed=3)
    src = tmp / "hf"
    save_hf_folder(src, sd, cfg)
    pkg = tmp / "q.sphere"
    code = run_cli_plain("convert", str(src), str(pkg), "--graticule", "2x4", "--quantize", "q8_0", "-q")
    assert code == 0
    return request.param, sd, src, pkg, spherefmt.save(src, tmp / "f.sphere", graticule="2x4")


def run_cli_plain(*args: str) -> int:
    from spherefmt.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_blocks_are_ggufs_own_and_every_tensor_reads_as_their_values(model):
    arch, sd, _, pkg, _ = model
    with spherefmt.open(pkg) as p:
        q = p.header.quantization
        assert q["type"] == "Q8_0" and q["sphere"] is True
        head = "lm_head.weight" if arch == "llama" else "transformer.wte.weight"
        attn = "model.layers.1.self_attn.q_proj.weight" if arch == "llama" else "transformer.h.1.attn.c_attn.weight"
        assert {head, attn} <= set(q["core"])
        assert not any("norm" in n or "ln_" in n or n.endswith(".bias") for n in q["core"])  # vectors as they are
        src = sd[attn].astype(np.float32)
        raw = p.group[f"core/{attn}"]
        assert raw.dtype == np.uint8 and raw.shape == (src.shape[0], src.shape[1] // 32 * 34)
        # the stored bytes are the gguf quantizer's, byte for byte
        assert np.asarray(raw[...]).tobytes() == gguf.quants.quantize(src, Q8_0).tobytes()
        np.testing.assert_array_equal(p.tensor(attn), _reference_q8_0(src))
        assert p.tensor_info(attn).dtype == "F32"
        # FFN tensors rebuilt from quantized cells: each neuron's fields quantized along the row
        ffn = "model.layers.2.mlp.down_proj.weight" if arch == "llama" else "transformer.h.2.mlp.c_proj.weight"
        w = sd[ffn].astype(np.float32)
        rows = w.T if arch == "llama" else w  # a neuron's down/c_proj slice is one row of the field
        want = _reference_q8_0(rows)
        np.testing.assert_array_equal(p.tensor(ffn), want.T if arch == "llama" else want)
        if arch == "gpt2":  # the one-wide input bias takes a block of its own, zeros after it
            b = sd["transformer.h.0.mlp.c_fc.bias"].astype(np.float32)
            padded = np.zeros((b.size, 32), np.float32)
            padded[:, 0] = b
            got = p.tensor("transformer.h.0.mlp.c_fc.bias")
            np.testing.assert_array_equal(got, _reference_q8_0(padded)[:, 0])
            # within float16's rounding of the scale: relative, or half a subnormal step times 127
            np.testing.assert_allclose(got, b, rtol=1e-2, atol=2.0**-25 * 127)
        neurons = p.group["sphere/d0/neurons"]
        assert neurons.dtype == np.uint8
    with spherefmt.open(model[4]) as f32:
        assert spherefmt.open(pkg).stored_bytes() < 0.75 * f32.stored_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_holds_blocks_and_gives_the_logits_of_the_packages_values(model, backend):
    """Resident and under a budget, the runtime's logits are transformers' on the package's
    (quantized) values; under a budget with ``weights="stored"`` the blocks themselves are held."""
    _, _, src, pkg, _ = model
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ours(torch.as_tensor(IDS)[None]).logits[0].numpy()
    with Session(pkg, backend=backend) as s:
        np.testing.assert_allclose(s.logits(IDS), ref, atol=1e-4, rtol=0)
    with Session(pkg, backend=backend, budget="40%", weights="stored") as s:
        out = s.logits(IDS)
        st = s.stats()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert "Q8_0" in st["weight_formats"] and st["peak_device_bytes"] <= st["budget_bytes"]
    assert st["bytes_uploaded"] > st["stored_bytes"]  # it streamed
    assert st["weight_bytes"] == st["stored_bytes"]
    # the quantized model is close to the float one, not equal (the test can fail both ways)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        orig = hf(torch.as_tensor(IDS)[None]).logits[0].numpy()
    err = np.abs(out - orig).max() / np.abs(orig).max()
    assert 1e-5 < err < 0.05


def test_modifying_a_quantized_package_quantizes_again(model, tmp_path):
    arch, _, _, pkg, _ = model
    import shutil

    copy = tmp_path / "m.sphere"
    shutil.copytree(pkg, copy)
    with spherefmt.open(copy, mode="r+") as p:
        lat, lon, depth = next(iter(p.experts()))
        e = p.expert(lat, lon, depth)
        new = e.neurons * 2  # float32 values
        p.write_expert(lat, lon, depth, new)
        name = "model.norm.weight" if arch == "llama" else "transformer.ln_f.weight"
        head = next(n for n in p.header.quantization["core"])
        w = p.tensor(head) + 0.01
        p.write_tensor(head, w)
    with spherefmt.open(copy) as p:
        got = p.expert(lat, lon, depth).neurons
        np.testing.assert_array_equal(got.reshape(-1, got.shape[-1])[:1], _reference_q8_0_rows(p, new)[:1])
        np.testing.assert_array_equal(p.tensor(head), _reference_q8_0(w))
        assert p.tensor_info(name).dtype != "Q8_0"
    from spherefmt.training.grow import grow_neurons

    with pytest.raises(InputError, match="quantized"):
        grow_neurons(str(copy), 4)


def _reference_q8_0_rows(p, rows: np.ndarray) -> np.ndarray:
    """Neuron rows quantized field by field (each padded to whole blocks), as values."""
    flat = rows.reshape(-1, rows.shape[-1]).astype(np.float32)
    out = []
    for sl in p.layout.slices().values():
        part = flat[:, sl]
        pad = (-part.shape[1]) % 32
        full = np.concatenate([part, np.zeros((part.shape[0], pad), np.float32)], axis=1)
        out.append(_reference_q8_0(full)[:, : part.shape[1]])
    return np.concatenate(out, axis=1)


def test_export_gives_the_quantized_values_as_float32(model, tmp_path, capsys):
    _, _, _, pkg, _ = model
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "export", str(pkg), str(out), "-q")
    assert code == 0, err
    from safetensors.numpy import load_file

    back = load_file(out)
    with spherefmt.open(pkg) as p:
        for name in p.header.quantization["core"][:3] + [next(iter(p.layout.layers[0].values()))]:
            assert back[name].dtype == np.float32
            np.testing.assert_array_equal(back[name], p.tensor(name))


def test_info_json_reports_the_quantization(model, capsys):
    _, _, _, pkg, _ = model
    code, out, _ = run_cli(capsys, "info", str(pkg), "--json")
    assert code == 0
    assert json.loads(out)["quantization"]["type"] == "Q8_0"


def test_bad_requests_and_bad_headers_are_one_line_errors(model, tmp_path, capsys):
    _, _, src, pkg, _ = model
    code, _, err = run_cli(capsys, "convert", str(src), str(tmp_path / "x.sphere"), "--quantize", "q4_9")
    assert code == 2 and "q4_9" in err
    code, _, err = run_cli(capsys, "export", str(pkg), str(tmp_path / "x.safetensors"), "--quantize", "q8_0")
    assert code == 2 and "for GGUF exports" in err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(InputError, match="only a model with a sphere"), pytest.warns(UserWarning, match="not GPT-2"):
        spherefmt.save({"w": np.ones((4, 32), np.float32)}, tmp_path / "g.sphere", quantize="q8_0")
    import shutil

    from spherefmt.testing.packages import remanifest

    for i, bad in enumerate(({"type": "Q4_9", "core": [], "sphere": True}, {"type": "Q8_0", "core": ["nope"], "sphere": True},
                             {"type": "Q8_0", "core": [], "sphere": "yes"},
                             {"type": "Q8_0", "core": [], "sphere": True, "types": {"nope": "Q4_K"}},
                             {"type": "Q8_0", "core": [], "sphere": True, "extra": 1})):
        broken = tmp_path / f"b{i}.sphere"
        shutil.copytree(pkg, broken)
        meta = json.loads((broken / "zarr.json").read_text())
        meta["attributes"]["spherefmt"]["quantization"] = bad
        (broken / "zarr.json").write_text(json.dumps(meta))
        remanifest(str(broken))
        with pytest.raises(FormatError, match="quantiz") as e:
            spherefmt.open(broken)
        assert "\n" not in str(e.value)
    # a quantized array of the wrong width: refused when read, named
    broken = tmp_path / "w.sphere"
    shutil.copytree(pkg, broken)
    with spherefmt.open(pkg) as p:
        name = p.header.quantization["core"][0]
    meta_path = broken / "core" / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][1] -= 34
    meta_path.write_text(json.dumps(meta))
    remanifest(str(broken))
    with spherefmt.open(broken) as p, pytest.raises(FormatError, match="Q8_0 blocks of"):
        p.tensor(name)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_native_moe_experts_quantize_and_stream_as_blocks(tmp_path, name):
    """Native experts stay one per cell as blocks; the model's router (and Qwen2-MoE's shared
    expert gate) stay float32, as llama.cpp keeps ``ffn_gate_inp``."""
    from spherefmt.testing.zoo import save_zoo_model

    folder = save_zoo_model(name, tmp_path / "hf")
    pkg = spherefmt.save(folder, tmp_path / "m.sphere", quantize="q8_0")
    with spherefmt.open(pkg) as p:
        core = set(p.header.quantization["core"])
        assert not any(n.endswith((".gate.weight", "shared_expert_gate.weight")) for n in core)
        assert p.header.experts is not None
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32).eval()
    ids = np.random.default_rng(7).integers(0, 100, 12)
    with torch.no_grad():
        ref = ours(torch.as_tensor(ids)[None]).logits[0].numpy()
    for backend in BACKENDS:
        with Session(pkg, backend=backend, budget="50%", weights="stored") as s:
            out = s.logits(ids)
            st = s.stats()
        np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)
        assert "Q8_0" in st["weight_formats"] and st["peak_device_bytes"] <= st["budget_bytes"], backend


def test_a_quantized_package_exports_for_llama_cpp_with_its_own_blocks(model, tmp_path, capsys):
    """Quantizing Q8_0 values again gives the same blocks: the GGUF's attention and gate blocks
    are the package's bytes (Q rows permuted whole), and only ffn_down (blocks along the other
    axis in llama.cpp) is quantized again from the package's values."""
    arch, _, _, pkg, _ = model
    if arch != "llama":
        pytest.skip("the llama.cpp exporter writes the Llama family")
    out = tmp_path / "q.gguf"
    code, _, err = run_cli(capsys, "export", str(pkg), str(out), "-q")
    assert code == 0, err
    assert "placeholder tokens" in err  # this model has no tokenizer.json: said, not hidden
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with spherefmt.open(pkg) as p:
        k = p.stored("model.layers.1.self_attn.k_proj.weight", blocks=True)
        heads = 2
        perm = k.reshape(heads, 2, k.shape[0] // heads // 2, k.shape[1]).swapaxes(1, 2).reshape(k.shape)
        assert tensors["blk.1.attn_k.weight"].tensor_type == Q8_0
        assert np.asarray(tensors["blk.1.attn_k.weight"].data).tobytes() == perm.tobytes()
        gate = p.tensor("model.layers.0.mlp.gate_proj.weight")
        assert np.asarray(tensors["blk.0.ffn_gate.weight"].data).tobytes() == \
            gguf.quants.quantize(gate, Q8_0).tobytes()
        down = p.tensor("model.layers.0.mlp.down_proj.weight")  # (128, 344): rows are not whole blocks
        t = tensors["blk.0.ffn_down.weight"]
        assert down.shape[1] % 32 and t.tensor_type == gguf.GGMLQuantizationType.F32  # so it stays float
        np.testing.assert_array_equal(np.asarray(t.data), down)
