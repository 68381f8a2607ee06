"""Hugging Face interop: sharded save_pretrained folders in, transformers models out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import spherefmt
from spherefmt.errors import FormatError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import spherefmt.interop.hf  # noqa: E402 - after the importorskip above

TINY = Path(spherefmt.__file__).parent / "data" / "tiny-gpt2"
IDS = torch.from_numpy(np.random.default_rng(0).integers(0, 4000, (2, 20)))


def _logits(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits.float().numpy()


def _saved(tmp_path, arch: str, dtype) -> Path:
    """A real ``save_pretrained`` folder, sharded (several safetensors files and an index)."""
    if arch == "gpt2":
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=dtype)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=128, intermediate_size=344,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                       max_position_embeddings=128)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    folder = tmp_path / arch
    model.save_pretrained(folder, max_shard_size="1MB")
    if arch == "gpt2":
        (folder / "tokenizer.json").write_bytes((TINY / "tokenizer.json").read_bytes())
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_equals_from_pretrained(tmp_path, arch, dtype):
    dt = getattr(torch, dtype)
    folder = _saved(tmp_path, arch, dt)
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    with spherefmt.open(pkg) as p:
        assert p.graticule is not None and sum(1 for _ in p.experts()) > 1  # FFN on the sphere
        assert ("tokenizer.json" in p.metadata["files"]) == (arch == "gpt2")
    ours = spherefmt.interop.hf.load_model(pkg)
    assert next(ours.parameters()).dtype == dt  # "auto": the package's dtype
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
    np.testing.assert_array_equal(_logits(ours), _logits(theirs))
    # everything downstream of transformers works: generation equals too
    a = ours.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    b = theirs.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_load_model_from_bare_names_and_refusals(tmp_path):
    from spherefmt.testing import gpt2_config, make_gpt2

    cfg = gpt2_config(n_layer=2, n_embd=32, n_head=4, vocab_size=4096)
    sd = make_gpt2(cfg, "F32", 0)
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}  # a state dict without the prefix
    m = spherefmt.interop.hf.load_model(spherefmt.save(bare, tmp_path / "bare.sphere", config=cfg), dtype=torch.float32)
    np.testing.assert_array_equal(m.transformer.h[1].mlp.c_fc.weight.detach().numpy(),
                                  sd["transformer.h.1.mlp.c_fc.weight"])
    with pytest.warns(UserWarning, match="not GPT-2 or Llama"):
        generic = spherefmt.save({"w": np.ones(3, np.float32)}, tmp_path / "g.sphere")
    with pytest.raises(FormatError, match="GPT-2 and Llama"):
        spherefmt.interop.hf.load_model(generic)


def test_export_to_a_folder_is_a_save_pretrained_folder(tmp_path, capsys):
    """The registry's Hugging Face writer: a package exported to a folder loads with
    ``from_pretrained`` and gives the original model's logits; the tensors are the original bytes
    and the tokenizer and config come back."""
    from safetensors.numpy import load_file

    from spherefmt.cli import main
    from spherefmt.interop.registry import FORMATS, format_for

    folder = _saved(tmp_path, "gpt2", torch.float32)
    pkg = spherefmt.save(folder, tmp_path / "m.sphere")
    out = tmp_path / "back"
    with pytest.raises(SystemExit) as e:
        main(["export", pkg, str(out), "-q"])
    assert e.value.code == 0, capsys.readouterr().err
    assert format_for(out, writing=True) is FORMATS["hf"]
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_array_equal(_logits(back), _logits(theirs))
    exported = load_file(out / "model.safetensors")
    with spherefmt.open(pkg) as p:
        assert set(exported) == set(p.keys())
        for name, arr in exported.items():
            assert arr.tobytes() == p.tensor(name).tobytes(), name
    with pytest.raises(spherefmt.errors.InputError, match="unknown export format"):
        spherefmt.export(pkg, tmp_path / "x.npy")
