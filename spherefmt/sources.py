"""Tensor sources: what ``sphere convert`` reads, one tensor at a time.

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

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .constants import MAX_HEADER_JSON
from .dtypes import from_numpy, from_torch
from .errors import FormatError
from .safetensors_io import SafetensorsFile, TensorInfo

__all__ = ["TensorSource", "bounded_heap", "open_source"]

#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h)
_M_MMAP_THRESHOLD = -3
#: the highest threshold glibc's dynamic rule reaches (``DEFAULT_MMAP_THRESHOLD_MAX``, 64-bit)
_GLIBC_DYNAMIC_MAX = 32 * 1024 * 1024


def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_HEAP_LOCK = threading.Lock()
_HEAP_USERS = [0]


@contextmanager
def bounded_heap(threshold: int = 4 * 1024 * 1024) -> Iterator[None]:
    """Give freed large arrays back to the system while a conversion or an export runs.

    glibc's malloc raises its mmap threshold each time it frees a large mapped block (up to
    32 MiB); after that, arrays of a few MiB to 32 MiB (one tensor, one layer's temporaries,
    zarr's encoded chunks in its codec threads) come from the heap and arenas, and once freed
    stay in the process as fragmented free space.  On a GPT-2 XL conversion that was about
    180 MiB above the live arrays at the peak, growing with the layer size (bench/bench_scale.py).
    Inside this block allocations of ``threshold`` bytes and more get their own maps, unmapped
    when freed, so the process holds what is live.  On exit free heap pages are released
    (``malloc_trim``) and the threshold is left at 32 MiB, where glibc's dynamic rule ends up in
    any process that has freed a large array (glibc cannot switch the dynamic rule back on).
    Nothing changes off glibc, or when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment.
    """
    libc = None if "MALLOC_MMAP_THRESHOLD_" in os.environ else _glibc()
    if libc is None:
        yield
        return
    with _HEAP_LOCK:
        _HEAP_USERS[0] += 1
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP_USERS[0] -= 1
            if not _HEAP_USERS[0]:  # the last of nested or concurrent users
                libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MAX)
                libc.malloc_trim(0)


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


def _torch_load(path: Path) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError:
        from .errors import BackendUnavailableError

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


def _read_json(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_HEADER_JSON:
        raise FormatError(f"{path}: {size} bytes is too large for a JSON side file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({type(e).__name__})") from None


def _inside(folder: Path, name: object, where: Path) -> Path:
    """Resolve a file named inside an index, refusing anything that leaves ``folder``."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise FormatError(f"{where}: shard file name {name!r} must be a plain file name in the same folder")
    return folder / name


#: Side files of a Hugging Face folder carried into the package verbatim.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "vocab.json", "merges.txt")


def _hf_dir(folder: Path) -> TensorSource:
    cfg_path = folder / "config.json"
    config = _read_json(cfg_path) if cfg_path.exists() else None
    if config is not None and not isinstance(config, dict):
        raise FormatError(f"{cfg_path}: config must be a JSON object")
    src: TensorSource
    if (folder / "model.safetensors.index.json").exists():
        ip = folder / "model.safetensors.index.json"
        index = _read_json(ip)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise FormatError(f"{ip}: weight_map must be a non-empty object")
        shards: list[Path] = []
        for name in dict.fromkeys(wm.values()):
            p = _inside(folder, name, ip)
            if not p.exists():
                raise FormatError(f"{ip}: shard {name!r} is missing")
            shards.append(p)
        src = SafetensorsSource(shards, str(folder))
        missing = set(wm) - set(src.keys())
        if missing:
            src.close()
            raise FormatError(f"{ip}: tensors listed but absent from the shards: {sorted(missing)[:3]}")
    elif (folder / "model.safetensors").exists():
        src = SafetensorsSource([folder / "model.safetensors"], str(folder))
    elif (folder / "pytorch_model.bin").exists():
        src = MappingSource(_torch_load(folder / "pytorch_model.bin"), str(folder))
    else:
        raise FormatError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    src.config = config
    src.files = {n: (folder / n).read_bytes() for n in CARRIED_FILES if (folder / n).is_file()}
    return src


def open_source(src: Any) -> TensorSource:
    """Open anything ``sphere convert`` accepts.

    Parameters
    ----------
    src
        A mapping of names to numpy arrays / torch tensors, a ``.safetensors`` file, a torch
        ``.pt``/``.pth``/``.bin`` state dict, a Hugging Face ``save_pretrained`` folder, or an
        existing spherefmt package (re-placed with new parameters).

    Raises
    ------
    FormatError
        When the input is not one of these or is malformed.
    """
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, Mapping):
        return MappingSource(src)
    if not isinstance(src, str | os.PathLike):
        raise FormatError(f"cannot convert a {type(src).__name__}: give a path or a state dict")
    from .package import is_package

    if is_package(src):
        from .package import PackageSource

        return PackageSource(src)
    p = Path(src)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_dir():
        return _hf_dir(p)
    if p.suffix == ".safetensors":
        s = SafetensorsSource([p], str(p))
        cfg = p.with_name("config.json")
        s.config = _read_json(cfg) if cfg.exists() else None
        return s
    if p.suffix == ".gguf":
        from .gguf_io import GGUFSource

        return GGUFSource(p)
    if p.suffix in (".pt", ".pth", ".bin"):
        return MappingSource(_torch_load(p), str(p))
    raise FormatError(f"{p}: unknown model file type {p.suffix!r} (expected .safetensors, .gguf, .pt, .pth, .bin or a folder)")
