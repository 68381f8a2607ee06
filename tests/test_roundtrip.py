"""Round trips are bit-exact: every exported tensor equals the source byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import spherefmt
from spherefmt.dtypes import from_numpy
from spherefmt.testing import save_hf_folder
from tests.helpers import dest, model, same_bytes


@pytest.mark.parametrize("store", ["dir", "zip", "memory"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_roundtrip_bit_exact(arch, dtype, store, tmp_path):
    sd, cfg = model(arch, dtype)
    url = spherefmt.save(sd, dest(store, tmp_path), config=cfg, graticule="2x3", depth=2)
    with spherefmt.open(url) as pkg:
        assert pkg.architecture == arch
        assert pkg.keys() == list(sd)
        for name, want in sd.items():
            assert same_bytes(pkg.tensor(name), want), name
        out = tmp_path / "back.safetensors"
        spherefmt.export(pkg, out)
    # the reference reader (safetensors' own, through torch for bfloat16) sees the same bytes
    with safe_open(str(out), framework="pt") as f:
        assert list(f.keys()) == sorted(sd) or set(f.keys()) == set(sd)
        for name, want in sd.items():
            t = f.get_tensor(name)
            dt, raw = from_numpy(want)
            assert (t.dtype, tuple(t.shape)) == (spherefmt.dtypes.to_torch(raw, dt).dtype, want.shape)
            assert t.contiguous().view(torch.uint8).numpy().tobytes() == want.tobytes(), name


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_torch_state_dict_roundtrip(dtype, tmp_path):
    sd, cfg = model("gpt2", dtype)
    tsd = {k: spherefmt.dtypes.to_torch(*reversed(from_numpy(v))) for k, v in sd.items()}
    src = tmp_path / "model.pt"
    torch.save(tsd, src)
    url = spherefmt.save(src, tmp_path / "m.sphere", config=cfg)
    out = spherefmt.export(url, tmp_path / "back.pt")
    back = torch.load(out, weights_only=True)
    assert list(back) == list(tsd)
    for k in tsd:
        assert back[k].dtype == tsd[k].dtype and torch.equal(back[k].view(torch.uint8), tsd[k].view(torch.uint8)), k
    torch_sd = spherefmt.open(url).state_dict(framework="torch")
    for k in tsd:
        assert torch.equal(torch_sd[k].view(torch.uint8), tsd[k].view(torch.uint8)), k


def test_torch_tensors_in_memory(tmp_path):
    sd, cfg = model("llama", "BF16")
    tsd = {k: spherefmt.dtypes.to_torch(*reversed(from_numpy(v))) for k, v in sd.items()}
    pkg = spherefmt.open(spherefmt.save(tsd, tmp_path / "m.sphere", config=cfg))
    for k, v in sd.items():
        assert same_bytes(pkg.tensor(k), v)


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder(shards, tmp_path):
    sd, cfg = model("llama", "BF16")
    folder = save_hf_folder(tmp_path / "hf", sd, cfg, shards=shards)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    pkg = spherefmt.open(spherefmt.save(folder, tmp_path / "m.sphere"))
    assert pkg.config == cfg
    assert pkg.metadata["metadata"] == {"format": "pt"}
    assert pkg.file("tokenizer.json") == b'{"version": "1.0"}'
    for k, v in sd.items():
        assert same_bytes(pkg.tensor(k), v)


def test_reconvert_package_with_other_graticule(tmp_path):
    sd, cfg = model("gpt2", "BF16")
    a = spherefmt.save(sd, tmp_path / "a.sphere", config=cfg, graticule="2x2", depth=3)
    b = spherefmt.save(a, tmp_path / "b.sphere", graticule="1x4", depth=1)
    pb = spherefmt.open(b)
    assert pb.graticule == (1, 4) and pb.depth == 1 and pb.config == cfg
    for k, v in sd.items():
        assert same_bytes(pb.tensor(k), v)


def test_generic_model_warns_and_stays_exact(tmp_path):
    rng = np.random.default_rng(1)
    sd = {"encoder.weight": rng.standard_normal((7, 5)).astype(np.float32), "step": np.array(3, dtype=np.int64),
          "empty": np.zeros((0, 4), np.float16), "mask": np.array([True, False])}
    with pytest.warns(UserWarning, match="core/"):
        url = spherefmt.save(sd, tmp_path / "g.sphere")
    pkg = spherefmt.open(url)
    assert pkg.architecture == "generic" and pkg.graticule is None and list(pkg.experts()) == []
    for k, v in sd.items():
        assert same_bytes(pkg.tensor(k), v), k


def test_negative_zero_and_nan_survive(tmp_path):
    sd, cfg = model("gpt2", "F32")
    sd["transformer.h.0.ln_1.bias"] = np.full_like(sd["transformer.h.0.ln_1.bias"], -0.0)
    sd["transformer.h.1.mlp.c_fc.bias"][:5] = -0.0
    sd["transformer.h.1.mlp.c_fc.bias"][5] = np.nan
    pkg = spherefmt.open(spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, codec="none"))
    for k, v in sd.items():
        assert same_bytes(pkg.tensor(k), v), k


def test_expert_contents_match_source(tmp_path):
    sd, cfg = model("gpt2", "F32")
    pkg = spherefmt.open(spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x2", depth=3))
    seen = {layer: [] for layer in range(3)}
    for lat, lon, d in pkg.experts():
        e = pkg.expert(lat, lon, d)
        for i, layer in enumerate(e.layers):
            w_in = sd[f"transformer.h.{layer}.mlp.c_fc.weight"]
            for slot, j in enumerate(e.index[i]):
                if j < 0:
                    assert not e.neurons[i, slot].any()
                    continue
                seen[layer].append(j)
                assert np.array_equal(e.field("w_in")[i, slot], w_in[:, j])
                assert e.field("b_in")[i, slot, 0] == sd[f"transformer.h.{layer}.mlp.c_fc.bias"][j]
                assert np.array_equal(e.field("w_out")[i, slot], sd[f"transformer.h.{layer}.mlp.c_proj.weight"][j])
    for layer, idx in seen.items():
        assert sorted(idx) == list(range(128)), layer
    one = pkg.expert(1, 1, 0, layer=2)
    assert one.layers == (2,) and one.neurons.shape[0] == 1


def test_file_url_and_zarr_store_object(tmp_path):
    from zarr.storage import MemoryStore

    sd, cfg = model("llama", "BF16")
    url = spherefmt.save(sd, f"file://{tmp_path}/f.sphere", config=cfg)
    pkg = spherefmt.open(url)
    assert (tmp_path / "f.sphere" / "zarr.json").exists()
    store = MemoryStore()
    spherefmt.save(sd, store, config=cfg)
    for p in (pkg, spherefmt.open(store)):
        sd2 = p.state_dict()
        assert list(sd2) == list(sd)
        for k, v in sd.items():
            assert same_bytes(sd2[k], v), k


def test_large_core_tensors_are_written_in_slabs(tmp_path, monkeypatch):
    from spherefmt import constants
    from spherefmt.interop.safetensors import SafetensorsFile

    sd, cfg = model("gpt2", "BF16")
    folder = save_hf_folder(tmp_path / "hf", sd, cfg)
    with SafetensorsFile(folder / "model.safetensors") as f:
        full = f.read("transformer.wte.weight")
        assert f.read("transformer.wte.weight", 5, 17).tobytes() == full[5:17].tobytes()
        assert f.read("transformer.wte.weight", 70, 999).tobytes() == full[70:].tobytes()
    monkeypatch.setattr(constants, "CORE_CHUNK_BYTES", 640)  # 10 rows of wte per chunk, 40 per slab
    pkg = spherefmt.open(spherefmt.save(folder, tmp_path / "m.sphere"))
    assert pkg.array("core/transformer.wte.weight").chunks == (10, 32)
    for k, v in sd.items():
        assert same_bytes(pkg.tensor(k), v), k
