"""Checking package images with the reference tools (qemu-img, fsck.vfat)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

__all__ = ["check_vhd"]


def check_vhd(image: str | Path, scratch: str | Path) -> dict:
    """Convert ``image`` to raw with ``qemu-img`` and check its FAT32 partition with
    ``fsck.vfat -n``; return ``qemu-img info``.  Raises ``AssertionError`` with the tool's output
    when either tool objects (qemu-img has no ``check`` for vpc images, so conversion is the test)."""
    from spherefmt.containers.vhd.filesystem import PARTITION_START

    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                                     text=True, check=True).stdout)
    scratch = Path(scratch)
    raw, part = scratch / "check-disk.raw", scratch / "check-part.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(raw)], check=True)
    try:
        with open(raw, "rb") as src, open(part, "wb") as dst:
            if src.read(512)[510:512] != b"\x55\xaa":
                raise AssertionError(f"{image}: no MBR signature")
            src.seek(PARTITION_START * 512)
            shutil.copyfileobj(src, dst, 1 << 20)
        fsck = subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True, text=True, check=False)
        if fsck.returncode != 0 or "wrong" in fsck.stdout.lower():
            raise AssertionError(f"{image}: fsck.vfat: {fsck.stdout} {fsck.stderr}")
    finally:
        raw.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return info
