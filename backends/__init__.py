"""Compute backends of the spherefmt runtime, installed as ``spherefmt.backends``.

One small file per backend behind the interface in :mod:`.base`, registered here by name.
:func:`get_backend` picks the backend given by argument, else ``$SPHEREFMT_BACKEND``, else the
first one in :data:`PREFERENCE` that starts.

    >>> from spherefmt.backends import get_backend
    >>> get_backend("numpy").name
    'numpy'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from spherefmt.backends.base import Backend
from spherefmt.errors import BackendUnavailableError, SpherefmtError, UnknownBackendError

__all__ = ["Backend", "register", "get_backend", "names", "probe", "PREFERENCE", "UnknownBackendError"]

_FACTORIES: dict[str, Callable[[str], Backend]] = {}
#: tried in this order when no backend is named: a real GPU first (CUDA/ROCm, then a Vulkan GPU,
#: never a CPU emulation such as lavapipe), then the CPU backend measured fastest
#: (``bench/bench_backends.py``: numpy ahead of torch's CPU build)
PREFERENCE = ("torch:cuda", "vulkan:gpu", "numpy", "torch:cpu")


def register(prefix: str, factory: Callable[[str], Backend]) -> None:
    """Register ``factory(name)`` for ``prefix`` and every ``prefix:<device>`` name."""
    _FACTORIES[prefix] = factory


def names() -> list[str]:
    """The registered backend prefixes."""
    return sorted(_FACTORIES)


def get_backend(name: str | Backend | None = None) -> Backend:
    """A started backend: ``name``, else ``$SPHEREFMT_BACKEND``, else the first that starts.

    Raises
    ------
    UnknownBackendError
        The name is not registered (the message lists the known ones).
    BackendUnavailableError
        The backend is known but cannot start here (the message says why and how to install it).
    """
    if isinstance(name, Backend):
        return name
    name = name or os.environ.get("SPHEREFMT_BACKEND") or None
    if name is None:
        errors = []
        for cand in PREFERENCE:
            try:
                return get_backend(cand)
            except (BackendUnavailableError, UnknownBackendError) as e:
                errors.append(str(e))
        raise BackendUnavailableError("no backend starts here: " + "; ".join(errors))
    prefix, _, device = name.partition(":")
    factory = _FACTORIES.get(prefix)
    if factory is None:
        raise UnknownBackendError(f"unknown backend {name!r}; known: {', '.join(names())} "
                                  "(torch and vulkan take an optional :device, e.g. torch:cuda:1)")
    return factory(device)


def probe() -> list[dict[str, Any]]:
    """Every registered backend with whether it starts here and why not."""
    out = []
    for cand in ("numpy", "torch:cpu", "torch:cuda", "vulkan"):
        if cand.partition(":")[0] not in _FACTORIES:
            continue
        try:
            b = get_backend(cand)
            out.append({"name": cand, "available": True, **b.describe()})
        except SpherefmtError as e:
            out.append({"name": cand, "available": False, "reason": str(e)})
    return out


def _numpy(device: str) -> Backend:
    if device not in ("", "cpu"):
        raise BackendUnavailableError(f"backend numpy:{device}: numpy runs on the CPU only")
    from spherefmt.backends.numpy import NumpyBackend

    return NumpyBackend()


def _torch(device: str) -> Backend:
    from spherefmt.backends.torch import TorchBackend

    return TorchBackend(device or None)


def _vulkan(device: str) -> Backend:
    from spherefmt.backends.vulkan import VulkanBackend

    return VulkanBackend(device)


register("numpy", _numpy)
register("torch", _torch)
register("vulkan", _vulkan)
