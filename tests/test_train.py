"""Trainable packages: fine-tune selected experts, write back only what changed (dir and .vhd)."""

from __future__ import annotations

import numpy as np
import pytest

import spherefmt
from spherefmt.cli import main
from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama, save_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import spherefmt.training.modules as st  # noqa: E402 - after the importorskip above
from tests.helpers import changed_keys, object_digests, train_steps  # noqa: E402 - after the importorskip above


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["dir", "vhd", "zip"])
def test_train_selected_experts_writes_back_only_them(tmp_path, arch, kind):
    if arch == "gpt2":
        cfg = gpt2_config(n_layer=4, n_embd=64, n_head=4, vocab_size=300)
        sd = make_gpt2(cfg, "F32", 0)
    else:
        cfg = llama_config(num_hidden_layers=4, hidden_size=64, intermediate_size=176, vocab_size=300)
        sd = make_llama(cfg, "F32", 0)
    save_hf_folder(tmp_path / "src", sd, cfg)
    pkg = tmp_path / {"vhd": "m.vhd", "zip": "m.zip", "dir": "m.sphere"}[kind]
    spherefmt.save(tmp_path / "src", pkg, graticule="2x4")
    before = object_digests(pkg)
    chosen = [(0, 1, 1), (1, 3, 2)]
    m = st.load(pkg, trainable=chosen)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, (4, 32)))
    losses = train_steps(m, ids, 6)
    assert losses[-1] < losses[0]
    written = m.save_changes()
    m.model.eval()
    with torch.no_grad():
        trained = m.model(ids).logits.numpy()
    m.pkg.close()
    assert sorted(written["experts"]) == sorted(chosen) and written["tensors"] == []
    after = object_digests(pkg)
    changed = sorted(changed_keys(before, after))  # the manifest, which every commit replaces, aside
    with spherefmt.open(pkg) as p:
        shards = sorted(p.shard_key(*e) for e in chosen)
    assert len(changed) == 2 and all(c.endswith(s) for c, s in zip(changed, shards, strict=True)), changed
    # reopening gives the trained weights: exported, transformers reproduces the trained logits
    spherefmt.export(pkg, tmp_path / "back.safetensors")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    from safetensors.torch import load_file

    back.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=False)
    back.eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), trained, atol=1e-5, rtol=0)
    # a second save with nothing changed writes nothing
    m2 = st.load(pkg, trainable="experts")
    assert m2.save_changes() == {"experts": [], "tensors": [], "bytes": 0, "router": None}
    m2.pkg.close()
    if kind == "zip":  # the zip was rewritten once (beside it, then renamed), and nothing is left over
        assert sorted(q.name for q in tmp_path.iterdir()) == ["back.safetensors", "m.zip", "src"]


def test_core_training_rewrites_core_tensors_only(tmp_path):
    cfg = gpt2_config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)
    save_hf_folder(tmp_path / "src", make_gpt2(cfg, "BF16", 0), cfg)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(tmp_path / "src", pkg, graticule="2x2")
    m = st.load(pkg, trainable="core")
    with torch.no_grad():
        m.model.transformer.ln_f.weight.add_(0.5)
    written = m.save_changes()
    m.pkg.close()
    assert written["experts"] == [] and written["tensors"] == ["transformer.ln_f.weight"]
    with spherefmt.open(pkg) as p:
        got = p.tensor("transformer.ln_f.weight").astype(np.float32)
    np.testing.assert_array_equal(got, np.full(32, 1.5, np.float32))


def test_cli_train(tmp_path, capsys):
    cfg = gpt2_config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=64)
    save_hf_folder(tmp_path / "src", make_gpt2(cfg, "F32", 0), cfg)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(tmp_path / "src", pkg, graticule="2x2")
    text = tmp_path / "t.txt"
    text.write_text("the sphere turns, the sphere learns. " * 60)
    png = tmp_path / "loss.png"
    main_args = ["train", str(pkg), "--text", str(text), "--steps", "15", "--experts", "0,1,0", "--lr", "3e-2",
                 "--seq", "32", "--plot", str(png), "-q"]
    try:
        main(main_args)
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    out = capsys.readouterr().out
    first, last = (float(v) for v in out.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first and "wrote 1 expert(s)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in (["--experts", "9,9,9"], ["--experts", "1,2"], []):
        with pytest.raises(SystemExit) as e:
            main(["train", str(pkg), "--text", str(text), "--steps", "1", *bad])
        assert e.value.code == 2


def test_router_trains_and_writes_back_alone(tmp_path):
    from spherefmt.format.routers import read_router, write_router
    from spherefmt.training.routers import train_router

    cfg = gpt2_config(n_layer=2, n_embd=32, n_head=4, vocab_size=300)
    save_hf_folder(tmp_path / "src", make_gpt2(cfg, "F32", 0), cfg)
    pkg = tmp_path / "m.sphere"
    spherefmt.save(tmp_path / "src", pkg, graticule="2x2")
    with spherefmt.open(pkg, "r+") as p:
        write_router(p, "learned", train_router(p, np.arange(200) % 300, steps=5, hidden=16, progress=False))
    before = object_digests(pkg)
    m = st.load(pkg, trainable="router")
    assert all(not p.requires_grad for p in m.model.parameters())
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    target = torch.zeros(16, dtype=torch.long)  # e.g. teach layer 0 to prefer cell 0
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(m.router[0](x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    written = m.save_changes()
    scores = m.router[0](x).detach().numpy()
    m.pkg.close()
    assert written["router"] == "learned" and written["experts"] == [] and written["tensors"] == []
    assert all(k.startswith("router/learned/") for k in changed_keys(before, object_digests(pkg)))
    with spherefmt.open(pkg) as p:
        np.testing.assert_allclose(read_router(p, "learned").scores(0, x.numpy()), scores, rtol=1e-5, atol=1e-5)
    plain = spherefmt.save(tmp_path / "src", tmp_path / "n.sphere", graticule="2x2")
    with pytest.raises(spherefmt.errors.InputError, match="no router"):
        st.load(plain, trainable="router")
