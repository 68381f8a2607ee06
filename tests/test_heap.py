"""spherefmt.heap: the two malloc policies, seen from outside as page faults (glibc only)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest

from spherefmt import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                                reason="glibc malloc policies")


def _faults(n: int, size: int) -> int:
    """Minor page faults while ``n`` arrays of ``size`` bytes are made, written and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.empty(size, np.uint8)
        a[::4096] = 1  # touch every page, as a read into the array does
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_reusing_heap_reuses_pages_bounded_heap_returns_them() -> None:
    size, n = 2 * 1024 * 1024, 50
    pages = size // 4096
    with heap.bounded_heap(256 * 1024):
        returned = _faults(n, size)
    with heap.reusing_heap(64 * 1024 * 1024):
        _faults(2, size)  # the first blocks fault in once
        reused = _faults(n, size)
    assert returned >= n * pages * 0.9  # every array in fresh pages
    assert reused <= pages  # the same pages again and again
    assert heap._USERS == []


def test_bounded_heap_wins_while_both_are_active() -> None:
    """A conversion beside a streaming session: memory is protected, not traded for speed."""
    size, n = 2 * 1024 * 1024, 20
    with heap.reusing_heap(64 * 1024 * 1024), heap.bounded_heap(256 * 1024):
        assert _faults(n, size) >= n * (size // 4096) * 0.9
    assert heap._USERS == []


def test_environment_choice_is_left_alone() -> None:
    code = ("from spherefmt import heap\nwith heap.reusing_heap(1 << 26):\n    print(len(heap._USERS))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0", platform.libc_ver()
