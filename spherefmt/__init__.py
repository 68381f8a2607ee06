"""spherefmt: transformer FFN neurons on a sphere, stored as a chunked, compressed Zarr package.

The public API is small, in the style of safetensors:

* :func:`save` - convert a model (file, folder or state dict) into a package;
* :func:`open` - open a package (``keys``, ``tensor``, ``state_dict``, ``expert``,
  ``write_expert``);
* :func:`export` - write a package back to ``.safetensors``, ``.gguf``, a torch state dict or a
  Hugging Face folder, bit for bit.

The code is in layers (``tests/test_architecture.py`` checks that imports point one way):
ground modules (:mod:`spherefmt.errors`, :mod:`~spherefmt.constants`, :mod:`~spherefmt.units`,
:mod:`~spherefmt.dtypes`, :mod:`~spherefmt.progress`); the format (:mod:`spherefmt.format`,
:mod:`spherefmt.containers`, :mod:`spherefmt.interop`); the compute backends
(:mod:`spherefmt.backends`) and the streaming runtime (:mod:`spherefmt.runtime`); and on top
training and growth (:mod:`spherefmt.training`), the CLI, the demo and pictures.
"""

from __future__ import annotations

from spherefmt.convert import save
from spherefmt.errors import (
    BackendUnavailableError,
    BudgetExceededError,
    ExpertNotFoundError,
    FormatError,
    PackageExistsError,
    ReadOnlyError,
    SpherefmtError,
)
from spherefmt.format.package import Expert, Package, is_package, open
from spherefmt.interop.registry import export

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
