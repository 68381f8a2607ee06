"""A seeded mutation fuzzer for every parser and container: hostile files must give a one-line
:class:`~spherefmt.errors.SpherefmtError`, never a traceback, a hang, or wrong data.

Each target makes one valid file (a package as a ``.zip``, a directory or a ``.vhd``; a
``.safetensors``, ``.gguf`` or torch file to convert), then for each case mutates its bytes
(bit flips, extreme integers written over 4- and 8-byte fields, truncation, zeroed or repeated
regions; biased toward the metadata at the start and end of a file) and opens the result the way
a user would.  A case ends as one of

* ``same``: it read, and every tensor is the original's (a mutation in unused bytes);
* ``clean``: a ``SpherefmtError`` (one line, the file named);
* ``traceback``: any other exception (goal 0);
* ``hang``: no answer within ``HANG_S`` seconds (goal 0);
* ``wrong``: it read, and some tensor differs, for the package targets whose every byte is
  checked (goal 0; a ``.safetensors``/``.gguf``/torch file has no checksum to catch a changed
  weight, so there this counts as ``same``-shaped data and is not a failure).

    python -m spherefmt.testing.fuzz --cases 2000        # what `make fuzz` runs

Four targets aim at shapes found by an outside harness rather than at random bytes:
``vhd-fat-size`` writes FAT sizes from the real one up to ``0xFFFFFFFF`` into the boot sector
(a 512 MiB FAT on a 4 GiB disk took minutes and 2.3 GB); ``non-finite`` puts NaN or infinity
into an FFN weight of a source and converts it (placement raised LinAlgError);
``zip-stream`` gives a package member a deflate stream that inflates to its real bytes and then
up to 64 MiB more under truthful size and CRC headers; ``exit-noise`` removes one object of a
package and runs ``sphere export`` in a fresh process, whose stderr must be exactly one line.
``error_lines`` is the most lines any clean error took (goal 1).

Each target runs in a child process, so that the worst resident memory above the child's own
baseline (after its imports and the valid file are made) is measured per target.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TARGETS", "fuzz", "mutate"]

HANG_S = 30
_EXTREMES = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of ``data`` (see the module docstring)."""
    b = bytearray(data)
    n = len(b)
    # most metadata sits near the start (headers, tables) or the end (zip directory, VHD footer)
    def at() -> int:
        r = rng.random()
        if r < 0.45:
            return rng.randrange(min(n, 1 << 16))
        if r < 0.7:
            return max(0, n - 1 - rng.randrange(min(n, 1 << 16)))
        return rng.randrange(n)

    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[at()] ^= 1 << rng.randrange(8)
    elif kind == 1:
        width = rng.choice((4, 8))
        i = at() & ~(width - 1)
        if i + width <= n:
            b[i : i + width] = (rng.choice(_EXTREMES) % (1 << (8 * width))).to_bytes(width, "little")
    elif kind == 2:
        b = b[: rng.randrange(n)]
    elif kind == 3:
        i, size = at(), rng.randint(1, 4096)
        b[i : i + size] = bytes(len(b[i : i + size]))
    elif kind == 4:
        i, j = at(), at()
        size = rng.randint(1, 512)
        b[j : j + size] = b[i : i + size]
    else:
        b[at()] = rng.randrange(256)
    return bytes(b)


@dataclass
class Target:
    name: str
    #: writes the valid file under the folder, returns its path and the tensors it holds
    make: Callable[[Path], tuple[Path, dict[str, bytes]]]
    #: opens a (mutated) file as a user would and returns its tensors' bytes
    read: Callable[[Path], dict[str, bytes]]
    #: every byte is checked (a package): a changed tensor is a failure
    checked: bool
    #: writes a hostile variant of the valid file (first path) to the second; default: :func:`mutate`
    shape: Callable[[Path, Path, random.Random], None] | None = None


def _model() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from spherefmt.testing.models import gpt2_config, make_gpt2

    cfg = gpt2_config(n_layer=2, n_embd=32, vocab_size=80)
    return make_gpt2(cfg, "F32", 0), cfg


def _package_bytes(url: Any) -> dict[str, bytes]:
    import spherefmt

    with spherefmt.open(url) as p:
        return {k: np.ascontiguousarray(v).tobytes() for k, v in p.state_dict().items()}


def _make_package(suffix: str) -> Callable[[Path], tuple[Path, dict[str, bytes]]]:
    def make(folder: Path) -> tuple[Path, dict[str, bytes]]:
        import spherefmt

        sd, cfg = _model()
        url = spherefmt.save(sd, folder / f"m{suffix}", config=cfg, graticule="2x2", depth=2)
        return Path(url), {k: v.tobytes() for k, v in sd.items()}
    return make


def _make_source(kind: str) -> Callable[[Path], tuple[Path, dict[str, bytes]]]:
    def make(folder: Path) -> tuple[Path, dict[str, bytes]]:
        sd, _ = _model()
        if kind == "safetensors":
            from safetensors.numpy import save_file

            path = folder / "m.safetensors"
            save_file(sd, path)
        elif kind == "gguf":
            import gguf

            path = folder / "m.gguf"
            w = gguf.GGUFWriter(path, arch="other")
            w.add_array("test.tokens", [f"t{i}" for i in range(50)])
            for name, a in list(sd.items())[:6]:
                w.add_tensor(name, a)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            sd = dict(list(sd.items())[:6])
        else:
            import torch

            path = folder / "m.pt"
            torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
        return path, {k: v.tobytes() for k, v in sd.items()}
    return make


def _read_source(path: Path) -> dict[str, bytes]:
    from spherefmt.interop.registry import open_source

    with open_source(path) as src:
        return {k: np.ascontiguousarray(src.read(k)).tobytes() for k in src.keys()}


def _fat_size(valid: Path, work: Path, rng: random.Random) -> None:
    import struct

    from spherefmt.containers.vhd.filesystem import PARTITION_START
    from spherefmt.containers.vhd.image import VHDImage

    shutil.copyfile(valid, work)
    at = PARTITION_START * 512 + 36
    with VHDImage(work, "r+") as v:
        real = struct.unpack("<I", v.read(at, 4))[0]
        size = rng.choice((real + rng.randint(1, 4096), real * rng.randint(2, 64), 0x100000, 0x200000,
                           rng.randint(real, 0xFFFFFFFF), 0xFFFFFFFF))
        v.write(at, struct.pack("<I", min(size, 0xFFFFFFFF)))


def _non_finite(valid: Path, work: Path, rng: random.Random) -> None:
    from safetensors.numpy import load_file, save_file

    sd = load_file(valid)
    name = rng.choice(sorted(k for k in sd if ".mlp." in k and k.endswith("weight")))
    w = sd[name].copy()
    for _ in range(rng.randint(1, 3)):
        w.flat[rng.randrange(w.size)] = rng.choice((np.nan, np.inf, -np.inf))
    sd[name] = w
    save_file(sd, work)


def _convert(path: Path) -> dict[str, bytes]:
    import spherefmt

    with tempfile.TemporaryDirectory() as tmp:
        url = spherefmt.save(path, Path(tmp) / "out.sphere", progress=False)
        return _package_bytes(url)


def _zip_stream(valid: Path, work: Path, rng: random.Random) -> None:
    import struct
    import zipfile
    import zlib

    with zipfile.ZipFile(valid) as src:
        infos = src.infolist()
        member = rng.choice(infos).filename
        members = {i.filename: src.read(i) for i in infos}
    real = members[member]
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)  # the tail, a MiB at a time (the fuzzing process's memory is measured)
    stream = c.compress(real) + b"".join(c.compress(zeros) for _ in range(rng.randint(1, 64))) + c.flush()
    with zipfile.ZipFile(work, "w") as out:
        for name, data in members.items():
            out.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), stream if name == member else data)
    raw = bytearray(work.read_bytes())
    for sig, method, crc, usize, name_at in ((b"PK\x03\x04", 8, 14, 22, 30), (b"PK\x01\x02", 10, 16, 24, 46)):
        at = 0
        while (at := raw.find(sig, at)) >= 0:  # the member's local and central headers: deflated, real size and CRC
            if raw[at + name_at : at + name_at + len(member)] == member.encode():
                struct.pack_into("<H", raw, at + method, 8)
                struct.pack_into("<I", raw, at + crc, zlib.crc32(real))
                struct.pack_into("<I", raw, at + usize, len(real))
                break
            at += 4
    work.write_bytes(bytes(raw))


def _missing_object(valid: Path, work: Path, rng: random.Random) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(valid, work)
    objects = sorted(p for p in work.rglob("*") if p.is_file() and "manifest" not in p.parts and p.name != "zarr.json")
    rng.choice(objects).unlink()


class _Noisy(Exception):
    """A command that failed with more than one line on stderr (``lines`` of them)."""

    def __init__(self, msg: str, lines: int) -> None:
        super().__init__(msg)
        self.lines = lines


def _export_in_a_process(url: Path) -> dict[str, bytes]:
    """``sphere export`` in a fresh interpreter: a clean error is exit 2 with exactly one line
    on stderr (anything more, such as asyncio's noise at exit, counts as a traceback)."""
    import subprocess

    from spherefmt.errors import SpherefmtError

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.safetensors"
        r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "export", str(url), str(out)], capture_output=True,
                           text=True, timeout=HANG_S)
        lines = r.stderr.splitlines()
        if r.returncode == 2 and len(lines) == 1:
            raise SpherefmtError(lines[0])
        if r.returncode == 0:
            from safetensors.numpy import load_file

            return {k: np.ascontiguousarray(v).tobytes() for k, v in load_file(out).items()}
        raise _Noisy(f"exit {r.returncode} with {len(lines)} lines on stderr", len(lines))


TARGETS: dict[str, Target] = {
    "zip": Target("zip", _make_package(".zip"), _package_bytes, True),
    "directory": Target("directory", _make_package(".sphere"), _package_bytes, True),
    "vhd": Target("vhd", _make_package(".vhd"), _package_bytes, True),
    "safetensors": Target("safetensors", _make_source("safetensors"), _read_source, False),
    "gguf": Target("gguf", _make_source("gguf"), _read_source, False),
    "torch": Target("torch", _make_source("torch"), _read_source, False),
    "vhd-fat-size": Target("vhd-fat-size", _make_package(".vhd"), _package_bytes, True, _fat_size),
    "non-finite": Target("non-finite", _make_source("safetensors"), _convert, False, _non_finite),
    "zip-stream": Target("zip-stream", _make_package(".zip"), _package_bytes, True, _zip_stream),
    "exit-noise": Target("exit-noise", _make_package(".sphere"), _export_in_a_process, True, _missing_object),
}


class _Hang(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Hang


def _case(target: Target, valid: Path, original: dict[str, bytes], rng: random.Random, scratch: Path
          ) -> tuple[str, str | None, int]:
    """One case: (outcome, why, lines of its error message: 0 when it read)."""
    from spherefmt.errors import SpherefmtError

    work = scratch / f"case{valid.suffix}"
    if target.shape is not None:
        target.shape(valid, work, rng)
    elif valid.is_dir():  # a directory package: mutate one of its objects
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(valid, work)
        files = sorted(p for p in work.rglob("*") if p.is_file())
        victim = rng.choice([p for p in files if p.name == "zarr.json"] if rng.random() < 0.5 else files)
        victim.write_bytes(mutate(victim.read_bytes(), rng))
    else:
        work.write_bytes(mutate(valid.read_bytes(), rng))
    signal.alarm(HANG_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = target.read(work)
        if got == original or not target.checked:
            return "same", None, 0
        return "wrong", "read without error, tensors differ", 0
    except _Hang:
        return "hang", None, 0
    except SpherefmtError as e:
        lines = max(1, len(str(e).splitlines()))
        return ("clean", None, 1) if lines == 1 else ("traceback", f"multi-line {type(e).__name__}: {str(e)[:100]}", lines)
    except _Noisy as e:
        return "traceback", str(e), e.lines
    except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "traceback", f"{type(e).__name__}: {str(e)[:100]} ({Path(tb.filename).name}:{tb.lineno})", 0
    finally:
        signal.alarm(0)


def _run(name: str, cases: int, seed: int, out: Any) -> None:
    target = TARGETS[name]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        valid, original = target.make(folder)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        signal.signal(signal.SIGALRM, _alarm)
        rng = random.Random(seed)
        counts: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        t0 = time.monotonic()
        size = valid.stat().st_size if valid.is_file() else sum(p.stat().st_size for p in valid.rglob("*") if p.is_file())
        lines = 0
        for _ in range(cases):
            kind, why, n = _case(target, valid, original, rng, folder)
            lines = max(lines, n)
            counts[kind] += 1
            if why and len(examples.setdefault(kind, [])) < 5:
                examples[kind].append(why)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        out.put({"target": name, "cases": cases, "seed": seed, "input_bytes": size, **{k: counts.get(k, 0) for k in
                 ("same", "clean", "traceback", "hang", "wrong")}, "examples": examples, "error_lines": lines,
                 "peak_rss_above_baseline_mib": round(peak / 1024, 1), "seconds": round(time.monotonic() - t0, 1)})


def fuzz(targets: list[str] | None = None, cases: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Run ``cases`` mutations of each target, each target in its own child process."""
    ctx = multiprocessing.get_context("forkserver")
    results = []
    for name in targets or list(TARGETS):
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(name, cases, seed, q))
        p.start()
        try:
            while True:
                try:
                    results.append(q.get(timeout=1))
                    break
                except queue.Empty:
                    if not p.is_alive():  # the child died (a crash is a finding too)
                        results.append({"target": name, "cases": cases, "seed": seed, "same": 0, "clean": 0,
                                        "traceback": cases, "hang": 0, "wrong": 0, "seconds": 0, "error_lines": None,
                                        "examples": {"traceback": [f"the fuzzing process exited {p.exitcode}"]},
                                        "peak_rss_above_baseline_mib": None, "input_bytes": 0})
                        break
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="seeded mutation fuzzing of spherefmt's parsers and containers")
    ap.add_argument("--cases", type=int, default=2000, help="mutations per target (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", choices=list(TARGETS), help="only these targets")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    results = fuzz(args.target, args.cases, args.seed)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['target']:12} {r['cases']:6} cases: {r['clean']} clean errors, {r['same']} read the same, "
                  f"{r['traceback']} tracebacks, {r['hang']} hangs, {r['wrong']} wrong, "
                  f"peak +{r['peak_rss_above_baseline_mib']} MiB, error lines {r['error_lines']}, {r['seconds']} s")
            for kind, ex in r["examples"].items():
                for e in ex:
                    print(f"    {kind}: {e}")
    return 1 if any(r["traceback"] or r["hang"] or r["wrong"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
