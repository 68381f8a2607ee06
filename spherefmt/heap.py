"""How glibc's malloc treats large arrays while spherefmt works: two policies, one state.

* :func:`bounded_heap` (conversion, export): freed large arrays go back to the system, so the
  process holds what is live (peak memory is the goal; every array is made once).
* :func:`reusing_heap` (a streaming session): freed blocks stay in the heap and the next block
  reuses their pages.  A session under a budget frees and reads blocks of the same few sizes all
  the time; with glibc's defaults each read lands in fresh pages the kernel must fault in and
  zero, 4 KiB at a time: on a 25% budget over a ``.vhd`` that was 1.26 million page faults for
  24 tokens and reads at 3.7 GB/s where the same ``pread`` into a reused buffer runs at 15
  (bench/bench_decode.py).

glibc's settings are process-wide, so the users of both policies are counted under one lock and
the settings follow the active ones (the bounded policy wins while any conversion runs: it is
the one that protects memory).  When the last user leaves, the threshold is left at 32 MiB
(where glibc's dynamic rule ends up in any process that has freed a large array; glibc cannot
switch the dynamic rule back on), the trim threshold at twice that, and free heap pages are
released (``malloc_trim``).  Nothing changes off glibc, or when ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` is set in the environment (the user chose).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["bounded_heap", "reusing_heap"]

#: glibc ``mallopt`` parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: the highest threshold glibc's dynamic rule reaches (``DEFAULT_MMAP_THRESHOLD_MAX``, 64-bit)
_GLIBC_DYNAMIC_MAX = 32 * 1024 * 1024
#: largest block a streaming session keeps in the heap; larger ones get their own maps
REUSE_MAX_BLOCK = 64 * 1024 * 1024
#: most free heap a streaming session keeps for reuse
REUSE_MAX_HOLD = 1024 * 1024 * 1024


def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LOCK = threading.Lock()
#: active users: (policy, bytes) per entry ("bounded", threshold) or ("reuse", hold)
_USERS: list[tuple[str, int]] = []


def _apply(libc: Any) -> None:
    """Set glibc to what the active users want (called with the lock held)."""
    bounded = [n for kind, n in _USERS if kind == "bounded"]
    reuse = [n for kind, n in _USERS if kind == "reuse"]
    if bounded:
        libc.mallopt(_M_MMAP_THRESHOLD, min(bounded))
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * min(bounded))
        # malloc maps a large block only when its heap has no free chunk for it: free heap kept
        # by a streaming session before would serve (and keep) every array of a conversion
        libc.malloc_trim(0)
    elif reuse:
        libc.mallopt(_M_MMAP_THRESHOLD, REUSE_MAX_BLOCK)
        libc.mallopt(_M_TRIM_THRESHOLD, min(REUSE_MAX_HOLD, sum(reuse)))
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_DYNAMIC_MAX)
        libc.malloc_trim(0)


@contextmanager
def _policy(kind: str, nbytes: int) -> Iterator[None]:
    chosen = "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
    libc = None if chosen else _glibc()
    if libc is None:
        yield
        return
    entry = (kind, int(nbytes))
    with _LOCK:
        _USERS.append(entry)
        _apply(libc)
    try:
        yield
    finally:
        with _LOCK:
            _USERS.remove(entry)
            _apply(libc)


def bounded_heap(threshold: int = 4 * 1024 * 1024) -> Any:
    """Give freed large arrays back to the system while a conversion or an export runs.

    glibc's malloc raises its mmap threshold each time it frees a large mapped block (up to
    32 MiB); after that, arrays of a few MiB to 32 MiB (one tensor, one layer's temporaries,
    zarr's encoded chunks in its codec threads) come from the heap and arenas, and once freed
    stay in the process as fragmented free space.  On a GPT-2 XL conversion that was about
    180 MiB above the live arrays at the peak, growing with the layer size (bench/bench_scale.py).
    Inside this block allocations of ``threshold`` bytes and more get their own maps, unmapped
    when freed, so the process holds what is live (glibc maps a block only when its heap has no
    free chunk for it, so entering also gives free heap pages back: ``malloc_trim``).
    """
    return _policy("bounded", threshold)


def reusing_heap(hold: int) -> Any:
    """Keep up to ``hold`` bytes of freed blocks (each up to 64 MiB) in the heap for reuse while a
    streaming session runs: the next block read lands in pages already faulted in."""
    return _policy("reuse", max(1, hold))
