"""Packages are plain Zarr v3 that other implementations read: tensorstore (Google's C++
library) opens every array of a default-codec package and returns the bytes zarr-python and
spherefmt return.  (The default chain is core Zarr v3: ``bytes``, ``blosc``, ``crc32c``, inside
``sharding_indexed`` for experts.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import spherefmt
from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama

ts = pytest.importorskip("tensorstore")


def _arrays(root: Path) -> list[str]:
    out = []
    for meta in sorted(root.rglob("zarr.json")):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            out.append(str(meta.parent.relative_to(root)))
    return out


@pytest.mark.parametrize("arch,dtype", [("gpt2", "BF16"), ("llama", "F16")])
def test_tensorstore_reads_every_array_byte_for_byte(tmp_path, arch, dtype):
    if arch == "gpt2":
        cfg = gpt2_config(n_layer=3, n_embd=64, vocab_size=300)
        sd = make_gpt2(cfg, dtype, 0)
    else:
        cfg = llama_config(num_hidden_layers=2, hidden_size=64, intermediate_size=176)
        sd = make_llama(cfg, dtype, 0)
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2)
    root = Path(url)
    paths = _arrays(root)
    group = zarr.open_group(str(root), mode="r")
    kinds = set()
    for path in paths:
        ours = np.asarray(group[path][...])
        theirs = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / path)}},
                         read=True).result().read().result()
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, path
        assert theirs.tobytes() == ours.tobytes(), path
        codecs = json.loads((root / path / "zarr.json").read_text())["codecs"]
        kinds.add(codecs[0]["name"])
        inner = codecs[0]["configuration"]["codecs"] if codecs[0]["name"] == "sharding_indexed" else codecs
        assert [c["name"] for c in inner] == ["bytes", "blosc", "crc32c"], path
    assert kinds == {"bytes", "sharding_indexed"} and len(paths) > len(sd) // 2
    with spherefmt.open(url) as p:  # and what tensorstore read is the model
        for name in p.keys():
            if p.entry(name).where == "core":
                a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                            "path": str(root / spherefmt.format.keys.core_key(name))}},
                            read=True).result().read().result()
                assert a.tobytes() == sd[name].tobytes(), name
