"""Packages in object storage: a real S3-compatible server (moto's server mode) on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec.config
import numpy as np
import pytest

import spherefmt
from spherefmt.cli import main
from spherefmt.containers.remote import client_options
from spherefmt.errors import FormatError, StorageError
from spherefmt.runtime import Session
from spherefmt.testing.s3 import S3Server
from tests.helpers import run_cli

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

TINY = Path(spherefmt.__file__).parent / "data" / "tiny-gpt2"
IDS = np.arange(1, 90) * 37 % 4096


@pytest.fixture(scope="module")
def server():
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    srv = S3Server()
    srv.use()
    yield srv
    srv.kill()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket_pkg(server, tmp_path_factory):
    """The small model converted straight into the bucket by the CLI, and the same into a folder."""
    local = tmp_path_factory.mktemp("s3") / "local.sphere"
    spherefmt.save(TINY, local)
    try:
        main(["convert", str(TINY), "s3://models/tiny", "-q"])
    except SystemExit as e:
        assert not e.code
    return "s3://models/tiny", local


def test_convert_into_a_bucket_then_info_and_eval(bucket_pkg, capsys):
    url, local = bucket_pkg
    code, out, _ = run_cli(capsys, "info", url, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["package"] == url and info["architecture"] == "gpt2" and info["experts"] > 1
    with spherefmt.open(url) as p, spherefmt.open(local) as q:
        assert p.metadata["tensors"] == q.metadata["tensors"]
        for name in p.keys():
            assert p.tensor(name).tobytes() == q.tensor(name).tobytes(), name
    text = (TINY / "heldout.txt").read_text()[:1500]
    (Path(local).parent / "t.txt").write_text(text)
    results = []
    for where in (url, str(local)):
        code, out, err = run_cli(capsys, "eval", where, "--text", str(Path(local).parent / "t.txt"), "--budget", "80%",
                              "--backend", "numpy", "--json")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["ppl"] == results[1]["ppl"] and results[0]["ppl"] < 400 and results[0]["tokens"] > 100


def test_streaming_reads_experts_by_byte_range(bucket_pkg, monkeypatch):
    url, local = bucket_pkg
    calls: list[tuple[str, object, object]] = []
    orig = s3fs.S3FileSystem._cat_file

    async def spy(self, path, version_id=None, start=None, end=None, **kw):
        calls.append((path, start, end))
        return await orig(self, path, version_id=version_id, start=start, end=end, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", spy)
    s3fs.S3FileSystem.clear_instance_cache()  # the sync methods of a new instance wrap the spy
    with Session(url, "numpy", budget="40%", prefetch=False) as s:
        remote = np.stack([s.logits(IDS[:40]), s.logits(IDS[40:80])])
        stats = s.stats()
    monkeypatch.undo()
    with Session(str(local), "numpy", budget="40%", prefetch=False) as s:
        here = np.stack([s.logits(IDS[:40]), s.logits(IDS[40:80])])
    np.testing.assert_array_equal(remote, here)
    fs = s3fs.S3FileSystem()
    shards = [(p, a, b) for p, a, b in calls if "/sphere/" in p and "/neurons/c/" in p]
    assert shards and stats["experts_loaded"] > 0
    for path, start, end in shards:  # every expert read is a range of its object, never all of it:
        size = fs.size(path)  # the shard index (a suffix), then one inner chunk (a range)
        if start is not None and start < 0:
            assert end is None and -start < size, (path, start, end)
        else:
            assert start is not None and end is not None and 0 <= start < end <= size, (path, start, end)
            assert end - start < size
    assert stats["bytes_read"] > 0
    # one ranged GET per cell-layer loaded (evicted cells read again are GETs again), and one
    # suffix GET per shard for its index, which is kept
    suffixes = [p for p, a, _ in shards if a is not None and a < 0]
    assert len(shards) - len(suffixes) == stats["experts_loaded"]
    assert len(suffixes) == len(set(suffixes)) == len({p for p, _, _ in shards})


def test_endpoint_from_fsspec_config_and_storage_options(bucket_pkg, server, monkeypatch):
    """The endpoint the user's way: fsspec's FSSPEC_S3_ENDPOINT_URL (read when fsspec is
    imported, so a new process) or storage_options; AWS_ENDPOINT_URL is the fixture's own."""
    url, _ = bucket_pkg
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["FSSPEC_S3_ENDPOINT_URL"] = server.url
    r = subprocess.run([sys.executable, "-m", "spherefmt.cli", "info", url, "--json"], env=env, check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["package"] == url
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"endpoint_url": server.url}
    with spherefmt.open(url, storage_options=opts) as p:
        assert p.where == url and p.metadata["state"] == "complete"
    # save into the bucket too, then open
    spherefmt.save(TINY, "s3://models/opts", storage_options=opts)
    assert spherefmt.is_package("s3://models/opts", storage_options=opts)
    with spherefmt.open("s3://models/opts", storage_options=opts) as p:
        assert p.metadata["state"] == "complete" and "transformer.wte.weight" in p.keys()
    s3fs.S3FileSystem.clear_instance_cache()


def test_client_retries_and_timeouts_are_bounded(monkeypatch):
    opts = client_options("s3://b/m")
    assert opts["config_kwargs"]["read_timeout"] == 10
    assert opts["config_kwargs"]["retries"] == {"total_max_attempts": 3, "mode": "standard"}
    # the user's fsspec configuration and storage_options win, key by key
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 1}})
    opts = client_options("s3://b/m", {"endpoint_url": "http://x"})
    assert opts["endpoint_url"] == "http://x" and opts["config_kwargs"]["read_timeout"] == 1
    assert opts["config_kwargs"]["connect_timeout"] == 5
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # botocore's own setting is left to botocore
    assert "retries" not in client_options("s3://b/m")["config_kwargs"]
    assert client_options("memory://m") == {}


def test_hung_then_killed_server_gives_a_clear_error(capsys, monkeypatch):
    own = S3Server()  # a server of its own, stopped (SIGSTOP) and then killed (SIGKILL) mid-read
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")  # restored afterwards, whatever use() sets
    try:
        own.use()
        spherefmt.save(TINY, "s3://models/doomed", codec="none")
        # a short read timeout, set the user's way (fsspec configuration), keeps the test short;
        # the defaults bound a hung server to about 3 x 10 s (test_client_retries...)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 1}})
        s3fs.S3FileSystem.clear_instance_cache()
        s = Session("s3://models/doomed", "numpy", budget="25%", prefetch=False)
        s.logits(IDS[:8])
        own.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"^s3://models/doomed: storage failed on .*Read timeout"):
            s.logits(IDS[:40])
        assert time.monotonic() - t0 < 15  # 3 attempts of 1 s and backoff, not minutes
        own.kill()
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"^s3://models/doomed: storage failed on .*Could not connect"):
            s.logits(IDS[:40])
        assert time.monotonic() - t0 < 10  # a refused connection: about a second
        s.close()
        code, _, err = run_cli(capsys, "info", "s3://models/doomed")
        assert code == 2 and err.startswith("sphere: error:") and "storage failed" in err and err.count("\n") == 1
    finally:
        own.kill()
        s3fs.S3FileSystem.clear_instance_cache()


def test_killed_conversion_leaves_no_package(server, capsys):
    url = "s3://models/interrupted"
    fs = s3fs.S3FileSystem()
    proc = subprocess.Popen([sys.executable, "-m", "spherefmt.cli", "convert", str(TINY), url, "-q"],
                            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not fs.exists("models/interrupted/core"):  # the header is written, tensors are arriving
        fs.invalidate_cache()
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()  # SIGKILL
    proc.wait()
    with pytest.raises(FormatError, match="incomplete"):
        spherefmt.open(url)
    code, _, err = run_cli(capsys, "info", url)
    assert code == 2 and "incomplete" in err
    code, _, err = run_cli(capsys, "convert", str(TINY), url, "-q")  # never replaced without asking
    assert code == 2 and "overwrite" in err
    code, _, err = run_cli(capsys, "convert", str(TINY), url, "-q", "--overwrite")
    assert code == 0, err
    with spherefmt.open(url) as p:
        assert p.metadata["state"] == "complete"


def test_two_writers_in_a_bucket_the_second_commit_is_refused(server):
    """S3 has no lock: the commit is a conditional PUT of the manifest (If-Match its ETag), and
    moto's server answers 412 to the writer that lost the race."""
    from tests.helpers import model

    from .test_integrity import race

    sd, cfg = model("gpt2", "F32")
    race(spherefmt.save(sd, "s3://models/race", config=cfg, graticule="2x2", depth=2))
