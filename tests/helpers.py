"""Helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import numpy as np

from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama

_counter = itertools.count()


def model(arch: str, dtype: str, seed: int = 0):
    if arch == "gpt2":
        cfg = gpt2_config(n_layer=3, n_embd=32, vocab_size=80)
        return make_gpt2(cfg, dtype, seed), cfg
    cfg = llama_config(num_hidden_layers=3, hidden_size=32, intermediate_size=88)
    return make_llama(cfg, dtype, seed), cfg


def dest(kind: str, tmp_path: Path) -> str:
    n = next(_counter)
    if kind == "dir":
        return str(tmp_path / f"m{n}.sphere")
    if kind == "zip":
        return str(tmp_path / f"m{n}.zip")
    return f"memory://t{tmp_path.name}-{n}"


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``sphere ARGS`` in-process: exit code, stdout, stderr."""
    from spherefmt.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def object_digests(path) -> dict[str, str]:
    """sha256 of every stored object of a package (directory, ``.zip`` or ``.vhd``), by key."""
    import hashlib

    path = Path(path)
    if path.suffix == ".zip":
        import zipfile

        with zipfile.ZipFile(path) as z:
            return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()}
    if path.suffix == ".vhd":
        from spherefmt.containers.vhd.filesystem import VHDFileSystem

        fs = VHDFileSystem(fo=str(path))
        try:
            return {p.lstrip("/"): hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find("/")}
        finally:
            fs.close()
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in path.rglob("*") if f.is_file()}


def changed_keys(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Objects added, removed or rewritten with other bytes (the manifests, which every commit
    adds, not counted)."""
    keys = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    return {k for k in keys if not k.startswith("manifest/")}


def train_steps(m, ids, steps: int, lr: float = 1e-2) -> list[float]:
    """A few Adam steps of a :mod:`spherefmt.training.modules` module on ``ids`` (its own labels)."""
    import torch

    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = m.model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def partition_raw(vhd, out, start_sector: int) -> Path:
    """The partition at ``start_sector`` of a VHD as a sparse raw file, extracted by qemu-img
    itself (a raw layer with an offset over its vpc driver: no multi-GB copy of the disk)."""
    opts = f"driver=raw,offset={start_sector * 512},file.driver=vpc,file.file.filename={vhd}"
    subprocess.run(["qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(out)], check=True)
    return Path(out)


def started_backends() -> list[str]:
    """The backends among numpy, torch:cpu, torch:cuda and vulkan that start on this machine."""
    from spherefmt.backends import get_backend
    from spherefmt.errors import BackendUnavailableError, UnknownBackendError

    out = []
    for name in ("numpy", "torch:cpu", "torch:cuda", "vulkan"):
        try:
            get_backend(name)
            out.append(name)
        except (BackendUnavailableError, UnknownBackendError):
            pass
    return out


def once_per_run(tmp_path_factory, name: str, make):
    """``make(folder) -> dict`` (JSON-able) run once per test run and shared by every pytest-xdist
    worker (pytest-xdist's documented pattern: a file lock in the run's shared base folder); the
    other workers wait for it and read its result.  For costly fixtures whose results tests only
    read (the sparsified small model)."""
    import json
    import os

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's base folder is in
    folder = root / f"once-{name}"
    result = folder / "result.json"
    with FileLock(str(folder) + ".lock"):
        if not result.exists():
            folder.mkdir(exist_ok=True)
            doc = make(folder)
            result.write_text(json.dumps(doc))
    return json.loads(result.read_text())
