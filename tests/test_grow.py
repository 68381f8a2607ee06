"""Growing the sphere: new neurons and new layers change nothing until trained, in place."""

from __future__ import annotations

import json

import numpy as np
import pytest

import spherefmt
from spherefmt.cli import main
from spherefmt.runtime import Session
from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama, save_hf_folder
from spherefmt.training.grow import grow_layers, grow_neurons

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import spherefmt.training.modules as st  # noqa: E402 - after the importorskip above
from tests.helpers import changed_keys, object_digests, train_steps  # noqa: E402 - after the importorskip above

IDS = np.random.default_rng(0).integers(0, 300, (2, 24))


def _folder(tmp_path, arch: str, layers: int = 4):
    if arch == "gpt2":
        cfg = gpt2_config(n_layer=layers, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
        sd = make_gpt2(cfg, "F32", 0)
    else:
        cfg = llama_config(num_hidden_layers=layers, hidden_size=64, intermediate_size=176, vocab_size=300)
        sd = make_llama(cfg, "F32", 0)
    save_hf_folder(tmp_path / "src", sd, cfg)
    return tmp_path / "src"


def _hf_logits(folder_or_pkg, tmp_path) -> np.ndarray:
    """Logits of transformers, loading either the source folder or an export of the package
    (after growth: new shapes, config from the package)."""
    if spherefmt.is_package(str(folder_or_pkg)):
        out = tmp_path / "export.safetensors"
        spherefmt.export(folder_or_pkg, out)
        with spherefmt.open(folder_or_pkg) as p:
            cfg = transformers.AutoConfig.for_model(**p.config)
        model = transformers.AutoModelForCausalLM.from_config(cfg).float()
        from safetensors.torch import load_file

        result = model.load_state_dict(load_file(out), strict=False)
        assert not [k for k in result.missing_keys if "lm_head" not in k], result.missing_keys
        model.tie_weights()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_pkg, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def _runtime_logits(pkg) -> np.ndarray:
    with Session(str(pkg), "numpy", prefetch=False) as s:
        return np.stack([s.logits(row) for row in IDS])


def _close(a: np.ndarray, b: np.ndarray) -> None:
    # adding neurons changes the length of the FFN sums, so BLAS may order them differently
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_new_neurons_change_nothing_until_trained(tmp_path, arch):
    src = _folder(tmp_path, arch)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x4")
    base = _hf_logits(src, tmp_path)
    with spherefmt.open(pkg) as p:
        n0, k0 = list(p.layout.neurons), p.slots(1)
    before = object_digests(pkg)
    # spread over every layer, then 40 more into one cell of shell 1: more than its free slots
    grow_neurons(pkg, 8)
    mid = object_digests(pkg)
    rep = grow_neurons(pkg, 40, cell=(0, 1), depth=1)
    after = object_digests(pkg)
    with spherefmt.open(pkg) as p:
        d1 = p.shell_layers(1)
        assert [n for n in p.layout.neurons] == [n + 8 + (40 if i in d1 else 0) for i, n in enumerate(n0)]
        assert p.slots(1) > k0 and rep["shells"][0]["capacity"][1] == p.slots(1)
        assert p.config["n_inner" if arch == "gpt2" else "intermediate_size"] == max(p.layout.neurons)
        e = p.expert(0, 1, 1)
        new = e.index >= np.array([n0[la] + 8 for la in e.layers])[:, None]
        assert new.sum() == 40 * len(d1)
        assert not e.field(p.layout.out_field)[new].astype(np.float32).any()  # zero outputs
        assert e.field(p.layout.in_field)[new].astype(np.float32).any()  # real inputs
        keys, full = set(p.expert_keys(0, 1, 1)), p.shard_key(0, 1, 1)
    # the first growth gave every cell one neuron per layer (each full cell got a second slot
    # block); the second wrote only expert (0, 1, 1)'s later slot blocks (its first is full) and
    # metadata: every core tensor and every other expert is byte-identical
    touched = {k for k in changed_keys(mid, after) if not k.endswith("zarr.json") and "/index/" not in k
               and "/parent/" not in k}
    assert len(keys) == 3 and touched == keys - {full}, touched
    assert not any(k.startswith("core/") for k in changed_keys(before, after))
    _close(_hf_logits(pkg, tmp_path), base)  # exported with padded layers, loaded by transformers
    _close(_runtime_logits(pkg), base)  # streamed: grown experts span two objects


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_new_layers_are_identity_blocks(tmp_path, arch):
    src = _folder(tmp_path, arch)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x4")
    base = _runtime_logits(pkg)
    before = object_digests(pkg)
    out = grow_layers(pkg, 2)
    assert out == {"layers": [4, 5], "depth": 4, "new_shell": True}
    with spherefmt.open(pkg) as p:
        assert p.depth == 5 and p.layer_depth[-2:] == [4, 4] and len(p.layout.neurons) == 6
        assert p.config["n_layer" if arch == "gpt2" else "num_hidden_layers"] == 6
        names = p.keys()
        assert names.index(next(n for n in names if ".5." in n)) > names.index(next(n for n in names if ".3." in n))
    np.testing.assert_array_equal(_runtime_logits(pkg), base)  # + exact zeros: bit-identical
    np.testing.assert_array_equal(_hf_logits(pkg, tmp_path), _hf_logits(src, tmp_path))
    assert not {k for k in changed_keys(before, object_digests(pkg)) if k in before and not k.endswith("zarr.json")}


def test_at_ten_shells_new_layers_join_the_surface_shell(tmp_path):
    cfg = gpt2_config(n_layer=10, n_embd=32, n_head=4, vocab_size=300, n_positions=64)
    save_hf_folder(tmp_path / "src", make_gpt2(cfg, "F32", 1), cfg)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(tmp_path / "src", pkg, graticule="1x2", depth=10)
    base = _runtime_logits(pkg)
    before = object_digests(pkg)
    assert grow_layers(pkg, 1) == {"layers": [10], "depth": 0, "new_shell": False}
    with spherefmt.open(pkg) as p:
        assert p.depth == 10 and p.shell_layers(0) == [9, 10]
    np.testing.assert_array_equal(_runtime_logits(pkg), base)
    new = {k for k in changed_keys(before, object_digests(pkg)) if not k.endswith("zarr.json")}
    # the surface shell's new layer lives in new objects (c/1/...): old experts untouched
    assert {k for k in new if k.startswith("sphere/")} == {f"sphere/d0/neurons/c/1/0/{lon}/0/0" for lon in (0, 1)} | {
        "sphere/d0/index/c/1/0/0/0", "sphere/d0/parent/c/1/0/0/0"}


def test_training_grown_experts_touches_only_them(tmp_path):
    src = _folder(tmp_path, "gpt2")
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x4")
    grow_neurons(pkg, 40, cell=(0, 1), depth=1)
    before = object_digests(pkg)
    m = st.load(pkg, trainable=[(0, 1, 1)])
    ids = torch.from_numpy(IDS)
    losses = train_steps(m, ids, 8)
    assert losses[-1] < losses[0]
    written = m.save_changes()
    m.model.eval()
    with torch.no_grad():
        trained = m.model(ids).logits.numpy()
    m.pkg.close()
    assert written["experts"] == [(0, 1, 1)] and written["tensors"] == []
    with spherefmt.open(pkg) as p:
        keys = set(p.expert_keys(0, 1, 1))
    assert changed_keys(before, object_digests(pkg)) == keys
    np.testing.assert_allclose(_hf_logits(pkg, tmp_path), trained, atol=1e-5, rtol=0)


def test_growth_inside_a_vhd_is_in_place(tmp_path):
    src = _folder(tmp_path, "llama")
    pkg = tmp_path / "m.vhd"
    spherefmt.save(src, pkg, graticule="2x4")
    base = _runtime_logits(pkg)
    before, size = object_digests(pkg), pkg.stat().st_size
    grow_neurons(pkg, 40, cell=(1, 2), depth=0)
    grow_layers(pkg, 1)
    after = object_digests(pkg)
    with spherefmt.open(pkg) as p:
        keys = set(p.expert_keys(1, 2, 0))
    rewritten = {k for k in changed_keys(before, after) if k in before and not k.endswith("zarr.json")}
    assert rewritten <= keys | {"sphere/d0/index/c/0/0/0/0", "sphere/d0/parent/c/0/0/0/0"}, rewritten
    assert pkg.stat().st_size > size
    from spherefmt.testing.images import check_vhd

    assert check_vhd(pkg, tmp_path)["format"] == "vpc"  # qemu-img reads it, fsck.vfat finds it clean
    _close(_runtime_logits(pkg), base)


def test_interrupted_growth_reads_as_before(tmp_path, monkeypatch):
    src = _folder(tmp_path, "gpt2")
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x4")
    base = _runtime_logits(pkg)
    from spherefmt.format.store import PackageStore

    def crash(*a, **k):
        raise KeyboardInterrupt

    # everything written but the manifest, and nothing cleaned up: what a SIGKILL leaves
    monkeypatch.setattr(PackageStore, "_commit", crash)
    for fn in (lambda: grow_neurons(pkg, 40, cell=(0, 1), depth=1), lambda: grow_layers(pkg, 1)):
        with pytest.raises(KeyboardInterrupt):
            fn()
        with spherefmt.open(pkg) as p:
            assert p.slots(1) == 32 and len(p.layer_depth) == 4
        np.testing.assert_array_equal(_runtime_logits(pkg), base)
    monkeypatch.undo()
    grow_neurons(pkg, 40, cell=(0, 1), depth=1)  # run again: completes
    _close(_runtime_logits(pkg), base)


def test_cli_grow(tmp_path, capsys):
    src = _folder(tmp_path, "gpt2", layers=2)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x2")

    def run(*args: str) -> int:
        try:
            main(["grow", str(pkg), *args])
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert run("--neurons", "70", "--cell", "1,1", "--depth", "0", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shells"][0]["capacity"] == [64, 192] and out["shells"][0]["experts"] == [[1, 1, 0]]
    assert run("--layers", "1") == 0
    assert "new shell" in capsys.readouterr().out
    for bad in ([], ["--neurons", "2", "--layers", "1"], ["--neurons", "2", "--cell", "1,1"],
                ["--neurons", "2", "--cell", "x", "--depth", "0"], ["--neurons", "2", "--depth", "7"],
                ["--neurons", "2", "--cell", "5,5", "--depth", "0"], ["--layers", "1", "--depth", "0"]):
        assert run(*bad) == 2, bad
        assert capsys.readouterr().err.startswith("sphere: error:")
