"""Package surgery for tests: what an attacker (or another tool) can do to a package."""

from __future__ import annotations

from typing import Any

from spherefmt.containers import open_container
from spherefmt.format.manifest import MANIFEST_KEY, Manifest, reserved
from spherefmt.format.store import PackageStore

__all__ = ["remanifest"]


def remanifest(url: Any) -> int:
    """Commit a manifest that lists the package's objects exactly as they are now (after they
    were edited behind spherefmt's back), so that the package is consistent again and what its
    readers check next is the content itself: a hostile package that comes with a matching
    manifest.  Returns the new generation."""
    c = open_container(url, "r")
    try:
        store = PackageStore(c, "r")
        gen = (store.generation or 0) + 1
        store.manifest = None  # list what the container holds, not what the old manifest said
        objects = {k: e for k, e in store.scan().items() if not reserved(k)}
        c.replace(MANIFEST_KEY, Manifest(gen, objects).encode(), c.version(MANIFEST_KEY))
        return gen
    finally:
        c.close()
