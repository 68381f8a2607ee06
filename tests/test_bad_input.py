"""Malformed inputs get a one-line FormatError naming the file; nothing the user had is lost."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import spherefmt
from spherefmt.errors import FormatError, InputError, IntegrityError, PackageExistsError
from spherefmt.interop.base import TensorSource
from spherefmt.testing import save_hf_folder
from spherefmt.testing.packages import remanifest
from tests.helpers import model


def _st(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def _one_line(e: pytest.ExceptionInfo, path: object) -> None:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


@pytest.mark.parametrize(
    "header,data,match",
    [
        (b"", b"", "truncated"),  # replaced below by a 3-byte file
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        (b"[1, 2]", b"", "not a JSON object"),
        (b"{not json", b"", "not valid JSON"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_safetensors(tmp_path, header, data, match):
    p = tmp_path / "bad.safetensors"
    if header == b"":
        p.write_bytes(b"\x01\x02\x03")
    else:
        _st(p, header, data)
    with pytest.raises(FormatError, match=match) as e:
        spherefmt.save(p, tmp_path / "out.sphere")
    _one_line(e, p)
    assert not (tmp_path / "out.sphere").exists()
    assert [x.name for x in tmp_path.iterdir()] == ["bad.safetensors"]


def test_header_length_beyond_file(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="exceeds") as e:
        spherefmt.save(p, tmp_path / "o.sphere")
    _one_line(e, p)
    p.write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(FormatError, match="truncated safetensors header"):
        spherefmt.save(p, tmp_path / "o.sphere")


def test_config_tensor_mismatch(tmp_path):
    sd, cfg = model("gpt2", "F32")
    for key, value, match in [("n_layer", 5, "tensors have 3"), ("n_embd", 48, "hidden size"), ("n_inner", 64, "FFN size")]:
        folder = save_hf_folder(tmp_path / f"hf-{key}", sd, {**cfg, key: value})
        with pytest.raises(FormatError, match=match) as e:
            spherefmt.save(folder, tmp_path / "o.sphere")
        _one_line(e, folder)
    bad = dict(sd)
    bad["transformer.h.1.mlp.c_proj.weight"] = bad["transformer.h.1.mlp.c_proj.weight"][:, :16].copy()
    with pytest.raises(FormatError, match="layer 1 FFN shapes disagree"):
        spherefmt.save(bad, tmp_path / "o.sphere", config=cfg)
    assert not (tmp_path / "o.sphere").exists()


def test_torch_file_with_arbitrary_object_is_refused(tmp_path):
    p = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": torch.zeros(2), "x": Boom()}, p)
    with pytest.raises(FormatError, match="not a loadable torch state dict") as e:
        spherefmt.save(p, tmp_path / "o.sphere")
    _one_line(e, p)
    assert not (tmp_path / "pwned").exists()
    p2 = tmp_path / "plain.pkl.bin"
    p2.write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(FormatError):
        spherefmt.save(p2, tmp_path / "o.sphere")


def test_sharded_index_cannot_escape_folder(tmp_path):
    sd, cfg = model("gpt2", "F32")
    folder = save_hf_folder(tmp_path / "hf", sd, cfg, shards=2)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="plain file name"):
        spherefmt.save(folder, tmp_path / "o.sphere")


def test_existing_package_refused_and_untouched(tmp_path):
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg)
    snapshot = {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    sd2, _ = model("gpt2", "F32", seed=1)
    with pytest.raises(PackageExistsError, match="--overwrite") as e:
        spherefmt.save(sd2, url, config=cfg)
    _one_line(e, url)
    assert snapshot == {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    spherefmt.save(sd2, url, config=cfg, overwrite=True)
    assert spherefmt.open(url).tensor("transformer.wte.weight").tobytes() == sd2["transformer.wte.weight"].tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sphere"]  # no staging leftovers
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(PackageExistsError, match="not a spherefmt package"):
        spherefmt.save(sd, other, config=cfg, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep me"


class _Failing(TensorSource):
    """A source that dies after some tensors: an interrupted conversion."""

    def __init__(self, sd, cfg, after):
        from spherefmt.interop.base import MappingSource

        self.inner, self.config, self.after, self.n = MappingSource(sd), cfg, after, 0
        self.where = "<failing>"

    def keys(self):
        return self.inner.keys()

    def info(self, name):
        return self.inner.info(name)

    def read(self, name):
        self.n += 1
        if self.n > self.after:
            raise KeyboardInterrupt
        return self.inner.read(name)


@pytest.mark.parametrize("after", [3, 30])
def test_interrupted_conversion_leaves_nothing_complete(tmp_path, after):
    sd, cfg = model("gpt2", "F32")
    old = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg)
    before = {p: p.read_bytes() for p in Path(old).rglob("*") if p.is_file()}
    with pytest.raises(KeyboardInterrupt):
        spherefmt.save(_Failing(sd, cfg, after), old, overwrite=True)
    assert before == {p: p.read_bytes() for p in Path(old).rglob("*") if p.is_file()}  # old package intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sphere"]
    # object stores are written in place: the package stays marked 'writing' and open refuses it
    # object stores are written in place: an interrupted conversion removes what it wrote
    url = f"memory://interrupted-{tmp_path.name}-{after}"
    with pytest.raises(KeyboardInterrupt):
        spherefmt.save(_Failing(sd, cfg, after), url)
    assert not spherefmt.is_package(url)
    with pytest.raises(FormatError, match="not a spherefmt package") as e:
        spherefmt.open(url)
    _one_line(e, url)


def _edit_header(url: str, fn) -> None:
    """Edit the header as an attacker would, then give the package a matching manifest (so
    that the header's own validation is what answers)."""
    p = Path(url) / "zarr.json"
    meta = json.loads(p.read_text())
    fn(meta["attributes"]["spherefmt"])
    p.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="zarr.json does not match"):
        spherefmt.open(url)  # as it is, the edit is caught by the manifest
    remanifest(url)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h.update(version=3), "newer than this spherefmt supports"),
        (lambda h: h.update(format="other"), "not a spherefmt package"),
        (lambda h: h.update(graticule=[500, 2]), "parallels must be"),
        (lambda h: h.update(depth=11), "depth 11"),
        (lambda h: h["tensors"][0].update(dtype="F128"), "unknown dtype"),
        (lambda h: h["tensors"][0].update(shape="x"), "shape"),
        (lambda h: h.update(layer_depth=[0]), "layer_depth"),
        (lambda h: h["shells"][0].update(capacity=1), "too small"),
        (lambda h: h["neuron_layout"].update(row_width=3), "row_width"),
        (lambda h: h.update(architecture="rwkv"), "unknown architecture"),
        (lambda h: h.update(fused={"x": 1}), "fused must be a list"),
        (lambda h: h.update(fused=[{"name": "f", "parts": ["missing.a", "missing.b"], "axis": 0}]), "fused entry"),
        (lambda h: h.update(fused=[{"name": h["tensors"][0]["name"], "parts": [h["tensors"][1]["name"],
                                                                              h["tensors"][2]["name"]], "axis": 0}]),
         "fused entry"),
        (lambda h: h.update(fused=[{"name": "f", "parts": [next(t["name"] for t in h["tensors"] if len(t["shape"]) == 1),
                                                           next(t["name"] for t in h["tensors"] if len(t["shape"]) == 2)],
                                    "axis": 0}]), "shapes disagree"),
    ],
)
def test_malformed_package_header(tmp_path, edit, match):
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x2", depth=2)
    _edit_header(url, edit)
    with pytest.raises(FormatError, match=match) as e:
        spherefmt.open(url)
    _one_line(e, url)


def test_corrupt_chunk_and_bad_index(tmp_path):
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x2", depth=2)
    pkg = spherefmt.open(url)
    shard = Path(url) / pkg.shard_key(1, 1, 0)
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"expert \(1, 1, 0\)") as e:
        spherefmt.open(url).expert(1, 1, 0)
    _one_line(e, url)
    g = zarr.open_group(url, mode="r+")
    idx = g["sphere/d1/index"][...]
    idx[0, 0, 0, 0] = idx[0, 0, 0, 1]  # a duplicated neuron index
    g["sphere/d1/index"][...] = idx
    remanifest(url)
    with pytest.raises(FormatError, match="not a permutation"):
        spherefmt.open(url).expert(0, 0, 1)


def test_core_array_shape_disagrees_with_header(tmp_path):
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg)
    g = zarr.open_group(url, mode="r+")
    g.create_array("core/transformer.wte.weight", shape=(2, 2), dtype="float32", overwrite=True)
    remanifest(url)
    with pytest.raises(FormatError, match="header says"):
        spherefmt.open(url).tensor("transformer.wte.weight")


def test_not_a_package(tmp_path):
    for target, match in [(tmp_path / "missing", "no such package"), (tmp_path, "not a spherefmt package")]:
        with pytest.raises(FormatError, match=match):
            spherefmt.open(target)
    f = tmp_path / "x.zip"
    f.write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a zip"):
        spherefmt.open(f)
    np.save(tmp_path / "a.npy", np.zeros(2))
    with pytest.raises(InputError, match="unknown model file type"):
        spherefmt.save(tmp_path / "a.npy", tmp_path / "o.sphere")


def test_bad_parameters(tmp_path):
    sd, cfg = model("gpt2", "F32")
    for kw, match in [({"graticule": "0x3"}, "parallels"), ({"graticule": "181x2"}, "parallels"),
                      ({"graticule": "axb"}, "expected PxM"), ({"depth": 11}, "depth 11"),
                      ({"depth": 4}, "only 3 layers"), ({"codec": "lz4"}, "codec")]:
        with pytest.raises(InputError, match=match):
            spherefmt.save(sd, tmp_path / "o.sphere", config=cfg, **kw)
    assert not (tmp_path / "o.sphere").exists()


def test_malformed_zarr_metadata(tmp_path):
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg)
    meta = Path(url) / "core" / "transformer.wte.weight" / "zarr.json"
    meta.write_text('{"zarr_format": 3, "node_type": "array", "shape": "nope"}')
    remanifest(url)
    pkg = spherefmt.open(url)
    with pytest.raises(FormatError, match="malformed metadata") as e:
        pkg.tensor("transformer.wte.weight")
    _one_line(e, url)
    with pytest.raises(FormatError, match="malformed metadata"):
        pkg.state_dict()
    (Path(url) / "zarr.json").write_text("{garbage")
    remanifest(url)
    with pytest.raises(FormatError, match="zarr.json is not valid JSON"):
        spherefmt.open(url)
    (Path(url) / "zarr.json").write_text('{"zarr_format": 2}')
    remanifest(url)
    with pytest.raises(FormatError, match="not a Zarr v3 group"):
        spherefmt.open(url)


@pytest.mark.parametrize("member", ["manifest/zarr.json", "zarr.json", "core/transformer.wte.weight/c/0/0"])
def test_zip_bombs_are_refused_before_they_inflate(tmp_path, member):
    """A zip whose manifest, metadata or chunk member deflates 200 MiB of zeros into a few hundred
    KB is refused from the declared sizes (the container's limits, or the size the manifest
    lists), without inflating it: the process does not grow by it."""
    import resource
    import zipfile

    sd, cfg = model("gpt2", "F32")
    good = spherefmt.save(sd, tmp_path / "m.zip", config=cfg)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as out:
        for info in src.infolist():
            if info.filename != member:
                out.writestr(info, src.read(info))
                continue
            zi = zipfile.ZipInfo(member)
            zi.compress_type = zipfile.ZIP_DEFLATED
            with out.open(zi, "w", force_zip64=True) as f:  # deflated, streamed
                zero = bytes(1 << 20)
                for _ in range(200):
                    f.write(zero)
    assert bomb.stat().st_size < 2 * 1024**2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="zip bomb|declares|does not match the package's manifest"):
        with spherefmt.open(bomb) as p:
            p.state_dict()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: not 200 MiB


def _truthful_stream_bomb(good: Path, bomb: Path, member: str, extra: int) -> None:
    """``good`` with ``member`` replaced by a deflate stream that inflates to its real bytes and
    then ``extra`` zero bytes, while the headers declare the real size and CRC-32."""
    import zipfile
    import zlib

    with zipfile.ZipFile(good) as src:
        real = src.read(member)
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = c.compress(real) + c.compress(bytes(extra)) + c.flush()
        with zipfile.ZipFile(bomb, "w") as out:
            for info in src.infolist():
                data = stream if info.filename == member else src.read(info)
                out.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
    raw = bytearray(bomb.read_bytes())
    name = member.encode()
    crc, size = zlib.crc32(real), len(real)
    for sig, method_at, crc_at, usize_at, name_at in ((b"PK\x03\x04", 8, 14, 22, 30), (b"PK\x01\x02", 10, 16, 24, 46)):
        at = 0
        while (at := raw.find(sig, at)) >= 0:
            if raw[at + name_at : at + name_at + len(name)] == name:
                struct.pack_into("<H", raw, at + method_at, 8)  # deflated
                struct.pack_into("<I", raw, at + crc_at, crc)
                struct.pack_into("<I", raw, at + usize_at, size)
                break
            at += 4
    bomb.write_bytes(bytes(raw))


@pytest.mark.parametrize("member", ["zarr.json", "core/transformer.wte.weight/c/0/0"])
def test_zip_members_that_tell_the_truth_and_inflate_further_are_refused(tmp_path, member):
    """A member whose declared size and CRC-32 are the real ones while its deflate stream goes on
    to 200 MiB of zeros: reading stops one byte past the declared size and refuses it (zipfile
    inflated the whole stream first: 2.16 GB for a 9.9 MB file), also when a writer unpacks it."""
    import resource

    sd, cfg = model("gpt2", "F32")
    good = spherefmt.save(sd, tmp_path / "m.zip", config=cfg)
    bomb = tmp_path / "bomb.zip"
    _truthful_stream_bomb(Path(good), bomb, member, 200 * 1024**2)
    assert bomb.stat().st_size < 2 * 1024**2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="inflates past its declared") as e:
        with spherefmt.open(bomb) as p:
            p.state_dict()
    _one_line(e, bomb)
    with pytest.raises(FormatError, match="inflates past its declared"):
        with spherefmt.open(bomb, "r+") as p:  # a writer unpacks the zip to edit it
            pass
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: not 200 MiB
    ok = tmp_path / "ok.zip"  # the same construction without the tail reads back
    _truthful_stream_bomb(Path(good), ok, member, 0)
    with spherefmt.open(ok) as p, spherefmt.open(good) as q:
        assert p.keys() == q.keys()


def test_symbolic_links_are_not_followed_out_of_a_model_folder(tmp_path):
    from spherefmt.testing import save_hf_folder

    sd, cfg = model("gpt2", "F32")
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    folder = tmp_path / "hf"
    save_hf_folder(folder, sd, cfg)
    (folder / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(FormatError, match="symbolic link out of the model folder"):
        spherefmt.save(folder, tmp_path / "a.sphere")
    assert not (tmp_path / "a.sphere").exists()
    # a link inside the folder is fine, and so is a Hugging Face cache snapshot's link to its blobs
    (folder / "tokenizer_config.json").unlink()
    (folder / "other.json").write_text("{}")
    (folder / "tokenizer_config.json").symlink_to(folder / "other.json")
    with spherefmt.open(spherefmt.save(folder, tmp_path / "b.sphere")) as p:
        assert p.file("tokenizer_config.json") == b"{}"
    cache = tmp_path / "models--org--tiny"
    snap = cache / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            (cache / "blobs" / f.name).write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    with spherefmt.open(spherefmt.save(snap, tmp_path / "c.sphere")) as p:
        assert p.tensor("transformer.wte.weight").tobytes() == sd["transformer.wte.weight"].tobytes()


def test_symbolic_links_inside_a_package_are_not_followed(tmp_path):
    import shutil

    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2)
    outside = tmp_path / "elsewhere"
    shard_dir = Path(url) / "sphere" / "d0" / "neurons" / "c"
    shutil.move(str(shard_dir), str(outside))
    shard_dir.symlink_to(outside, target_is_directory=True)
    before = sorted(p.stat().st_mtime_ns for p in outside.rglob("*") if p.is_file())
    with spherefmt.open(url, "r+") as p:
        with pytest.raises(FormatError, match="symbolic link"):  # reads through the link are refused
            p.expert(0, 0, 0)
        with pytest.raises(FormatError, match="symbolic link"):
            p.write_expert(0, 0, 0, np.zeros((len(p.shell_layers(0)), p.slots(0), p.layout.row_width), np.float32))
    assert sorted(p.stat().st_mtime_ns for p in outside.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("target", ["sphere/d0/neurons", "core/transformer.wte.weight"])
def test_zero_chunk_shapes_are_a_format_error(tmp_path, target):
    """Array metadata with a chunk (or a shard's inner chunk) of size 0, consistent with the
    manifest, is a one-line FormatError, not a ZeroDivisionError from zarr's indexing."""
    sd, cfg = model("gpt2", "F32")
    url = spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2)
    meta = Path(url) / target / "zarr.json"
    md = json.loads(meta.read_text())
    if md["codecs"][0]["name"] == "sharding_indexed":
        md["codecs"][0]["configuration"]["chunk_shape"][3] = 0
    else:
        md["chunk_grid"]["configuration"]["chunk_shape"][0] = 0
    meta.write_text(json.dumps(md))
    remanifest(url)
    with spherefmt.open(url) as p, pytest.raises(FormatError, match="chunk shape .* (positive|tile)|malformed metadata"):
        p.state_dict()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_non_finite_ffn_weights_are_refused_by_name(tmp_path, bad, dtype):
    """A NaN or infinity in an FFN weight (a broken fine-tune) is refused in one line naming the
    tensor and the first bad index, by the API and the CLI (exit 2), before anything is written;
    placement never sees it (it raised LinAlgError from its SVD)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    sd, cfg = model("gpt2", dtype)
    src = save_hf_folder(tmp_path / "src", sd, cfg)
    weights = load_file(src / "model.safetensors")
    name = next(n for n in weights if n.endswith("h.0.mlp.c_fc.weight"))
    w = weights[name].copy()
    values = w.view(np.uint16).astype(np.uint32) << 16 if dtype == "BF16" else w
    row = np.asarray(values, dtype=np.uint32 if dtype == "BF16" else np.float32)
    if dtype == "BF16":
        row[3, 5] = np.float32(bad).view(np.uint32)
        w = (row >> 16).astype(np.uint16).view(w.dtype)
    else:
        w[3, 5] = bad
    weights[name] = w
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=rf"{name}.*non-finite.*index \[3, 5\]") as e:
        spherefmt.save(src, tmp_path / "out.sphere")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.sphere").exists()
    r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "convert", str(src), str(tmp_path / "o.sphere")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and name in r.stderr, r.stderr
    assert not (tmp_path / "o.sphere").exists()
