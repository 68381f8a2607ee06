"""spec/FORMAT.md and spherefmt/constants.py say the same thing."""

from __future__ import annotations

import json
import re
from pathlib import Path

from spherefmt import constants as C

SPEC = (Path(__file__).parent.parent / "spec" / "FORMAT.md").read_text()


def _table(after: str) -> list[list[str]]:
    section = SPEC.split(after, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows.append(cells)
    return rows[1:]


def test_constants_table():
    rows = _table("## 2. Constants")
    assert len(rows) >= 25
    for name, value in rows:
        name, value = name.strip("`"), json.loads(value.strip("`"))
        assert getattr(C, name) == value, name


def test_every_public_scalar_constant_is_in_the_spec():
    documented = {r[0].strip("`") for r in _table("## 2. Constants")}
    scalars = {k for k, v in vars(C).items() if k.isupper() and isinstance(v, int | float | str) and k != "SHELL_GROUP_FMT"}
    assert scalars - documented == set()


def test_dtype_table():
    rows = _table("## 5. Data types")
    assert {r[0].strip("`"): (r[1].strip("`"), int(r[2])) for r in rows} == C.DTYPES


def test_supported_versions_and_codecs():
    m = re.search(r"`SUPPORTED_VERSIONS` \(`(\[.*?\])`\)", SPEC)
    assert m and tuple(json.loads(m.group(1))) == C.SUPPORTED_VERSIONS
    presets = [r[0].strip("`") for r in _table("## 6. Codecs")]
    assert tuple(presets) == C.CODEC_PRESETS
    for name, suffix, axis in C.GPT2_FIELDS + C.LLAMA_FIELDS:
        assert f"`{name}` = `{suffix}` axis {axis}" in SPEC.replace("\n  ", " ")
