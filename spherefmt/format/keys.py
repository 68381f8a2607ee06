"""Storage keys of a package's objects (``spec/FORMAT.md`` section 2): one place spells them."""

from __future__ import annotations

from urllib.parse import quote

from spherefmt import constants as C

__all__ = ["core_key", "file_key", "shard_key", "shell_path"]


def core_key(name: str) -> str:
    """Zarr path of a core tensor: the name percent-encoded so it is one safe node name."""
    q = quote(name, safe="._-")
    if q.startswith((".", "__")):  # '.', '..' and '__*' are not valid zarr node names
        q = f"%{ord(q[0]):02X}{q[1:]}"
    return f"{C.CORE_GROUP}/{q}"


def file_key(name: str) -> str:
    return "files/" + core_key(name).split("/", 1)[1]


def shell_path(depth: int) -> str:
    return f"{C.SPHERE_GROUP}/{C.SHELL_GROUP_FMT.format(depth=depth)}"



def shard_key(lat: int, lon: int, depth: int) -> str:
    """The storage key of expert ``(lat, lon, depth)`` before any growth (one object)."""
    return f"{shell_path(depth)}/{C.NEURONS_ARRAY}/c/0/{lat}/{lon}/0/0"
