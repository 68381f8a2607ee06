"""Every container passes the same suite (spherefmt.testing.containers)."""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path

import pytest
from zarr.storage import MemoryStore

from spherefmt.testing.containers import ContainerSuite

_n = itertools.count()


class TestDirectory(ContainerSuite):
    def location(self, tmp_path):
        return tmp_path / f"p{next(_n)}.sphere"

    def remove_object(self, url, key):
        (Path(url) / key).unlink()


class TestZip(ContainerSuite):
    reader_follows = False
    def location(self, tmp_path):
        return tmp_path / f"p{next(_n)}.zip"

    def remove_object(self, url, key):
        with zipfile.ZipFile(url) as z:
            members = {i.filename: z.read(i) for i in z.infolist() if i.filename != key}
        with zipfile.ZipFile(url, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)


class TestVHD(ContainerSuite):
    reader_follows = False
    def location(self, tmp_path):
        return tmp_path / f"p{next(_n)}.vhd"

    def remove_object(self, url, key):
        from spherefmt.containers.vhd.filesystem import VHDFileSystem

        fs = VHDFileSystem(str(url), "r+")
        try:
            fs.rm_file("/" + key)
        finally:
            fs.close()


class TestMemoryURL(ContainerSuite):
    locks = False
    shared_across_processes = False

    def location(self, tmp_path):
        return f"memory://conformance-{tmp_path.name}-{next(_n)}"

    def remove_object(self, url, key):
        import fsspec

        fsspec.filesystem("memory").rm_file(url.removeprefix("memory://") + "/" + key)


class TestZarrStore(ContainerSuite):
    locks = False
    shared_across_processes = False

    def location(self, tmp_path):
        return MemoryStore()

    def remove_object(self, url, key):
        from zarr.core.sync import sync

        sync(url.delete(key))


@pytest.mark.usefixtures("s3_server")
class TestS3(ContainerSuite):
    locks = False
    shared_across_processes = False  # (the command line reaches it too; its endpoint is this process's setting)

    def location(self, tmp_path):
        return f"s3://conformance/p{next(_n)}"

    def remove_object(self, url, key):
        import s3fs

        s3fs.S3FileSystem().rm_file(url.removeprefix("s3://") + "/" + key)


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import os

    import s3fs

    from spherefmt.testing.s3 import S3Server

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    srv = S3Server()
    srv.use("conformance")
    yield srv
    srv.kill()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()
