"""A real S3-compatible server on loopback (moto's server mode) for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

__all__ = ["S3Server"]


class S3Server:
    """``python -m moto.server`` on a free loopback port, as its own process (so that it can be
    killed).  :meth:`use` points every S3 client of this process, and of children started
    afterwards, at it (``AWS_ENDPOINT_URL``, test credentials) and makes ``bucket``."""

    def __init__(self, timeout: float = 60.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def use(self, bucket: str = "models") -> None:
        import s3fs

        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.url)
        s3fs.S3FileSystem.clear_instance_cache()  # cached clients would keep the old endpoint
        s3fs.S3FileSystem().mkdir(bucket)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
