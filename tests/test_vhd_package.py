"""Packages inside a VHD: every API and CLI command works on a .vhd path; the image is a real
vpc image with a FAT32 partition that qemu-img, fsck.vfat and mtools accept, and plain zarr
reads the store copied out of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import spherefmt
from spherefmt.containers.vhd.filesystem import PARTITION_START, VHDFileSystem
from spherefmt.containers.vhd.image import VHDImage
from spherefmt.errors import FormatError, ReadOnlyError
from spherefmt.testing import save_hf_folder
from tests.helpers import model, partition_raw, same_bytes

TOOLS = ("qemu-img", "fsck.vfat", "mcopy")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs qemu-utils, dosfstools and mtools")


def sphere(*args):
    return subprocess.run([sys.executable, "-m", "spherefmt.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def vhd_pkg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vhd")
    sd, cfg = model("gpt2", "BF16")
    folder = save_hf_folder(tmp / "hf", sd, cfg)
    pkg = tmp / "model.vhd"
    r = sphere("convert", str(folder), str(pkg), "--graticule", "2x3", "--depth", "2", "-q")
    assert r.returncode == 0, r.stderr
    return pkg, sd, tmp


def test_cli_and_api_on_vhd(vhd_pkg):
    pkg, sd, tmp = vhd_pkg
    info = json.loads(sphere("info", str(pkg), "--json").stdout)
    assert info["architecture"] == "gpt2" and info["graticule"] == [2, 3] and info["experts"] == 12
    cell = json.loads(sphere("cell", str(pkg), "1", "2", "0", "--json").stdout)
    assert cell["expert"] == [1, 2, 0] and cell["stored_bytes"] > 0
    out = tmp / "back.safetensors"
    assert sphere("export", str(pkg), str(out), "-q").returncode == 0
    back = spherefmt.open(spherefmt.save(out, tmp / "back.sphere", config=json.loads((tmp / "hf" / "config.json").read_text())))
    with spherefmt.open(pkg) as p:
        for k, v in sd.items():
            assert same_bytes(p.tensor(k), v) and same_bytes(back.tensor(k), v), k


def test_image_is_real_vpc_with_clean_fat32_and_plain_zarr_reads_it(vhd_pkg):
    pkg, sd, tmp = vhd_pkg
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(pkg)], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] >= 4 * 1024**3
    assert os.path.getsize(pkg) < 32 * 1024**2  # the file holds the content, not the virtual size
    with VHDImage(pkg) as v:  # the MBR
        assert v.read(510, 2) == b"\x55\xaa"
    part = partition_raw(pkg, tmp / "part.raw", PARTITION_START)
    fsck = subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0 and "wrong" not in fsck.stdout.lower(), fsck.stdout
    out = tmp / "copied"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-s", "-n", "-i", str(part), "::/", str(out)], check=True, env=env, capture_output=True)
    part.unlink()
    store = out if (out / "zarr.json").exists() else next(p.parent for p in out.rglob("zarr.json") if p.parent.parent == out)
    g = zarr.open_group(str(store), mode="r")  # plain zarr, files copied out by another FAT implementation
    for name, _entry in ((t["name"], t) for t in g.attrs["spherefmt"]["tensors"] if t["where"] == "core"):
        arr = g[spherefmt.format.keys.core_key(name)][...]
        assert arr.tobytes() == sd[name].tobytes(), name
    assert g["sphere/d0/neurons"].shape[1:3] == (2, 3)


def test_write_expert_in_vhd_changes_only_that_expert(vhd_pkg, tmp_path):
    pkg, _, _ = vhd_pkg
    copy = tmp_path / "m.vhd"
    shutil.copy(pkg, copy)

    def digests():
        fs = VHDFileSystem(str(copy))
        try:
            return {p: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find("/")}
        finally:
            fs.close()

    before = digests()
    with spherefmt.open(copy, "r+") as p:
        e = p.expert(0, 1, 1)
        new = e.neurons.copy()
        new[e.index >= 0] = np.asarray(1.5, dtype=new.dtype)
        p.write_expert(0, 1, 1, new)
        key = "/" + p.shard_key(0, 1, 1)
        with pytest.raises(ReadOnlyError, match="another process .*is writing"):
            spherefmt.open(copy, "r+")
    after = digests()
    assert {k for k in after if after[k] != before.get(k) and not k.startswith("/manifest/")} == {key}
    with spherefmt.open(copy) as p:
        assert p.expert(0, 1, 1).neurons.tobytes() == new.tobytes()
    fsck_ok = subprocess.run(["fsck.vfat", "-n", str(partition_raw(copy, tmp_path / "p.raw", PARTITION_START))],
                             capture_output=True, text=True)
    assert fsck_ok.returncode == 0, fsck_ok.stdout + fsck_ok.stderr


def test_vhd_destination_rules(vhd_pkg, tmp_path):
    pkg, sd, _ = vhd_pkg
    r = sphere("convert", str(pkg), str(pkg))
    assert r.returncode == 2 and "already holds a package" in r.stderr
    r = sphere("convert", str(pkg), str(tmp_path / "x.vhd"), "--vhd-size", "lots")
    assert r.returncode == 2 and "size 'lots'" in r.stderr
    r = sphere("convert", str(pkg), str(tmp_path / "small.vhd"), "--vhd-size", "100M", "-q")
    assert r.returncode == 2 and "FAT32 volume needs" in r.stderr and "--vhd-size" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


def test_vhd_is_an_fsspec_protocol(vhd_pkg):
    import fsspec

    pkg, _, _ = vhd_pkg
    fs = fsspec.filesystem("vhd", fo=str(pkg))
    try:
        assert {"/core", "/sphere", "/zarr.json"} <= set(fs.ls("/", detail=False))
        assert fs.cat_file("/zarr.json").startswith(b"{")
        assert fs.cat_file("/zarr.json", 0, 1) == b"{"
    finally:
        fs.close()


@pytest.mark.filterwarnings("ignore:One or more FATs differ")  # only FAT 1 is damaged on purpose
def test_looping_cluster_chain_is_refused_not_followed(vhd_pkg, tmp_path):
    import struct

    from spherefmt.errors import FormatError

    pkg, _, _ = vhd_pkg
    bad = tmp_path / "loop.vhd"
    shutil.copy(pkg, bad)
    fs = VHDFileSystem(str(bad))
    first, _, _ = fs._lookup("/zarr.json")
    fat_offset = PARTITION_START * 512 + 32 * 512  # reserved sectors, then FAT 1
    fs.close()
    from spherefmt.containers.vhd.image import VHDImage

    with VHDImage(bad, "r+") as v:  # make zarr.json's cluster point at itself
        v.write(fat_offset + 4 * first, struct.pack("<I", first))
    fs = VHDFileSystem(str(bad))
    try:
        with pytest.raises(FormatError, match="loops|cannot read"):
            fs.cat_file("/zarr.json")
    finally:
        fs.close()


@pytest.mark.slow
def test_full_filesystem_is_a_clear_error_and_keeps_old_bytes(tmp_path):
    from spherefmt.containers.vhd.filesystem import create_package_image

    img = tmp_path / "small.vhd"
    create_package_image(img, 2200 * 1024**2)  # about the smallest FAT32 volume
    fs = VHDFileSystem(str(img), "r+", durable=False)
    try:
        fs.pipe_file("/keep", b"old bytes")
        with pytest.raises(OSError, match="filesystem inside the image is full.*--vhd-size") as e:
            for i in range(100):  # zeros: the VHD allocates nothing, the FAT fills all the same
                fs.pipe_file(f"/fill{i}", bytes(256 * 1024**2))
        assert e.value.errno == 28
        n = 0
        for size in (16 * 1024**2, 1024**2, 32 * 1024):  # fill what is left, cluster by cluster
            try:
                while True:
                    fs.pipe_file(f"/rest{n}", bytes(size))
                    n += 1
            except OSError as full:
                assert full.errno == 28
        with pytest.raises(OSError, match="full"):
            fs.pipe_file("/keep", b"new bytes that no longer fit")  # replacing needs a free cluster
        assert fs.cat_file("/keep") == b"old bytes"
    finally:
        fs.close()
    assert os.path.getsize(img) < 64 * 1024**2


def _foreign_image(tmp_path: Path, pkg: Path, start: int, gpt: bool = False) -> Path:
    """A VHD made entirely by other tools: an MBR with one FAT32 partition at sector ``start``,
    formatted by mkfs.vfat, the package copied in by mtools (which stores short lowercase names
    as 8.3 entries with the lowercase flags and no long name, as Windows does), converted to vpc
    by qemu-img."""
    import struct

    raw = tmp_path / "disk.raw"
    sectors = 96 * 1024 * 1024 // 512
    with open(raw, "wb") as f:
        f.truncate(sectors * 512)
        if not gpt:
            mbr = bytearray(512)
            mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x0C, b"\xfe\xff\xff", start, sectors - start)
            mbr[510:512] = b"\x55\xaa"
            f.write(mbr)
    end = sectors - start
    if gpt:  # sgdisk writes the protective MBR, the GPT and its backup; 0700: basic data
        end = sectors - 34 - start  # the backup GPT takes the last 33 sectors
        subprocess.run(["sgdisk", "-n", f"1:{start}:{start + end - 1}", "-t", "1:0700", str(raw)], check=True,
                       capture_output=True)
    subprocess.run(["mkfs.vfat", "-F", "32", "--offset", str(start), str(raw), str(end // 2)],
                   check=True, capture_output=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    items = [str(p) for p in sorted(pkg.iterdir())]
    subprocess.run(["mcopy", "-s", "-i", f"{raw}@@{start * 512}", *items, "::/"], check=True, env=env,
                   capture_output=True)
    vhd = tmp_path / "foreign.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", str(raw), str(vhd)], check=True)
    raw.unlink()
    return vhd


@pytest.mark.parametrize("start,gpt", [(128, False), (63, False), (2048, True)])
def test_reads_an_image_made_by_mkfs_mtools_and_qemu_img(tmp_path, start, gpt):
    if gpt and shutil.which("sgdisk") is None:
        pytest.skip("needs sgdisk (gdisk)")
    sd, cfg = model("gpt2", "F32")
    pkg = Path(spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2))
    vhd = _foreign_image(tmp_path, pkg, start, gpt)
    with spherefmt.open(vhd) as p:
        for name in p.keys():
            assert p.tensor(name).tobytes() == sd[name].tobytes(), name
        assert p.verify()["mismatched"] == []
        assert p.stored_bytes("core") > 0  # listings come back with the names as written, lowercase


def test_volumes_that_are_not_fat32_are_refused_by_name(tmp_path):
    import struct

    from spherefmt.containers.vhd.image import VHDImage, create_vhd

    img = tmp_path / "x.vhd"
    create_vhd(img, 64 * 1024 * 1024)
    with VHDImage(img, "r+") as v:
        mbr = bytearray(512)
        mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", 2048, 100000)
        mbr[510:512] = b"\x55\xaa"
        v.write(0, bytes(mbr))
    with pytest.raises(FormatError, match="no FAT32 partition .*type 0x83"):
        spherefmt.open(img)
    with VHDImage(img, "r+") as v:
        mbr[450] = 0x06  # FAT16
        v.write(0, bytes(mbr))
    with pytest.raises(FormatError, match="no FAT32 partition .*FAT16"):
        spherefmt.open(img)


def test_a_boot_sector_that_does_not_fit_the_disk_is_refused_at_once(tmp_path):
    """BPB_FATSz32 = 0xFFFFFFFF in a small image: refused from the boot sector, before any FAT is
    read (pyfatfs would allocate the whole declared FAT)."""
    import resource
    import struct

    sd, cfg = model("gpt2", "F32")
    img = Path(spherefmt.save(sd, tmp_path / "m.vhd", config=cfg))
    from spherefmt.containers.vhd.image import VHDImage

    with VHDImage(img, "r+") as v:
        v.write(PARTITION_START * 512 + 36, struct.pack("<I", 0xFFFFFFFF))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="does not fit"):
        spherefmt.open(img)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def test_a_fat_larger_than_its_volume_needs_is_refused_at_once(tmp_path):
    """BPB_FATSz32 swept from the real value up: every FAT that fits the 4 GiB disk but is larger
    than its volume can use (0x100000 sectors made readers load a 512 MiB FAT: minutes, 2.3 GB)
    is refused in one line, within a second, before any FAT is read; the real value opens."""
    import resource
    import struct
    import time

    sd, cfg = model("gpt2", "F32")
    img = Path(spherefmt.save(sd, tmp_path / "m.vhd", config=cfg))
    at = PARTITION_START * 512 + 36
    with VHDImage(img, "r") as v:
        real = struct.unpack("<I", v.read(at, 4))[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for fatsz in (2 * real, 0x100000, 0x200000, 0x3FFFFF, 0x400000, 0xFFFFFF, 0xFFFFFFFF):
        with VHDImage(img, "r+") as v:
            v.write(at, struct.pack("<I", fatsz))
        t0 = time.perf_counter()
        with pytest.raises(FormatError, match="malformed FAT32 boot sector|does not fit"):
            spherefmt.open(img)
        assert time.perf_counter() - t0 < 1.0, fatsz
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
    r = sphere("info", str(img))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    with VHDImage(img, "r+") as v:
        v.write(at, struct.pack("<I", real))
    with spherefmt.open(img) as p:
        assert p.keys()


def test_writes_into_an_image_made_by_other_tools_keep_one_entry_per_name(tmp_path):
    """write_expert on a volume whose directories mtools wrote as 8.3 entries with the lowercase
    flags (``SPHERE``, no long name) writes into those directories: no second ``sphere`` beside
    them, the package reads back the new expert, and fsck.vfat finds the volume clean."""
    sd, cfg = model("gpt2", "F32")
    pkg = Path(spherefmt.save(sd, tmp_path / "m.sphere", config=cfg, graticule="2x3", depth=2))
    vhd = _foreign_image(tmp_path, pkg, 128)
    with spherefmt.open(vhd, "r+") as p:
        a = next(x for x in p.experts() if (p.expert(*x).index >= 0).any())
        e = p.expert(*a)
        new = e.neurons.copy()
        new[e.index >= 0] += 1
        p.write_expert(*a, new)
    with spherefmt.open(vhd) as p:
        assert np.array_equal(p.expert(*a).neurons, new) and p.verify()["mismatched"] == []
    fs = VHDFileSystem(fo=str(vhd))
    try:
        assert fs.ls("/", detail=False) == ["/core", "/manifest", "/sphere", "/zarr.json"]
    finally:
        fs.close()
    partition_raw(vhd, tmp_path / "part.raw", 128)
    fsck = subprocess.run(["fsck.vfat", "-n", str(tmp_path / "part.raw")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.filterwarnings("ignore:.*is not GPT-2 or Llama-family")  # bare tensors: a generic package
def test_names_a_fat_volume_cannot_hold_are_encoded(tmp_path):
    """A model with names that differ only in case, names far over FAT's 255 characters (two
    sharing their first 200), and ``..`` (stored as ``%2E.``, whose trailing dot FAT drops)
    converts to a .vhd, reads back bit for bit, lists its keys as written, is edited in place,
    and leaves a volume that fsck passes and mtools lists (``spec/VHD.md`` section 3.1)."""
    from spherefmt.containers.vhd.filesystem import VHDFileSystem
    from spherefmt.format.keys import core_key

    sd = {"w": np.ones(3, np.float32), "W": np.zeros(3, np.float32), "Wq.Proj": np.full(2, 7, np.float32),
          "x" * 200 + "a" * 300: np.arange(4, dtype=np.float32), "x" * 200 + "B": np.arange(5, dtype=np.float32),
          "..": np.full(2, 2, np.float32), "end.": np.full(2, 3, np.float32)}
    vhd = tmp_path / "n.vhd"
    spherefmt.save(sd, vhd)
    with spherefmt.open(vhd) as p:
        assert sorted(p.entries) == sorted(sd)
        assert all(p.tensor(k).tobytes() == v.tobytes() for k, v in sd.items())
    fs = VHDFileSystem(str(vhd))
    try:
        assert set(fs.ls("/core", detail=False)) == {"/" + core_key(k) for k in sd} | {"/core/zarr.json"}
        assert fs.cat_file("/" + core_key("x" * 200 + "B") + "/zarr.json").startswith(b"{")
    finally:
        fs.close()
    with spherefmt.open(vhd, mode="r+") as p:  # an in-place edit finds each encoded name again
        p.write_tensor("W", np.full(3, 9, np.float32))
    with spherefmt.open(vhd) as p:
        assert p.tensor("W").tolist() == [9, 9, 9] and p.tensor("w").tolist() == [1, 1, 1]
        assert p.verify()["mismatched"] == [] and p.verify()["missing"] == [] and p.verify()["unlisted"] == []
    partition_raw(vhd, tmp_path / "part.raw", 2048)
    fsck = subprocess.run(["fsck.vfat", "-n", str(tmp_path / "part.raw")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mdir = subprocess.run(["mdir", "-i", str(tmp_path / "part.raw"), "-/", "-b", "::/core"], capture_output=True,
                          text=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert mdir.returncode == 0, mdir.stderr
    assert "::/core/w/zarr.json" in mdir.stdout and "::/core/!=!w/zarr.json" in mdir.stdout, mdir.stdout
