"""libguestfs (a real Linux kernel in an appliance) reads what spherefmt wrote; guestmount
mounts it, and spherefmt reads and writes a FAT volume libguestfs made.  Two appliance launches
in all (about 20 s each without KVM)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import spherefmt
from spherefmt.containers.vhd.filesystem import VHDFileSystem
from tests.helpers import model, partition_raw

pytestmark = pytest.mark.skipif(shutil.which("guestmount") is None or not os.path.exists("/usr/lib/python3/dist-packages/guestfs.py"),
                                reason="needs libguestfs-tools and python3-guestfs")


@pytest.fixture(scope="module", autouse=True)
def _tcg():
    """This machine's /dev/kvm creates VMs whose appliance then hangs at boot; the tests run the
    appliance under TCG rather than wait for spherefmt.containers.vhd.mount's one-time KVM probe."""
    saved = os.environ.get("LIBGUESTFS_BACKEND_SETTINGS")
    os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    yield
    if saved is None:
        os.environ.pop("LIBGUESTFS_BACKEND_SETTINGS", None)
    else:
        os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = saved


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    sd, cfg = model("llama", "BF16")
    path = tmp_path_factory.mktemp("gfs") / "m.vhd"
    spherefmt.save(sd, path, config=cfg, graticule="2x2", depth=2)
    return str(path)


def test_libguestfs_reads_the_same_bytes(pkg, tmp_path):
    """In one appliance launch: libguestfs reads our image file for file, and (on a second,
    blank .vhd from qemu-img) partitions it with ``part-disk``'s defaults, makes a FAT volume with
    its ``mkfs`` and copies the package in with the Linux kernel's vfat driver; spherefmt then
    reads that image, writes an expert into it, and fsck.vfat finds it clean."""
    from spherefmt.containers.vhd.mount import open_guestfs

    theirs = tmp_path / "theirs.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", str(theirs), "1G"], check=True)
    g = open_guestfs(pkg, extra=[str(theirs)])
    try:
        assert g.vfs_type("/dev/sda1") == "vfat"
        files = sorted("/" + f for f in g.find("/") if g.is_file("/" + f))
        fs = VHDFileSystem(pkg)
        try:
            ours = sorted(fs.find("/"))
            assert files == ours and len(files) > 10
            for f in files:
                assert g.read_file(f) == fs.cat_file(f), f
        finally:
            fs.close()
        out = tmp_path / "out"
        out.mkdir()
        g.copy_out("/", str(out))  # the whole store, copied out by the Linux kernel's vfat driver
        g.umount_all()
        g.part_disk("/dev/sdb", "mbr")  # libguestfs' defaults: where and how it partitions
        g.part_set_mbr_id("/dev/sdb", 1, 0x0C)
        g.mkfs("vfat", "/dev/sdb1")
        g.mount("/dev/sdb1", "/")
        for entry in sorted(os.listdir(out)):
            g.copy_in(str(out / entry), "/")
        g.umount_all()
        start = g.part_list("/dev/sdb")[0]["part_start"] // 512
        g.shutdown()
    finally:
        g.close()
    assert start != 2048  # not where spherefmt puts it: the reader finds it from the MBR
    _read_and_write_foreign(theirs, start, tmp_path)
    import zarr

    root = zarr.open_group(str(out), mode="r")  # plain zarr, no spherefmt
    sd, _ = model("llama", "BF16")
    for t in root.attrs["spherefmt"]["tensors"]:
        if t["where"] == "core":
            assert root[spherefmt.format.keys.core_key(t["name"])][...].tobytes() == sd[t["name"]].tobytes()


def _read_and_write_foreign(vhd, start: int, tmp_path) -> None:
    sd, _ = model("llama", "BF16")
    with spherefmt.open(str(vhd)) as p:
        assert all(p.tensor(k).tobytes() == v.tobytes() for k, v in sd.items())
    with spherefmt.open(str(vhd), "r+") as p:
        a = next(x for x in p.experts() if (p.expert(*x).index >= 0).any())
        e = p.expert(*a)
        new = e.neurons.copy()
        new[e.index >= 0] = np.asarray(2.0, dtype=new.dtype)
        p.write_expert(*a, new)
    with spherefmt.open(str(vhd)) as p:
        assert p.expert(*a).neurons.tobytes() == new.tobytes() and p.verify()["mismatched"] == []
    fsck = subprocess.run(["fsck.vfat", "-n", str(partition_raw(vhd, tmp_path / "theirs.raw", start))],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_sphere_mount_and_unmount(pkg, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "mount", pkg, str(mnt)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "zarr.json").exists()
        with spherefmt.open(str(mnt)) as p:  # the mounted folder is a plain directory package
            assert p.architecture == "llama" and p.graticule == (2, 2)
            sd, _ = model("llama", "BF16")
            assert p.tensor("model.embed_tokens.weight").tobytes() == sd["model.embed_tokens.weight"].tobytes()
    finally:
        r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "unmount", str(mnt)], capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (mnt / "zarr.json").exists()
