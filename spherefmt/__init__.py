"""spherefmt: transformer FFN neurons on a sphere, stored as a chunked, compressed Zarr package.

The public API is small, in the style of safetensors:

* :func:`save` - convert a model (file, folder or state dict) into a package;
* :func:`open` - open a package (``keys``, ``tensor``, ``state_dict``, ``expert``,
  ``write_expert``);
* :func:`export` - write a package back to ``.safetensors`` or a torch state dict, bit for bit.
"""

from __future__ import annotations

from .errors import (
    BackendUnavailableError,
    BudgetExceededError,
    ExpertNotFoundError,
    FormatError,
    PackageExistsError,
    ReadOnlyError,
    SpherefmtError,
)
from .export import export
from .package import Expert, Package, is_package, open, save

__version__ = "0.1.0"

__all__ = [
    "save",
    "open",
    "export",
    "is_package",
    "Package",
    "Expert",
    "SpherefmtError",
    "FormatError",
    "PackageExistsError",
    "ReadOnlyError",
    "ExpertNotFoundError",
    "BackendUnavailableError",
    "BudgetExceededError",
    "__version__",
]
