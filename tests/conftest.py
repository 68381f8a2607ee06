"""pytest fixtures shared by the suite; helpers are in ``tests/helpers.py``."""

from __future__ import annotations

import pytest

from spherefmt.testing import gpt2_config, make_gpt2


@pytest.fixture
def small_gpt2():
    cfg = gpt2_config(n_layer=3, n_embd=32, vocab_size=80)
    return make_gpt2(cfg, "F32"), cfg
