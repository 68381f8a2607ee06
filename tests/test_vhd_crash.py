"""Crash safety: a writer killed with SIGKILL at random points, a dozen times.  Every time the image
opens, and every expert holds either its old bytes or one complete new version, and passes its
checksums."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import spherefmt
from spherefmt.containers.vhd.image import VHDImage
from tests.helpers import model

TRIALS = 12  # the crash benchmark (bench/bench_reliability.py) runs hundreds

WRITER = r"""
import sys, numpy as np, spherefmt
pkg = spherefmt.open(sys.argv[1], "r+")
addrs = list(pkg.experts())
rows = {a: pkg.expert(*a) for a in addrs}
print("ready", flush=True)
k = 0
while True:  # rewrite experts with a new constant in every real slot, until killed
    k += 1
    for a in addrs:
        e = rows[a]
        new = e.neurons.copy()
        new[e.index >= 0] = np.float32(k)
        pkg.write_expert(*a, new)
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:One or more FATs differ")  # a kill between the two FAT copies
@pytest.mark.filterwarnings("ignore:Filesystem was not cleanly unmounted")  # every kill
def test_sigkill_during_expert_writes(tmp_path):
    sd, cfg = model("llama", "F32")
    base = tmp_path / "base.vhd"
    spherefmt.save(sd, base, config=cfg, graticule="2x2", depth=2)
    with spherefmt.open(base) as pkg:
        original = {a: pkg.expert(*a) for a in pkg.experts()}
    rng = random.Random(0)
    seen_new = 0
    for trial in range(TRIALS):
        img = tmp_path / "t.vhd"
        shutil.copy(base, img)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(img)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        with VHDImage(img):  # the image itself opens
            pass
        with spherefmt.open(img) as pkg:  # so do its filesystem and package, and every expert
            for a, old in original.items():
                e = pkg.expert(*a)  # decoding verifies every chunk's crc32c
                real = e.neurons[e.index >= 0]
                if np.array_equal(e.neurons, old.neurons):
                    continue
                assert (e.neurons[e.index < 0] == 0).all(), (trial, a)
                values = np.unique(real)
                assert values.size == 1 and values[0] == int(values[0]) >= 1, (trial, a, values[:5])
                seen_new += 1
        img.unlink()
    assert seen_new > 0  # the kills did land in the middle of real work


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:One or more FATs differ")
@pytest.mark.filterwarnings("ignore:Filesystem was not cleanly unmounted")
def test_reader_beside_a_writer_never_sees_a_torn_expert(tmp_path):
    sd, cfg = model("llama", "F32")
    img = tmp_path / "m.vhd"
    spherefmt.save(sd, img, config=cfg, graticule="2x2", depth=2)
    with spherefmt.open(img) as pkg:
        original = {a: pkg.expert(*a).neurons.copy() for a in pkg.experts()}
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(img)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        checked = new = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            with spherefmt.open(img) as pkg:  # a reader opens while the writer works...
                for a, old in original.items():
                    e = pkg.expert(*a)  # ...and every expert it reads is old or wholly new
                    checked += 1
                    if np.array_equal(e.neurons, old):
                        continue
                    values = np.unique(e.neurons[e.index >= 0])
                    assert values.size == 1 and values[0] >= 1, (a, values[:5])
                    new += 1
    finally:
        child.kill()
        child.wait()
    assert checked > 50 and new > 0
