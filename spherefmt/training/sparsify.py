"""Make a dense model sparse on its sphere: ``sphere sparsify`` (``spec/FORMAT.md`` 7.3).

Training-free cell routing costs a dense GELU FFN too much (on the project's small model the
oracle over 32 cells at 25% active is +29% perplexity); what recovers it is training with the
routing in the forward pass (MoEfication's and LLaMA-MoE's recovery step).  The recipe:

1. **placement** (policy ``routed-balanced``): the package's dense model runs on the text; in
   each layer the neurons that move the FFN output most on average fill the always-on cells (the
   polar cap: flat cells ``0..n-1``), the others are grouped by their activation profiles
   (balanced k-means) into the remaining cells of a graticule of ``cells`` cells;
2. **fine-tuning with top-k routing in the loop**: every FFN computes, per token, the always-on
   cells and the other cells with the largest output norm ``||act_c @ W_out_c||`` (the oracle,
   from the current weights, no gradient through the choice) up to ``ceil(share * cells)``
   cells -- exactly the count and the rule the runtime's top-k uses -- at a share drawn in turn
   from ``shares`` (so that one model serves all of them, dense included); the loss is the
   language-model loss mixed (``distill``) with the KL divergence from the original dense
   model's next-token distribution (the teacher: what keeps the dense and the 50% model as good
   as the original); embeddings stay frozen; the checkpoint with the best mean held-back loss at
   ``active`` and dense is kept (Ctrl-C stops early and keeps it);
3. **router distillation** on the fine-tuned model (``router/learned``, always-on cells left out);
4. **write-back in place**: the new package is built in memory and only the objects whose bytes
   differ are written into the package, in one transaction (directories, ``.zip``, ``.vhd``,
   fsspec URLs); the header records every step (``placement``, ``routing``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import numpy as np

from spherefmt import constants as C
from spherefmt.dtypes import from_float32, to_float32
from spherefmt.errors import InputError
from spherefmt.format.package import Package
from spherefmt.format.package import open as open_package
from spherefmt.format.placement import PlacementPlan, always_on_cells, own_directions, routed_cells
from spherefmt.format.routers import k_for_share, write_router
from spherefmt.format.write import save
from spherefmt.interop.package import PackageSource
from spherefmt.training import require_torch

__all__ = ["DEFAULT_SHARES", "check", "grid_for_cells", "sparsify"]

#: the shares ``sphere sparsify`` trains for by default (one model serves each of them)
DEFAULT_SHARES = (0.125, 0.25, 0.5, 1.0)
DEFAULT_ACTIVE = 0.25
DEFAULT_CELLS = 128
DEFAULT_STEPS = 600
DEFAULT_ALWAYS_ON = 0.1
DEFAULT_DISTILL = 0.5
DEFAULT_LR = 1e-3
#: tokens of the text the placement profiles are measured on
PLACEMENT_TOKENS = 8192


def grid_for_cells(cells: int) -> tuple[int, int]:
    """The graticule ``(P, M)`` with ``P * M == cells`` closest to Earth's ``M = 2P``."""
    if isinstance(cells, bool) or not isinstance(cells, int) or not 2 <= cells <= C.MAX_PARALLELS * C.MAX_MERIDIANS:
        raise InputError(f"cells {cells!r}: expected a whole number of cells per layer, 2..{C.MAX_PARALLELS * C.MAX_MERIDIANS}")
    best = None
    for p in range(1, C.MAX_PARALLELS + 1):
        if cells % p == 0 and cells // p <= C.MAX_MERIDIANS:
            score = abs(math.log(cells / p / p / 2))
            if best is None or score < best[0]:
                best = (score, p)
    if best is None:
        raise InputError(f"cells {cells}: no graticule of at most {C.MAX_PARALLELS}x{C.MAX_MERIDIANS} has that many")
    return best[1], cells // best[1]


def _torch() -> Any:
    return require_torch("sphere sparsify")


class _Overlay(PackageSource):
    """The package as a conversion source, with the trained tensors in place of the stored ones."""

    def __init__(self, pkg: Package, trained: dict[str, np.ndarray]) -> None:  # noqa: D107 - no second open
        self.pkg, self.where, self.config = pkg, pkg.where, pkg.config
        self.metadata = dict(pkg.header.metadata)
        self.files = {n: pkg.file(n) for n in pkg.header.files}
        self.trained = trained

    def close(self) -> None:
        pass  # the package belongs to the caller

    def read(self, name: str) -> np.ndarray:
        return self.trained[name] if name in self.trained else super().read(name)


def _projections(model: Any, arch: str) -> list[Any]:
    """Each layer's FFN output projection (GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``)."""
    if arch == C.ARCH_GPT2:
        return [b.mlp.c_proj for b in model.transformer.h]
    return [b.mlp.down_proj for b in model.model.layers]


def _out_rows(module: Any) -> Any:
    """``(N, d)`` output rows of a projection's neurons: a ``Linear`` (Llama) stores ``(d, N)``,
    GPT-2's ``Conv1D`` ``(N, d)``."""
    return module.weight.T if isinstance(module, _torch().nn.Linear) else module.weight


class _Routing:
    """Top-k cell routing of every FFN of a ``transformers`` model, as forward pre-hooks on the
    output projections: the activations that reach the projection are multiplied by a 0/1 mask
    of the chosen cells' neurons."""

    def __init__(self, model: Any, arch: str, cells: dict[int, np.ndarray], n_cells: int, always_on: np.ndarray) -> None:
        torch = _torch()
        self.torch = torch
        self.share: float | None = None
        self.projs = _projections(model, arch)
        on = np.zeros(n_cells, dtype=bool)
        on[always_on] = True
        self.handles = []
        self.layers = []
        for layer, proj in enumerate(self.projs):
            cell = np.asarray(cells[layer], dtype=np.int64)
            n = len(cell)
            occupied = np.unique(cell)
            cap = int(np.bincount(cell, minlength=n_cells).max())
            # (occupied cells, capacity) table of neuron indices, padded with n (a zero column)
            table = np.full((len(occupied), cap), n, dtype=np.int64)
            for j, c in enumerate(occupied):
                members = np.flatnonzero(cell == c)
                table[j, : len(members)] = members
            self.layers.append({"table": torch.from_numpy(table), "pos": torch.from_numpy(np.searchsorted(occupied, cell)),
                                "on": torch.from_numpy(on[occupied]), "cells": len(occupied),
                                "always": int(on[occupied].sum())})
            self.handles.append(proj.register_forward_pre_hook(self._hook(layer)))

    def _hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...]) -> Any:
            if self.share is None:
                return None
            (h,) = args
            return (h * self.mask(layer, h, module).to(h.dtype),)

        return hook

    def mask(self, layer: int, h: Any, module: Any) -> Any:
        """``(..., N)`` 0/1 mask: per token the always-on cells and the largest-norm others."""
        torch, info = self.torch, self.layers[layer]
        k = k_for_share(float(self.share or 1.0), info["cells"], info["always"])
        if k >= info["cells"]:
            return torch.ones(h.shape[-1], dtype=h.dtype)
        with torch.no_grad():
            w = _out_rows(module).detach()
            wz = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])[info["table"]]  # (C, K, d)
            hz = torch.cat([h.detach(), torch.zeros(*h.shape[:-1], 1, dtype=h.dtype)], dim=-1)[..., info["table"]]
            norms = torch.linalg.vector_norm(torch.einsum("...ck,ckd->...cd", hz, wz), dim=-1)  # (..., C)
            norms = torch.where(info["on"], torch.full_like(norms, float("inf")), norms)
            top = torch.topk(norms, k, dim=-1).indices
            chosen = torch.zeros_like(norms).scatter_(-1, top, 1.0)
            return chosen[..., info["pos"]]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _windows(ids: np.ndarray, seq: int) -> np.ndarray:
    n = (len(ids) - 1) // seq
    return np.stack([ids[i * seq : i * seq + seq] for i in range(n)]) if n else np.zeros((0, seq), np.int64)


def _nll(model: Any, windows: np.ndarray, batch: int) -> float:
    torch = _torch()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            x = torch.from_numpy(windows[s : s + batch])
            out = model(x, labels=x)
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def _profiles(model: Any, arch: str, ids: np.ndarray, seq: int) -> list[np.ndarray]:
    """Per layer ``(tokens, N)``: ``|activation| * |out row|`` of every neuron on ``ids`` (dense)."""
    torch = _torch()
    projs = _projections(model, arch)
    got: dict[int, list[np.ndarray]] = {i: [] for i in range(len(projs))}

    def keep(layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            h = args[0].detach().reshape(-1, args[0].shape[-1])
            norm = torch.linalg.vector_norm(_out_rows(module).detach(), dim=1)
            got[layer].append((h.abs() * norm).numpy())

        return hook

    handles = [p.register_forward_pre_hook(keep(i)) for i, p in enumerate(projs)]
    try:
        windows = _windows(ids, seq)
        with torch.no_grad():
            for s in range(0, len(windows), 16):
                model(torch.from_numpy(windows[s : s + 16]))
    finally:
        for h in handles:
            h.remove()
    return [np.concatenate(got[i]) for i in sorted(got)]


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def sparsify(url: Any, ids: Sequence[int] | np.ndarray, *, active: float = DEFAULT_ACTIVE,
             shares: Sequence[float] = DEFAULT_SHARES, cells: int | None = DEFAULT_CELLS, steps: int = DEFAULT_STEPS,
             always_on: float = DEFAULT_ALWAYS_ON, batch: int = 8, seq: int = 128, lr: float = DEFAULT_LR,
             router_steps: int = 300, router_tokens: int = 20000, eval_every: int = 50,
             distill: float = DEFAULT_DISTILL, seed: int = 0, progress: bool = True,
             storage_options: dict[str, Any] | None = None,
             on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Sparsify the package at ``url`` in place on token ``ids`` (module docstring); returns what
    it did: ``losses`` (per step), ``val`` (``[step, nll at active, nll dense]``), ``best_step``,
    ``written``/``removed`` (object keys), ``unchanged`` (objects kept), ``seconds``.

    Raises
    ------
    InputError
        A package it cannot sparsify (no sphere, native experts, quantized, not GPT-2/Llama), or
        parameters out of range, or too little text.
    """
    torch = _torch()
    from spherefmt.interop.hf import build  # noqa: PLC0415 - needs torch and transformers
    from spherefmt.progress import progress_bar  # noqa: PLC0415

    t_start = time.perf_counter()
    shares = sorted({float(s) for s in shares})
    if not shares or not all(0 < s <= 1 for s in shares):
        raise InputError(f"shares {shares}: each must be in (0, 1]")
    if not 0 < active <= 1:
        raise InputError(f"active {active}: expected a share in (0, 1]")
    if active not in shares:
        shares = sorted({*shares, active})
    if not 0 <= always_on < min(shares):
        raise InputError(f"always-on share {always_on}: must be below the smallest share ({min(shares)})")
    if steps < 1:
        raise InputError("steps must be at least 1")
    if not 0 <= distill <= 1:
        raise InputError(f"distill {distill}: the weight of the dense teacher's loss, in [0, 1]")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    pkg = open_package(url, "r+", storage_options=storage_options)
    try:
        check(pkg)
        ctx = int((pkg.config or {}).get("n_positions") or (pkg.config or {}).get("max_position_embeddings") or 1024)
        seq = min(seq, ctx)
        if len(ids) < 8 * seq:
            raise InputError(f"sparsify needs at least {8 * seq} tokens of text, got {len(ids)}")
        # the last 5% (two to 64 windows) is held back to choose the checkpoint
        n_val = max(2 * seq + 1, min(len(ids) // 20, 64 * seq + 1))
        train_ids, val_ids = ids[:-n_val], ids[-n_val:]
        p, m = grid_for_cells(cells) if cells is not None else pkg.require_graticule()
        n_cells = p * m
        on = always_on_cells(p, m, always_on)
        n_max = max(pkg.layout.neurons)
        if n_cells > n_max:
            raise InputError(f"cells {n_cells}: more than the {n_max} neurons of a layer")
        model = build(pkg, dtype=torch.float32)
        model.eval()
        torch.manual_seed(seed)

        # 1. placement from activation profiles on the text
        prof = _profiles(model, pkg.architecture, train_ids[:PLACEMENT_TOKENS], seq)
        cells_of: dict[int, np.ndarray] = {}
        in_field = pkg.layout.in_field or pkg.layout.fields[0].name
        sl = pkg.layout.slices()
        for layer in range(len(pkg.layout.neurons)):
            rows = to_float32(pkg.layer_rows(layer), pkg.layout.dtype)
            shell = pkg.layer_depth[layer]
            cap = math.ceil(max(pkg.layout.neurons[la] for la in range(len(pkg.layout.neurons))
                                if pkg.layer_depth[la] == shell) / n_cells)
            cells_of[layer] = routed_cells(prof[layer], own_directions(rows[:, sl[in_field]]), p, m, cap, on, seed=seed)
        del prof

        # 2. fine-tuning with the routing in the forward pass, at a mix of shares
        # the dense model as it came, before any hook: the teacher of distillation
        teacher = None
        if distill > 0:
            teacher = copy.deepcopy(model).eval()
            for q in teacher.parameters():
                q.requires_grad_(False)
        routing = _Routing(model, pkg.architecture, cells_of, n_cells, on)
        frozen = ("wte.", "wpe.", "embed_tokens.")
        params = [q for name, q in model.named_parameters() if not any(f in name for f in frozen)]
        for name, q in model.named_parameters():
            q.requires_grad_(not any(f in name for f in frozen))
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
        val_w = _windows(val_ids, seq)
        rng = np.random.default_rng(seed)
        losses: list[float] = []
        val: list[list[float]] = []

        def evaluate(step: int) -> float:
            """Held-back loss at ``active`` and dense (their mean chooses the checkpoint: one
            package serves both)."""
            model.eval()
            routing.share = active
            v = _nll(model, val_w, 16)
            routing.share = 1.0
            d = _nll(model, val_w, 16)
            val.append([step, v, d])
            return (v + d) / 2

        best = (evaluate(0), 0, {k: t.detach().clone() for k, t in model.state_dict().items()})
        bar = progress_bar(steps, "sparsify", progress, unit="step")
        warm = max(1, steps // 20)
        stopped = False
        try:
            for step in range(steps):
                model.train()
                routing.share = shares[step % len(shares)]
                for g in opt.param_groups:  # warm-up, then cosine down to a tenth
                    g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
                starts = rng.integers(0, len(train_ids) - seq - 1, batch)
                x = torch.from_numpy(np.stack([train_ids[s : s + seq] for s in starts]))
                out = model(x, labels=x)
                loss = out.loss
                if teacher is not None:  # the original dense model's next-token distribution
                    with torch.no_grad():
                        t_logp = torch.log_softmax(teacher(x).logits[:, :-1].float(), dim=-1)
                    s_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
                    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
                    loss = (1 - distill) * loss + distill * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(step, losses[-1])
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    v = evaluate(step + 1)
                    if v < best[0]:
                        best = (v, step + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
                    bar.set_postfix(loss=f"{np.mean(losses[-eval_every:]):.3f}", held=f"{val[-1][1]:.3f}/{val[-1][2]:.3f}")
                bar.update(1)
        except KeyboardInterrupt:
            stopped = True  # keep the best checkpoint so far and write it
        bar.close()
        routing.remove()
        model.load_state_dict(best[2])
        model.eval()

        # the trained values, in the package's own tensor names and storage dtypes
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        trained = {}
        for name in pkg.keys():
            key = next((k for k in (name, "transformer." + name, "model." + name) if k in state), None)
            if key is None or any(f in name for f in frozen):
                continue
            value = state[key]
            if pkg.entry(name).where == "sphere":
                # build() pads grown layers to the common FFN size: keep the layer's own neurons
                owner = pkg.owner(name)
                if owner is not None:
                    axis = next(f.axis for f in pkg.layout.fields if f.name == owner[1])
                    value = np.take(value, np.arange(pkg.layout.neurons[owner[0]]), axis=axis)
            stored = from_float32(np.ascontiguousarray(value), pkg.tensor_info(name).dtype)
            if not np.array_equal(stored.view(np.uint8), np.ascontiguousarray(pkg.stored(name)).view(np.uint8)):
                trained[name] = stored
        record = {"policy": C.PLACEMENT_ROUTED, "version": 1, "sample_tokens": int(min(len(train_ids), PLACEMENT_TOKENS)),
                  "sample_sha256": _digest(train_ids[:PLACEMENT_TOKENS]), "always_on_share": always_on}
        plan = PlacementPlan(cells_of, record)
        routing_member = {
            "always_on": [[int(c) for c in on if (cells_of[la] == c).any()] for la in range(len(pkg.layout.neurons))],
            "trained": {"shares": shares, "active": active, "steps": len(losses), "best_step": best[1],
                        "stopped_early": stopped, "batch": batch, "seq": seq, "lr": lr, "distill": distill,
                        "always_on_share": always_on, "seed": seed,
                        "text_tokens": int(len(ids)), "text_sha256": _digest(ids),
                        "heldback_nll": {"active": round(next(v for st, v, _ in val if st == best[1]), 6),
                                         "dense": round(next(d for st, _, d in val if st == best[1]), 6)}}}
        result = _write_back(pkg, trained, plan, (p, m), routing_member, train_ids[:router_tokens], router_steps, seed,
                             progress)
    finally:
        pkg.close()
    result.update({"losses": losses, "val": val, "best_step": best[1], "stopped_early": stopped,
                   "graticule": [p, m], "always_on": len(on), "seconds": time.perf_counter() - t_start,
                   "tensors_trained": sorted(trained)})
    return result


def check(pkg: Package) -> None:
    """Refuse, with one line, a package that sparsify cannot train."""
    where = pkg.where
    if pkg.graticule is None:
        raise InputError(f"{where}: the package has no sphere (a generic package); nothing to route")
    if pkg.header.experts is not None:
        raise InputError(f"{where} holds native experts: they are routed by the model's own router already")
    if pkg.header.quantization is not None:
        raise InputError(f"{where} is quantized ({pkg.header.quantization['type']}): sparsify the float package it "
                         "was converted from, then quantize it (sphere convert --quantize)")
    if len(set(pkg.layout.neurons)) > 1:
        raise InputError(f"{where}: its layers hold different neuron counts (grown unevenly); sparsify re-places every "
                         "layer and needs them equal: grow every layer alike (sphere grow --neurons N) first")
    if pkg.architecture not in (C.ARCH_GPT2, C.ARCH_LLAMA):
        raise InputError(f"{where}: sparsify trains GPT-2 and Llama-family packages; this one is {pkg.architecture!r}")


def _write_back(pkg: Package, trained: dict[str, np.ndarray], plan: PlacementPlan, grid: tuple[int, int],
                routing_member: dict[str, Any], train_ids: np.ndarray, router_steps: int, seed: int,
                progress: bool) -> dict[str, Any]:
    """Build the sparsified package in memory, distil its router, then write into ``pkg`` only
    the objects whose bytes differ (and drop those it no longer has), in one transaction."""
    from spherefmt.training.routers import train_router  # noqa: PLC0415 - needs torch

    tmp = f"memory://spherefmt-sparsify-{uuid.uuid4().hex}"
    src = _Overlay(pkg, trained)
    try:
        save(src, tmp, graticule=grid, depth=pkg.depth, codec=pkg.header.codec, placement=plan)
    finally:
        src.close()
    try:
        new = open_package(tmp, "r+")
        try:
            with new.transaction():
                header = copy.deepcopy(new.header)
                header.routing = routing_member
                new.write_header(header)
            router = train_router(new, train_ids, steps=router_steps, seed=seed, progress=progress,
                                  always_on=routing_member["always_on"])
            write_router(new, "learned", router)
            result = pkg.replace_with(new)
        finally:
            new.close()
    finally:
        fsspec.filesystem("memory").rm(tmp.removeprefix("memory://"), recursive=True)
    return result
