"""spherefmt.heap: the two malloc policies, seen from outside as page faults (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from spherefmt import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                                reason="glibc malloc policies")


_CHECK = """
import json, resource, sys
import numpy as np
from spherefmt import heap

def faults(n, size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.empty(size, np.uint8)
        a[::4096] = 1  # touch every page, as a read into the array does
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

size = 2 * 1024 * 1024
out = {}
with heap.bounded_heap(256 * 1024):
    out["bounded"] = faults(20, size)
with heap.reusing_heap(64 * 1024 * 1024):
    faults(2, size)  # the first blocks fault in once
    out["reusing"] = faults(20, size)
    with heap.bounded_heap(256 * 1024):  # a conversion beside a streaming session
        out["both"] = faults(20, size)
out["users"] = len(heap._USERS)
print(json.dumps(out))
"""


def test_reusing_heap_reuses_pages_bounded_heap_returns_them() -> None:
    """In a fresh process (malloc maps a large block only when its heap has no free chunk for
    it, so the check needs a heap no earlier test has fragmented): inside ``bounded_heap`` every
    2 MiB array lands in fresh pages, inside ``reusing_heap`` in the same pages again, and the
    bounded policy wins while both are active (memory is protected, not traded for speed)."""
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                                    check=True).stdout)
    pages = 2 * 1024 * 1024 // 4096
    assert out["bounded"] >= 20 * pages * 0.9
    assert out["reusing"] <= pages
    assert out["both"] >= 20 * pages * 0.9
    assert out["users"] == 0


def test_environment_choice_is_left_alone() -> None:
    code = ("from spherefmt import heap\nwith heap.reusing_heap(1 << 26):\n    print(len(heap._USERS))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0", platform.libc_ver()
