"""The one exception hierarchy of spherefmt.

Every error spherefmt raises on purpose derives from :class:`SpherefmtError` and from the
builtin that callers already catch, so ``except ValueError`` keeps working for format
violations and ``except KeyError`` for a missing expert.  Messages are one line and name the
file or object and the problem.
"""

from __future__ import annotations

__all__ = [
    "SpherefmtError",
    "FormatError",
    "PackageExistsError",
    "ReadOnlyError",
    "ExpertNotFoundError",
    "BackendUnavailableError",
    "BudgetExceededError",
    "UnknownBackendError",
    "InputError",
    "StorageError",
    "DiskFullError",
    "PackageLockedError",
    "IntegrityError",
    "ConcurrentWriteError",
]


class SpherefmtError(Exception):
    """Root of every error spherefmt raises on purpose."""


class FormatError(SpherefmtError, ValueError):
    """Input or package bytes violate a format (spherefmt, safetensors, torch, zarr metadata)."""


class PackageExistsError(SpherefmtError, FileExistsError):
    """The destination already holds a package (or other data) and overwrite was not asked."""


class ReadOnlyError(SpherefmtError, PermissionError):
    """A write was attempted on a package opened read-only, or on a read-only container."""


class PackageLockedError(ReadOnlyError):
    """Another process is writing the package (one writer at a time); the message says who."""


class ConcurrentWriteError(SpherefmtError, RuntimeError):
    """Another writer committed a change to the package first (object storage, which has no
    lock): nothing of this change was committed; reopen the package and do it again."""


class IntegrityError(FormatError):
    """An object the package's manifest lists is missing, or its bytes do not match the manifest
    (a damaged package, or one changed outside spherefmt)."""


class ExpertNotFoundError(SpherefmtError, KeyError):
    """No expert (or tensor) with that address exists in the package."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it one plain line
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(SpherefmtError, ImportError):
    """A compute backend (or optional dependency) cannot start here; carries the install hint."""


class BudgetExceededError(SpherefmtError, MemoryError):
    """A memory budget cannot hold what was asked of it."""


class UnknownBackendError(SpherefmtError, ValueError):
    """A backend name that is not registered; the message lists the known ones."""


class InputError(SpherefmtError, ValueError):
    """An argument the caller can fix: a malformed size, budget or graticule, an unknown file type
    or mode, token ids outside the vocabulary, a prompt longer than the context.  (Bytes that
    violate a format are :class:`FormatError`.)"""


class StorageError(SpherefmtError, OSError):
    """The storage holding a package (an object store, a network filesystem) failed or could not
    be reached; the message names the package and the object."""


class DiskFullError(StorageError):
    """The disk of the machine holding the package (not a filesystem inside a ``.vhd``) is full;
    the change that needed the space was not committed."""
