"""A hostile-input safetensors reader and a streaming safetensors writer.

Why not the ``safetensors`` package alone: its numpy API refuses bfloat16 and its writer needs
every tensor in memory at once.  Conversion must stream tensor by tensor with bounded memory
and keep every dtype bit for bit, so this module reads the header itself (checking every size
and offset, see ``spec/FORMAT.md`` "Sources") and returns raw storage arrays; the files it
writes are read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spherefmt.constants import DTYPES, MAX_SAFETENSORS_HEADER
from spherefmt.dtypes import TensorInfo, check_dtype, check_shape, contiguous
from spherefmt.errors import FormatError
from spherefmt.interop.base import TensorSource, no_escape, read_json

if TYPE_CHECKING:
    from spherefmt.format.package import Package

__all__ = ["SafetensorsFile", "SafetensorsSource", "export_safetensors", "open_safetensors", "write_safetensors"]


class SafetensorsFile:
    """One ``.safetensors`` file opened for reading, header validated up front.

    Parameters
    ----------
    path
        Path of the file.

    Raises
    ------
    FormatError
        On a truncated file, a header that is not a JSON object, an unknown dtype, a shape that
        does not match the byte range, or offsets that leave the data section or overlap.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _parse(self) -> None:
        where = str(self.path)
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{where}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER:
            raise FormatError(f"{where}: safetensors header of {n} bytes exceeds the {MAX_SAFETENSORS_HEADER}-byte limit")
        if 8 + n > size:
            raise FormatError(f"{where}: truncated safetensors header ({n} bytes announced, {size - 8} present)")
        raw = self._fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"{where}: safetensors header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{where}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise FormatError(f"{where}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        spans = []
        for name, entry in header.items():
            w = f"{where}: tensor {name!r}"
            if not name or not isinstance(entry, dict):
                raise FormatError(f"{w}: entry must be a JSON object with a non-empty name")
            dtype = check_dtype(entry.get("dtype"), w)
            shape = check_shape(entry.get("shape"), w)
            offs = entry.get("data_offsets")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            ):
                raise FormatError(f"{w}: data_offsets must be two integers")
            begin, end = offs
            if not 0 <= begin <= end <= data_size:
                raise FormatError(f"{w}: data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
            info = TensorInfo(name, dtype, shape)
            if end - begin != info.nbytes:
                raise FormatError(f"{w}: shape {list(shape)} of {dtype} needs {info.nbytes} bytes, offsets give {end - begin}")
            self._entries[name] = (info, begin)
            spans.append((begin, end, name))
        spans.sort()
        for (_b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:], strict=False):
            if b1 < e0 and b1 != e1:  # empty tensors may sit anywhere
                raise FormatError(f"{where}: tensors {n0!r} and {n1!r} overlap")
        # Keep the file's own order (by offset) so exports come out in the same order.
        self._order = [n for _, _, n in spans]

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._order)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Read one tensor (or rows ``start:stop`` of axis 0) as its storage array (bfloat16 as
        uint16 words), a fresh copy."""
        info, begin = self._entries[name]
        storage = np.dtype(DTYPES[info.dtype][0])
        shape = info.shape
        if start is not None and shape:
            start, stop, _ = slice(start, stop).indices(shape[0])
            row = math.prod(shape[1:]) * storage.itemsize
            begin += start * row
            shape = (max(0, stop - start), *shape[1:])
        out = np.empty(shape, dtype=storage)
        nbytes = out.nbytes
        # .data: the array's buffer as a memoryview (numpy's stubs make ndarray a Buffer only on 3.12+)
        buf = out.reshape(-1).view(np.uint8).data if out.size else memoryview(b"")
        got = 0
        while got < nbytes:
            k = os.preadv(self._fh.fileno(), [buf[got:]], self._data_start + begin + got)
            if k <= 0:
                raise FormatError(f"{self.path}: tensor {name!r}: file ended while reading")
            got += k
        return out

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_safetensors(
    path: str | os.PathLike[str],
    infos: Iterable[TensorInfo],
    get: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time.

    The header is computed from ``infos`` first; ``get(name)`` is then called once per tensor
    and its bytes written, so peak memory is one tensor.  The file appears under its final name
    only when complete (written beside it, then renamed).

    Parameters
    ----------
    path
        Destination file.
    infos
        Tensors in the order they are written.
    get
        Returns the storage array of a tensor (any dtype with the right byte count).
    metadata
        Optional ``__metadata__`` (string to string).
    progress
        Called with the byte count of each tensor written.
    """
    infos = list(infos)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for t in infos:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the reference pads the header to 8 bytes
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for t in infos:
                arr = contiguous(get(t.name))
                if arr.nbytes != t.nbytes:
                    raise FormatError(f"{path}: tensor {t.name!r} has {arr.nbytes} bytes, header says {t.nbytes}")
                f.write(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
                if progress:
                    progress(t.nbytes)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class SafetensorsSource(TensorSource):
    """One or more safetensors files (a sharded checkpoint is a name -> file map)."""

    def __init__(self, files: list[Path], where: str) -> None:
        self.where = where
        self._files: list[SafetensorsFile] = []
        self._owner: dict[str, SafetensorsFile] = {}
        self._order: list[str] = []
        self.metadata = {}
        try:
            for p in files:
                f = SafetensorsFile(p)
                self._files.append(f)
                self.metadata.update(f.metadata)
                for k in f.keys():
                    if k in self._owner:
                        raise FormatError(f"{p}: tensor {k!r} also appears in {self._owner[k].path}")
                    self._owner[k] = f
                    self._order.append(k)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> TensorInfo:
        return self._owner[name].info(name)

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._owner[name].read(name, start, stop)

    def close(self) -> None:
        for f in self._files:
            f.close()


def open_safetensors(path: Path) -> SafetensorsSource:
    """A ``.safetensors`` file as a source; a ``config.json`` beside it is the model's config."""
    src = SafetensorsSource([path], str(path))
    cfg = no_escape(path.parent, path.with_name("config.json"), path)
    src.config = read_json(cfg) if cfg.exists() else None
    return src


def export_safetensors(pkg: Package, dst: Path, storage: Callable[[str], np.ndarray], progress: Callable[[int], Any]) -> None:
    """Write every tensor of a package to one ``.safetensors`` file, one tensor in memory at a time."""
    infos = [pkg.tensor_info(n, padded=True) for n in pkg.keys()]
    write_safetensors(dst, infos, storage, metadata=pkg.header.metadata or None, progress=progress)
