"""Fused projections: split on conversion so the FFN lands on the sphere, fused again on export.

Phi-3 stores a layer's query, key and value projections as one ``self_attn.qkv_proj.weight``
and its FFN gate and up projections as one ``mlp.gate_up_proj.weight`` (gate rows first).  A
package stores the parts under the names Llama uses (``q_proj``/``k_proj``/``v_proj``,
``gate_proj``/``up_proj``), so the FFN neurons become sphere rows and the runtime runs the model
as the Llama family it is; the header's ``fused`` list (``spec/FORMAT.md`` section 3) names
each source tensor and its parts, and every export concatenates the parts back, bit for bit
(a split along axis 0 and a concatenation are both exact).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from spherefmt.dtypes import TensorInfo
from spherefmt.errors import FormatError
from spherefmt.interop.base import TensorSource

__all__ = ["FUSIONS", "SplitSource", "FusedView", "split_fused", "fuse_state_dict"]


def _qkv(config: Mapping[str, Any], rows: int) -> list[int]:
    d, h = int(config.get("hidden_size") or 0), int(config.get("num_attention_heads") or 0)
    hd = int(config.get("head_dim") or (d // h if h else 0))
    kv = int(config.get("num_key_value_heads") or h)
    sizes = [h * hd, kv * hd, kv * hd]
    if min(sizes) <= 0 or sum(sizes) != rows:
        raise FormatError(f"qkv_proj has {rows} rows; the config's heads ({h} x {hd}, {kv} KV) make {sum(sizes)}")
    return sizes


def _halves(config: Mapping[str, Any], rows: int) -> list[int]:
    if rows % 2:
        raise FormatError(f"gate_up_proj has an odd number of rows ({rows})")
    return [rows // 2, rows // 2]


#: model_type -> (name pattern, part suffixes, row counts of the parts from (config, rows))
FUSIONS: dict[str, list[tuple[re.Pattern[str], list[str], Callable[[Mapping[str, Any], int], list[int]]]]] = {
    "phi3": [(re.compile(r"^(?P<pre>.*\.self_attn\.)qkv_proj\.weight$"), ["q_proj.weight", "k_proj.weight",
                                                                          "v_proj.weight"], _qkv),
             (re.compile(r"^(?P<pre>.*\.mlp\.)gate_up_proj\.weight$"), ["gate_proj.weight", "up_proj.weight"], _halves)],
}


class SplitSource(TensorSource):
    """A source whose fused tensors are presented as their parts (rows of the fused tensor)."""

    def __init__(self, inner: TensorSource, rules: list[Any]) -> None:
        self.inner, self.where = inner, inner.where
        self.config, self.metadata, self.files = inner.config, inner.metadata, inner.files
        self._parts: dict[str, tuple[str, int, int]] = {}  # part -> (fused name, first row, stop row)
        self._keys: list[str] = []
        #: what the header records: ``[{"name", "parts", "axis"}]``
        self.fused: list[dict[str, Any]] = []
        have = set(inner.keys())
        for name in inner.keys():
            rule = next(((m, sfx, fn) for pat, sfx, fn in rules if (m := pat.match(name))), None)
            info = inner.info(name)
            if rule is None or len(info.shape) != 2:
                self._keys.append(name)
                continue
            m, suffixes, sizes_of = rule
            try:
                sizes = sizes_of(inner.config or {}, info.shape[0])
            except FormatError as e:
                raise FormatError(f"{inner.where}: {name}: {e}") from None
            parts = [m["pre"] + s for s in suffixes]
            if clash := [p for p in parts if p in have]:
                raise FormatError(f"{inner.where}: {name} is fused but {clash[0]!r} exists beside it")
            start = 0
            for part, n in zip(parts, sizes, strict=True):
                self._parts[part] = (name, start, start + n)
                start += n
            self._keys += parts
            self.fused.append({"name": name, "parts": parts, "axis": 0})

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        if name not in self._parts:
            return self.inner.info(name)
        fused, a, b = self._parts[name]
        src = self.inner.info(fused)
        return TensorInfo(name, src.dtype, (b - a, *src.shape[1:]))

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self.info(name).shape[0]) if name in self._parts else self.inner.read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self._parts:
            return self.inner.read_rows(name, start, stop)
        fused, a, b = self._parts[name]
        stop = min(stop, b - a)
        return np.ascontiguousarray(self.inner.read_rows(fused, a + start, a + stop))

    def close(self) -> None:
        self.inner.close()


def split_fused(source: TensorSource) -> TensorSource:
    """``source`` with its fused projections split (a :class:`SplitSource`), or as it is."""
    rules = FUSIONS.get(str((source.config or {}).get("model_type", "")).lower())
    if not rules:
        return source
    split = SplitSource(source, rules)
    return split if split.fused else source


class FusedView:
    """A package seen by an exporter: its split tensors as the fused source tensors again.

    Writers call ``keys()``, ``tensor_info(name, padded=...)`` and a ``storage(name)`` function;
    every other attribute is the package's own."""

    def __init__(self, pkg: Any, storage: Callable[[str], np.ndarray]) -> None:
        self._pkg, self._storage = pkg, storage
        self._of = {f["name"]: list(f["parts"]) for f in pkg.header.fused}
        first = {parts[0]: name for name, parts in self._of.items()}
        rest = {p for parts in self._of.values() for p in parts[1:]}
        self._keys = [first.get(n, n) for n in pkg.keys() if n not in rest]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pkg, name)

    def keys(self) -> list[str]:
        return list(self._keys)

    def tensor_info(self, name: str, padded: bool = False) -> TensorInfo:
        if name not in self._of:
            return self._pkg.tensor_info(name, padded=padded)
        infos = [self._pkg.tensor_info(p, padded=padded) for p in self._of[name]]
        return TensorInfo(name, infos[0].dtype, (sum(i.shape[0] for i in infos), *infos[0].shape[1:]))

    def storage(self, name: str) -> np.ndarray:
        if name not in self._of:
            return self._storage(name)
        return np.concatenate([self._storage(p) for p in self._of[name]], axis=0)


def fuse_state_dict(sd: dict[str, Any], fused: list[dict[str, Any]]) -> dict[str, Any]:
    """A state dict (numpy or torch tensors) with each fused tensor's parts concatenated back."""
    out = dict(sd)
    for f in fused:
        parts = [out.pop(p) for p in f["parts"]]
        if isinstance(parts[0], np.ndarray):
            out[f["name"]] = np.concatenate(parts, axis=0)
        else:
            import torch

            out[f["name"]] = torch.cat(parts, dim=0)
    return out
