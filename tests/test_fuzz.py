"""Parsers treat their input as hostile: random and mutated inputs give FormatError or a valid
result, never another exception, a hang or a path outside the store."""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spherefmt
from spherefmt.errors import FormatError
from spherefmt.format.header import Header
from spherefmt.format.keys import core_key
from spherefmt.interop.safetensors import SafetensorsFile
from tests.helpers import model

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_safetensors(tmp_path, blob):
    p = tmp_path / "f.safetensors"
    p.write_bytes(blob)
    try:
        with SafetensorsFile(p) as f:
            for k in f.keys():
                f.read(k)
    except FormatError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    entries=st.dictionaries(
        st.text(min_size=0, max_size=6),
        st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "U8", "X", 3]),
                               "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
                               "data_offsets": st.lists(st.integers(-4, 40), min_size=0, max_size=3) | json_values}),
        max_size=4),
    data=st.binary(max_size=48),
)
def test_structured_safetensors_headers(tmp_path, entries, data):
    hb = json.dumps(entries).encode()
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    try:
        with SafetensorsFile(p) as f:
            for k in f.keys():
                arr = f.read(k)
                assert arr.nbytes == f.info(k).nbytes
    except FormatError:
        pass


_SD, _CFG = model("gpt2", "F32")
_HEADER: dict = {}


def _base_header() -> dict:
    if not _HEADER:
        url = spherefmt.save(_SD, "memory://fuzz-base", config=_CFG, graticule="2x2", depth=2)
        _HEADER.update(spherefmt.open(url).metadata)
    return copy.deepcopy(_HEADER)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(st.data())
def test_mutated_package_headers(data):
    h = _base_header()
    paths = [p for p in _paths(h) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = h
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Header.parse({"spherefmt": h}, "fuzz")
    except FormatError:
        pass


@given(st.text(min_size=1, max_size=40))
def test_core_keys_never_escape(name):
    key = core_key(name)
    node = key.split("/", 1)[1]
    assert key.startswith("core/") and "/" not in node and node not in (".", "..") and not node.startswith(("__", "."))
    assert np.all([c.isascii() for c in node])
