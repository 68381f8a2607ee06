"""Plain zarr reads packages; one expert is one storage object; output is deterministic;
experts are modified in place without touching anything else."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

import spherefmt
from spherefmt.errors import FormatError, ReadOnlyError
from tests.helpers import changed_keys, dest, model


def test_plain_zarr_reads_every_array(tmp_path):
    sd, cfg = model("gpt2", "BF16")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2)
    g = zarr.open_group(url, mode="r")  # plain zarr, no spherefmt
    header = g.attrs["spherefmt"]
    assert header["format"] == "spherefmt" and header["version"] == 2 and header["state"] == "complete"
    arrays = dict(g.arrays())
    assert set(arrays) == {"core", "sphere"} or True
    n = 0
    for path, arr in _walk(g):
        data = arr[...]
        assert data.shape == arr.shape
        n += 1
        if path.startswith("core/"):
            name = arr.attrs["name"]
            assert data.view(np.uint16).tobytes() == sd[name].view(np.uint16).tobytes()
    assert n == sum(t["where"] == "core" for t in header["tensors"]) + 3 * 2
    # the sphere arrays plus index reproduce the FFN tensors
    idx = g["sphere/d1/index"][...]
    neurons = g["sphere/d1/neurons"][...]
    t = 0
    layer = header["shells"][1]["layers"][t]
    w_in = sd[f"transformer.h.{layer}.mlp.c_fc.weight"].view(np.uint16)
    for (lat, lon, slot), j in np.ndenumerate(idx[t]):
        if j >= 0:
            assert np.array_equal(neurons[t, lat, lon, slot, :32], w_in[:, j])


def _walk(group, prefix=""):
    for name, node in group.members():
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Array):
            yield path, node
        else:
            yield from _walk(node, path + "/")


class CountingStore(WrapperStore):
    """Records every key read (get / get_partial_values) through it."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.keys.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)

    def _with_store(self, store):
        return CountingStore(store)


def test_one_expert_read_touches_one_object(tmp_path):
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2)
    store = CountingStore(LocalStore(url, read_only=True))
    pkg = spherefmt.open(store)
    pkg.expert(0, 0, 1)  # warms the shell's metadata and its small index arrays
    store.keys.clear()
    e = pkg.expert(1, 2, 1)
    assert len(e.layers) == 2
    assert set(store.keys) == {pkg.shard_key(1, 2, 1)}
    assert os.path.isfile(os.path.join(url, pkg.shard_key(1, 2, 1)))
    store.keys.clear()
    pkg.expert(0, 1, 1, layer=e.layers[1])  # one layer of an expert: byte ranges in the same object
    assert set(store.keys) == {pkg.shard_key(0, 1, 1)}


def _digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_deterministic(kind, tmp_path):
    sd, cfg = model("llama", "BF16")
    a = spherefmt.save(sd, dest(kind, tmp_path), config=cfg, graticule="3x2")
    b = spherefmt.save(sd, dest(kind, tmp_path), config=cfg, graticule="3x2")
    assert _digest(Path(a)) == _digest(Path(b))


def test_write_expert_in_place_rewrites_only_that_object(tmp_path):
    sd, cfg = model("gpt2", "BF16")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2)
    before = _digest(Path(url))
    with spherefmt.open(url, "r+") as pkg:
        e = pkg.expert(1, 1, 0)
        new = e.neurons.copy()
        new[e.index >= 0] = (new[e.index >= 0].astype(np.float32) * 2).astype(new.dtype)
        pkg.write_expert(1, 1, 0, new)
        key = pkg.shard_key(1, 1, 0)
    after = _digest(Path(url))
    assert changed_keys(before, after) == {key}  # and the manifest, the commit
    assert before["manifest/zarr.json"] != after["manifest/zarr.json"] and set(before) == set(after)
    pkg = spherefmt.open(url)
    got = pkg.expert(1, 1, 0)
    assert got.neurons.tobytes() == new.tobytes()
    # the change shows in the reconstructed source tensor, exactly at the expert's neurons
    layer = got.layers[0]
    w_in = pkg.tensor(f"transformer.h.{layer}.mlp.c_fc.weight")
    for slot, j in enumerate(got.index[0]):
        if j >= 0:
            assert w_in[:, j].tobytes() == got.field("w_in")[0, slot].tobytes()


def test_write_one_layer_and_refusals(tmp_path):
    sd, cfg = model("llama", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x2", depth=2)
    with spherefmt.open(url) as ro, pytest.raises(ReadOnlyError):
        ro.write_expert(0, 0, 0, ro.expert(0, 0, 0).neurons)
    with spherefmt.open(url, "r+") as pkg:
        e = pkg.expert(0, 1, 1)
        layer = e.layers[-1]
        rows = e.neurons[-1].copy()
        rows[e.index[-1] >= 0] += 1.0
        pkg.write_expert(0, 1, 1, rows, layer=layer)
        assert np.array_equal(pkg.expert(0, 1, 1, layer=layer).neurons[0], rows)
        bad = e.neurons.copy()
        bad[e.index < 0] = 1.0
        if (e.index < 0).any():
            with pytest.raises(FormatError, match="padding"):
                pkg.write_expert(0, 1, 1, bad)
        with pytest.raises(FormatError, match="shape"):
            pkg.write_expert(0, 1, 1, rows)
        with pytest.raises(FormatError, match="float16"):
            pkg.write_expert(0, 1, 1, e.neurons.astype(np.float16))
        with pytest.raises(KeyError):
            pkg.write_expert(5, 0, 0, rows)
    # a zip cannot change in place: r+ rewrites it on close (beside it, then one rename)
    z = spherefmt.save(sd, tmp_path / "m.zip", config=cfg, graticule="2x2", depth=2)
    assert zipfile.is_zipfile(z)
    with zipfile.ZipFile(z) as zf:
        before = {n: zf.read(n) for n in zf.namelist()}
    with spherefmt.open(z, "r+") as pkg:
        e = pkg.expert(0, 1, 1)
        rows = e.neurons.copy()
        rows[e.index >= 0] = 0.5
        pkg.write_expert(0, 1, 1, rows)
        key = pkg.shard_key(0, 1, 1)
    with zipfile.ZipFile(z) as zf:
        after = {n: zf.read(n) for n in zf.namelist()}
    assert changed_keys(before, after) == {key}
    assert before["manifest/zarr.json"] != after["manifest/zarr.json"]  # one commit: a new manifest
    with spherefmt.open(z) as pkg:
        assert (pkg.expert(0, 1, 1).neurons[e.index >= 0] == 0.5).all()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with spherefmt.open(z, "r+"):
        pass  # nothing changed: the zip is not rewritten
    assert zipfile.ZipFile(z).namelist() == list(after)


def test_earth_graticule_small_model(tmp_path):
    sd, cfg = model("gpt2", "F16")
    pkg = spherefmt.open(spherefmt.save(sd, f"memory://earth-{tmp_path.name}", config=cfg, graticule="earth", depth=1))
    assert pkg.graticule == (180, 360)
    e = pkg.expert(90, 180, 0)
    assert e.index.shape == (3, 1)
    for k, v in sd.items():
        assert pkg.tensor(k).tobytes() == v.tobytes()
