"""The sphere command: convert, info, cell, export; exit code 2 and one line on user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from spherefmt.testing import save_hf_folder
from tests.helpers import model

SPHERE = [sys.executable, "-m", "spherefmt.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPHERE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    sd, cfg = model("gpt2", "BF16")
    return save_hf_folder(tmp_path_factory.mktemp("hf") / "gpt2", sd, cfg, shards=2), sd


def test_convert_info_cell_export(hf, tmp_path):
    folder, sd = hf
    pkg = tmp_path / "m.sphere"
    r = run("convert", str(folder), str(pkg), "--graticule", "2x3", "--depth", "2", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(run("info", str(pkg), "--json").stdout)
    assert info["architecture"] == "gpt2" and info["graticule"] == [2, 3] and info["depth"] == 2
    assert info["experts"] == 12 and info["layer_depth"] == [1, 1, 0] and info["layers"] == 3
    assert info["neuron_row"] == {"dtype": "BF16", "width": 65, "fields": {"w_in": 32, "b_in": 1, "w_out": 32}}
    assert 0 < info["stored_bytes"] and info["raw_bytes"] == sum(v.nbytes for v in sd.values())
    text = run("info", str(pkg)).stdout
    assert "graticule     2 x 3 cells, depth 2, 12 experts" in text
    cell = json.loads(run("cell", str(pkg), "1", "2", "1", "--json").stdout)
    assert cell["expert"] == [1, 2, 1] and [x["layer"] for x in cell["layers"]] == [0, 1]
    assert cell["stored_bytes"] == os.path.getsize(pkg / cell["object"])
    assert all(len(x["indices"]) == x["neurons"] <= cell["capacity"] for x in cell["layers"])
    out = tmp_path / "back.safetensors"
    r = run("export", str(pkg), str(out), "-q")
    assert r.returncode == 0, r.stderr
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(sd)
        for k in sd:
            assert f.get_tensor(k).view(dtype=__import__("torch").int16).numpy().tobytes() == sd[k].tobytes()


@pytest.mark.parametrize(
    "args,match",
    [
        (["info", "{tmp}/nothing"], "no such package"),
        (["cell", "{pkg}", "9", "0", "0"], "no expert (9, 0, 0)"),
        (["convert", "{hf}", "{pkg}"], "already holds a package"),
        (["convert", "{hf}", "{tmp}/x.sphere", "--graticule", "3y3"], "expected PxM"),
        (["convert", "{tmp}/missing.safetensors", "{tmp}/y.sphere"], "no such file"),
        (["export", "{pkg}", "{tmp}/out.txt"], "unknown export format"),
        (["mount", "{tmp}/m.vhd", "{tmp}", "--rw"], "mounts read-only"),
    ],
)
def test_user_errors_exit_2_with_one_line(hf, tmp_path, args, match):
    folder, _ = hf
    pkg = tmp_path / "p.sphere"
    assert run("convert", str(folder), str(pkg), "-q").returncode == 0
    r = run(*[a.format(tmp=tmp_path, pkg=pkg, hf=folder) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sphere: error:") and match in lines[0], r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr  # nothing else: no progress bar, no warning, no blank line


def test_help_and_usage_errors():
    r = run("--help")
    assert r.returncode == 0 and "convert" in r.stdout and "Quick start" in r.stdout
    r = run("convert", "--help")
    assert "--graticule" in r.stdout and "earth" in r.stdout and "--overwrite" in r.stdout
    assert run("convert").returncode == 2
    assert run("info", "x", "--bogus").returncode == 2


def test_generic_model_warns(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.ones((2, 3), np.float32)}, str(tmp_path / "m.safetensors"))
    r = run("convert", str(tmp_path / "m.safetensors"), str(tmp_path / "g.sphere"), "-q")
    assert r.returncode == 0 and "sphere: warning:" in r.stderr and "core/" in r.stderr
    info = json.loads(run("info", str(tmp_path / "g.sphere"), "--json").stdout)
    assert info["architecture"] == "generic" and "graticule" not in info
