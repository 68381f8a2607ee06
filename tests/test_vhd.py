"""The VHD layer against qemu-img (the reference), and against hostile images."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spherefmt.containers.vhd.image import SECTOR, VHDImage, chs_geometry, create_vhd, disk_size
from spherefmt.errors import FormatError, ReadOnlyError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (Debian qemu-utils)")
MiB = 1024 * 1024


def qemu_info(path, fmt=None) -> dict:
    opts = ["-f", fmt] if fmt else []
    return json.loads(subprocess.run(["qemu-img", "info", *opts, "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)


def qemu_raw(path, tmp_path, fmt="vpc") -> bytes:
    out = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("dynamic", [True, False])
def test_our_image_matches_qemu(tmp_path, dynamic):
    path = tmp_path / "a.vhd"
    size = create_vhd(path, 40 * MiB + 12345, dynamic=dynamic)
    assert size >= 40 * MiB + 12345 and size % SECTOR == 0
    c, h, s = chs_geometry(size)
    assert c * h * s * SECTOR == size  # geometry and current_size agree
    # qemu probes dynamic images as vpc; a fixed image is raw data plus a footer, so it is named
    info = qemu_info(path, None if dynamic else "vpc")
    assert info["format"] == "vpc" and info["virtual-size"] == size
    start = os.path.getsize(path)
    with VHDImage(path, "r+") as v:
        v.write(3 * MiB + 7, b"sphere" * 50_000)
        v.write(39 * MiB, bytes(MiB))  # zeros allocate nothing
        v.write(0, b"\x01" * 700)
        blocks = v.allocated_blocks()
    if dynamic:
        assert blocks == 2
        assert os.path.getsize(path) == start + blocks * (2 * MiB + SECTOR)
    else:
        assert os.path.getsize(path) == size + SECTOR
    with VHDImage(path) as v:
        ours = v.read(0, v.size)
    assert ours == qemu_raw(path, tmp_path)
    assert ours[3 * MiB + 7 : 3 * MiB + 7 + 12] == b"spheresphere"


def test_we_read_images_qemu_made(tmp_path):
    dyn = tmp_path / "q.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(dyn), "9M"], check=True)
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 300k", "-c", "write -P 0x33 5000k 4k", str(dyn)],
                   check=True, capture_output=True)
    raw = qemu_raw(dyn, tmp_path)
    with VHDImage(dyn) as v:
        assert v.size == len(raw) and v.read(0, v.size) == raw and v.read(MiB, 3) == b"\x5a" * 3
    fixed = tmp_path / "f.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "vpc", "-o", "subformat=fixed", str(dyn), str(fixed)],
                   check=True)
    with VHDImage(fixed) as v:
        assert v.read(0, v.size) == qemu_raw(fixed, tmp_path) and v.read(5000 * 1024, 2) == b"\x33\x33"


def test_writes_to_qemu_image_and_readonly(tmp_path):
    dyn = tmp_path / "q.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(dyn), "9M"], check=True)
    with VHDImage(dyn, "r+") as v:
        v.write(4 * MiB - 3, b"abcdef")  # spans two blocks
    assert qemu_raw(dyn, tmp_path)[4 * MiB - 3 : 4 * MiB + 3] == b"abcdef"
    with VHDImage(dyn) as v, pytest.raises(ReadOnlyError):
        v.write(0, b"x")
    with VHDImage(dyn) as v, pytest.raises(ValueError):
        v.read(v.size - 1, 2)


def test_disk_size_rule():
    assert disk_size(1) == 17 * 4 * 512 * (disk_size(1) // (17 * 4 * 512))
    for req in [MiB, 100 * MiB + 1, 3 * 1024 * MiB, 126 * 1024 * MiB]:
        s = disk_size(req)
        c, h, spt = chs_geometry(s)
        assert s >= req and c * h * spt * SECTOR == s and s - req < 255 * 16 * SECTOR + SECTOR
    big = 500 * 1024 * MiB
    assert disk_size(big) == big


def test_lost_footer_falls_back_to_the_copy(tmp_path):
    path = tmp_path / "a.vhd"
    create_vhd(path, 8 * MiB)
    with VHDImage(path, "r+") as v:
        v.write(MiB, b"keep")
    with open(path, "r+b") as f:  # a crash between allocation steps can tear the last sector
        f.seek(-SECTOR, 2)
        f.write(b"\0" * SECTOR)
    with VHDImage(path, "r+") as v:
        assert v.read(MiB, 4) == b"keep"
        v.write(5 * MiB, b"more")
    with VHDImage(path) as v:
        assert v.read(5 * MiB, 4) == b"more" and v.read(MiB, 4) == b"keep"
    assert qemu_raw(path, tmp_path)[5 * MiB : 5 * MiB + 4] == b"more"


def _small_image(tmp_path, name="base.vhd") -> bytes:
    path = tmp_path / name
    if not path.exists():
        create_vhd(path, 6 * MiB, block_size=1 << 20)
        with VHDImage(path, "r+") as v:
            v.write(0, b"\x11" * 1000)
            v.write(3 * MiB, b"\x22" * 1000)
    return path.read_bytes()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_images_raise_format_error(tmp_path, data):
    base = bytearray(_small_image(tmp_path))
    kind = data.draw(st.sampled_from(["flip", "truncate", "field", "bat"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(base) - 1))
            base[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        base = base[: data.draw(st.integers(0, len(base) - 1))]
    elif kind == "field":  # a header or footer field set to an absurd value (checksums fixed up)
        where = data.draw(st.sampled_from([0, len(base) - SECTOR, SECTOR]))
        off = data.draw(st.sampled_from([16, 40, 48, 60] if where != SECTOR else [16, 28, 32]))
        width = 8 if (where != SECTOR and off in (16, 40, 48)) or (where == SECTOR and off == 16) else 4
        base[where + off : where + off + width] = data.draw(st.binary(min_size=width, max_size=width))
        at = 64 if where != SECTOR else 36
        size = SECTOR if where != SECTOR else 1024
        blob = bytearray(base[where : where + size])
        blob[at : at + 4] = b"\0\0\0\0"
        base[where + at : where + at + 4] = struct.pack(">I", (~sum(blob)) & 0xFFFFFFFF)
    else:  # BAT entries pointing anywhere
        for _ in range(data.draw(st.integers(1, 3))):
            slot = data.draw(st.integers(0, 5))
            base[3 * SECTOR + 4 * slot : 3 * SECTOR + 4 * slot + 4] = struct.pack(">I", data.draw(st.integers(0, 2**32 - 1)))
    path = tmp_path / "bad.vhd"
    path.write_bytes(bytes(base))
    try:
        with VHDImage(path) as v:
            v.read(0, min(v.size, 8 * MiB))
    except FormatError as e:
        assert "\n" not in str(e) and str(path) in str(e)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b[:100], "shorter than a footer"),
        (lambda b: b"x" * 8 + b[8:-SECTOR] + b"y" * SECTOR, "bad footer cookie"),
        (lambda b: b[:SECTOR + 44] + b"\xff" + b[SECTOR + 45 :], "dynamic header checksum"),
        (lambda b: b[: 3 * SECTOR] + struct.pack(">I", 10**6) + b[3 * SECTOR + 4 :], "outside the data area"),
        (lambda b: b[: 3 * SECTOR + 4] + b[3 * SECTOR : 3 * SECTOR + 4] + b[3 * SECTOR + 8 :], "overlap"),
        (lambda b: b[: 64] + b"\0\0\0\0" + b[68:-SECTOR] + b[-SECTOR:-SECTOR + 64] + b"\0\0\0\0" + b[-SECTOR + 68 :],
         "footer checksum"),
    ],
)
def test_specific_malformations(tmp_path, mutate, match):
    base = _small_image(tmp_path)
    path = tmp_path / "bad.vhd"
    path.write_bytes(mutate(base))
    with pytest.raises(FormatError, match=match) as e:
        VHDImage(path)
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(a=st.text(st.sampled_from("aAbB.! %_-~zZ9é"), min_size=1, max_size=400),
       b=st.text(st.sampled_from("aAbB.! %_-~zZ9é"), min_size=1, max_size=400))
def test_fat_name_encoding_is_a_case_blind_bijection(a, b):
    """Encoded FAT names (spec/VHD.md 3.1) decode back, fit what pyfatfs writes, keep no capital
    letter, trailing dot or space (so FAT compares them as they are), and two different
    components never share one, however FAT folds case."""
    from spherefmt.containers.vhd.names import CONTINUED, ENCODED, FAT_WRITE_NAME, decode, encode

    for c in (a, b):
        parts = encode(c)
        assert all(len(p) <= FAT_WRITE_NAME and p == p.lower() and not p.endswith((".", " ")) for p in parts)
        assert [p[:2] for p in parts] == [CONTINUED] * (len(parts) - 1) + [ENCODED]
        assert "".join(decode(p[2:]) for p in parts) == c
    if a != b:
        assert [p.lower() for p in encode(a)] != [p.lower() for p in encode(b)]
