"""A package in a zarr ``Store`` that the caller opened (``spherefmt.open(store)``): the
caller's store is used as it is and stays open after the package is closed.  A zarr store has
no lock and no conditional write: ``replace`` checks, then writes, which is safe for one writer
process (the caller's own store is the caller's to share)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from spherefmt.containers.base import Blob, Container, safe_key

__all__ = ["StoreContainer"]


class StoreContainer(Container):
    """A caller's zarr store (see the module docstring)."""

    remote = True  # its I/O runs on zarr's event loop: callers on that loop use a thread
    borrowed = True

    def __init__(self, store: Store) -> None:
        self.store = store
        self.where = str(getattr(store, "where", None) or type(store).__name__)

    def get(self, key: str, start: int | None = None, end: int | None = None, *, mapped: bool = False
            ) -> Blob | None:
        safe_key(key, self.where)
        req: Any = None
        if start is not None and start < 0:
            req = SuffixByteRequest(-start)
        elif start is not None or end is not None:
            req = RangeByteRequest(start or 0, end if end is not None else 2**62)
        buf = sync(self.store.get(key, prototype=default_buffer_prototype(), byte_range=req))
        return None if buf is None else buf.to_bytes()

    def keys(self, prefix: str = "") -> Iterator[str]:
        async def collect() -> list[str]:
            return [k async for k in self.store.list_prefix(prefix)]

        return iter(sorted(sync(collect())))

    def put(self, key: str, data: Blob) -> None:
        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(bytes(data))))


    def delete(self, key: str) -> None:
        sync(self.store.delete(key))
