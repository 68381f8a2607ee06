"""Packages as trainable torch modules, and writing back only what changed.

    >>> import spherefmt.training.modules as st
    >>> m = st.load("model.sphere", trainable=[(0, 1, 2)])   # one expert trainable, the rest frozen
    >>> ...train m.model (a transformers model) as usual...
    >>> m.save_changes()                                     # rewrites expert (0, 1, 2) only
    >>> r = st.load("model.sphere", trainable="router")      # the stored router: r.router[layer](x)

The module is the Hugging Face ``transformers`` model of the package's architecture with the
package's weights (dense).  Training selected experts masks the gradients of every FFN neuron
outside them, so only their rows move; :meth:`SphereModule.save_changes` compares each expert and
core tensor with the package and rewrites exactly those that differ, in place (directory, ``.vhd``
and fsspec packages).  Values are cast back to the package's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spherefmt.dtypes import from_float32
from spherefmt.errors import ExpertNotFoundError, FormatError, InputError
from spherefmt.format.arch import rows_from_tensors
from spherefmt.format.package import Package
from spherefmt.format.package import open as open_package
from spherefmt.format.routers import Router, read_router, router_names, write_router
from spherefmt.interop.hf import build
from spherefmt.training import require_torch

__all__ = ["SphereModule", "load"]

#: a joined expert tensor of a native-MoE package (``spherefmt.interop.experts``)
_JOINED = re.compile(r"^(?P<pre>.*\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _torch() -> Any:
    return require_torch("spherefmt.training.modules")


class SphereModule:
    """A package's model as ``self.model`` (a ``transformers`` module), with bookkeeping to write
    trained values back into the package."""

    def __init__(self, pkg: Package, trainable: str | Sequence[tuple[int, int, int]] = "all",
                 router: str | None = None) -> None:
        _torch()
        self.pkg = pkg
        # float32 for training; padded: after uneven growth every layer gets the largest FFN
        # size, zero neurons filling (masked below, so they stay zero)
        model = build(pkg, dtype=_torch().float32)
        self.model = model.train()
        #: the package's router ``router/<name>`` as torch modules (``self.router[layer](x)`` gives
        #: the cell scores of FFN inputs ``x``), when asked for or when ``trainable="router"``
        self.router, self.router_name = None, router
        if trainable == "router" and router is None:
            names = router_names(pkg)
            if not names:
                raise InputError(f"{pkg.where} holds no router to train: sphere route-train makes one")
            self.router_name = "learned" if "learned" in names else names[0]
        if self.router_name is not None:
            self._router_meta = read_router(pkg, self.router_name)
            self.router = _router_modules(self._router_meta)
            self.router.requires_grad_(trainable in ("all", "router"))
        self._params = dict(self.model.named_parameters())
        self._ffn = set(pkg.layout.ffn_tensors())
        #: native experts: joined package tensor -> (stacked parameter, which projection); the
        #: model holds each layer's experts as ``mlp.experts.gate_up_proj`` ``(E, 2f, d)`` and
        #: ``mlp.experts.down_proj`` ``(E, d, f)`` (transformers 5), the package one joined
        #: tensor per projection (``spec/FORMAT.md`` 9.0.1)
        self._stacked: dict[str, tuple[str, str]] = {}
        self._expert_count = 0 if pkg.header.experts is None else int(pkg.header.experts["count"])
        if pkg.header.experts is not None:
            for n in self._ffn:
                m = _JOINED.match(n)
                if m is None:
                    raise FormatError(f"{pkg.where}: {n!r} is not a joined expert tensor")
                proj = m["proj"]
                self._stacked[n] = (self._module_name(f"{m['pre']}mlp.experts."
                                                      + ("down_proj" if proj == "down_proj" else "gate_up_proj")), proj)
        self._ffn_params = ({p for p, _ in self._stacked.values()} if self._stacked
                            else {self._module_name(n) for n in self._ffn})
        self._trainable = trainable
        self._experts = self._select(trainable)
        self._apply_trainable(trainable)
        # what the package holds now, as digests: save_changes compares against these
        self._baseline, _ = self._state(None)
        self._router_digest = self._router_state()

    def _router_state(self) -> bytes | None:
        import hashlib

        if self.router is None:
            return None
        h = hashlib.blake2b(digest_size=16)
        for name, p in sorted(self.router.named_parameters()):
            h.update(name.encode() + p.detach().cpu().numpy().tobytes())
        return h.digest()

    # --- what trains --------------------------------------------------------------------------
    def _select(self, trainable: Any) -> list[tuple[int, int, int]] | None:
        if isinstance(trainable, str):
            if trainable not in ("all", "experts", "core", "router", "none"):
                raise InputError(f"trainable {trainable!r}: all, experts, core, router, none, or a list of "
                                 "(lat, lon, depth)")
            return None
        experts: list[tuple[int, int, int]] = []
        for e in trainable:
            try:
                lat, lon, depth = (int(v) for v in e)
            except (TypeError, ValueError):
                raise InputError(f"trainable expert {e!r}: expected (lat, lon, depth)") from None
            self.pkg.check_address(lat, lon, depth)
            experts.append((lat, lon, depth))
        return experts

    def _apply_trainable(self, trainable: Any) -> None:
        torch = _torch()
        for name, p in self._params.items():
            is_ffn = name in self._ffn_params
            if trainable == "all":
                p.requires_grad_(True)
            elif trainable == "experts":
                p.requires_grad_(is_ffn)
            elif trainable == "core":
                p.requires_grad_(not is_ffn)
            elif trainable in ("none", "router"):
                p.requires_grad_(False)
            else:
                p.requires_grad_(is_ffn)
        size = self.pkg.ffn_size() or 0
        padded = any(n != size for n in self.pkg.layout.neurons)
        if self._experts is None and not padded:
            return
        # per FFN tensor, a 0/1 mask over the neuron axis: only the chosen experts' neurons learn,
        # and the zero neurons that pad a grown layer to the common size never do
        keep: dict[int, np.ndarray] = {}
        for layer, n in enumerate(self.pkg.layout.neurons):
            keep[layer] = np.zeros(size, dtype=bool)
            if self._experts is None:
                keep[layer][:n] = True
        for lat, lon, depth in self._experts or []:
            _, index, _ = self.pkg.shell_arrays(depth)
            for t, layer in enumerate(self.pkg.shell_layers(depth)):
                idx = index[t, lat, lon]
                keep[layer][idx[idx >= 0]] = True
        if self._stacked:  # per expert and neuron: gate_up (E, 2f, d) and down (E, d, f)
            e = self._expert_count
            for layer, tensors in enumerate(self.pkg.layout.layers):
                k = torch.from_numpy(keep[layer]).reshape(e, -1).to(torch.float32)
                for f in self.pkg.layout.fields:
                    pname, proj = self._stacked[tensors[f.name]]
                    p = self._params[pname]
                    if not p.requires_grad or proj == "up_proj":  # gate_up is masked once, via gate
                        continue
                    m = torch.cat([k, k], dim=1)[:, :, None] if proj == "gate_proj" else k[:, None, :]
                    p.register_hook(lambda g, m=m: g * m.to(g.dtype))
            return
        for layer, tensors in enumerate(self.pkg.layout.layers):
            mask = torch.from_numpy(keep[layer])
            for f in self.pkg.layout.fields:
                p = self._params[self._module_name(tensors[f.name])]
                if not p.requires_grad:
                    continue
                shape = [1] * p.dim()
                shape[f.axis] = -1
                m = mask.reshape(shape).to(p.dtype)
                p.register_hook(lambda g, m=m: g * m)

    def _module_name(self, source: str) -> str:
        if source in self._params:
            return source
        if ".block_sparse_moe." in source:  # Mixtral's router: mlp.gate in transformers 5
            return self._module_name(source.replace(".block_sparse_moe.", ".mlp."))
        for prefix in ("transformer.", "model."):  # packages from bare state dicts
            if prefix + source in self._params:
                return prefix + source
        raise FormatError(f"{self.pkg.where}: no parameter for tensor {source!r}")

    def parameter_for(self, source: str) -> Any:
        """The model's parameter that holds the package's tensor ``source`` (a name of the
        package's layout, such as a layer's ``w_in``): the one training changes and
        :meth:`save_changes` writes back.

        Raises
        ------
        FormatError
            When the model has no such parameter.
        """
        return self._params[self._module_name(source)]

    def parameters(self) -> Iterable[Any]:
        """The trainable parameters (for an optimiser)."""
        own = list(self.router.parameters()) if self.router is not None else []
        return [p for p in [*self.model.parameters(), *own] if p.requires_grad]

    # --- writing back -------------------------------------------------------------------------
    def _state(self, baseline: dict[Any, bytes] | None) -> tuple[dict[Any, bytes], dict[Any, np.ndarray]]:
        """Digests of every core tensor and every expert as they would be stored now, and the
        arrays of those that differ from ``baseline``."""
        import hashlib

        pkg, layout = self.pkg, self.pkg.layout
        digests: dict[Any, bytes] = dict(baseline or {})
        changed: dict[Any, np.ndarray] = {}
        current: dict[str, np.ndarray] = {}
        # only trainable values can have moved since the baseline (frozen ones have no gradient);
        # with selected experts, only those experts
        check_all = baseline is None
        ffn_live = check_all or any(self._params[p].requires_grad for p in self._ffn_params)
        experts = None if check_all or self._experts is None else set(self._experts)
        layers_needed = set(range(len(layout.layers))) if experts is None else \
            {la for (_, _, d) in experts for la in pkg.shell_layers(d)}
        for name in pkg.keys():
            try:
                p = self._params[self._stacked[name][0] if name in self._stacked else self._module_name(name)]
            except FormatError:
                continue  # e.g. a tied lm_head the package does not store
            if not check_all and not p.requires_grad:
                continue
            if name in self._ffn and (not ffn_live or _owner(pkg, name)[0] not in layers_needed):
                continue
            value = self._joined(name, p) if name in self._stacked else p.detach().cpu().float().numpy()
            if name in self._ffn:  # drop the zero neurons that pad a grown layer
                layer, field = _owner(pkg, name)
                axis = next(f.axis for f in layout.fields if f.name == field)
                value = np.take(value, np.arange(layout.neurons[layer]), axis=axis)
            current[name] = from_float32(value, pkg.tensor_info(name).dtype)
            if name not in self._ffn:
                digests[name] = hashlib.blake2b(current[name].tobytes(), digest_size=16).digest()
                if baseline is not None and baseline.get(name) != digests[name]:
                    changed[name] = current[name]
        if not ffn_live:
            return digests, changed
        rows = {layer: rows_from_tensors(layout, {n: current[n] for n in layout.layers[layer].values()}, layer)
                for layer in sorted(layers_needed)}
        p_, m_ = pkg.require_graticule()
        for depth in range(pkg.depth):
            arr, index, _ = pkg.shell_arrays(depth)
            layers = pkg.shell_layers(depth)
            if not set(layers) <= layers_needed:
                continue
            for lat in range(p_):
                for lon in range(m_):
                    if experts is not None and (lat, lon, depth) not in experts:
                        continue
                    idx = index[:, lat, lon]
                    if not (idx >= 0).any():
                        continue
                    new = np.zeros((len(layers), pkg.slots(depth), arr.shape[4]), dtype=arr.dtype)
                    for t, layer in enumerate(layers):
                        real = idx[t] >= 0
                        new[t, real] = rows[layer][idx[t][real]]
                    key = (lat, lon, depth)
                    digests[key] = hashlib.blake2b(new.tobytes(), digest_size=16).digest()
                    if baseline is not None and baseline.get(key) != digests[key]:
                        changed[key] = new
        return digests, changed

    def _joined(self, name: str, p: Any) -> np.ndarray:
        """A joined expert tensor's values (package layout, float32) from the stacked parameter."""
        e = self._expert_count
        v = p.detach().cpu().float()
        proj = self._stacked[name][1]
        if proj == "down_proj":  # (E, d, f) -> (d, E * f)
            return v.permute(1, 0, 2).reshape(v.shape[1], -1).numpy()
        f = v.shape[1] // 2
        part = v[:, :f] if proj == "gate_proj" else v[:, f:]
        return part.reshape(e * f, v.shape[2]).numpy()

    def save_changes(self) -> dict[str, Any]:
        """Write back every expert and core tensor whose values changed since loading (or since
        the last save); returns what was written.  Nothing is read back from the package: the
        comparison is against digests taken when the values were loaded, for the trainable
        values (frozen parameters and unselected experts cannot have changed by training; edits
        to them are not saved)."""
        pkg = self.pkg
        if pkg.mode != "r+":
            raise InputError(f"{pkg.where} is open read-only: load it with mode='r+' to save changes")
        digests, changed = self._state(self._baseline)
        with pkg.transaction():  # everything below commits at once, or none of it
            written: dict[str, Any] = {"experts": [], "tensors": [], "bytes": 0}
            for key, data in changed.items():
                if isinstance(key, str):
                    pkg.write_tensor(key, data)
                    written["tensors"].append(key)
                else:
                    lat, lon, depth = key
                    pkg.write_expert(lat, lon, depth, data)
                    written["experts"].append(key)
                written["bytes"] += data.nbytes
            written["router"] = None
            now = self._router_state() if self.router is not None else None
            # router_name is set whenever router is: its test narrows the type, it changes nothing
            if self.router is not None and self.router_name is not None and now != self._router_digest:
                layers = [{k: p.detach().cpu().numpy().astype(np.float32) for k, p in lay.named_parameters()}
                          for lay in self.router]
                old = self._router_meta
                write_router(pkg, self.router_name, Router(old.kind, layers, old.cells, meta=old.meta))
                written["router"] = self.router_name
                written["bytes"] += sum(a.nbytes for lay in layers for a in lay.values())
        # only once committed do the written values become the baseline of the next save
        self._baseline = digests
        if written["router"] is not None:
            self._router_digest = now
        return written


def _owner(pkg: Package, name: str) -> tuple[int, str]:
    """``(layer, field)`` of an FFN tensor (the caller knows it is one)."""
    owner = pkg.owner(name)
    if owner is None:
        raise FormatError(f"{pkg.where}: {name!r} is not an FFN tensor")
    return owner


def _router_modules(router: Any) -> Any:
    """A stored router as a ``ModuleList`` of per-layer scorers (``relu(x w1 + b1) w2 + b2``)."""
    torch = _torch()
    module: Any = torch.nn.Module  # torch is imported lazily, so mypy cannot name the base class

    class RouterLayer(module):
        def __init__(self, arrays: dict[str, np.ndarray]) -> None:
            super().__init__()
            for key in ("w1", "b1", "w2", "b2"):
                if key in arrays:
                    self.register_parameter(key, torch.nn.Parameter(torch.from_numpy(np.array(arrays[key], np.float32))))

        def forward(self, x: Any) -> Any:
            h = torch.relu(x @ self.w1 + self.b1) if hasattr(self, "w1") else x
            return h @ self.w2 + self.b2

    return torch.nn.ModuleList(RouterLayer(a) for a in router.layers)


def load(pkg: str | Path | Package, trainable: str | Sequence[tuple[int, int, int]] = "all",
         mode: str = "r+", router: str | None = None) -> SphereModule:
    """A package as a trainable module (opened ``r+`` so that :meth:`SphereModule.save_changes`
    can write back).

    Parameters
    ----------
    trainable
        ``"all"``, ``"experts"`` (every FFN neuron), ``"core"`` (everything else), ``"router"``
        (only the stored router), ``"none"``, or a list of experts ``(lat, lon, depth)``.
    router
        Load the stored router of this name as ``.router`` (default with ``trainable="router"``:
        ``learned``); ``save_changes`` writes it back when it changed.
    """
    if not isinstance(pkg, Package):
        pkg = open_package(pkg, mode)
    if pkg.graticule is None:
        raise ExpertNotFoundError(f"{pkg.where}: the package has no sphere")
    if pkg.header.quantization is not None and trainable != "router" and trainable != "none":
        # gradients of quantized blocks are not defined: train the float weights, quantize afterwards
        raise InputError(f"{pkg.where} is quantized ({pkg.header.quantization['type']}): train the float package it was converted from, "
                         "then quantize it again (its router trains: trainable='router')")
    return SphereModule(pkg, trainable, router)
