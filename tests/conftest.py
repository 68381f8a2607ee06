"""pytest fixtures shared by the suite; helpers are in ``tests/helpers.py``."""

from __future__ import annotations

import sys

import pytest

from spherefmt.testing import gpt2_config, make_gpt2


@pytest.fixture
def small_gpt2():
    cfg = gpt2_config(n_layer=3, n_embd=32, vocab_size=80)
    return make_gpt2(cfg, "F32"), cfg


@pytest.fixture(autouse=True)
def _torch_seed():
    """torch's global generator starts each test at the same state (pytest-randomly reseeds
    ``random`` and numpy's global generator, not torch's): no test's weights depend on which
    tests ran before it in the same worker."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
