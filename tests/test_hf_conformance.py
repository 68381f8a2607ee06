"""The conformance table of architectures: every model the runtime claims, made by
``transformers``' own random init and ``save_pretrained`` (sharded), converted, and run by the
runtime on numpy, torch and vulkan, dense and with every cell routed, and by
``spherefmt.interop.hf.load_model``, against ``from_pretrained`` on the same folder in float32.
The rest is refused with a message that names what is not implemented.

Tolerance: max |difference| / max |reference logit| <= 1e-4 (the runtime measures ~1e-6); a
feature ignored moves these models' logits by 0.4 to 5 in that measure (``spherefmt.testing.zoo``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import spherefmt
from spherefmt.errors import FormatError
from spherefmt.runtime.session import Session
from spherefmt.testing.zoo import REFUSED, ZOO, save_zoo_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(0).integers(0, 320, 24)
TOL = 1e-4


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _reference(folder) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(IDS)[None]).logits[0].numpy()


def _backends() -> list[str]:
    from spherefmt.backends import probe

    ok = {b["name"] for b in probe() if b.get("available")}
    return [b for b in ("numpy", "torch:cpu", "vulkan") if b in ok]


BACKENDS = _backends()


@pytest.mark.parametrize("name", list(ZOO))
def test_runtime_and_load_model_equal_from_pretrained(tmp_path, name):
    folder = save_zoo_model(name, tmp_path / "hf")
    ref = _reference(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no model of the table may fall back to a generic package
        pkg = spherefmt.save(folder, tmp_path / "m.sphere", graticule="2x2", depth=2)
    with spherefmt.open(pkg) as p:
        assert p.architecture == ("gpt2" if name == "gpt2" else "llama")
        assert sum(1 for _ in p.experts()) > 1  # the FFN is on the sphere
    for backend in BACKENDS:
        with Session(pkg, backend=backend) as s:
            assert _rel(s.logits(IDS), ref) <= TOL, backend
        if backend == "numpy":
            with Session(pkg, backend=backend, active="100%") as s:
                assert _rel(s.logits(IDS), ref) <= TOL, "top-k = all cells"
    ours = spherefmt.interop.hf.load_model(pkg, dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(ours(torch.as_tensor(IDS)[None]).logits[0].numpy(), ref) <= TOL, "load_model"


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma", "olmo2"])
def test_bfloat16_checkpoints(tmp_path, name):
    """A bfloat16 checkpoint runs (widened to float32) as ``from_pretrained(dtype=float32)`` runs it."""
    folder = save_zoo_model(name, tmp_path / "hf", dtype="bfloat16")
    ref = _reference(folder)
    pkg = spherefmt.save(folder, tmp_path / "m.sphere", graticule="2x2", depth=2)
    for backend in BACKENDS:
        with Session(pkg, backend=backend) as s:
            assert _rel(s.logits(IDS), ref) <= TOL, backend


@pytest.mark.filterwarnings("ignore:.*is not GPT-2 or Llama-family")
@pytest.mark.parametrize("name", list(REFUSED))
def test_unimplemented_configs_are_refused_by_name(tmp_path, name):
    folder = save_zoo_model(name, tmp_path / "hf")
    pkg = spherefmt.save(folder, tmp_path / "m.sphere", graticule="2x2", depth=2)  # every model converts
    with pytest.raises(FormatError, match=REFUSED[name][2]):
        Session(pkg, backend="numpy")


def test_an_unknown_config_field_is_refused_not_ignored(tmp_path):
    """A field no reader knows (a feature a newer transformers adds) stops the runtime, named."""
    folder = save_zoo_model("llama2", tmp_path / "hf")
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_sink_tokens"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    pkg = spherefmt.save(folder, tmp_path / "m.sphere", graticule="2x2", depth=2)
    with pytest.raises(FormatError, match="'attention_sink_tokens' .* not implemented"):
        Session(pkg, backend="numpy")


def test_phi3_fused_projections_split_on_conversion_and_fused_on_export(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj are stored as Llama's parts (the FFN on the sphere) and
    every export writes them fused again, bit for bit, under their own names."""
    from safetensors.numpy import load_file

    folder = save_zoo_model("phi3", tmp_path / "hf")
    original = {}
    for shard in sorted(folder.glob("*.safetensors")):
        original.update(load_file(shard))
    pkg = spherefmt.save(folder, tmp_path / "m.sphere", graticule="2x2", depth=2)
    with spherefmt.open(pkg) as p:
        names = set(p.keys())
        assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" not in names
        assert p.entry("model.layers.0.mlp.up_proj.weight").where == "sphere"
        assert {f["name"] for f in p.header.fused} == {f"model.layers.{i}.{t}" for i in range(2)
                                                       for t in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")}
    spherefmt.export(pkg, tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    spherefmt.export(pkg, tmp_path / "folder")
    assert _rel(_reference(tmp_path / "folder"), _reference(folder)) == 0.0
