"""Native experts: a MoE layer's per-expert tensors joined into one FFN, split again on export.

Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints hold one tensor per expert and projection
(``model.layers.N.block_sparse_moe.experts.E.w1.weight``, ``model.layers.N.mlp.experts.E.
gate_proj.weight``; the form ``save_pretrained`` writes).  On conversion the ``E`` experts of a
layer are presented as one Llama-shaped FFN of ``E * f`` neurons, expert ``e`` owning neurons
``e * f .. (e + 1) * f - 1``: ``<module>.experts.gate_proj.weight`` (rows of every expert's gate,
in expert order), ``up_proj`` likewise, ``down_proj`` (their columns).  Placement then puts each
expert in a cell of its own (``spec/FORMAT.md`` section 9.0.1), the model's router stays in
``core/`` under its own name, and the header's ``experts`` member lists every joined tensor and
its parts, so an export writes the per-expert tensors again, bit for bit (concatenation and
splitting are exact).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from spherefmt.dtypes import TensorInfo
from spherefmt.errors import FormatError
from spherefmt.interop.base import TensorSource

__all__ = ["MOE_TYPES", "MoeRule", "JoinedSource", "join_experts", "SplitView", "split_state_dict", "moe_rule",
           "stacked_state_dict", "StackedSource"]


@dataclass(frozen=True)
class MoeRule:
    """How one architecture names its experts."""

    #: the layer's MoE module (``mlp`` or Mixtral's ``block_sparse_moe``)
    module: str
    #: field -> per-expert projection name
    parts: Mapping[str, str]
    #: config keys giving the expert count (first present wins)
    count_keys: tuple[str, ...]
    #: config key of one expert's neuron count
    size_key: str


_QWEN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
#: model_type -> how its experts are named; every type here is also a runtime type
MOE_TYPES: dict[str, MoeRule] = {
    "mixtral": MoeRule("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}, ("num_local_experts",),
                       "intermediate_size"),
    "qwen2_moe": MoeRule("mlp", _QWEN, ("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "qwen3_moe": MoeRule("mlp", _QWEN, ("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "olmoe": MoeRule("mlp", _QWEN, ("num_experts", "num_local_experts"), "intermediate_size"),
}
#: the joined tensors' projection names (what the sphere's fields read)
JOINED = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_AXIS = {"gate": 0, "up": 0, "down": 1}


def moe_rule(config: Mapping[str, Any] | None) -> MoeRule | None:
    return MOE_TYPES.get(str((config or {}).get("model_type", "")).lower())


def expert_count(config: Mapping[str, Any], rule: MoeRule) -> int:
    n = next((config[k] for k in rule.count_keys if isinstance(config.get(k), int)), None)
    if n is None or isinstance(n, bool) or n < 1:
        raise FormatError(f"config gives no expert count ({' or '.join(rule.count_keys)})")
    return int(n)


class _Joining(TensorSource):
    """A source that presents some of its tensors joined (``_of``: joined name -> how) and passes
    every other tensor through; subclasses give a joined tensor's shape and values."""

    def __init__(self, inner: TensorSource) -> None:
        self.inner, self.where = inner, inner.where
        self.config, self.metadata, self.files = inner.config, inner.metadata, inner.files
        #: what the header records: ``[{"name", "parts", "axis"}]`` (``"stacked"`` too, for GGUF)
        self.joined: list[dict[str, Any]] = []
        self._of: dict[str, tuple[Any, int]] = {}
        self._keys: list[str] = []

    def _info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def _read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return self._info(name) if name in self._of else self.inner.info(name)

    def read(self, name: str) -> np.ndarray:
        return self._read(name) if name in self._of else self.inner.read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self._of:
            return self.inner.read_rows(name, start, stop)
        return np.ascontiguousarray(self._read(name)[start:stop])

    def close(self) -> None:
        self.inner.close()


class JoinedSource(_Joining):
    """A source whose per-expert FFN tensors are presented joined, layer by layer."""

    def __init__(self, inner: TensorSource, rule: MoeRule, experts: int) -> None:
        super().__init__(inner)
        self.rule, self.count = rule, experts
        have = list(inner.keys())
        pat = re.compile(rf"^(?P<pre>.*\.)(?P<l>\d+)\.{re.escape(rule.module)}\.experts\.(?P<e>\d+)\."
                         rf"(?P<w>{'|'.join(map(re.escape, rule.parts.values()))})\.weight$")
        field_of = {v: k for k, v in rule.parts.items()}
        first: dict[tuple[str, int, str], str] = {}  # (prefix, layer, field) -> joined name
        seen: set[str] = set()
        for name in have:
            m = pat.match(name)
            if m is None:
                continue
            seen.add(name)
            fld = field_of[m["w"]]
            key = (m["pre"], int(m["l"]), fld)
            if key not in first:
                first[key] = f"{m['pre']}{m['l']}.{rule.module}.experts.{JOINED[fld]}.weight"
        for (pre, layer, fld), joined in first.items():
            parts = [f"{pre}{layer}.{rule.module}.experts.{e}.{rule.parts[fld]}.weight" for e in range(experts)]
            missing = [p for p in parts if p not in seen]
            if missing:
                raise FormatError(f"{inner.where}: layer {layer} has no {missing[0]!r} ({experts} experts in the config)")
            if joined in have:
                raise FormatError(f"{inner.where}: {joined!r} exists beside the per-expert tensors it would join")
            infos = [inner.info(p) for p in parts]
            shapes = {i.shape for i in infos}
            if len(shapes) != 1 or len(infos[0].shape) != 2 or len({i.dtype for i in infos}) != 1:
                raise FormatError(f"{inner.where}: the experts of layer {layer} ({parts[0]!r}...) differ in shape or dtype")
            self._of[joined] = (parts, _AXIS[fld])
            self.joined.append({"name": joined, "parts": parts, "axis": _AXIS[fld]})
        stray = seen - {p for parts, _ in self._of.values() for p in parts}
        if stray:
            raise FormatError(f"{inner.where}: expert tensor {sorted(stray)[0]!r} is beyond the config's {experts} experts")
        # the joined tensor takes the place of its first part, in the source's order
        at = {parts[0]: j for j, (parts, _) in self._of.items()}
        self._keys = [at.get(n, n) for n in have if n not in seen or n in at]
        self.joined.sort(key=lambda j: self._keys.index(j["name"]))

    def _info(self, name: str) -> TensorInfo:
        parts, axis = self._of[name]
        i = self.inner.info(parts[0])
        shape = list(i.shape)
        shape[axis] *= len(parts)
        return TensorInfo(name, i.dtype, tuple(shape))

    def _read(self, name: str) -> np.ndarray:
        parts, axis = self._of[name]
        return np.concatenate([self.inner.read(p) for p in parts], axis=axis)


#: llama.cpp's stacked expert tensors -> the joined name (its dense FFN name) and the axis
_GGUF_STACKED = {"ffn_gate_exps": ("ffn_gate", 0), "ffn_up_exps": ("ffn_up", 0), "ffn_down_exps": ("ffn_down", 1)}


class StackedSource(_Joining):
    """A GGUF source whose stacked experts (``blk.N.ffn_{gate,up}_exps.weight`` ``(E, f, d)``,
    ``ffn_down_exps`` ``(E, d, f)``) are presented joined under llama.cpp's dense FFN names
    (``blk.N.ffn_gate.weight`` ``(E * f, d)``, ``ffn_down`` ``(d, E * f)``); the header entry has
    one part and ``stacked: E``."""

    def __init__(self, inner: TensorSource, experts: int) -> None:
        super().__init__(inner)
        self.count = experts
        pat = re.compile(r"^(?P<pre>blk\.\d+\.)(?P<w>ffn_(?:gate|up|down)_exps)\.weight$")
        have = inner.keys()
        keys = []
        for name in have:
            m = pat.match(name)
            if m is None:
                keys.append(name)
                continue
            base, axis = _GGUF_STACKED[m["w"]]
            joined = f"{m['pre']}{base}.weight"
            info = inner.info(name)
            if joined in have:
                raise FormatError(f"{inner.where}: {joined!r} exists beside the stacked experts {name!r}")
            if len(info.shape) != 3 or info.shape[0] != experts:
                raise FormatError(f"{inner.where}: {name!r} has shape {list(info.shape)}, not {experts} stacked experts")
            self._of[joined] = (name, axis)
            self.joined.append({"name": joined, "parts": [name], "axis": axis, "stacked": experts})
            keys.append(joined)
        self._keys = keys

    def _info(self, name: str) -> TensorInfo:
        src, axis = self._of[name]
        e, a, b = self.inner.info(src).shape
        return TensorInfo(name, self.inner.info(src).dtype, (e * a, b) if axis == 0 else (a, e * b))

    def _read(self, name: str) -> np.ndarray:
        src, axis = self._of[name]
        x = self.inner.read(src)
        e, a, b = x.shape
        return x.reshape(e * a, b) if axis == 0 else np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(a, e * b)


def _unstack(data: Any, e: int, axis: int) -> Any:
    """A joined tensor back to its stacked source (the inverse of :meth:`StackedSource.read`)."""
    if axis == 0:
        return data.reshape(e, data.shape[0] // e, data.shape[1])
    x = data.reshape(data.shape[0], e, data.shape[1] // e)
    return np.ascontiguousarray(x.transpose(1, 0, 2)) if isinstance(x, np.ndarray) else x.permute(1, 0, 2).contiguous()


def join_experts(source: TensorSource) -> TensorSource:
    """``source`` with its experts joined (a :class:`JoinedSource`, or a :class:`StackedSource`
    for llama.cpp's stacked experts) when it holds a MoE's experts, else as it is."""
    rule = moe_rule(source.config)
    cfg = source.config or {}
    if rule is None and cfg.get("source_format") == "gguf" and isinstance(cfg.get("num_local_experts"), int) \
            and any(n.endswith("_exps.weight") for n in source.keys()) \
            and not any(n.endswith("_exps.weight") and source.info(n).dtype == "U8" for n in source.keys()):
        # (quantized experts, raw GGUF blocks, stay as they are: spherefmt.format.arch says why)
        stacked = StackedSource(source, int(cfg["num_local_experts"]))
        return stacked if stacked.joined else source
    if rule is None:
        return source
    try:
        count = expert_count(source.config or {}, rule)
    except FormatError as e:
        raise FormatError(f"{source.where}: {e}") from None
    joined = JoinedSource(source, rule, count)
    return joined if joined.joined else source


def _split(data: Any, n: int, axis: int) -> list[Any]:
    if isinstance(data, np.ndarray):
        return np.split(data, n, axis=axis)
    return list(data.chunk(n, dim=axis))  # torch


class SplitView:
    """A package seen by an exporter: each joined tensor as its per-expert source tensors again.

    Writers call ``keys()``, ``tensor_info(name, padded=...)`` and a ``storage(name)`` function;
    every other attribute is the package's own.  The joined tensor of the last part asked for is
    kept, so a layer's experts are read once, not once per expert."""

    def __init__(self, pkg: Any, storage: Callable[[str], np.ndarray]) -> None:
        self._pkg, self._storage = pkg, storage
        self._part: dict[str, tuple[str, int]] = {}
        self._joined = {j["name"]: (list(j["parts"]), int(j["axis"])) for j in pkg.header.experts["tensors"]}
        #: joined name -> (experts, axis) for llama.cpp's stacked experts (one 3-D part)
        self._stacked = {j["name"]: (int(j["stacked"]), int(j["axis"])) for j in pkg.header.experts["tensors"]
                         if j.get("stacked")}
        for name, (parts, _) in self._joined.items():
            for i, p in enumerate(parts):
                self._part[p] = (name, i)
        self._keys = [p for n in pkg.keys() for p in (self._joined[n][0] if n in self._joined else [n])]
        self._last: tuple[str, list[np.ndarray]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pkg, name)

    def keys(self) -> list[str]:
        return list(self._keys)

    def tensor_info(self, name: str, padded: bool = False) -> TensorInfo:
        if name not in self._part:
            return self._pkg.tensor_info(name, padded=padded)
        joined, _ = self._part[name]
        parts, axis = self._joined[joined]
        i = self._pkg.tensor_info(joined, padded=padded)
        if joined in self._stacked:
            e, _ = self._stacked[joined]
            a, b = i.shape
            return TensorInfo(name, i.dtype, (e, a // e, b) if axis == 0 else (e, a, b // e))
        shape = list(i.shape)
        if shape[axis] % len(parts):
            raise FormatError(f"{self._pkg.where}: {joined!r} does not split into {len(parts)} experts")
        shape[axis] //= len(parts)
        return TensorInfo(name, i.dtype, tuple(shape))

    def storage(self, name: str) -> np.ndarray:
        if name not in self._part:
            return self._storage(name)
        joined, i = self._part[name]
        if joined in self._stacked:
            return _unstack(self._storage(joined), *self._stacked[joined])
        if self._last is None or self._last[0] != joined:
            parts, axis = self._joined[joined]
            self._last = (joined, [np.ascontiguousarray(x) for x in _split(self._storage(joined), len(parts), axis)])
        return self._last[1][i]


def split_state_dict(sd: dict[str, Any], experts: Mapping[str, Any] | None) -> dict[str, Any]:
    """A state dict (numpy or torch tensors) with every joined tensor split into its experts."""
    if not experts:
        return sd
    out = {}
    joined = {j["name"]: j for j in experts["tensors"]}
    for name, value in sd.items():
        j = joined.get(name)
        if j is None:
            out[name] = value
            continue
        if j.get("stacked"):
            out[j["parts"][0]] = _unstack(value, int(j["stacked"]), int(j["axis"]))
            continue
        for part, piece in zip(j["parts"], _split(value, len(j["parts"]), int(j["axis"])), strict=True):
            out[part] = piece.contiguous() if hasattr(piece, "contiguous") else np.ascontiguousarray(piece)
    return out


def stacked_state_dict(sd: dict[str, Any], experts: Mapping[str, Any]) -> dict[str, Any]:
    """A torch state dict with each layer's joined experts in the form transformers 5 holds them in
    memory: ``<pre>N.mlp.experts.gate_up_proj`` ``(E, 2f, d)`` (each expert's gate rows, then its
    up rows) and ``<pre>N.mlp.experts.down_proj`` ``(E, d, f)``; Mixtral's ``block_sparse_moe``
    module is ``mlp`` there."""
    import torch

    e = int(experts["count"])
    out = dict(sd)
    pat = re.compile(r"^(?P<pre>.*\.\d+\.)(?P<mod>mlp|block_sparse_moe)\.experts\.gate_proj\.weight$")
    for name in list(sd):
        m = pat.match(name)
        if m is None:
            continue
        base = f"{m['pre']}{m['mod']}.experts."
        gate, up, down = (out.pop(f"{base}{p}.weight") for p in ("gate_proj", "up_proj", "down_proj"))
        f, d = gate.shape[0] // e, gate.shape[1]
        mem = f"{m['pre']}mlp.experts."
        out[f"{mem}gate_up_proj"] = torch.cat([gate.reshape(e, f, d), up.reshape(e, f, d)], dim=1).contiguous()
        out[f"{mem}down_proj"] = down.reshape(d, e, f).permute(1, 0, 2).contiguous()
    for name in list(out):
        if ".block_sparse_moe." in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = out.pop(name)
    return out
