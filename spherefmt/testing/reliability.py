"""Crash trials: a writer killed with SIGKILL at a random moment of its change, and what the
package is afterwards.  ``tests/test_integrity.py`` runs a few per container and
``bench/bench_reliability.py`` hundreds.

A trial copies a base package, starts a writer process that prepares its change (opens the
package, trains a step...) and waits; then the change starts and the writer is killed after a
random delay (up to a little more than the change takes).  The package must then be exactly
the state before the change or exactly the state after it, pass ``verify``, and the next writer
must find nothing to repair.  Writers are forked from a server process that has already
imported spherefmt, torch and numpy (``multiprocessing``'s forkserver), so a trial costs the
change, not a Python start-up.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Trials", "copy_package", "leftovers", "state_of"]

#: the changes a trial can interrupt
OPS = ("grow", "train", "convert")
IDS = (np.arange(64) * 37 % 80).astype(np.int64)  # token ids of the training step (vocabulary 80)


def copy_package(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def state_of(pkg: str | Path) -> dict[str, str] | str:
    """Every tensor's dtype, shape and bytes (a digest) and whether every object matches the
    manifest; or the one-line error of a package that cannot be read."""
    import spherefmt

    try:
        with spherefmt.open(pkg) as p:
            out = {n: f"{t.dtype}{t.shape}:"
                      f"{hashlib.sha256(np.ascontiguousarray(t).view(np.uint8).data).hexdigest()[:16]}"
                   for n, t in p.state_dict().items()}
            v = p.verify()
    except Exception as e:  # noqa: BLE001 - what a user would see is the outcome
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if v["missing"] or v["mismatched"]:
        return f"verify: {len(v['missing'])} missing, {len(v['mismatched'])} damaged"
    return out


def leftovers(pkg: str | Path) -> dict[str, Any]:
    """What killed writers left: files beside the package (``.<name>.*``; ``lock`` counts the
    lock file apart: it is empty and removed by the next writer) and objects inside that the
    manifest does not list."""
    import spherefmt

    p = Path(pkg)
    beside = [q for q in p.parent.glob(f".{p.name}.*") if q.name != f".{p.name}.lock"]
    nbytes = 0
    for q in beside:
        nbytes += sum(f.stat().st_size for f in q.rglob("*") if f.is_file()) if q.is_dir() else q.stat().st_size
    inside: list[str] = []
    try:
        with spherefmt.open(pkg) as pk:
            inside = pk.verify()["unlisted"]
    except Exception:  # noqa: BLE001 - an unreadable package is reported by state_of
        pass
    return {"beside": sorted(q.name for q in beside), "beside_bytes": nbytes, "inside": inside,
            "lock": (p.parent / f".{p.name}.lock").exists()}


# --- the writer (runs in a forked child) ---------------------------------------------------------
def _prepare(op: str, pkg: str, args: dict[str, Any]) -> Any:
    import spherefmt

    if op == "grow":
        return spherefmt.open(pkg, "r+")
    if op == "train":
        import torch

        import spherefmt.training.modules as st

        torch.set_num_threads(1)  # the same reductions in the same order: the reference is reproducible
        torch.manual_seed(0)
        m = st.load(pkg, trainable=[tuple(e) for e in args["experts"]])
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        ids = torch.from_numpy(IDS[None])
        loss = m.model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        return m
    if op == "convert":
        return None
    raise ValueError(f"unknown operation {op!r}")


def _change(op: str, pkg: str, args: dict[str, Any], handle: Any) -> None:
    import spherefmt

    if op == "grow":
        from spherefmt.training.grow import grow_neurons

        grow_neurons(handle, args.get("neurons", 24), cell=(0, 1), depth=0, seed=1)
        handle.close()  # a zip is rewritten here: part of the change
    elif op == "train":
        handle.save_changes()
        handle.pkg.close()
    else:
        spherefmt.save(args["source"], pkg, overwrite=True, config=args.get("config"), graticule=args.get("graticule"),
                       depth=args.get("depth"))


def _writer(op: str, pkg: str, args: dict[str, Any], ready: Any, go: Any, done: Any) -> None:
    handle = _prepare(op, pkg, args)
    ready.set()
    go.wait()
    _change(op, pkg, args, handle)
    done.set()
    os._exit(0)  # no interpreter teardown: as close to a kill as a clean exit gets


class Trials:
    """Writers forked from a server that has imported what they need (see the module docstring)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["numpy", "zarr", "torch", "spherefmt", "spherefmt.training.grow", "spherefmt.training.modules",
                                         "spherefmt.testing.reliability"])

    def run(self, op: str, pkg: str | Path, args: dict[str, Any], delay: float | None) -> dict[str, Any]:
        """Run ``op`` on ``pkg``; kill it ``delay`` seconds after its change starts (``None``:
        let it finish).  Returns ``{"seconds": change time or delay, "finished": bool}``."""
        ready, go, done = self.ctx.Event(), self.ctx.Event(), self.ctx.Event()
        proc = self.ctx.Process(target=_writer, args=(op, str(pkg), args, ready, go, done))
        proc.start()
        try:
            if not ready.wait(120):
                raise RuntimeError(f"{op} writer did not get ready (exit code {proc.exitcode})")
            t0 = time.perf_counter()
            go.set()
            if delay is None:
                proc.join(600)
                if not done.is_set():
                    raise RuntimeError(f"{op} writer failed (exit code {proc.exitcode})")
                return {"seconds": time.perf_counter() - t0, "finished": True}
            finished = done.wait(delay)
            if proc.is_alive():
                proc.kill()  # SIGKILL
            proc.join(30)
            return {"seconds": delay, "finished": finished}
        finally:
            if proc.is_alive():
                proc.kill()  # SIGKILL
                proc.join(30)

    def trial(self, op: str, base: Path, work: Path, args: dict[str, Any], delay: float,
              old: dict[str, str], new: dict[str, str]) -> dict[str, Any]:
        """One killed change on a copy of ``base``: its outcome (``old``, ``new``, ``neither``
        or the error that opening gave), the leftovers, and whether the next writer then finds
        the package as it was and leaves nothing behind."""
        import spherefmt

        pkg = copy_package(base, work)
        r = self.run(op, pkg, args, delay)
        st = state_of(pkg)
        outcome = "old" if st == old else "new" if st == new else ("neither" if isinstance(st, dict) else st)
        after_kill = leftovers(pkg)
        try:  # the next writer: takes the lock, finishes or removes what the killed one left
            with spherefmt.open(pkg, "r+"):
                pass
            next_ok = state_of(pkg) == st
        except Exception as e:  # noqa: BLE001
            next_ok = False
            outcome = outcome if outcome != "old" and outcome != "new" else f"next writer: {type(e).__name__}: {e}"
        after_next = leftovers(pkg)
        return {"delay": round(delay, 4), "finished": r["finished"], "outcome": outcome,
                "leftovers_after_kill": after_kill, "leftovers_after_next_writer": after_next,
                "next_writer_keeps_state": next_ok}
