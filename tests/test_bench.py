"""Every benchmark still runs: each ``bench/bench_*.py`` at its ``--smoke`` size, and its JSON
still has the fields the README's tables are read from (checked against the committed full
result too, so the list below cannot drift from what the benchmark really writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))

#: per benchmark, the fields its README table reads: ``a.b`` a key path, ``[]`` every element of
#: a list, ``*`` every value of a mapping
FIELDS: dict[str, list[str]] = {
    "bench_architecture": ["before.modules", "before.lines", "before.private_reaches", "before.cycles",
                           "after.largest", "after.layer_violations", "suite_wall_s"],
    "bench_backends": ["rows[].backend", "rows[].available", "same_tokens_on_every_backend"],
    "bench_decode": ["results[].model", "results[].rows[].row", "results[].rows[].tokens_per_s",
                     "results[].rows[].budget", "results[].goals.*.value", "results[].goals.*.met",
                     "results[].dense_tokens_equal_transformers"],
    "bench_format": ["results.*.codecs.*.convert.seconds", "results.*.codecs.*.size.stored_bytes",
                     "results.*.codecs.*.load.default_threads.warm.median_s", "goals", "machine.cpu_model"],
    "bench_gguf": ["rows[].ffn", "rows[].codec", "rows[].gguf_bytes", "rows[].package_bytes", "rows[].import_s",
                   "rows[].export_s", "rows[].export_identical", "rows[].import_over_copy"],
    "bench_moe": ["runs[].package", "runs[].active", "runs[].heldout_ppl", "runs[].unseen_ppl",
                  "runs[].cells_read_fraction", "goals.*.value", "goals.*.met", "sparsify.seconds"],
    "bench_moe_native": ["rows[].row", "rows[].tokens_per_s", "rows[].budget", "goals.*.value",
                         "same_tokens_as_transformers", "weight_bytes"],
    "bench_placement": ["rows[].shape", "rows[].projected_s", "rows[].exact_s", "goals.*.value", "goals.*.met",
                        "exact_time_exponent_in_width"],
    "bench_precision": ["rows[].row", "rows[].tokens_per_s", "rows[].precision", "rows[].mode",
                        "perplexity.*.perplexity", "goals.*.value",
                        "budget_tokens_equal_resident"],
    "bench_reliability": ["kills.*.trials", "kills.*.outcomes", "racing.*.experts_lost", "readers.*.mixed",
                          "load.rows", "fuzz", "goals"],
    "bench_runtime": ["models[].model", "models[].runs[].store", "models[].runs[].budget", "models[].runs[].mode",
                      "models[].runs[].tokens_per_s", "models[].runs[].peak_device_bytes",
                      "models[].anchors.transformers_resident.tokens_per_s", "models[].goals.*.value"],
    "bench_s3": ["rows[].model", "rows[].local.seconds", "rows[].s3.seconds", "rows[].s3.get_requests",
                 "rows[].s3_over_local_time"],
    "bench_scale": ["results.*.parameters", "results.*.convert.seconds", "results.*.convert.peak_rss_bytes",
                    "results.*.export.seconds", "results.*.session.peak_rss_bytes", "results.*.verify.identical",
                    "analysis.export_identical"],
    "bench_train": ["rows[].experts_changed", "rows[].experts_total", "rows[].save_changes_s",
                    "rows[].save_changes_bytes", "rows[].safetensors_resave_s", "growth[].growth", "growth[].grow_s",
                    "growth[].bytes_written"],
    "bench_vhd": ["size_bytes.vhd_over_dir", "read_all_experts_MBps", "read_all_ratio_vhd_over_dir",
                  "one_expert_ms.vhd", "one_expert_ratio_vhd_over_pread", "rewrite_one_expert_in_vhd_s"],
}
#: the committed full result of each (``bench/results/<name>.json``)
RESULT = {name: BENCH / "results" / f"{name.removeprefix('bench_')}.json" for name in SCRIPTS}


def missing(doc: Any, path: str) -> list[str]:
    """The places where ``doc`` lacks ``path`` (empty: present everywhere); an empty list or
    mapping on the way counts as missing (a table with no rows reads nothing)."""
    head, _, rest = path.partition(".")
    many = head.endswith("[]")
    key = head.removesuffix("[]")
    if key == "*":
        if not isinstance(doc, dict) or not doc:
            return [path]
        values = list(doc.values())
        return [m for v in values for m in (missing(v, rest) if rest else [])]
    if not isinstance(doc, dict) or key not in doc:
        return [path]
    value = doc[key]
    if many:
        if not isinstance(value, list) or not value:
            return [path]
        return [m for v in value for m in (missing(v, rest) if rest else [])]
    return missing(value, rest) if rest else []


def test_every_script_is_listed():
    assert set(FIELDS) == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_fields_are_in_the_committed_result(name):
    doc = json.loads(RESULT[name].read_text())
    assert [m for f in FIELDS[name] for m in missing(doc, f)] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_smoke(name, tmp_path):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(out)], cwd=BENCH.parent,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [m for f in FIELDS[name] for m in missing(doc, f)] == []
