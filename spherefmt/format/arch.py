"""Architecture detection: which tensors are FFN neurons, and how a neuron row is laid out.

A *neuron row* is the concatenation of one slice per *field*: for each field tensor, the slice
at the neuron's index along the field's neuron axis, flattened.  GPT-2 rows are
``[c_fc.weight[:, j], c_fc.bias[j], c_proj.weight[j, :]]`` (``F = 2d + 1``); Llama rows are
``[gate_proj.weight[j, :], up_proj.weight[j, :], down_proj.weight[:, j]]`` (``F = 3d``).
Rows are what an expert stores, so one read brings a neuron's input and output weights together.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spherefmt.constants import (
    ARCH_GENERIC,
    ARCH_GPT2,
    ARCH_LLAMA,
    GGUF_LLAMA_FIELDS,
    GPT2_FIELDS,
    LLAMA_FIELDS,
    SPHERE_DTYPES,
)
from spherefmt.dtypes import TensorInfo
from spherefmt.errors import FormatError

__all__ = ["Field", "Layout", "detect", "rows_from_tensors"]

#: model types whose FFN is Llama's (gate/up/down projections; Phi-3's fused ``gate_up_proj`` is
#: split on conversion, :mod:`spherefmt.interop.fused`)
LLAMA_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite",
                     "internlm2", "yi", "deepseek", "smollm"}


@dataclass(frozen=True)
class Field:
    """One part of a neuron row: its name, the tensor suffix, the neuron axis and its width."""

    name: str
    suffix: str
    axis: int
    width: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "suffix": self.suffix, "axis": self.axis, "width": self.width}


@dataclass
class Layout:
    """Where the FFN neurons live in a source model."""

    arch: str
    dtype: str = ""
    fields: list[Field] = field(default_factory=list)
    #: per layer: field name -> tensor name
    layers: list[dict[str, str]] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)
    in_field: str = ""
    out_field: str = ""
    warning: str | None = None
    #: native experts per layer (0: a dense FFN); expert ``e`` owns neurons ``e * n / E ..``
    experts: int = 0

    @property
    def row_width(self) -> int:
        return sum(f.width for f in self.fields)

    def ffn_tensors(self) -> set[str]:
        return {n for layer in self.layers for n in layer.values()}

    def slices(self) -> dict[str, slice]:
        out, o = {}, 0
        for f in self.fields:
            out[f.name] = slice(o, o + f.width)
            o += f.width
        return out


def _generic(reason: str) -> Layout:
    return Layout(arch=ARCH_GENERIC, warning=f"{reason}; every tensor is stored in core/ (bit-exact, no experts)")


def _cfg_int(config: Mapping[str, Any] | None, *keys: str) -> int | None:
    for k in keys:
        v = (config or {}).get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def detect(infos: Mapping[str, TensorInfo], config: Mapping[str, Any] | None, where: str) -> Layout:
    """Detect the architecture and FFN layout from the config and the tensor names.

    Returns a generic layout (with ``warning`` set) for models that are neither GPT-2 nor
    Llama-family.  Raises :class:`FormatError` when the config and the tensors disagree.
    """
    model_type = str((config or {}).get("model_type", "")).lower()
    names = list(infos)
    gpt2_re = re.compile(r"^(?P<pre>(?:.*\.)?h\.)(?P<l>\d+)\.mlp\.c_fc\.weight$")
    llama_re = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<l>\d+)\.mlp\.gate_proj\.weight$")
    gguf_re = re.compile(r"^(?P<pre>blk\.)(?P<l>\d+)\.ffn_gate\.weight$")  # llama.cpp names
    hits = {ARCH_GPT2: [gpt2_re.match(n) for n in names], ARCH_LLAMA: [llama_re.match(n) for n in names]}
    if any(re.match(r"^blk\.\d+\.ffn_gate_exps\.weight$", n) for n in names):  # experts left stacked
        quantized = any(infos[n].dtype == "U8" for n in names if n.endswith("_exps.weight"))
        return _generic(f"{where}: the GGUF's MoE experts are " + (
            "of a GGUF type gguf cannot dequantize; they are kept bit for bit in core/" if quantized
            else "stacked without an expert count in its metadata"))
    gguf_names = not any(hits[ARCH_LLAMA]) and any(gguf_re.match(n) for n in names)
    if gguf_names:
        hits[ARCH_LLAMA] = [gguf_re.match(n) for n in names]
    from spherefmt.interop.experts import JOINED, expert_count, moe_rule  # noqa: PLC0415 (interop imports format)

    rule = moe_rule(config)
    experts = 0
    if rule is not None:  # a MoE whose experts JoinedSource presented as one FFN per layer
        moe_re = re.compile(rf"^(?P<pre>(?:.*\.)?layers\.)(?P<l>\d+)\.{re.escape(rule.module)}\.experts\.gate_proj\.weight$")
        hits[ARCH_LLAMA] = [moe_re.match(n) for n in names]
        if not any(hits[ARCH_LLAMA]):
            return _generic(f"{where}: {model_type!r} holds no per-expert FFN tensors this version reads")
        sparse = {int(h["l"]) for h in hits[ARCH_LLAMA] if h}
        if len(sparse) != (_cfg_int(config, "num_hidden_layers") or len(sparse)):
            return _generic(f"{where}: {model_type!r} mixes dense and MoE layers ({len(sparse)} of "
                            f"{_cfg_int(config, 'num_hidden_layers')} are MoE); one package holds one FFN kind")
        arch = ARCH_LLAMA
        spec = tuple((f, f"{rule.module}.experts.{JOINED[f]}.weight", a) for f, _, a in LLAMA_FIELDS)
        experts = expert_count(config or {}, rule)
    elif model_type == "gpt2" or (not model_type and any(hits[ARCH_GPT2])):
        arch, spec = ARCH_GPT2, GPT2_FIELDS
    elif model_type in LLAMA_MODEL_TYPES or (not model_type and any(hits[ARCH_LLAMA])):
        arch, spec = ARCH_LLAMA, GGUF_LLAMA_FIELDS if gguf_names else LLAMA_FIELDS
        if gguf_names and any(n.endswith(".ffn_gate_inp.weight") for n in names):  # llama.cpp's MoE
            experts = _cfg_int(config, "num_local_experts") or 0
    else:
        return _generic(f"{where}: architecture {model_type or 'unknown'!r} is not GPT-2 or Llama-family")
    matches = [m for m in hits[arch] if m]
    if not matches:
        raise FormatError(f"{where}: config says {model_type!r} but no FFN tensors with the expected names were found")
    prefixes = {m["pre"] for m in matches}
    if len(prefixes) != 1:
        return _generic(f"{where}: FFN tensors under several prefixes {sorted(prefixes)}")
    pre = prefixes.pop()
    n_layers = max(int(m["l"]) for m in matches) + 1
    cfg_layers = _cfg_int(config, "n_layer", "num_hidden_layers")
    if cfg_layers is not None and cfg_layers != n_layers:
        raise FormatError(f"{where}: config has {cfg_layers} layers but the tensors have {n_layers}")
    d = _cfg_int(config, "n_embd", "hidden_size")
    n_inner = _cfg_int(config, "n_inner", "intermediate_size")
    if rule is not None:
        per = _cfg_int(config, rule.size_key)
        n_inner = None if per is None else per * experts
    elif experts and n_inner is not None:  # GGUF: feed_forward_length is one expert's
        n_inner *= experts
    if arch == ARCH_GPT2 and n_inner is None and d is not None:
        n_inner = 4 * d
    if gguf_names and any(infos[f"{pre}{la}.{suffix}"].dtype == "U8" for la in range(n_layers)
                          for _, suffix, _ in spec if f"{pre}{la}.{suffix}" in infos):
        return _generic(f"{where}: the FFN tensors are of a GGUF type gguf cannot dequantize (raw blocks); they are "
                        "kept bit for bit in core/")
    layout = Layout(arch=arch, in_field=spec[0][0], out_field=spec[-1][0], experts=experts)
    dtypes = set()
    for layer in range(n_layers):
        names_l = {fname: f"{pre}{layer}.{suffix}" for fname, suffix, _ in spec}
        for tname in names_l.values():
            if tname not in infos:
                raise FormatError(f"{where}: layer {layer} lacks FFN tensor {tname!r}")
        shapes = {fname: infos[t].shape for fname, t in names_l.items()}
        dtypes |= {infos[t].dtype for t in names_l.values()}
        if arch == ARCH_GPT2:
            w_in, b_in, w_out = shapes["w_in"], shapes["b_in"], shapes["w_out"]
            ok = len(w_in) == 2 and b_in == (w_in[1],) and w_out == (w_in[1], w_in[0])
            dd, n = (w_in[0], w_in[1]) if len(w_in) == 2 else (0, 0)
        else:
            g, u, dn = shapes["gate"], shapes["up"], shapes["down"]
            ok = len(g) == 2 and u == g and dn == (g[1], g[0])
            n, dd = (g[0], g[1]) if len(g) == 2 else (0, 0)
        if not ok:
            raise FormatError(f"{where}: layer {layer} FFN shapes disagree: {shapes}")
        if d is not None and dd != d:
            raise FormatError(f"{where}: config hidden size {d} but layer {layer} FFN tensors have {dd}")
        if n_inner is not None and n != n_inner:
            raise FormatError(f"{where}: config FFN size {n_inner} but layer {layer} has {n} neurons")
        if n == 0:
            return _generic(f"{where}: layer {layer} has no FFN neurons")
        if experts and n % experts:
            raise FormatError(f"{where}: layer {layer} has {n} expert neurons, not a multiple of {experts} experts")
        layout.layers.append(names_l)
        layout.neurons.append(n)
        if layer == 0:
            for fname, suffix, axis in spec:
                shp = shapes[fname]
                width = math.prod(s for i, s in enumerate(shp) if i != axis)
                layout.fields.append(Field(fname, suffix, axis, width))
    if len(dtypes) != 1 or next(iter(dtypes)) not in SPHERE_DTYPES:
        return _generic(f"{where}: FFN tensors have dtypes {sorted(dtypes)}; the sphere holds one float dtype")
    layout.dtype = dtypes.pop()
    return layout


def rows_from_tensors(layout: Layout, tensors: Mapping[str, np.ndarray], layer: int) -> np.ndarray:
    """Build the ``(N, F)`` neuron rows of one layer from its field tensors (storage arrays)."""
    parts = []
    n = layout.neurons[layer]
    for f in layout.fields:
        t = tensors[layout.layers[layer][f.name]]
        parts.append(np.moveaxis(t, f.axis, 0).reshape(n, f.width))
    return np.concatenate(parts, axis=1)
