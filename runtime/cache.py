"""Device-resident blocks under a byte capacity: load, use, release; evict; prefetch.

Eviction is Belady-style for a forward pass that visits *positions* in a fixed cycle (embedding,
layer 0 .. L-1, head): the victim is the unpinned block whose next use is farthest away
(``(position - now) mod period``; a block already used at the current visit counts a whole
period).  For a dense model larger than the cache this keeps a stable resident set and streams
the rest, where LRU would miss every time.  Ties go to the least recently used.

The prefetcher is a pair of background threads.  They load the blocks the next position will likely
need, but only into room it can make by evicting blocks needed *later* than the one it loads,
so it never pushes out something the forward pass wants sooner.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from spherefmt.errors import BudgetExceededError
from spherefmt.runtime.loader import Key

__all__ = ["WeightCache", "CacheStats"]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    expert_loads: int = 0
    expert_evictions: int = 0
    bytes_uploaded: int = 0
    prefetch_loads: int = 0
    prefetch_hits: int = 0
    prefetch_skipped: int = 0
    wait_s: float = 0.0
    load_s: float = 0.0


@dataclass
class _Block:
    key: Key
    nbytes: int
    position: int
    tensors: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    pins: int = 0
    last_use: int = 0
    visit: int = -1
    prefetched: bool = False
    error: BaseException | None = None


class WeightCache:
    """Blocks on one backend under ``capacity`` bytes.

    Parameters
    ----------
    backend
        Where blocks live.
    load
        ``load(key) -> {name: float32 host array}`` (the :class:`~.loader.BlockLoader`).
    nbytes
        ``nbytes(key) -> int``, known before loading.
    position
        ``position(key) -> int``: when in the cycle the block is used.
    period
        Number of positions in one cycle.
    capacity
        Bytes the resident blocks may take (the budget minus KV cache and scratch).
    """

    def __init__(self, backend: Any, load: Callable[[Key], dict[str, Any]], nbytes: Callable[[Key], int],
                 position: Callable[[Key], int], period: int, capacity: int, prefetch: bool = True,
                 workers: int = 2) -> None:
        self.backend = backend
        self._load, self._nbytes, self._position = load, nbytes, position
        self.period = period
        self.capacity = capacity
        self.used = 0
        self.stats = CacheStats()
        self._blocks: dict[Key, _Block] = {}
        self._cond = threading.Condition()
        self._clock = 0
        self.now = 0  # current position
        self.visit = 0  # counts set_position calls
        #: keys used at only some visits of their position (top-k experts); others always are
        self.sparse: Callable[[Key], bool] = lambda key: False
        self._visits: dict[int, int] = {}
        self._uses: dict[Key, int] = {}
        self._queue: queue.Queue[tuple[int, Key] | None] | None = None
        self._threads: list[threading.Thread] = []
        if prefetch:
            # decoding (zstd, shuffle, crc32c) releases the GIL: workers overlap with the forward pass
            self._queue = queue.Queue()
            for i in range(workers):
                t = threading.Thread(target=self._prefetch_loop, name=f"spherefmt-prefetch-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    # --- positions and priorities -----------------------------------------------------------
    def set_position(self, position: int) -> None:
        with self._cond:
            self.now = position
            self.visit += 1
            self._visits[position] = self._visits.get(position, 0) + 1

    def _distance(self, b: _Block) -> float:
        """Expected steps until the block is used again: the cycle distance to its position,
        plus, for a block not used at every visit of its position (a routed expert), the
        expected cycles skipped, ``1/p - 1`` with ``p`` its observed use rate there."""
        if b.position == self.now and b.visit == self.visit:
            d: float = self.period  # used at this visit: next needed a whole cycle later at the earliest
        else:
            d = (b.position - self.now) % self.period
        if self.sparse(b.key):
            visits = self._visits.get(b.position, 0)
            p = (self._uses.get(b.key, 0) + 1) / (visits + 2)  # Laplace: unseen -> 1/2
            d += self.period * (1 / p - 1)
        return d

    def _make_room(self, need: int, farther_than: float | None) -> bool:
        """Evict until ``need`` more bytes fit; with ``farther_than``, only blocks needed later
        than that distance.  Called with the lock held."""
        if self.used + need <= self.capacity:
            return True
        # one scan per victim, not a sort of every block: a load usually evicts one or two
        # blocks of about its size, and this runs for every load (a sort per load was 17% of a
        # 25%-budget decode step in the profile)
        while self.used + need > self.capacity:
            best: tuple[float, int] | None = None
            victim = None
            for b in self._blocks.values():
                if b.ready and b.pins == 0:
                    dist = self._distance(b)
                    if (farther_than is None or dist > farther_than) and (
                            best is None or (dist, -b.last_use) > best):
                        best, victim = (dist, -b.last_use), b
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, b: _Block) -> None:
        for t in b.tensors.values():
            self.backend.free(t)
        b.tensors.clear()
        del self._blocks[b.key]
        self.used -= b.nbytes
        self.stats.evictions += 1
        if b.key[0] == "cell":
            self.stats.expert_evictions += 1

    # --- use --------------------------------------------------------------------------------
    @contextmanager
    def use(self, key: Key) -> Iterator[dict[str, Any]]:
        """The block's device tensors, pinned for the ``with`` body (loaded first if needed)."""
        b = self._acquire(key)
        try:
            yield b.tensors
        finally:
            with self._cond:
                b.pins -= 1
                self._cond.notify_all()

    def _acquire(self, key: Key) -> _Block:
        t0 = time.perf_counter()
        with self._cond:
            while True:
                b = self._blocks.get(key)
                if b is not None and b.ready:
                    self.stats.hits += 1
                    if b.prefetched:
                        self.stats.prefetch_hits += 1
                        b.prefetched = False
                    b.pins += 1
                    break
                if b is not None:  # the prefetcher is loading it: wait rather than load twice
                    self._cond.wait()
                    continue
                need = self._nbytes(key)
                if need > self.capacity:
                    raise BudgetExceededError(f"block {key} needs {need} bytes; the cache holds {self.capacity}")
                if not self._make_room(need, None):
                    if any(not x.ready for x in self._blocks.values()):
                        self._cond.wait()  # a prefetch in flight becomes evictable when it lands
                        continue
                    raise BudgetExceededError(f"no room for block {key} ({need} bytes): everything resident is in use")
                b = self._start(key, need, prefetched=False)
                # pinned before it is filled: between _fill marking it ready and this thread taking
                # the lock back, a prefetch making room could otherwise evict it (and hand back an
                # empty block: seen once in a clean-clone run, the vulkan 25% test)
                b.pins += 1
                self._cond.release()
                try:
                    self._fill(b)
                finally:
                    self._cond.acquire()
                self.stats.misses += 1
                break
            self._clock += 1
            if b.visit != self.visit:
                self._uses[key] = self._uses.get(key, 0) + 1
            b.last_use, b.visit = self._clock, self.visit
        self.stats.wait_s += time.perf_counter() - t0
        return b

    def _start(self, key: Key, need: int, prefetched: bool) -> _Block:
        b = _Block(key, need, self._position(key), prefetched=prefetched)
        self._blocks[key] = b
        self.used += need
        return b

    def _fill(self, b: _Block) -> None:
        """Load a reserved block outside the lock; on failure drop the reservation and re-raise."""
        t0 = time.perf_counter()
        try:
            host = self._load(b.key)
            tensors = {name: self.backend.adopt(a) for name, a in host.items()}
        except BaseException:
            with self._cond:
                self._blocks.pop(b.key, None)
                self.used -= b.nbytes
                self._cond.notify_all()
            raise
        with self._cond:
            b.tensors, b.ready = tensors, True
            self.stats.loads += 1
            self.stats.load_s += time.perf_counter() - t0
            self.stats.bytes_uploaded += b.nbytes
            if b.key[0] == "cell":
                self.stats.expert_loads += 1
            self._cond.notify_all()

    # --- prefetch ---------------------------------------------------------------------------
    def prefetch(self, keys: Sequence[Key]) -> None:
        """Ask the background workers to load ``keys`` (in order) if room can be made for them."""
        if self._queue is not None:
            for key in keys:
                self._queue.put((self.visit, key))

    def _prefetch_loop(self) -> None:
        q = self._queue
        while q is not None:
            item = q.get()
            try:
                if item is None:
                    return
                self._prefetch_one(*item)
            finally:
                q.task_done()

    def _prefetch_one(self, visit: int, key: Key) -> None:
        with self._cond:
            if self.visit > visit + 1 or key in self._blocks:  # stale (the pass moved on) or there
                return
            need = self._nbytes(key)
            dist = (self._position(key) - self.now) % self.period + 0.5  # never before what is due sooner
            if need > self.capacity or not self._make_room(need, dist):
                self.stats.prefetch_skipped += 1
                return
            b = self._start(key, need, prefetched=True)
        try:
            self._fill(b)
        except Exception:  # noqa: BLE001 - the forward pass reads it again and reports the error
            return
        with self._cond:
            self.stats.prefetch_loads += 1

    # --- capacity -----------------------------------------------------------------------------
    def resize(self, capacity: int) -> None:
        """Change the capacity, evicting down to it."""
        with self._cond:
            self.capacity = capacity
            while any(not b.ready for b in self._blocks.values()):
                self._cond.wait()
            if not self._make_room(0, None):
                raise BudgetExceededError("cannot shrink the cache: blocks are in use")

    def close(self) -> None:
        if self._queue is not None:
            for _ in self._threads:
                self._queue.put(None)
            for t in self._threads:
                t.join(timeout=30)
            self._queue = None
        with self._cond:
            for b in list(self._blocks.values()):
                if b.ready:
                    self._evict(b)
