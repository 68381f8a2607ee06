from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama

_counter = itertools.count()


@pytest.fixture
def small_gpt2():
    cfg = gpt2_config(n_layer=3, n_embd=32, vocab_size=80)
    return make_gpt2(cfg, "F32"), cfg


def model(arch: str, dtype: str, seed: int = 0):
    if arch == "gpt2":
        cfg = gpt2_config(n_layer=3, n_embd=32, vocab_size=80)
        return make_gpt2(cfg, dtype, seed), cfg
    cfg = llama_config(num_hidden_layers=3, hidden_size=32, intermediate_size=88)
    return make_llama(cfg, dtype, seed), cfg


def dest(kind: str, tmp_path: Path) -> str:
    n = next(_counter)
    if kind == "dir":
        return str(tmp_path / f"m{n}.sphere")
    if kind == "zip":
        return str(tmp_path / f"m{n}.zip")
    return f"memory://t{tmp_path.name}-{n}"


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``sphere ARGS`` in-process: exit code, stdout, stderr."""
    from spherefmt.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
