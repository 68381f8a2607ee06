"""Training on packages (torch, an optional extra): modules, routers, growth, sparsify."""

from __future__ import annotations

from typing import Any

from spherefmt.errors import BackendUnavailableError

__all__ = ["require_torch"]


def require_torch(what: str) -> Any:
    """``torch``, or :class:`BackendUnavailableError` saying that ``what`` needs it."""
    try:
        import torch  # noqa: PLC0415 - torch is an optional extra
    except ImportError as e:
        raise BackendUnavailableError(f"{what} needs torch (pip install torch==2.13.0)") from e
    return torch
