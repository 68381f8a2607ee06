"""The package header (``spec/FORMAT.md`` section 3), typed: the one place its keys are spelled.

:meth:`Header.parse` checks the root attribute of an untrusted package and returns a
:class:`Header`; :meth:`Header.to_json` writes it back.  Every other module reads the header
through these dataclasses, never by string keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from spherefmt import constants as C
from spherefmt.dtypes import TensorInfo, check_dtype, check_shape
from spherefmt.errors import FormatError, InputError
from spherefmt.format.arch import Field, Layout
from spherefmt.format.placement import Grid, check_grid, layer_shells

__all__ = ["Header", "LayerEntry", "NeuronLayout", "Shell", "TensorEntry", "new_header"]

_KNOWN = ("format", "version", "state", "architecture", "config", "metadata", "files", "codec", "tensors", "warning",
          "fused", "experts", C.QUANTIZATION_KEY, C.ROUTING_KEY,
          "graticule", "depth", "layer_depth", "shells", "neuron_layout", "layers", "placement")


@dataclass
class TensorEntry:
    """One tensor of the source: where it is stored (``core`` or ``sphere``)."""

    name: str
    dtype: str
    shape: list[int]
    where: str

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.dtype, tuple(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "where": self.where}


@dataclass
class NeuronLayout:
    """How a neuron row is laid out: its dtype and fields (``spec/FORMAT.md`` section 4)."""

    dtype: str
    row_width: int
    fields: list[Field]
    in_field: str
    out_field: str

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "row_width": self.row_width, "fields": [f.to_json() for f in self.fields],
                "in_field": self.in_field, "out_field": self.out_field}


@dataclass
class LayerEntry:
    """One transformer layer: its neuron count and, per field, the tensor it came from."""

    neurons: int
    tensors: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"neurons": self.neurons, "tensors": dict(self.tensors)}


@dataclass
class Shell:
    """One depth shell: the layers it holds and ``capacity``, the neuron slots per cell (``K``)."""

    depth: int
    layers: list[int]
    capacity: int

    def to_json(self) -> dict[str, Any]:
        return {"depth": self.depth, "layers": list(self.layers), "capacity": self.capacity}


@dataclass
class Header:
    """The root header of a package."""

    version: int
    state: str
    architecture: str
    config: dict[str, Any] | None
    metadata: dict[str, str]
    files: list[str]
    codec: str
    tensors: list[TensorEntry]
    warning: str | None = None
    graticule: tuple[int, int] | None = None
    depth: int = 0
    layer_depth: list[int] = field(default_factory=list)
    shells: list[Shell] = field(default_factory=list)
    neuron_layout: NeuronLayout | None = None
    layers: list[LayerEntry] = field(default_factory=list)
    placement: dict[str, Any] | None = None
    #: source tensors stored split (``[{"name", "parts", "axis"}]``): exports concatenate the parts
    fused: list[dict[str, Any]] = field(default_factory=list)
    #: native experts (``{"count", "neurons", "tensors": [{"name", "parts", "axis"}]}``): each
    #: layer's FFN is ``count`` experts of ``neurons`` joined, each expert in a cell of its own
    experts: dict[str, Any] | None = None
    #: quantized tensors (``{"type": "Q8_0", "core": [names], "sphere": bool}``, section 5.1)
    quantization: dict[str, Any] | None = None
    #: trained top-k routing (``{"always_on": [[flat cells] per layer], "trained": {...}}``,
    #: section 7.3): the cells every token computes, and what ``sphere sparsify`` did
    routing: dict[str, Any] | None = None
    #: members this version does not know, kept as they are when the header is written back
    extra: dict[str, Any] = field(default_factory=dict)

    # --- views ----------------------------------------------------------------------------
    @property
    def has_sphere(self) -> bool:
        return self.graticule is not None

    def tensor(self, name: str) -> TensorEntry | None:
        return next((t for t in self.tensors if t.name == name), None)

    def shell(self, depth: int) -> Shell:
        return next(s for s in self.shells if s.depth == depth)

    def layout(self) -> Layout:
        """The neuron layout as :class:`~spherefmt.format.arch.Layout` (what ``save`` detected)."""
        nl = self.neuron_layout
        if nl is None:
            return Layout(arch=self.architecture)
        return Layout(arch=self.architecture, dtype=nl.dtype, fields=list(nl.fields),
                      layers=[dict(lay.tensors) for lay in self.layers], neurons=[lay.neurons for lay in self.layers],
                      in_field=nl.in_field, out_field=nl.out_field)

    # --- JSON -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        h: dict[str, Any] = {
            "format": C.FORMAT_NAME, "version": self.version, "state": self.state, "architecture": self.architecture,
            "config": self.config, "metadata": dict(self.metadata), "files": list(self.files), "codec": self.codec,
            "tensors": [t.to_json() for t in self.tensors], "warning": self.warning,
        }
        if self.fused:
            h["fused"] = [{"name": f["name"], "parts": list(f["parts"]), "axis": f["axis"]} for f in self.fused]
        if self.experts is not None:
            h["experts"] = {"count": self.experts["count"], "neurons": self.experts["neurons"],
                            "tensors": [{"name": j["name"], "parts": list(j["parts"]), "axis": j["axis"],
                                         **({"stacked": j["stacked"]} if j.get("stacked") else {})}
                                        for j in self.experts["tensors"]]}
        if self.quantization is not None:
            h[C.QUANTIZATION_KEY] = {"type": self.quantization["type"], "core": list(self.quantization["core"]),
                                     "sphere": bool(self.quantization["sphere"])}
            if self.quantization.get("types"):
                h[C.QUANTIZATION_KEY]["types"] = dict(sorted(self.quantization["types"].items()))
        if self.graticule is not None and self.neuron_layout is not None:
            h.update({
                "graticule": list(self.graticule), "depth": self.depth, "layer_depth": list(self.layer_depth),
                "shells": [s.to_json() for s in self.shells], "neuron_layout": self.neuron_layout.to_json(),
                "layers": [lay.to_json() for lay in self.layers],
            })
            if self.placement is not None:
                h["placement"] = self.placement
            if self.routing is not None:
                h[C.ROUTING_KEY] = {"always_on": [list(c) for c in self.routing["always_on"]],
                                    **{k: v for k, v in self.routing.items() if k != "always_on"}}
        h.update(self.extra)
        return h

    @classmethod
    def parse(cls, attrs: Mapping[str, Any] | None, where: str) -> Header:
        """Check the root attributes of an untrusted package (``spec/FORMAT.md`` section 3).

        Raises
        ------
        FormatError
            Not a package, a newer or unsupported version, an interrupted conversion, or any
            member malformed or inconsistent with another.
        """
        h = _validated(attrs, where)
        sphere = h["architecture"] != C.ARCH_GENERIC
        nl = h.get("neuron_layout") if sphere else None
        return cls(
            version=h["version"], state=h["state"], architecture=h["architecture"], config=h.get("config"),
            metadata=dict(h["metadata"]), files=list(h.get("files", [])), codec=h["codec"],
            tensors=[TensorEntry(t["name"], t["dtype"], list(t["shape"]), t["where"]) for t in h["tensors"]],
            warning=h.get("warning"),
            graticule=(h["graticule"][0], h["graticule"][1]) if sphere else None,
            depth=h["depth"] if sphere else 0,
            layer_depth=list(h["layer_depth"]) if sphere else [],
            shells=sorted((Shell(s["depth"], list(s["layers"]), s["capacity"]) for s in h["shells"]),
                          key=lambda s: s.depth) if sphere else [],
            neuron_layout=NeuronLayout(
                nl["dtype"], nl["row_width"],
                [Field(f["name"], f.get("suffix", ""), f["axis"], f["width"]) for f in nl["fields"]],
                nl["in_field"], nl["out_field"]) if nl is not None else None,
            layers=[LayerEntry(lay["neurons"], dict(lay["tensors"])) for lay in h["layers"]] if sphere else [],
            placement=h.get("placement") if sphere else None,
            fused=[dict(f) for f in h.get("fused", [])],
            experts=h.get("experts") if sphere else None,
            quantization=h.get(C.QUANTIZATION_KEY),
            routing=h.get(C.ROUTING_KEY) if sphere else None,
            extra={k: v for k, v in h.items() if k not in _KNOWN},
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(h: Mapping[str, Any], key: str, typ: type, where: str) -> Any:
    v = h.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError(f"{where}: package header field {key!r} is missing or malformed")
    return v


def _ints(v: Any, n: int | None = None) -> TypeGuard[list[int]]:
    return isinstance(v, list) and (n is None or len(v) == n) and all(_is_int(x) for x in v)


def _validated(attrs: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    h = (attrs or {}).get(C.ROOT_ATTR) if isinstance(attrs, Mapping) else None
    if not isinstance(h, dict) or h.get("format") != C.FORMAT_NAME:
        raise FormatError(f"{where}: not a spherefmt package (no '{C.ROOT_ATTR}' root attribute)")
    version = _get(h, "version", int, where)
    if version > C.FORMAT_VERSION:
        raise FormatError(f"{where}: package format version {version} is newer than this spherefmt supports "
                          f"({C.FORMAT_VERSION}); upgrade spherefmt")
    if version not in C.SUPPORTED_VERSIONS:
        raise FormatError(f"{where}: package format version {version} is not supported")
    if h.get("state") != C.STATE_COMPLETE:
        raise FormatError(f"{where}: package is incomplete (state {str(h.get('state'))[:20]!r}): "
                          "its conversion was interrupted")
    arch = _get(h, "architecture", str, where)
    if arch not in C.ARCHITECTURES:
        raise FormatError(f"{where}: unknown architecture {arch[:40]!r}")
    if _get(h, "codec", str, where) not in C.CODEC_PRESETS:
        raise FormatError(f"{where}: unknown codec preset {h['codec'][:40]!r}")
    if h.get("config") is not None and not isinstance(h["config"], dict):
        raise FormatError(f"{where}: config must be an object or null")
    if h.get("warning") is not None and not isinstance(h["warning"], str):
        raise FormatError(f"{where}: warning must be a string or null")
    files = h.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise FormatError(f"{where}: files must be a list of names")
    seen: set[str] = set()
    for t in _get(h, "tensors", list, where):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"] or t["name"] in seen:
            raise FormatError(f"{where}: malformed or duplicate tensor entry")
        seen.add(t["name"])
        check_dtype(t.get("dtype"), f"{where}: tensor {t['name'][:80]!r}")
        t["shape"] = list(check_shape(t.get("shape"), f"{where}: tensor {t['name'][:80]!r}"))
        if t.get("where") not in ("core", "sphere"):
            raise FormatError(f"{where}: tensor {t['name'][:80]!r} has no valid 'where'")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in _get(h, "metadata", dict, where).items()):
        raise FormatError(f"{where}: metadata must map strings to strings")
    _check_fused(h, where)
    _check_quantization(h, where)
    if arch == C.ARCH_GENERIC:
        if any(t["where"] == "sphere" for t in h["tensors"]):
            raise FormatError(f"{where}: a generic package cannot hold sphere tensors")
        return h
    if not _ints(h.get("graticule"), 2):
        raise FormatError(f"{where}: graticule must be two integers")
    p, m = h["graticule"]
    d = _get(h, "depth", int, where)
    try:
        check_grid(p, m, d)
    except InputError as e:
        raise FormatError(f"{where}: {e}") from None
    layers = _get(h, "layers", list, where)
    ld = h.get("layer_depth")
    if not _ints(ld, len(layers)) or not all(0 <= x < d for x in ld):
        raise FormatError(f"{where}: layer_depth must give a shell 0..{d - 1} for each of {len(layers)} layers")
    nl = _get(h, "neuron_layout", dict, where)
    check_dtype(nl.get("dtype"), f"{where}: neuron_layout")
    if nl["dtype"] not in C.SPHERE_DTYPES:
        raise FormatError(f"{where}: neuron_layout dtype {nl['dtype']} cannot be on the sphere")
    fields = nl.get("fields")
    if not isinstance(fields, list) or not fields:
        raise FormatError(f"{where}: neuron_layout.fields malformed")
    for fd in fields:
        if not (isinstance(fd, dict) and isinstance(fd.get("name"), str) and _is_int(fd.get("width"))
                and _is_int(fd.get("axis")) and fd["width"] >= 0 and 0 <= fd["axis"] < C.MAX_NDIM
                and isinstance(fd.get("suffix", ""), str)):
            raise FormatError(f"{where}: neuron_layout field {str(fd)[:80]} malformed")
    names = [fd["name"] for fd in fields]
    if len(set(names)) != len(names) or nl.get("in_field") not in names or nl.get("out_field") not in names:
        raise FormatError(f"{where}: neuron_layout field names are duplicated or in/out fields unknown")
    if sum(fd["width"] for fd in fields) != nl.get("row_width") or not _is_int(nl.get("row_width")):
        raise FormatError(f"{where}: neuron_layout.row_width disagrees with its fields")
    tensors = {t["name"]: t for t in h["tensors"]}
    owned: set[str] = set()
    for i, layer in enumerate(layers):
        lt = layer.get("tensors") if isinstance(layer, dict) else None
        if not (isinstance(layer, dict) and _is_int(layer.get("neurons")) and layer["neurons"] >= 1
                and isinstance(lt, dict) and set(lt) == set(names) and all(isinstance(v, str) for v in lt.values())):
            raise FormatError(f"{where}: layer {i} entry malformed")
        for fd in fields:
            t = tensors.get(lt[fd["name"]])
            if t is None or t["where"] != "sphere" or t["name"] in owned or t["dtype"] != nl["dtype"]:
                raise FormatError(f"{where}: layer {i} field {fd['name']!r} names a missing, shared or mistyped tensor")
            owned.add(t["name"])
            shp = t["shape"]
            if fd["axis"] >= len(shp) or shp[fd["axis"]] != layer["neurons"] \
                    or math.prod(shp) != layer["neurons"] * fd["width"]:
                raise FormatError(f"{where}: layer {i} tensor {t['name'][:80]!r} shape {shp} disagrees with its field")
    if owned != {t["name"] for t in h["tensors"] if t["where"] == "sphere"}:
        raise FormatError(f"{where}: some sphere tensors belong to no layer")
    shells = _get(h, "shells", list, where)
    if len(shells) != d or not all(isinstance(s, dict) and _is_int(s.get("depth")) for s in shells) \
            or sorted(s["depth"] for s in shells) != list(range(d)):
        raise FormatError(f"{where}: shells must list depths 0..{d - 1} once each")
    for s in shells:
        want = [i for i, x in enumerate(ld) if x == s["depth"]]
        if s.get("layers") != want or not want or not _is_int(s.get("capacity")) or s["capacity"] < 1 \
                or s["capacity"] * p * m < max(layers[i]["neurons"] for i in want):
            raise FormatError(f"{where}: shell {s['depth']} disagrees with layer_depth or is too small")
    if h.get("placement") is not None and not isinstance(h["placement"], dict):
        raise FormatError(f"{where}: placement must be an object")
    if h.get("experts") is not None:
        _check_experts(h, tensors, p * m, where)
    _check_routing(h, len(layers), p * m, where)
    return h


def _check_routing(h: dict[str, Any], n_layers: int, cells: int, where: str) -> None:
    """``routing`` (section 7.3): per layer, the always-on cells, distinct flat ids in range."""
    r = h.get(C.ROUTING_KEY)
    if r is None:
        return
    on = r.get("always_on") if isinstance(r, dict) else None
    if not isinstance(on, list) or len(on) != n_layers or not all(
            isinstance(c, list) and len(c) < cells and all(_is_int(v) and 0 <= v < cells for v in c)
            and len(set(c)) == len(c) for c in on):
        raise FormatError(f"{where}: routing.always_on must list, for each of the {n_layers} layers, distinct cells "
                          f"0..{cells - 1} (not all of them)")
    if h.get("experts") is not None:
        raise FormatError(f"{where}: routing is for dense models; native experts route with the model's router")


def _check_quantization(h: dict[str, Any], where: str) -> None:
    """The ``quantization`` member (section 5.1): its type, and tensors that can hold blocks."""
    q = h.get(C.QUANTIZATION_KEY)
    if q is None:
        return
    types = q.get("types", {}) if isinstance(q, dict) else None
    if not isinstance(q, dict) or q.get("type") not in C.QUANT_TYPES or not isinstance(q.get("sphere"), bool) \
            or not isinstance(q.get("core"), list) or not all(isinstance(n, str) for n in q["core"]) \
            or len(set(q["core"])) != len(q["core"]) or not isinstance(types, dict) \
            or not all(t in C.QUANT_TYPES and n in q["core"] for n, t in types.items()) \
            or set(q) - {"type", "core", "sphere", "types"}:
        raise FormatError(f"{where}: quantization must be {{'type': one of {sorted(C.QUANT_TYPES)}, 'core': [names], "
                          "'sphere': bool, optionally 'types': {core name: type}}")
    tensors = {t["name"]: t for t in h["tensors"]}
    for name in q["core"]:
        t = tensors.get(name)
        block = C.QUANT_TYPES[str(types.get(name, q["type"]))][0]
        if t is None or t["where"] != "core" or t["dtype"] != "F32" or len(t["shape"]) != 2 \
                or t["shape"][1] % block:
            raise FormatError(f"{where}: quantized tensor {name[:80]!r} is not a core F32 matrix whose rows are "
                              f"whole blocks of {block}")
    if q["sphere"]:
        nl = h.get("neuron_layout")
        if h["architecture"] == C.ARCH_GENERIC or not isinstance(nl, dict) or nl.get("dtype") != "F32":
            raise FormatError(f"{where}: a quantized sphere needs an F32 neuron layout")


def _check_experts(h: dict[str, Any], tensors: Mapping[str, Any], cells: int, where: str) -> None:
    """``experts``: every layer is ``count`` experts of ``neurons`` (each fits one cell), and
    every sphere tensor is one joined entry whose ``count`` parts are not stored themselves."""
    ex = h["experts"]
    if not (isinstance(ex, dict) and _is_int(ex.get("count")) and _is_int(ex.get("neurons"))
            and ex["count"] >= 1 and ex["neurons"] >= 1 and isinstance(ex.get("tensors"), list)):
        raise FormatError(f"{where}: experts member malformed")
    if ex["count"] > cells:
        raise FormatError(f"{where}: {ex['count']} experts do not fit {cells} cells (one expert per cell)")
    for i, layer in enumerate(h["layers"]):
        if layer["neurons"] != ex["count"] * ex["neurons"]:
            raise FormatError(f"{where}: layer {i} has {layer['neurons']} neurons, not {ex['count']} experts of "
                              f"{ex['neurons']}")
    for s in h["shells"]:
        if s["capacity"] < ex["neurons"]:
            raise FormatError(f"{where}: shell {s['depth']} holds {s['capacity']} neurons per cell; an expert has "
                              f"{ex['neurons']}")
    covered: set[str] = set()
    parts_seen: set[str] = set()
    for j in ex["tensors"]:
        parts = j.get("parts") if isinstance(j, dict) else None
        if not (isinstance(j, dict) and isinstance(j.get("name"), str) and j["name"] in tensors
                and tensors[j["name"]]["where"] == "sphere" and j["name"] not in covered and j.get("axis") in (0, 1)
                and isinstance(parts, list)
                and (len(parts) == ex["count"] if j.get("stacked") is None
                     else j["stacked"] == ex["count"] and len(parts) == 1)
                and all(isinstance(q, str) and q and q not in tensors and q not in parts_seen for q in parts)
                and len(set(parts)) == len(parts)):
            raise FormatError(f"{where}: experts tensor entry {str(j)[:80]} malformed")
        covered.add(j["name"])
        parts_seen.update(parts)
    if covered != {t["name"] for t in h["tensors"] if t["where"] == "sphere"}:
        raise FormatError(f"{where}: experts member does not list every sphere tensor")


def _check_fused(h: dict[str, Any], where: str) -> None:
    """``fused``: each entry a new name and two or more stored tensors of one dtype whose shapes
    agree past axis 0, each part in one entry only."""
    fused = h.get("fused", [])
    tensors = {t["name"]: t for t in h["tensors"]}
    used: set[str] = set()
    if not isinstance(fused, list):
        raise FormatError(f"{where}: fused must be a list")
    for f in fused:
        parts = f.get("parts") if isinstance(f, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] and f["name"] not in tensors
                and f.get("axis") == 0 and isinstance(parts, list) and len(parts) >= 2
                and all(isinstance(p, str) and p in tensors and p not in used for p in parts)
                and len(set(parts)) == len(parts)):
            raise FormatError(f"{where}: fused entry {str(f)[:80]} malformed")
        shapes = [tensors[p]["shape"] for p in parts]
        if len({tensors[p]["dtype"] for p in parts}) != 1 or any(not s or s[1:] != shapes[0][1:] for s in shapes):
            raise FormatError(f"{where}: fused entry {f['name'][:80]!r}: its parts' dtypes or shapes disagree")
        used.update(parts)


def new_header(*, layout: Layout, grid: Grid | None, infos: Mapping[str, TensorInfo], config: dict[str, Any] | None,
               metadata: Mapping[str, str], files: list[str], codec: str,
               placement: dict[str, Any] | None = None, fused: list[dict[str, Any]] | None = None,
               joined: list[dict[str, Any]] | None = None) -> Header:
    """The header of a package being written (state ``writing`` until the conversion ends)."""
    ffn = layout.ffn_tensors()
    h = Header(
        version=C.FORMAT_VERSION, state=C.STATE_WRITING, architecture=layout.arch, config=config,
        metadata=dict(metadata), files=sorted(files), codec=codec,
        tensors=[TensorEntry(n, i.dtype, list(i.shape), "sphere" if n in ffn else "core") for n, i in infos.items()],
        warning=layout.warning, fused=list(fused or []))
    if grid is None:
        return h
    shells = layer_shells(len(layout.layers), grid.depth)
    h.graticule = (grid.parallels, grid.meridians)
    h.depth = grid.depth
    h.layer_depth = list(shells)
    per_cell = layout.experts or grid.cells  # native experts: one expert (all its neurons) per cell
    if layout.experts > grid.cells:
        raise InputError(f"graticule {grid.parallels}x{grid.meridians} has {grid.cells} cells for "
                         f"{layout.experts} experts (one expert per cell)")
    h.shells = [Shell(s, [lay for lay, sh in enumerate(shells) if sh == s],
                      math.ceil(max(n for n, sh in zip(layout.neurons, shells, strict=True) if sh == s) / per_cell))
                for s in range(grid.depth)]
    if layout.experts:
        h.experts = {"count": layout.experts, "neurons": layout.neurons[0] // layout.experts,
                     "tensors": [dict(j) for j in joined or []]}
    h.neuron_layout = NeuronLayout(layout.dtype, layout.row_width, list(layout.fields), layout.in_field,
                                   layout.out_field)
    h.layers = [LayerEntry(n, dict(t)) for n, t in zip(layout.neurons, layout.layers, strict=True)]
    h.placement = placement or {"policy": C.PLACEMENT_POLICY, "version": C.PLACEMENT_VERSION, "bend": C.DEFAULT_BEND}
    return h
