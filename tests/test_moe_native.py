"""Open-weight MoE models with their native experts as cells (issue 17): Mixtral, Qwen2-MoE (with
its shared expert), Qwen3-MoE and OLMoE made by ``transformers``' own init and ``save_pretrained``
(the per-expert form it writes), converted, run with the model's own router on every backend,
resident and under a budget smaller than the experts, against ``from_pretrained``; exported back
bit for bit; loaded by ``load_model``.
"""

from __future__ import annotations

import numpy as np
import pytest

import spherefmt
from spherefmt.errors import FormatError, InputError
from spherefmt.runtime.session import Session
from spherefmt.testing.zoo import MOE, save_zoo_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(1).integers(0, 320, 20)
TOL = 1e-4


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _reference(folder, ids=IDS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].numpy()


def _backends() -> list[str]:
    from spherefmt.backends import probe

    ok = {b["name"] for b in probe() if b.get("available")}
    return [b for b in ("numpy", "torch:cpu", "vulkan") if b in ok]


BACKENDS = _backends()


def _originals(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("name,dtype", [(n, "float32") for n in MOE] + [("mixtral", "bfloat16")])
def test_native_experts_run_exactly_resident_and_streamed(tmp_path, name, dtype):
    folder = save_zoo_model(name, tmp_path / "hf", dtype=dtype)
    ref = _reference(folder)
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    with spherefmt.open(pkg) as p:
        ex = p.header.experts
        assert p.architecture == "llama" and ex["count"] == 4 and ex["neurons"] == 48
        assert p.header.graticule == (2, 4)  # the smallest P x 2P with a cell per expert
        for depth in range(p.depth):  # each expert whole in a cell of its own
            _, index, _ = p.shell_arrays(depth)
            for t in range(index.shape[0]):
                owners = [set((index[t, a, b][index[t, a, b] >= 0] // 48).tolist()) for a in range(2) for b in range(4)]
                held = [o for o in owners if o]
                assert all(len(o) == 1 for o in held) and sorted(min(o) for o in held) == [0, 1, 2, 3]
    for backend in BACKENDS:
        with Session(pkg, backend=backend) as s:
            assert _rel(s.logits(IDS), ref) <= TOL, backend
        with Session(pkg, backend=backend, budget="30%") as s:  # less than the experts: they stream
            assert _rel(s.logits(IDS), ref) <= TOL, (backend, "30%")
            st = s.stats()
            assert st["experts_evicted"] > 0 and st["peak_device_bytes"] <= st["budget_bytes"]
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(ours(torch.as_tensor(IDS)[None]).logits[0].numpy(), ref) <= TOL, "load_model"


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_export_writes_every_expert_back_bit_for_bit(tmp_path, name):
    folder = save_zoo_model(name, tmp_path / "hf", dtype="bfloat16")
    original = _originals(folder)
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    with spherefmt.open(pkg) as p:
        names = set(p.keys())
        assert not any(".experts.0." in n for n in names)  # joined: one FFN tensor per projection
        joined = [n for n in names if p.entry(n).where == "sphere"]
        assert len(joined) == 2 * 3
    spherefmt.export(pkg, tmp_path / "back.safetensors")
    back = _originals_file(tmp_path / "back.safetensors")
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    spherefmt.export(pkg, tmp_path / "folder")  # a save_pretrained folder transformers loads as it was
    assert _rel(_reference(tmp_path / "folder"), _reference(folder)) == 0.0


def _originals_file(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def test_decode_reads_only_the_routed_experts(tmp_path):
    """Under a budget that holds about one layer of experts, a decode step loads the experts its
    router picks and no others (prefetch off: nothing speculative)."""
    folder = save_zoo_model("mixtral", tmp_path / "hf")
    pkg = spherefmt.save(folder, tmp_path / "m.sphere", codec="none")
    with Session(pkg, backend="numpy", budget="30%", prefetch=False) as s:
        s.logits(IDS[:4])
        before = s.stats()["experts_loaded"]
        tokens = s.generate(IDS[:4].tolist(), 6, stop_at_eos=False)
        st = s.stats()
        loads = st["experts_loaded"] - before
        # 2 layers x top-2 per token at most; the 4-token prompt reload is included above
        assert 0 < loads <= (6 + 4) * 2 * 2
        assert st["active_cell_fraction"] == pytest.approx(0.5)  # top-2 of 4 experts
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = model.generate(torch.as_tensor(IDS[:4])[None], max_new_tokens=6, do_sample=False)[0, 4:].tolist()
    assert tokens == want


def test_cell_choosing_options_are_refused_for_native_experts(tmp_path):
    folder = save_zoo_model("olmoe", tmp_path / "hf")
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    with pytest.raises(InputError, match="own router .*top 2 of 4"):
        Session(pkg, backend="numpy", active="25%")
    with pytest.raises(InputError, match="placement plan"):
        from spherefmt.format.placement import PlacementPlan

        spherefmt.save(folder, tmp_path / "p.sphere", placement=PlacementPlan({}, {}))
    with pytest.raises(InputError, match="4 experts"):
        spherefmt.save(folder, tmp_path / "g.sphere", graticule="1x2")


def test_a_package_whose_cells_mix_experts_is_refused(tmp_path, monkeypatch):
    """The reader checks the rule the format states (a cell holds one whole expert) against a
    writer that places neurons one by one instead, as for a dense model."""
    import spherefmt.format.write as write
    from spherefmt.format.placement import assign

    folder = save_zoo_model("qwen3_moe", tmp_path / "hf")
    monkeypatch.setattr(write, "expert_cells", lambda dirs, experts, p, m: assign(dirs, p, m, capacity=48))
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    with pytest.raises(FormatError, match="one whole expert"):
        Session(pkg, backend="numpy")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_training_one_native_expert_writes_back_only_its_cell(tmp_path, name):
    """The package as a transformers MoE model (its stacked experts): training one expert's cell
    rewrites that cell alone, training the core (routers included) rewrites core tensors alone,
    and the runtime then computes what the trained model computes."""
    import spherefmt.training.modules as st
    from tests.helpers import changed_keys, object_digests, train_steps

    folder = save_zoo_model(name, tmp_path / "hf")
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    with spherefmt.open(pkg) as p:
        _, index, _ = p.shell_arrays(0)
        lat, lon = (int(v[0]) for v in np.nonzero((index[0] >= 0).any(axis=-1)))
    chosen = [(lat, lon, 0)]
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 320, (2, 16)))
    for trainable, want_experts in ((chosen, chosen), ("core", [])):
        before = object_digests(pkg)
        m = st.load(pkg, trainable=trainable)
        losses = train_steps(m, ids, 4)
        assert losses[-1] < losses[0]
        written = m.save_changes()
        m.model.eval()
        with torch.no_grad():
            trained = m.model(ids[:1]).logits[0].numpy()
        m.pkg.close()
        assert sorted(written["experts"]) == want_experts
        if want_experts:
            assert written["tensors"] == []
            with spherefmt.open(pkg) as p:
                shard = p.shard_key(*chosen[0])
            changed = changed_keys(before, object_digests(pkg))  # the manifest aside
            assert len(changed) == 1 and next(iter(changed)).endswith(shard), changed
        else:
            assert written["tensors"] and not any(".experts." in t for t in written["tensors"])
            router = "block_sparse_moe.gate.weight" if name == "mixtral" else "mlp.gate.weight"
            assert any(t.endswith(router) for t in written["tensors"])  # the model's router trained too
        with Session(pkg, backend="numpy") as s:
            assert _rel(s.logits(ids[0].numpy()), trained) <= TOL
