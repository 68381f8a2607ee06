"""The fuzz harness (spherefmt.testing.fuzz) on every parser and container, a bounded number of
cases each (``make fuzz`` runs thousands): every mutated file gives a one-line SpherefmtError or
reads the original tensors; no traceback, no hang, no wrong data, and memory stays bounded."""

from __future__ import annotations

import pytest

from spherefmt.testing.fuzz import TARGETS, fuzz


@pytest.mark.parametrize("target", list(TARGETS))
def test_mutated_files_never_give_a_traceback_a_hang_or_wrong_data(target):
    pytest.importorskip({"gguf": "gguf", "torch": "torch", "vhd": "pyfatfs", "vhd-fat-size": "pyfatfs"}.get(target, "numpy"))
    cases = 8 if target == "exit-noise" else 40  # (each of its cases is a fresh `sphere` process)
    (r,) = fuzz([target], cases=cases, seed=7)
    assert r["traceback"] == 0 and r["hang"] == 0 and r["wrong"] == 0, r
    assert r["clean"] + r["same"] == cases and r["clean"] > 0  # the mutations did reach the parser
    assert r["error_lines"] == 1  # every error one line (the command's whole stderr for exit-noise)
    assert r["peak_rss_above_baseline_mib"] < 2 * r["input_bytes"] / 2**20 + 256
