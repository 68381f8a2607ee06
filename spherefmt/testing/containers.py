"""The conformance suite every container passes (``tests/conformance/test_containers.py``).

A test class subclasses :class:`ContainerSuite` and supplies two hooks: :meth:`location`, where
a new package of this container goes, and :meth:`remove_object`, how an object disappears
behind spherefmt's back (a damaged disk, a hand edit).  The suite then checks the container
contract of :mod:`spherefmt.containers.base` and the package properties of format version 2
that rest on it (``spec/FORMAT.md`` section 10), once for all containers.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import spherefmt
from spherefmt.containers import open_container
from spherefmt.containers.base import CommitConflict, Container
from spherefmt.errors import ConcurrentWriteError, FormatError, IntegrityError, PackageLockedError
from spherefmt.format.store import PackageStore
from spherefmt.testing.models import gpt2_config, make_gpt2

__all__ = ["ContainerSuite"]

_n = itertools.count()


def _model() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    cfg = gpt2_config(n_layer=2, n_embd=32, vocab_size=80)
    return make_gpt2(cfg, "F32", 0), cfg


def _got(c: Container, key: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of an object the test expects to be there (absent: the test fails)."""
    blob = c.get(key, start, end)
    assert blob is not None, f"{key}: missing"
    return bytes(blob)


class ContainerSuite:
    """Subclass and fill in the hooks; every ``test_*`` method below then runs for it."""

    #: whether a second writer is refused by a lock (else by the conditional commit)
    locks = True
    #: whether an open reader sees a later commit at its next read (a ``.vhd`` reader, with its
    #: cached view of the FAT, and a ``.zip`` reader, with the file it opened, keep reading the
    #: generation they opened until a check fails or they reopen: consistent, not newest)
    reader_follows = True
    #: whether another process (the ``sphere`` command) can open this container's URLs
    shared_across_processes = True

    def location(self, tmp_path: Any) -> Any:
        """Where a new package of this container goes (unique per call)."""
        raise NotImplementedError

    def remove_object(self, url: Any, key: str) -> None:
        """Remove one stored object behind spherefmt's back."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------
    def package(self, tmp_path: Any) -> Any:
        sd, cfg = _model()
        loc = self.location(tmp_path)
        spherefmt.save(sd, loc, config=cfg, graticule="2x2", depth=2)
        return loc

    @staticmethod
    def _state(url: Any) -> dict[str, bytes]:
        with spherefmt.open(url) as p:
            return {k: v.tobytes() for k, v in p.state_dict().items()}

    # -- the container contract --------------------------------------------------------------
    def test_objects_ranges_and_listing(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        c = open_container(url, "r")
        try:
            keys = list(c.keys())
            assert "zarr.json" in keys and "manifest/zarr.json" in keys
            assert all(k.startswith(("core/", "sphere/", "manifest/", "zarr.json")) for k in keys)
            assert set(c.keys("sphere")) == {k for k in keys if k.startswith("sphere/")}
            whole = _got(c, "zarr.json")
            assert c.size("zarr.json") == len(whole) and c.get("nope/zarr.json") is None
            assert _got(c, "zarr.json", 3, 10) == whole[3:10]
            assert _got(c, "zarr.json", -7) == whole[-7:]
            assert _got(c, "zarr.json", len(whole) - 2, len(whole) + 100) == whole[-2:]  # clipped
            for bad in ("../x", "/abs", "a//b", "a/./b"):
                with pytest.raises(FormatError, match="unsafe"):
                    c.get(bad)
        finally:
            c.close()

    def test_replace_is_conditional(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        c = open_container(url, "r+")
        try:
            c.lock() if c.can_lock else None
            v = c.version("extra/obj")
            assert v is None
            c.replace("extra/obj", b"one", None)
            v1 = c.version("extra/obj")
            assert v1 is not None and _got(c, "extra/obj") == b"one"
            with pytest.raises(CommitConflict):
                c.replace("extra/obj", b"two", None)  # it exists now
            c.replace("extra/obj", b"two", v1)
            assert c.version("extra/obj") != v1
            with pytest.raises(CommitConflict):
                c.replace("extra/obj", b"three", v1)  # stale
            assert _got(c, "extra/obj") == b"two"
            c.put("extra/other", b"x")
            c.move("extra/other", "extra/moved")
            assert c.get("extra/other") is None and _got(c, "extra/moved") == b"x"
            c.delete("extra/moved")
            c.delete("extra/moved")  # absent: nothing happens
            assert c.get("extra/moved") is None
            c.delete("extra/obj")
        finally:
            c.close()

    # -- the package properties of format version 2 -------------------------------------------
    def test_a_missing_object_is_an_error_not_zeros(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        with spherefmt.open(url) as p:
            shard = p.shard_key(1, 1, 0)
        self.remove_object(url, shard)
        with spherefmt.open(url) as p:
            with pytest.raises(IntegrityError, match=f"{shard} is listed in the package's manifest but missing"):
                p.expert(1, 1, 0)
            with pytest.raises(IntegrityError):
                p.state_dict()
        self.remove_object(url, "core/transformer.wte.weight/zarr.json")
        with spherefmt.open(url) as p, pytest.raises(IntegrityError, match="weight/zarr.json"):
            p.tensor("transformer.wte.weight")

    def test_a_missing_object_is_one_line_from_the_command_line(self, tmp_path: Any) -> None:
        """With a shard gone, ``sphere export`` and ``sphere verify`` print exactly one line on
        stderr (no asyncio task noise at exit, no library warnings) and exit 2 and 1; the
        export leaves nothing behind.  Several runs: the noise depended on thread timing."""
        import subprocess
        import sys

        if not self.shared_across_processes:
            pytest.skip("another process cannot open this container's URLs")
        sd, cfg = make_gpt2(gpt2_config(n_layer=4, n_embd=64, vocab_size=80), "F32", 0), \
            gpt2_config(n_layer=4, n_embd=64, vocab_size=80)
        url = self.location(tmp_path)
        spherefmt.save(sd, url, config=cfg, graticule="4x8", depth=2)
        with spherefmt.open(url) as p:
            shard = p.shard_key(0, 0, 1)
        self.remove_object(url, shard)
        out = Path(tmp_path) / "out.safetensors"
        for _ in range(4):
            r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "export", str(url), str(out)],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "missing" in r.stderr, r.stderr[-2000:]
            assert not out.exists()
        r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "verify", str(url)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 1 and r.stderr.count("\n") <= 1, r.stderr[-2000:]

    def test_a_change_commits_whole_or_not_at_all(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        before = self._state(url)
        with spherefmt.open(url, "r+") as p:
            g = p.generation
            assert g is not None  # format version 2: a manifest generation
            with pytest.raises(KeyboardInterrupt), p.transaction():
                for a in p.experts():
                    e = p.expert(*a)
                    rows = e.neurons.copy()
                    rows[e.index >= 0] = 7
                    p.write_expert(*a, rows)
                raise KeyboardInterrupt  # half-way through a user's batch
            assert p.generation == g
        assert self._state(url) == before
        with spherefmt.open(url, "r+") as p, p.transaction():
            for a in p.experts():
                e = p.expert(*a)
                rows = e.neurons.copy()
                rows[e.index >= 0] = 7
                p.write_expert(*a, rows)
        with spherefmt.open(url) as p:
            assert p.generation == g + 1  # the whole batch: one commit
            assert all((p.expert(*a).neurons[p.expert(*a).index >= 0] == 7).all() for a in p.experts())
            v = p.verify()
            assert not v["missing"] and not v["mismatched"] and not v["unlisted"]

    def test_a_reader_follows_a_commit(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        with spherefmt.open(url) as reader:
            first = reader.expert(0, 1, 1)
            with spherefmt.open(url, "r+") as w:
                rows = first.neurons.copy()
                rows[first.index >= 0] = 2
                w.write_expert(0, 1, 1, rows)
            # the reader's view is a generation old: its next read is one generation or the other
            again = reader.expert(0, 1, 1)
            assert again.neurons.tobytes() in (first.neurons.tobytes(), rows.tobytes())
            if self.reader_follows:
                assert again.neurons.tobytes() == rows.tobytes() and reader.generation == 2
        with spherefmt.open(url) as p:
            assert (p.expert(0, 1, 1).neurons[first.index >= 0] == 2).all()

    def test_one_writer(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        if self.locks:
            with spherefmt.open(url, "r+"), pytest.raises(PackageLockedError):
                spherefmt.open(url, "r+")
            return
        a, b = spherefmt.open(url, "r+"), spherefmt.open(url, "r+")
        try:
            e = a.expert(0, 1, 1)
            with pytest.raises(ConcurrentWriteError), b.transaction():
                b.write_expert(0, 1, 1, e.neurons)
                a.write_expert(0, 1, 1, e.neurons)
        finally:
            a.close()
            b.close()

    def test_what_a_killed_writer_left_is_never_read_and_then_removed(self, tmp_path: Any) -> None:
        url = self.package(tmp_path)
        before = self._state(url)
        with spherefmt.open(url, "r+") as p:
            e = p.expert(1, 0, 1)
            rows = e.neurons.copy()
            rows[e.index >= 0] = 5
            # everything written but the commit, and no clean-up: what a SIGKILL leaves
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(PackageStore, "_commit", lambda *a: None)
                p.write_expert(1, 0, 1, rows)
        assert self._state(url) == before
        with spherefmt.open(url, "r+"):
            pass  # the next writer
        if not self.locks:  # no lock: staging is dropped once a newer generation has committed
            with spherefmt.open(url, "r+") as p:
                p.write_expert(1, 0, 1, p.expert(1, 0, 1).neurons)  # same bytes, a new generation
            with spherefmt.open(url, "r+"):
                pass
        with spherefmt.open(url) as p:
            v = p.verify()
            assert v["unlisted"] == [] and v["mismatched"] == [] and v["missing"] == []
        assert self._state(url) == before
