"""Tensor sources: what ``sphere convert`` reads, one tensor at a time (the interface of every
format module; :mod:`spherefmt.interop.registry` picks the module for a path).

Contract of :class:`TensorSource` (every source implements these hooks):

* ``keys()`` - tensor names in the source's own order;
* ``info(name)`` - :class:`TensorInfo` (dtype in safetensors spelling, shape) without reading data;
* ``read(name)`` - the tensor's *storage* array (bfloat16 as uint16 words), a fresh array;
* ``metadata`` - string-to-string metadata (safetensors ``__metadata__``), ``config`` - the
  model's ``config.json`` as a dict or ``None``.

Peak memory of a conversion is therefore one tensor at a time plus what placement keeps of the
previous layer.  Inputs are hostile: paths named inside an index never escape the model folder,
torch files load with ``weights_only=True`` only.
"""

from __future__ import annotations

import contextlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spherefmt.constants import MAX_HEADER_JSON
from spherefmt.dtypes import TensorInfo, from_numpy, from_torch
from spherefmt.errors import FormatError
from spherefmt.heap import bounded_heap

__all__ = ["MappingSource", "TensorSource", "bounded_heap", "inside", "link_root", "no_escape", "read_json",
           "written_in_place"]


class TensorSource(ABC):
    """A read-only collection of named tensors (see the module docstring for the contract)."""

    metadata: dict[str, str] = {}
    config: dict[str, Any] | None = None
    #: Extra files carried along (name -> bytes), e.g. a tokenizer.json.
    files: dict[str, bytes] = {}
    where: str = "<source>"

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def info(self, name: str) -> TensorInfo: ...

    @abstractmethod
    def read(self, name: str) -> np.ndarray: ...

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (axis 0) of a tensor; sources that can read a byte range override
        this so that large tensors never sit whole in memory."""
        return self.read(name)[start:stop]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files held open."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappingSource(TensorSource):
    """An in-memory state dict of numpy arrays or torch tensors."""

    def __init__(self, tensors: Mapping[str, Any], where: str = "<state dict>") -> None:
        self.where = where
        self._t: dict[str, tuple[str, np.ndarray]] = {}
        for k, v in tensors.items():
            if not isinstance(k, str) or not k:
                raise FormatError(f"{where}: tensor names must be non-empty strings, got {k!r}")
            if isinstance(v, np.ndarray):
                self._t[k] = from_numpy(v)
            elif type(v).__module__.startswith("torch") and hasattr(v, "dtype"):
                self._t[k] = from_torch(v)
            else:
                raise FormatError(f"{where}: {k!r} is a {type(v).__name__}, not a tensor")

    def keys(self) -> list[str]:
        return list(self._t)

    def info(self, name: str) -> TensorInfo:
        dtype, arr = self._t[name]
        return TensorInfo(name, dtype, tuple(arr.shape))

    def read(self, name: str) -> np.ndarray:
        return self._t[name][1]


def read_json(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_HEADER_JSON:
        raise FormatError(f"{path}: {size} bytes is too large for a JSON side file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({type(e).__name__})") from None


def inside(folder: Path, name: object, where: Path) -> Path:
    """Resolve a file named inside an index, refusing anything that leaves ``folder``."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise FormatError(f"{where}: shard file name {name!r} must be a plain file name in the same folder")
    return folder / name


def link_root(folder: Path) -> Path:
    """Where a symbolic link in a model folder may point: the folder itself, or for a Hugging
    Face cache snapshot (``.../models--org--name/snapshots/<rev>/``, whose files are links to
    ``../../blobs/``) the model's cache folder."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def no_escape(folder: Path, path: Path, where: Path | str) -> Path:
    """``path`` (a file in ``folder``), refusing one that is a symbolic link to a file outside
    :func:`link_root`: converting an untrusted folder never copies another file of the machine
    (``~/.ssh/id_rsa`` behind a ``tokenizer_config.json``) into the package."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(link_root(folder)):
            raise FormatError(f"{where}: {path.name!r} is a symbolic link out of the model folder (to {target}); "
                              "refused")
    return path


@contextlib.contextmanager
def written_in_place(writer: Any, tmp: Path, dst: Path) -> Iterator[None]:
    """Run the body that writes ``writer`` (a ``GGUFWriter`` on ``tmp``, or anything with ``close``), then rename ``tmp`` to
    ``dst``; on any failure ``tmp`` is removed and ``dst`` left as it was."""
    try:
        yield
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
