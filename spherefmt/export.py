"""Export a package back to the formats it came from, with original names, shapes, dtypes, bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import FormatError
from .package import Package
from .package import open as open_package
from .safetensors_io import write_safetensors

__all__ = ["export"]


def export(pkg: Any, dst: str | os.PathLike[str], *, fmt: str | None = None, progress: bool = False) -> str:
    """Write every tensor of a package to ``dst``.

    Parameters
    ----------
    pkg
        A :class:`Package` or anything :func:`spherefmt.open` accepts.
    dst
        ``*.safetensors`` (streamed: one tensor in memory at a time) or ``*.pt``/``*.pth``/``*.bin``
        (a torch state dict; needs torch and holds the whole model in memory while saving).
    fmt
        ``"safetensors"`` or ``"torch"``; default from the suffix of ``dst``.
    """
    dst = Path(dst)
    fmt = fmt or {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}.get(dst.suffix)
    if fmt not in ("safetensors", "torch"):
        raise FormatError(f"{dst}: unknown export format; use a .safetensors, .pt, .pth or .bin name")
    own = not isinstance(pkg, Package)
    p = open_package(pkg) if own else pkg
    try:
        # after uneven growth, FFN tensors are padded with zero neurons to one size (the config's)
        infos = [p.tensor_info(n, padded=True) for n in p.keys()]
        from .package import _progress

        with _progress(sum(i.nbytes for i in infos), "export", progress) as bar:
            if fmt == "safetensors":
                meta = p.metadata["metadata"]
                write_safetensors(dst, infos, lambda n: p._storage(n, padded=True), metadata=meta or None,
                                  progress=bar.update)
            else:
                import torch

                sd = {}
                for i in infos:
                    sd[i.name] = p.tensor(i.name, "torch", padded=True).clone()
                    bar.update(i.nbytes)
                tmp = dst.with_name(f".{dst.name}.partial")
                torch.save(sd, tmp)
                os.replace(tmp, dst)
    finally:
        if own:
            p.close()
    return str(dst)
