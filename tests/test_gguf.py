"""GGUF in and out: the gguf package's writer -> sphere convert -> sphere export -> its reader."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spherefmt
from spherefmt.errors import FormatError

gguf = pytest.importorskip("gguf")
from spherefmt.testing.gguf import make_llama_gguf  # noqa: E402 - after the importorskip above
from tests.helpers import run_cli  # noqa: E402 - after the importorskip above


def _fields(path) -> list[tuple]:
    r = gguf.GGUFReader(path)
    out = []
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        out.append((name, [int(t) for t in f.types], [bytes(f.parts[i].tobytes()) for i in f.data]))
    return out


def _tensors(path) -> list[tuple]:
    return [(t.name, int(t.tensor_type), [int(x) for x in t.shape], bytes(np.asarray(t.data).tobytes()))
            for t in gguf.GGUFReader(path).tensors]


@pytest.mark.parametrize("quantized_ffn", [False, True])
def test_round_trip_through_the_cli(tmp_path, capsys, quantized_ffn):
    src = make_llama_gguf(tmp_path / "m.gguf", quantized_ffn=quantized_ffn)
    pkg, out = tmp_path / "m.sphere", tmp_path / "back.gguf"
    code, _, converted = run_cli(capsys, "convert", str(src), str(pkg), "--graticule", "2x2", "-q")
    assert code == 0, converted
    code, _, err = run_cli(capsys, "export", str(pkg), str(out), "-q")
    assert code == 0, err
    assert _fields(out) == _fields(src)
    if quantized_ffn:
        # the Q8_0 FFN went onto the sphere: gate and up blocks are each neuron's own rows and
        # come back the same bytes; ffn_down's blocks run along the neurons and were quantized
        # again per neuron (said at conversion, recorded): same type and shape, close values
        assert "quantized again onto the sphere as Q8_0" in converted
        back, orig = {t[0]: t for t in _tensors(out)}, {t[0]: t for t in _tensors(src)}
        assert list(back) == list(orig)
        reader = {t.name: t for t in gguf.GGUFReader(src).tensors}
        again = {t.name: t for t in gguf.GGUFReader(out).tensors}
        for name in orig:
            if "ffn_down" not in name:
                assert back[name] == orig[name], name
                continue
            assert back[name][1:3] == orig[name][1:3] and back[name][3] != orig[name][3]
            a = gguf.quants.dequantize(reader[name].data, reader[name].tensor_type)
            b = gguf.quants.dequantize(again[name].data, again[name].tensor_type)
            assert np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) < 0.01
    else:
        # gguf's own reader: identical tensors (names, types, shapes, bytes); the writer even
        # lays the file out byte for byte the same
        assert _tensors(out) == _tensors(src)
        assert out.read_bytes() == src.read_bytes()
    code, text, _ = run_cli(capsys, "info", str(pkg), "--json")
    info = json.loads(text)
    with spherefmt.open(pkg) as p:
        # the FFN is on the sphere: an expert's rows are the GGUF FFN rows' values
        assert info["architecture"] == "llama" and info["experts"] == 4 * 2
        assert p.tensor_info("output.weight").dtype == "U8"  # Q8_0 head carried raw
        gate = next(t for t in gguf.GGUFReader(src).tensors if t.name == "blk.1.ffn_gate.weight")
        gate = gguf.quants.dequantize(gate.data, gate.tensor_type)
        e = p.expert(0, 1, p.layer_depth[1], layer=1)
        real = e.index[0] >= 0
        np.testing.assert_array_equal(e.field("gate")[0][real], gate[e.index[0][real]])
        if quantized_ffn:
            assert p.header.quantization == {"type": "Q8_0", "core": [], "sphere": True}
            change = float(p.header.metadata["spherefmt.quantization_rel_rms"])
            assert 0 < change < 0.01 and info["quantization"]["sphere_rel_rms_change"] == change
    # llama.cpp's RoPE factors are not implemented: refused by name, not a traceback
    code, _, err = run_cli(capsys, "run", str(pkg), "--prompt", "ab", "-n", "2", "--backend", "numpy")
    assert code == 2 and "rope_freqs.weight" in err


def test_gguf_export_of_a_trained_package_and_refusals(tmp_path):
    src = make_llama_gguf(tmp_path / "m.gguf")
    pkg = spherefmt.save(src, tmp_path / "m.sphere", graticule="2x2")
    with spherefmt.open(pkg, "r+") as p:
        e = p.expert(1, 0, 0)
        rows = e.neurons.copy()
        rows[e.index >= 0] = 0.25
        p.write_expert(1, 0, 0, rows)
        layer = e.layers[0]
        changed = e.index[0][e.index[0] >= 0]
    spherefmt.export(pkg, tmp_path / "t.gguf")
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    assert (t[f"blk.{layer}.ffn_up.weight"][changed] == 0.25).all()
    from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama

    # a package from Hugging Face names exports the llama.cpp way (test_..._exports_for_llama_cpp);
    # one llama.cpp's llama GGUF cannot hold is refused by name
    hf = spherefmt.save(make_llama(llama_config(), "F32"), tmp_path / "hf.sphere", config=llama_config())
    with pytest.warns(UserWarning, match="placeholder tokens"):
        spherefmt.export(hf, tmp_path / "x.gguf")
    assert gguf.GGUFReader(tmp_path / "x.gguf").fields["general.architecture"].contents() == "llama"
    g2 = spherefmt.save(make_gpt2(gpt2_config(), "F32"), tmp_path / "g.sphere", config=gpt2_config())
    with pytest.raises(FormatError, match="model_type 'gpt2'"):
        spherefmt.export(g2, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_hostile_gguf_files(tmp_path):
    good = make_llama_gguf(tmp_path / "m.gguf").read_bytes()
    for name, blob in (("empty", b""), ("magic", b"GGUF"), ("text", b"hello world, not a model" * 4),
                       ("truncated", good[: len(good) // 3]), ("header", good[:40])):
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(FormatError, match=str(bad)):
            spherefmt.save(bad, tmp_path / f"{name}.sphere")
        assert not (tmp_path / f"{name}.sphere").exists()


_GOOD: list[bytes] = []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_reader_only_raises_format_error(tmp_path_factory, data):
    if not _GOOD:
        _GOOD.append(make_llama_gguf(tmp_path_factory.mktemp("g") / "m.gguf", layers=1, d=32, ff=64, vocab=32)
                     .read_bytes())
    blob = bytearray(_GOOD[0])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(blob) // 2, len(blob)))
    d = tmp_path_factory.mktemp("f")
    path = d / "x.gguf"
    path.write_bytes(bytes(blob[:cut]))
    from spherefmt.interop.gguf import GGUFSource

    try:
        with GGUFSource(path) as s:
            for name in s.keys():
                s.read(name)
    except FormatError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    shutil.rmtree(d)


def test_hostile_counts_are_refused_before_the_reader_allocates(tmp_path):
    """A GGUF whose key/value array count or string length is far beyond the file (2^31 items in a
    few hundred KB: minutes and gigabytes in the gguf reader) is refused at once, naming it."""
    import struct
    import time

    import gguf

    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(src, arch="other")  # no FFN to place: stored as a generic package
    w.add_array("test.tokens", [f"t{i}" for i in range(100)])
    w.add_array("test.scores", [0.5] * 100)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = src.read_bytes()
    cases = {}
    for key, what in ((b"test.tokens", "items cannot fit"), (b"test.scores", "items cannot fit")):
        at = data.index(key) + len(key) + 4 + 4  # the key, its value type, the item type: then the count
        cases[key.decode()] = (data[:at] + struct.pack("<Q", 2**31) + data[at + 8:], what)
    at = data.index(b"test.tokens") - 8  # the key's own length
    cases["key length"] = (data[:at] + struct.pack("<Q", 2**40) + data[at + 8:], "runs past the end")
    cases["kv count"] = (data[:16] + struct.pack("<Q", 2**60) + data[24:], "cannot fit")
    for name, (blob, match) in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        t0 = time.monotonic()
        with pytest.raises(FormatError, match=match):
            spherefmt.save(bad, tmp_path / "x.sphere")
        assert time.monotonic() - t0 < 5, name  # not minutes: nothing was read item by item
    with pytest.warns(UserWarning, match="not GPT-2 or Llama"):
        assert spherefmt.save(src, tmp_path / "ok.sphere")  # the untouched file converts


@pytest.mark.parametrize("shared_ff", [0, 40], ids=["mixtral", "shared-expert"])
def test_a_gguf_moe_puts_its_stacked_experts_on_the_sphere_and_exports_byte_for_byte(tmp_path, capsys, shared_ff):
    """llama.cpp's MoE layout (``ffn_gate_inp`` and stacked ``ffn_*_exps``): each expert whole in
    a cell of its own, a Qwen2-MoE shared expert (``*_shexp``) in the always-on core, and the
    exported file is the source file, byte for byte."""
    src = make_llama_gguf(tmp_path / "moe.gguf", experts=4, ff=48, shared_ff=shared_ff)
    pkg, out = tmp_path / "moe.sphere", tmp_path / "back.gguf"
    code, _, err = run_cli(capsys, "convert", str(src), str(pkg), "-q")
    assert code == 0, err
    with spherefmt.open(pkg) as p:
        ex = p.header.experts
        assert p.architecture == "llama" and ex["count"] == 4 and ex["neurons"] == 48
        assert [j["parts"] for j in ex["tensors"]][:3] == [["blk.0.ffn_gate_exps.weight"], ["blk.0.ffn_up_exps.weight"],
                                                           ["blk.0.ffn_down_exps.weight"]]
        stacked = np.asarray(next(t for t in gguf.GGUFReader(src).tensors if t.name == "blk.1.ffn_down_exps.weight").data)
        for depth in range(p.depth):
            _, index, _ = p.shell_arrays(depth)
            for t in range(len(p.shell_layers(depth))):
                held = [set((index[t, a, b][index[t, a, b] >= 0] // 48).tolist()) for a in range(index.shape[1])
                        for b in range(index.shape[2])]
                assert sorted(min(h) for h in held if h) == [0, 1, 2, 3] and all(len(h) <= 1 for h in held)
        _, index, _ = p.shell_arrays(p.layer_depth[1])
        t = p.shell_layers(p.layer_depth[1]).index(1)
        lat, lon = (int(v[0]) for v in np.nonzero((index[t] >= 0).any(axis=-1)))
        e = p.expert(lat, lon, p.layer_depth[1], layer=1)  # an expert's rows are its GGUF down columns
        real = e.index[0] >= 0
        j = e.index[0][real]
        assert len(j) == 48
        np.testing.assert_array_equal(e.field("down")[0][real], stacked[j // 48, :, j % 48])
        if shared_ff:  # the shared expert is not a cell: it is the layer's always-on part
            assert p.tensor_info("blk.1.ffn_down_shexp.weight").shape == (64, shared_ff)
            assert not any("shexp" in n for j in ex["tensors"] for n in j["parts"])
    code, _, err = run_cli(capsys, "export", str(pkg), str(out), "-q")
    assert code == 0, err
    assert _tensors(out) == _tensors(src) and out.read_bytes() == src.read_bytes()


def test_a_gguf_moe_with_quantized_experts_streams_them_from_the_sphere_as_blocks(tmp_path, capsys):
    """Q8_0 stacked experts become one cell each, quantized again on the sphere: gate and up are
    the GGUF's blocks' values exactly, the runtime streams them as blocks, and the export gives
    back gate and up byte for byte (ffn_down within the recorded change)."""
    from spherefmt.runtime import Session

    src = make_llama_gguf(tmp_path / "moe.gguf", experts=4, ff=64, quantized_ffn=True, rope_freqs=False)
    pkg, out = tmp_path / "moe.sphere", tmp_path / "back.gguf"
    with pytest.warns(UserWarning, match="quantized again onto the sphere as Q8_0"):
        spherefmt.save(src, pkg)
    reader = {t.name: t for t in gguf.GGUFReader(src).tensors}
    with spherefmt.open(pkg) as p:
        assert p.architecture == "llama" and p.header.experts is not None
        assert p.header.quantization == {"type": "Q8_0", "core": [], "sphere": True}
        stacked = gguf.quants.dequantize(reader["blk.1.ffn_gate_exps.weight"].data, reader["blk.1.ffn_gate_exps.weight"].tensor_type)
        for lat, lon, depth in list(p.experts())[:3]:
            e = p.expert(lat, lon, depth, layer=1)
            real = e.index[0] >= 0
            if real.any():
                j = e.index[0][real]
                np.testing.assert_array_equal(e.field("gate")[0][real], stacked[j // 64, j % 64])
    # the runtime runs it as Mixtral (llama.cpp's llama architecture with experts), blocks held:
    # transformers' Mixtral on the package's values (load_model maps llama.cpp's names back)
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.helpers import started_backends

    hf = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32)
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = np.random.default_rng(3).integers(0, 256, 10)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)[None]).logits[0].numpy()
    for backend in started_backends():
        with Session(pkg, backend=backend, budget="60%", weights="stored") as s:
            got = s.logits(ids)
            st = s.stats()
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=backend)
        assert "Q8_0" in st["weight_formats"] and st["peak_device_bytes"] <= st["budget_bytes"], backend
    code, _, err = run_cli(capsys, "export", str(pkg), str(out), "-q")
    assert code == 0, err
    back = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert list(back) == list(reader)
    for name, t in reader.items():
        if "ffn_down" in name:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            b = gguf.quants.dequantize(back[name].data, back[name].tensor_type)
            assert back[name].tensor_type == t.tensor_type and np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) < 0.01
        else:
            assert bytes(np.asarray(back[name].data).tobytes()) == bytes(np.asarray(t.data).tobytes()), name


def _permuted(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out again here (the reference)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_a_hugging_face_llama_exports_for_llama_cpp(tmp_path, capsys, quantize):
    """Every tensor under llama.cpp's name, Q/K permuted per head, the metadata llama.cpp reads
    and the BPE tokenizer, read back with the gguf package's reader; with ``--quantize q8_0``
    the matrices are the gguf quantizer's blocks."""
    from spherefmt.testing import llama_config, make_llama, save_hf_folder

    cfg = llama_config(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)
    sd = make_llama(cfg, "F32", seed=1)
    src = tmp_path / "hf"
    save_hf_folder(src, sd, cfg)
    vocab = {f"t{i}": i for i in range(254)}
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": ["t 1"]},
                                                    "added_tokens": [{"id": 254, "content": "<s>", "special": True}]}))
    pkg, out = tmp_path / "m.sphere", tmp_path / "m.gguf"
    spherefmt.save(src, pkg, graticule="2x2")
    args = ["export", str(pkg), str(out), "-q"] + (["--quantize", quantize] if quantize else [])
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    r = gguf.GGUFReader(out)
    kv = {f.name: f for f in r.fields.values()}
    assert kv["general.architecture"].contents() == "llama" and kv["llama.block_count"].contents() == 2
    assert kv["llama.attention.head_count_kv"].contents() == 2 and kv["llama.feed_forward_length"].contents() == 96
    assert kv["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = kv["tokenizer.ggml.tokens"].contents()
    assert tokens[5] == "t5" and tokens[254] == "<s>" and kv["tokenizer.ggml.token_type"].contents()[254] == 3
    got = {t.name: t for t in r.tensors}
    Q = gguf.GGMLQuantizationType.Q8_0

    def values(name: str) -> np.ndarray:
        t = got[name]
        if t.tensor_type == Q:
            return gguf.quants.dequantize(np.asarray(t.data), Q).reshape(tuple(reversed([int(x) for x in t.shape])))
        return np.asarray(t.data)

    want = {"token_embd.weight": sd["model.embed_tokens.weight"], "output.weight": sd["lm_head.weight"],
            "blk.1.attn_q.weight": _permuted(sd["model.layers.1.self_attn.q_proj.weight"], 4),
            "blk.1.attn_k.weight": _permuted(sd["model.layers.1.self_attn.k_proj.weight"], 2),
            "blk.0.ffn_down.weight": sd["model.layers.0.mlp.down_proj.weight"],
            "blk.0.attn_norm.weight": sd["model.layers.0.input_layernorm.weight"]}
    assert len(got) == 2 + 1 + 2 * 9
    for name, w in want.items():
        if quantize and w.ndim == 2:
            assert got[name].tensor_type == Q
            ref = gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), Q), Q)
            np.testing.assert_array_equal(values(name), ref, err_msg=name)
        else:
            np.testing.assert_array_equal(values(name), w, err_msg=name)


def test_the_llama_cpp_export_refuses_what_it_cannot_say(tmp_path, capsys):
    from spherefmt.testing.zoo import save_zoo_model

    for name, match in (("llama3", "RoPE scaling"), ("mistral", "sliding window"), ("qwen2", "model_type")):
        folder = save_zoo_model(name, tmp_path / name)
        pkg = spherefmt.save(folder, tmp_path / f"{name}.sphere", graticule="2x2", depth=2)
        code, _, err = run_cli(capsys, "export", str(pkg), str(tmp_path / f"{name}.gguf"), "-q")
        assert code == 2 and match in err and not (tmp_path / f"{name}.gguf").exists(), (name, err)


def test_a_llama_gguf_package_streams_as_transformers_reads_the_gguf(tmp_path):
    """llama.cpp's names, its Q/K permutation undone, F16 embeddings and a raw Q8_0 LM head held
    as they are: logits equal transformers' ``from_pretrained(gguf_file=...)`` on every backend,
    resident and under a budget."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from spherefmt.runtime import Session
    from tests.helpers import started_backends

    src = make_llama_gguf(tmp_path / "m.gguf", d=64, ff=128, rope_freqs=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = np.random.default_rng(7).integers(0, 256, 12)
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(ids)[None]).logits[0].numpy()
    pkg = spherefmt.save(src, tmp_path / "m.sphere")
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32)  # llama.cpp's names mapped back
    with torch.no_grad():
        np.testing.assert_array_equal(ours(torch.as_tensor(ids)[None]).logits[0].numpy(), ref)
    for backend in started_backends():
        with Session(pkg, backend=backend) as s:
            np.testing.assert_allclose(s.logits(ids), ref, atol=1e-5, rtol=0, err_msg=backend)
        with Session(pkg, backend=backend, budget="70%", weights="stored") as s:
            out = s.logits(ids)
            st = s.stats()
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=backend)
        assert st["weight_formats"] == ["F16", "F32", "Q8_0"] and st["peak_device_bytes"] <= st["budget_bytes"]
    # the permutation matters: without it the logits are far off (the test can fail)
    from spherefmt.interop.llamacpp import unpermute as _unpermute

    q = spherefmt.open(pkg).tensor("blk.0.attn_q.weight")
    assert not np.array_equal(_unpermute(q, 4), q)


def test_a_gguf_with_what_the_runtime_does_not_implement_is_refused_by_name(tmp_path):
    from spherefmt.runtime import Session

    pkg = spherefmt.save(make_llama_gguf(tmp_path / "r.gguf"), tmp_path / "r.sphere")  # with rope_freqs.weight
    with pytest.raises(FormatError, match="rope_freqs.weight"):
        Session(pkg, backend="numpy")
    if importlib.util.find_spec("transformers") is not None:
        with pytest.raises(FormatError, match="rope_freqs.weight"):
            spherefmt.interop.hf.load_model(pkg)


def test_a_k_quant_gguf_streams_q4_k_as_blocks_and_reads_q6_k(tmp_path):
    """A GGUF as ``Q4_K_M`` lays it out (``Q4_K`` and ``Q6_K`` attention, a ``Q6_K`` head): the
    ``Q4_K`` matrices are held as their blocks, the ``Q6_K`` ones widened by gguf's dequantizer
    at load; logits equal transformers' ``from_pretrained(gguf_file=...)`` on every backend."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from spherefmt.runtime import Session
    from tests.helpers import started_backends

    src = make_llama_gguf(tmp_path / "k.gguf", d=256, ff=256, rope_freqs=False, k_quants=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="k.gguf", dtype=torch.float32)
    ids = np.random.default_rng(8).integers(0, 256, 12)
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(ids)[None]).logits[0].numpy()
    assert np.abs(ref).max() > 1e-3  # the Q6_K head's values reach the logits
    pkg = spherefmt.save(src, tmp_path / "k.sphere")
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32)  # raw Q4_K/Q6_K by gguf's dequantizer
    with torch.no_grad():
        np.testing.assert_array_equal(ours(torch.as_tensor(ids)[None]).logits[0].numpy(), ref)
    for backend in started_backends():
        with Session(pkg, backend=backend, budget="70%", weights="stored") as s:
            out = s.logits(ids)
            st = s.stats()
        np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=backend)
        assert st["weight_formats"] == ["F16", "F32", "Q4_K"] and st["peak_device_bytes"] <= st["budget_bytes"]


def test_a_q4_k_m_gguf_streams_its_ffn_from_the_sphere(tmp_path):
    """As llama.cpp's ``Q4_K_M`` lays a model out (``Q4_K`` gate/up and attention, ``Q6_K``
    down, v and head): the FFN goes onto a ``Q4_K`` sphere (``ffn_down`` quantized again per
    neuron, the change recorded), the rest stays as it was.  The runtime's logits equal
    transformers' on the package's values (its ``gguf_file`` model with the package's FFN), and
    are close to transformers' on the GGUF itself."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from spherefmt.runtime import Session
    from tests.helpers import started_backends

    src = make_llama_gguf(tmp_path / "m.gguf", d=256, ff=256, rope_freqs=False, k_quants=True, quantized_ffn="Q4_K_M")
    with pytest.warns(UserWarning, match="quantized again onto the sphere as Q4_K"):
        pkg = spherefmt.save(src, tmp_path / "m.sphere")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = np.random.default_rng(5).integers(0, 256, 12)
    with torch.no_grad():
        orig = hf(torch.as_tensor(ids)[None]).logits[0].numpy()
    with spherefmt.open(pkg) as p:
        assert p.header.quantization["type"] == "Q4_K" and p.header.quantization["core"] == []
        change = float(p.header.metadata["spherefmt.quantization_rel_rms"])
        assert 0 < change < 0.1
        for layer, block in enumerate(hf.model.layers):  # the package's FFN values into the reference
            for part, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                getattr(block.mlp, part).weight.data = torch.as_tensor(p.tensor(f"blk.{layer}.{name}.weight"))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)[None]).logits[0].numpy()
    assert np.abs(ref - orig).max() > 0  # ffn_down changed, and the reference sees it
    for backend in started_backends():
        with Session(pkg, backend=backend, budget="60%", weights="stored") as s:
            out = s.logits(ids)
            st = s.stats()
        np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=backend)
        assert st["weight_formats"] == ["F16", "F32", "Q4_K"] and st["peak_device_bytes"] <= st["budget_bytes"]
    assert np.abs(out - orig).max() / np.abs(orig).max() < 0.1


def test_a_quantized_ffn_of_an_architecture_without_a_sphere_stays_raw_bit_for_bit(tmp_path, capsys):
    """Only a Llama-family GGUF's quantized FFN goes onto a sphere; in any other architecture the
    blocks stay raw in core/ (not widened to float32 values) and export byte-identical."""
    src = make_llama_gguf(tmp_path / "m.gguf", quantized_ffn=True)
    other = tmp_path / "other.gguf"
    other.write_bytes(src.read_bytes().replace(b"llama", b"zorba"))  # same lengths: a valid GGUF
    assert gguf.GGUFReader(other).fields["general.architecture"].contents() == "zorba"
    pkg, out = tmp_path / "o.sphere", tmp_path / "back.gguf"
    code, _, err = run_cli(capsys, "convert", str(other), str(pkg), "-q")
    assert code == 0, err
    with spherefmt.open(pkg) as p:
        assert p.architecture == "generic" and p.header.quantization is None
        assert p.tensor_info("blk.0.ffn_gate.weight").dtype == "U8"
    code, _, err = run_cli(capsys, "export", str(pkg), str(out), "-q")
    assert code == 0, err
    assert out.read_bytes() == other.read_bytes()
