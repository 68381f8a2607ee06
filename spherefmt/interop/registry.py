"""One table of the model formats spherefmt reads (``convert``) and writes (``export``).

Each external format is one module of :mod:`spherefmt.interop` offering the same two things: a
*source* (a path -> :class:`~spherefmt.interop.base.TensorSource`) and a *writer* (a package ->
a file or folder at a path).  They are registered here by name, with the suffixes (or, for
folders, the test) that select them; :func:`open_source` and :func:`export` are lookups in this
table, and ``sphere convert --help`` / ``sphere export --help`` list it.

A writer is called as ``writer(pkg, dst, storage, progress)``: ``storage(name)`` gives the
tensor's storage array as exported (FFN tensors padded to one size after growth, see
:meth:`~spherefmt.format.package.Package.tensor`), one layer in memory at a time, and
``progress(nbytes)`` advances a bar.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from spherefmt.errors import FormatError, InputError
from spherefmt.format.package import Package, is_package
from spherefmt.format.package import open as open_package
from spherefmt.interop.base import MappingSource, TensorSource, bounded_heap
from spherefmt.interop.experts import SplitView
from spherefmt.interop.fused import FusedView
from spherefmt.interop.gguf import export_gguf, open_gguf
from spherefmt.interop.hf import export_hf_folder, open_hf_folder
from spherefmt.interop.package import LayerReader, PackageSource
from spherefmt.interop.safetensors import export_safetensors, open_safetensors
from spherefmt.interop.torchfile import export_torch, open_torch
from spherefmt.progress import progress_bar

__all__ = ["FORMATS", "ModelFormat", "export", "format_for", "open_source", "register"]

Writer = Callable[[Package, Path, Callable[[str], np.ndarray], Callable[[int], Any]], None]


@dataclass(frozen=True)
class ModelFormat:
    """One external model format."""

    name: str
    description: str
    #: file suffixes that select it (empty for folders)
    suffixes: tuple[str, ...] = ()
    #: opens a path for ``convert`` (``None``: not read)
    source: Callable[[Path], TensorSource] | None = None
    #: writes a package to a path for ``export`` (``None``: not written)
    writer: Writer | None = None
    #: True for formats that are folders
    folder: bool = False


FORMATS: dict[str, ModelFormat] = {}


def register(fmt: ModelFormat) -> ModelFormat:
    """Add a format to the table (a later registration of the same name replaces it)."""
    FORMATS[fmt.name] = fmt
    return fmt


register(ModelFormat("safetensors", "safetensors file (a config.json beside it is read)", (".safetensors",),
                     open_safetensors, export_safetensors))
register(ModelFormat("gguf", "GGUF (llama.cpp); export needs a package converted from GGUF", (".gguf",),
                     open_gguf, export_gguf))
register(ModelFormat("torch", "torch state dict (weights_only)", (".pt", ".pth", ".bin"), open_torch, export_torch))
register(ModelFormat("hf", "Hugging Face save_pretrained folder", (), open_hf_folder, export_hf_folder, folder=True))


def format_for(path: str | os.PathLike[str], *, writing: bool, name: str | None = None) -> ModelFormat:
    """The format of ``path`` (by ``name``, else by suffix; a folder is ``hf``).

    Raises
    ------
    InputError
        No registered format matches, or it cannot be read (``writing=False``) or written.
    """
    p = Path(path)
    role = "writer" if writing else "source"
    usable = [f for f in FORMATS.values() if getattr(f, role) is not None]
    if name is not None:
        fmt = FORMATS.get(name)
        if fmt is None or getattr(fmt, role) is None:
            raise InputError(f"format {name!r}: expected one of {', '.join(f.name for f in usable)}")
        return fmt
    for fmt in usable:
        if p.suffix in fmt.suffixes:
            return fmt
    if (p.is_dir() or (writing and not p.suffix)) and (fmt := next((f for f in usable if f.folder), None)):
        return fmt
    known = ", ".join(s for f in usable for s in f.suffixes)
    what = "export format" if writing else "model file type"
    raise InputError(f"{p}: unknown {what} {p.suffix!r} (expected {known} or a folder)")


def open_source(src: Any) -> TensorSource:
    """Open anything ``sphere convert`` accepts.

    Parameters
    ----------
    src
        A mapping of names to numpy arrays / torch tensors, a path of a registered format
        (:data:`FORMATS`), or an existing spherefmt package (re-placed with new parameters).

    Raises
    ------
    FormatError
        When the input is malformed; :class:`InputError` when it is none of these.
    """
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, Mapping):
        return MappingSource(src)
    if not isinstance(src, str | os.PathLike):
        raise InputError(f"cannot convert a {type(src).__name__}: give a path or a state dict")
    if is_package(src):
        return PackageSource(src)
    p = Path(src)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    fmt = format_for(p, writing=False)
    if fmt.source is None:  # format_for only returns readable formats
        raise FormatError(f"{p}: {fmt.name} cannot be read")
    return fmt.source(p)


def export(pkg: Any, dst: str | os.PathLike[str], *, fmt: str | None = None, progress: bool = False,
           quantize: str | None = None) -> str:
    """Write every tensor of a package to ``dst`` in a registered format.

    Parameters
    ----------
    pkg
        A :class:`~spherefmt.format.package.Package` or anything :func:`spherefmt.open` accepts.
    dst
        ``*.safetensors`` (streamed: one tensor in memory at a time), ``*.gguf`` (packages
        converted from GGUF: metadata and tensor types restored, see :mod:`spherefmt.interop.gguf`),
        ``*.pt``/``*.pth``/``*.bin`` (a torch state dict; needs torch and holds the whole model in
        memory while saving), or a folder (Hugging Face ``save_pretrained`` layout).
    fmt
        A name of :data:`FORMATS` (``"safetensors"``, ``"gguf"``, ``"torch"``, ``"hf"``); default
        from ``dst``.
    quantize
        GGUF only: ``"q8_0"`` writes a Llama-family package's matrices as ``Q8_0`` blocks.

    Returns
    -------
    str
        Where it was written.
    """
    dst = Path(dst)
    chosen = format_for(dst, writing=True, name=fmt)
    writer = chosen.writer
    if writer is None:  # format_for only returns writable formats
        raise FormatError(f"{dst}: {chosen.name} cannot be written")
    if quantize is not None:
        if chosen.name != "gguf":
            raise InputError(f"{dst}: --quantize is for GGUF exports (the {chosen.name} format has no Q8_0 type)")
        writer = functools.partial(writer, quantize=quantize)  # type: ignore[call-arg]
    own = not isinstance(pkg, Package)
    p = open_package(pkg) if own else pkg
    try:
        # after uneven growth, FFN tensors are padded with zero neurons to one size (the config's)
        total = sum(p.tensor_info(n, padded=True).nbytes for n in p.keys())
        with progress_bar(total, "export", progress) as bar, bounded_heap():
            storage = LayerReader(p).storage
            if p.header.experts:  # native experts joined on conversion: each expert's tensors again
                split = SplitView(p, storage)
                writer(cast(Package, split), dst, split.storage, bar.update)
            elif p.header.fused:  # split on conversion (Phi-3): each fused tensor written whole again
                view = FusedView(p, storage)
                writer(cast(Package, view), dst, view.storage, bar.update)
            else:
                writer(p, dst, storage, bar.update)
    finally:
        if own:
            p.close()
    return str(dst)
