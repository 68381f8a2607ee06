"""The wheel installs backends/ and runtime/ inside the spherefmt namespace, never as generic
top-level packages, and the installed package works in a clean virtual environment."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_in_clean_venv(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = wheels.glob("spherefmt-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"spherefmt", f"{whl.name.split('-')[0]}-{whl.name.split('-')[1]}.dist-info"}, tops
    assert "spherefmt/backends/__init__.py" in names and "spherefmt/runtime/__init__.py" in names
    assert "spherefmt/py.typed" in names
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(whl)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    # dependencies come from the project's environment (after the clean venv's own site-packages,
    # and without its .pth files, so the editable install is not visible)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    code = (
        "import importlib.util, spherefmt, spherefmt.backends, spherefmt.runtime, numpy as np;"
        "assert importlib.util.find_spec('backends') is None and importlib.util.find_spec('runtime') is None;"
        "assert 'venv' in spherefmt.__file__, spherefmt.__file__;"
        "u = spherefmt.save({'w': np.arange(6, dtype=np.float32)}, 'memory://wheel');"
        "assert spherefmt.open(u).tensor('w').tolist() == list(range(6)); print('ok')"
    )
    r = subprocess.run([str(py), "-W", "ignore", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert (env_dir / "bin" / "sphere").exists()
