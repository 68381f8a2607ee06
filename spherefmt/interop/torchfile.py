"""Torch state-dict files (``.pt``, ``.pth``, ``.bin``): read with ``weights_only=True`` (never
unpickling arbitrary objects), written with ``torch.save``.  torch is an optional extra."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spherefmt.errors import BackendUnavailableError, FormatError
from spherefmt.interop.base import MappingSource

if TYPE_CHECKING:
    from spherefmt.format.package import Package

__all__ = ["export_torch", "open_torch", "torch_load"]


def torch_load(path: Path) -> Mapping[str, Any]:
    try:
        import torch  # noqa: PLC0415 - optional extra
    except ImportError:
        raise BackendUnavailableError(f"{path}: reading torch files needs torch: pip install 'spherefmt[torch]'") from None
    try:
        # weights_only=True: never unpickle arbitrary objects from a model file.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: not a loadable torch state dict ({msg[:200]})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{path}: torch file must hold a flat mapping of names to tensors")
    return obj


def open_torch(path: Path) -> MappingSource:
    """A torch state-dict file as a source."""
    return MappingSource(torch_load(path), str(path))


def export_torch(pkg: Package, dst: Path, storage: Callable[[str], np.ndarray], progress: Callable[[int], Any]) -> None:
    """``torch.save`` of every tensor (the whole model in memory while saving), written beside
    ``dst`` and renamed over it."""
    try:
        import torch  # noqa: PLC0415 - optional extra
    except ImportError:
        raise BackendUnavailableError(f"{dst}: writing torch files needs torch: pip install 'spherefmt[torch]'") from None
    sd = {}
    for name in pkg.keys():
        sd[name] = pkg.tensor(name, "torch", padded=True).clone()
        progress(pkg.tensor_info(name, padded=True).nbytes)
    tmp = dst.with_name(f".{dst.name}.partial")
    torch.save(sd, tmp)
    os.replace(tmp, dst)
