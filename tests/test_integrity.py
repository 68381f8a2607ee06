"""Format v2: a package never fails silently.  Each case the format-v2 issue measured is a test
here: missing objects, edited metadata, killed writers, two writers, readers beside a writer,
leftovers, a full host disk, object storage without a lock, version-1 packages."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import spherefmt
from spherefmt.errors import ConcurrentWriteError, DiskFullError, IntegrityError, PackageLockedError, ReadOnlyError
from spherefmt.training.grow import grow_neurons
from tests.helpers import model, run_cli

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = [pytest.mark.filterwarnings("ignore:Filesystem was not cleanly unmounted"),  # every killed VHD writer
              pytest.mark.filterwarnings("ignore:One or more FATs differ")]


def _save(tmp_path: Path, name: str = "m.sphere", arch: str = "gpt2", seed: int = 0, **kw):
    sd, cfg = model(arch, "F32", seed)
    kw = {"graticule": "2x2", "depth": 2, **kw}
    return spherefmt.save(sd, tmp_path / name, config=cfg, **kw), sd


def _every_read_fails(url: str, match: str) -> None:
    """tensor, state_dict, expert, cell_layer and export all refuse, naming the object."""
    with spherefmt.open(url) as p:
        calls = [p.state_dict, lambda: [p.tensor(n) for n in p.keys()], lambda: [p.expert(*a) for a in p.experts()],
                 lambda: [p.cell_layer(a, b, layer) for layer in range(len(p.layer_depth)) for a in range(2)
                          for b in range(2)]]
        failed = 0
        for call in calls:
            try:
                call()
            except IntegrityError as e:
                assert match in str(e) and "\n" not in str(e), str(e)
                failed += 1
        assert failed >= 2, "the damage must be found by more than one kind of read"


# --- a missing object is an error, never zeros -----------------------------------------------------
@pytest.mark.parametrize("key", ["core/transformer.wte.weight/c/0/0", "sphere/d0/neurons/c/0/1/1/0/0"])
def test_missing_object_in_a_directory_is_an_error_everywhere(tmp_path, capsys, key):
    url, _ = _save(tmp_path)
    (Path(url) / key).unlink()
    _every_read_fails(url, f"{key} is listed in the package's manifest but missing")
    code, _, err = run_cli(capsys, "export", url, str(tmp_path / "o.safetensors"), "-q")
    assert code == 2 and "missing" in err and err.count("\n") == 1
    code, out, _ = run_cli(capsys, "verify", url, "--json")
    assert code == 1 and json.loads(out)["missing"] == [key]


def test_renamed_zip_entry_is_missing_not_zeros(tmp_path):
    url, _ = _save(tmp_path, "m.zip")
    key = "sphere/d0/neurons/c/0/1/1/0/0"
    raw = bytearray(Path(url).read_bytes())
    at = raw.rfind(key.encode())  # the central directory comes last: rename the entry there only
    raw[at + len(key) - 1] = ord("9")
    Path(url).write_bytes(bytes(raw))
    _every_read_fails(url, f"{key} is listed in the package's manifest but missing")


def test_one_byte_of_a_fat_short_name_changed_is_missing_not_zeros(tmp_path):
    from spherefmt.containers.vhd.filesystem import PARTITION_START, VHDFileSystem
    from spherefmt.containers.vhd.image import VHDImage

    url, _ = _save(tmp_path, "m.vhd")
    key = "sphere/d0/neurons/c/0/1/1/0/0"
    fs = VHDFileSystem(url)
    try:
        parent, _, _ = fs._lookup("/" + key.rsplit("/", 1)[0])
        fat = fs._fat.fs
        at = PARTITION_START * 512 + fat.get_data_cluster_address(parent)
        cluster = fs._vhd.read(at, fat.bytes_per_cluster)
    finally:
        fs.close()
    entry = cluster.find(b"0          ")  # the short 8.3 entry of the file "0"
    assert entry >= 0 and entry % 32 == 0
    with VHDImage(url, "r+") as v:
        v.write(at + entry, b"1")
    _every_read_fails(url, f"{key} is listed in the package's manifest but missing")


# --- metadata is checked like data -------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["shuffle", "endian", "transpose", "chunk_key_encoding", "fill_value"])
def test_edited_array_metadata_is_refused(tmp_path, edit):
    url, _ = _save(tmp_path, codec="default")
    meta = Path(url) / "core" / "transformer.wte.weight" / "zarr.json"
    md = json.loads(meta.read_text())
    if edit == "shuffle":
        next(c for c in md["codecs"] if c["name"] == "blosc")["configuration"]["shuffle"] = "bitshuffle"
    elif edit == "endian":
        md["codecs"][0]["configuration"]["endian"] = "big"
    elif edit == "transpose":
        md["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}})
    elif edit == "chunk_key_encoding":
        md["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    else:
        md["fill_value"] = 1.0
    meta.write_text(json.dumps(md))
    with spherefmt.open(url) as p, pytest.raises(IntegrityError, match="weight/zarr.json does not match"):
        p.tensor("transformer.wte.weight")
    # the root header too: an edit of any byte is found before the header is believed
    root = Path(url) / "zarr.json"
    root.write_text(root.read_text().replace('"codec": "default"', '"codec": "none"   '))
    with pytest.raises(IntegrityError, match=r"object zarr.json does not match"):
        spherefmt.open(url)


def test_an_object_the_manifest_does_not_list_is_never_read(tmp_path):
    """An expert with no neurons is not stored; a shard planted at its key (a leftover, or an
    attacker's) is not read as its data: the package reads exactly as before."""
    url, sd = _save(tmp_path, graticule="earth", depth=1)
    with spherefmt.open(url) as p:
        full = next(a for a in p.experts() if (p.expert(*a).index >= 0).any())
        empty = next(a for a in p.experts() if not (p.expert(*a).index >= 0).any())
        src, dst = Path(url) / p.shard_key(*full), Path(url) / p.shard_key(*empty)
    assert not dst.exists()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with spherefmt.open(url) as p:
        assert p.verify()["unlisted"] == [str(dst.relative_to(url))]
        assert not p.expert(*empty).neurons.any()  # zeros: the fill value, not the planted rows
        for name in p.keys():
            assert p.tensor(name).tobytes() == sd[name].tobytes()


# --- one writer at a time ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".sphere", ".zip", ".vhd"])
def test_a_second_writer_is_refused_at_once_or_waits(tmp_path, suffix):
    url, _ = _save(tmp_path, "m" + suffix)
    first = spherefmt.open(url, "r+")
    t0 = time.monotonic()
    with pytest.raises(PackageLockedError, match="another process .*is writing this package"):
        spherefmt.open(url, "r+")
    assert time.monotonic() - t0 < 1
    e = first.expert(0, 1, 1)
    rows = e.neurons.copy()
    rows[e.index >= 0] = 0.25
    first.write_expert(0, 1, 1, rows)
    threading.Timer(0.5, first.close).start()  # the first writer finishes half a second later...
    with spherefmt.open(url, "r+", lock_timeout=20) as second:  # ...and the second, waiting, goes on
        assert (second.expert(0, 1, 1).neurons[e.index >= 0] == 0.25).all()  # nothing was lost
        f = second.expert(0, 1, 0)
        other = f.neurons.copy()
        other[f.index >= 0] = 0.5
        second.write_expert(0, 1, 0, other)
    with spherefmt.open(url) as p:
        assert (p.expert(0, 1, 1).neurons[e.index >= 0] == 0.25).all()
        assert (p.expert(0, 1, 0).neurons[p.expert(0, 1, 0).index >= 0] == 0.5).all()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m" + suffix]  # no lock file, no staging


GROW_BESIDE_WRITES = r"""
import sys, numpy as np, spherefmt
from spherefmt.training.grow import grow_neurons
url, role, n0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(6):
    with spherefmt.open(url, "r+", lock_timeout=60) as p:
        if role == "grow":
            grow_neurons(p, 8, seed=i)
        else:  # the expert's original neurons get the value i + 1; grown slots stay as they are
            e = p.expert(1, 0, 0)
            rows = e.neurons.copy()
            rows[(e.index >= 0) & (e.index < n0)] = i + 1
            p.write_expert(1, 0, 0, rows)
"""


def test_growth_beside_expert_writers_loses_nothing(tmp_path):
    """Two processes write expert (1, 0, 0) while a third grows every layer, each taking turns
    through the lock: every grown neuron has real input weights and zero output weights, and
    the expert holds the writers' last value (grown slots excepted)."""
    url, _ = _save(tmp_path)
    with spherefmt.open(url) as p:
        n0 = p.metadata["layers"][0]["neurons"]
    procs = [subprocess.Popen([sys.executable, "-c", GROW_BESIDE_WRITES, url, role, str(n0)])
             for role in ("grow", "w", "w")]
    assert [q.wait(300) for q in procs] == [0, 0, 0]
    with spherefmt.open(url) as p:
        assert p.verify()["mismatched"] == [] and p.metadata["layers"][0]["neurons"] == n0 + 6 * 8
        for layer in range(len(p.layer_depth)):
            rows = p.layer_rows(layer).astype(np.float32)
            sl = p.expert(0, 0, p.layer_depth[layer]).fields
            grown = rows[n0:]
            assert (np.abs(grown[:, sl["w_in"]]).sum(axis=1) > 0).all()  # input weights, never zero
            assert (grown[:, sl["w_out"]] == 0).all() and (grown[:, sl["b_in"]] == 0).all()
        e = p.expert(1, 0, 0)
        assert (e.neurons[(e.index >= 0) & (e.index < n0)] == 6).all()  # the writers' last value


# --- readers beside a writer -------------------------------------------------------------------------
REWRITER = r"""
import sys, numpy as np, spherefmt
pkg = spherefmt.open(sys.argv[1], "r+")
addrs = list(pkg.experts())
base = {a: pkg.expert(*a) for a in addrs}
print("ready", flush=True)
k = 0
while True:
    k += 1
    with pkg.transaction():  # every expert gets the constant k in one commit
        for a in addrs:
            e = base[a]
            rows = e.neurons.copy()
            rows[e.index >= 0] = k
            pkg.write_expert(*a, rows)
"""


@pytest.mark.parametrize("suffix", [".sphere", ".vhd"])
def test_streaming_reads_beside_a_writer_all_succeed_and_never_mix(tmp_path, suffix):
    url, _ = _save(tmp_path, "m" + suffix, arch="llama")
    with spherefmt.open(url) as p:
        original = {(layer, a, b): p.cell_layer(a, b, layer)[0].tobytes() for layer in range(len(p.layer_depth))
                    for a in range(2) for b in range(2)}
    child = subprocess.Popen([sys.executable, "-c", REWRITER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        reads, seen, t_end = 0, set(), time.monotonic() + 6
        with spherefmt.open(url) as p:
            n_layers = len(p.layer_depth)
            while time.monotonic() < t_end:
                values = []
                for layer in range(n_layers):
                    for lat in range(2):
                        for lon in range(2):
                            rows, index, _ = p.cell_layer(lat, lon, layer)  # the runtime's unit of streaming
                            if rows.tobytes() == original[layer, lat, lon]:
                                continue  # not rewritten yet
                            v = np.unique(rows[index >= 0])
                            assert v.size == 1, v[:4]  # one version of the expert, never a mix
                            values.append(float(v[0]))
                            reads += 1
                seen.update(values)
            gens = p.generation
    finally:
        child.kill()
        child.wait()
    assert reads > 50 and len(seen) > 2 and gens > 2, (reads, len(seen), gens)


# --- killed writers: the old state or the new one ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".sphere", ".zip", ".vhd"])
@pytest.mark.parametrize("op", ["grow", "train"])
def test_killed_writers_leave_the_old_or_the_new_package(tmp_path, suffix, op):
    from spherefmt.testing.reliability import Trials, copy_package, state_of

    base, _ = _save(tmp_path, "base" + suffix)
    args = {"experts": [[0, 1, 0], [1, 0, 1]]}
    trials = Trials()
    ref = copy_package(base, tmp_path / f"ref{suffix}")
    seconds = trials.run(op, ref, args, None)["seconds"]
    old, new = state_of(base), state_of(ref)
    assert isinstance(old, dict) and isinstance(new, dict) and old != new
    rng = random.Random(13)
    outcomes = []
    for _ in range(3):
        r = trials.trial(op, Path(base), tmp_path / f"t{suffix}", args, rng.uniform(0, seconds * 1.1), old, new)
        assert r["outcome"] in ("old", "new"), r
        assert r["next_writer_keeps_state"] and not r["leftovers_after_next_writer"]["beside"], r
        assert not r["leftovers_after_next_writer"]["inside"], r
        outcomes.append(r["outcome"])
    assert outcomes


def test_killed_conversion_to_vhd_leaves_nothing(tmp_path):
    """The image is built as an unnamed file: a kill leaves no multi-MB partial image."""
    from spherefmt.testing.reliability import Trials

    sd, cfg = model("gpt2", "F32")
    src = tmp_path / "src.safetensors"
    from safetensors.numpy import save_file

    save_file(sd, src)
    trials = Trials()
    dst = tmp_path / "new.vhd"
    seconds = trials.run("convert", dst, {"source": str(src), "config": cfg}, None)["seconds"]
    dst.unlink()
    for delay in (seconds * 0.3, seconds * 0.7):
        trials.run("convert", dst, {"source": str(src), "config": cfg}, delay)
        left = [q.name for q in tmp_path.iterdir() if q.name not in ("src.safetensors", ".new.vhd.lock")]
        assert left in ([], ["new.vhd"]), left  # nothing, or the finished package
        if dst.exists():
            assert spherefmt.is_package(dst)
            dst.unlink()


def test_interrupted_directory_conversion_leftovers_are_removed_by_the_next_writer(tmp_path):
    url, _ = _save(tmp_path)
    stage = tmp_path / f".m.sphere.partial-{os.getpid() + 1}"  # what a killed conversion leaves
    shutil.copytree(url, stage)
    (tmp_path / f".m.sphere.edit-{os.getpid() + 1}").mkdir()
    spherefmt.open(url).close()
    assert len(list(tmp_path.iterdir())) == 3  # a reader leaves them alone...
    spherefmt.open(url, "r+").close()  # ...the next writer, holding the lock, removes them
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.sphere"]


# --- a full host disk ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB filesystem (tmpfs); skipped where this process cannot mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> None:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\1" * max(0, free - leave))


@pytest.mark.parametrize("suffix", [".sphere", ".vhd"])
def test_a_full_host_disk_is_reported_and_changes_nothing(tmp_path, small_disk, suffix):
    url, _ = _save(tmp_path, "m" + suffix)
    here = small_disk / ("m" + suffix)
    (shutil.copytree if suffix == ".sphere" else shutil.copyfile)(url, here)
    from spherefmt.testing.reliability import state_of

    before = state_of(here)
    _fill(small_disk, 64 * 1024)
    with pytest.raises(DiskFullError, match="host disk is full") as e:
        grow_neurons(str(here), 300)
    assert "inside" not in str(e.value) and "\n" not in str(e.value)
    assert state_of(here) == before  # exactly as it was
    (small_disk / "filler").unlink()
    grow_neurons(str(here), 300)  # with room again, the same growth goes through
    assert state_of(here) != before


def test_conversion_onto_a_full_host_disk(tmp_path, small_disk):
    sd, cfg = model("gpt2", "F32")
    _fill(small_disk, 96 * 1024)
    with pytest.raises(DiskFullError, match="host disk is full"):
        spherefmt.save(sd, small_disk / "m.sphere", config=cfg)
    assert sorted(q.name for q in small_disk.iterdir()) == ["filler"]


# --- object storage: no lock, a conditional commit -----------------------------------------------------
def race(url: str) -> None:
    """Two writers of one object-storage package (which has no lock): the second to commit is
    refused as a whole, and the first's change is kept."""
    a, b = spherefmt.open(url, "r+"), spherefmt.open(url, "r+")
    try:
        e = a.expert(0, 1, 1)
        rows = e.neurons.copy()
        rows[e.index >= 0] = 3
        with pytest.raises(ConcurrentWriteError, match="another writer committed a change first"):
            with b.transaction():  # b starts first...
                b.write_expert(0, 1, 1, rows * 2)
                a.write_expert(0, 1, 1, rows)  # ...a commits first: b's commit must fail
        with pytest.raises(ConcurrentWriteError, match="another writer changed the package"):
            b.write_expert(0, 1, 0, b.expert(0, 1, 0).neurons)  # b's view is stale: refused up front
    finally:
        a.close()
        b.close()
    with spherefmt.open(url) as p:
        assert (p.expert(0, 1, 1).neurons[e.index >= 0] == 3).all()
        assert p.verify()["mismatched"] == [] and p.verify()["missing"] == []


def test_memory_url_second_commit_is_refused(tmp_path):
    sd, cfg = model("gpt2", "F32")
    race(spherefmt.save(sd, f"memory://race-{tmp_path.name}", config=cfg, graticule="2x2", depth=2))


def test_fsspec_without_a_conditional_write_is_read_only(tmp_path):
    url, _ = _save(tmp_path)
    with pytest.raises(ReadOnlyError, match="no conditional write"):
        spherefmt.open(f"dir::file://{url}", "r+")


# --- version-1 packages ----------------------------------------------------------------------------------
def test_v1_fixture_reads_and_upgrades_on_write(tmp_path):
    src = FIXTURES / "v1-gpt2-bf16.sphere"
    pkg = tmp_path / "v1.sphere"
    shutil.copytree(src, pkg)
    with spherefmt.open(pkg) as p:
        assert p.generation is None and p.metadata["version"] == 1
        before = p.state_dict()
    with spherefmt.open(pkg, "r+") as p:
        e = p.expert(0, 0, 0)
        rows = e.neurons.copy()
        p.write_expert(0, 0, 0, rows)  # the same bytes: a commit all the same
    with spherefmt.open(pkg) as p:
        assert p.generation == 1 and p.metadata["version"] == 2
        assert p.verify()["mismatched"] == [] and not p.verify()["missing"]
        after = p.state_dict()
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    assert (pkg / "manifest" / "zarr.json").exists()
