"""Router training: distil a ``learned`` router from the package's own dense FFN (torch)."""

from __future__ import annotations

import hashlib
from typing import cast

import numpy as np

from spherefmt.format.package import Package
from spherefmt.format.routers import Router
from spherefmt.progress import progress_bar
from spherefmt.runtime.loader import BlockLoader
from spherefmt.runtime.routing import cell_targets
from spherefmt.runtime.session import ffn_inputs

__all__ = ["train_router"]


def train_router(pkg: Package, ids: np.ndarray, *, steps: int = 300, hidden: int = 128, seed: int = 0,
                 progress: bool = True, always_on: list[list[int]] | None = None) -> Router:
    """Distil a ``learned`` router from the package's own dense FFN on token ``ids``.

    ``always_on`` (per layer, flat cells; default the package's ``routing.always_on``): cells every
    token computes anyway, left out of the target so the router spends itself on the others."""
    import torch  # noqa: PLC0415 - torch is an optional extra

    loader = BlockLoader(pkg, {}, {})
    ctx = int((pkg.config or {}).get("n_positions") or (pkg.config or {}).get("max_position_embeddings") or 1024)
    xs = ffn_inputs(pkg, ids, min(ctx, 256))
    p, m = pkg.require_graticule()
    if always_on is None:
        always_on = (pkg.header.routing or {}).get("always_on") or [[] for _ in xs]
    torch.manual_seed(seed)
    layers = []
    bar = progress_bar(steps * len(xs), "route-train", progress, unit="step")
    quality = []
    for layer, x in enumerate(xs):
        t, q = cell_targets(pkg, loader, layer, x)
        quality.append(q)
        occupied = t.sum(axis=0) > 0
        t[:, list(always_on[layer])] = 0.0
        occupied[list(always_on[layer])] = False
        target = torch.from_numpy(t / np.maximum(t.sum(axis=1, keepdims=True), 1e-12))
        xt = torch.from_numpy(x)
        mu, sd = xt.mean(0), xt.std(0) + 1e-6  # folded into w1/b1 afterwards
        d = x.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, p * m))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        mask = torch.from_numpy(np.where(occupied, 0.0, -1e9).astype(np.float32))
        gen = torch.Generator().manual_seed(seed + layer)
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (min(512, len(xt)),), generator=gen)
            logits = net((xt[idx] - mu) / sd) + mask
            loss = -(target[idx] * torch.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
        first, last = cast(torch.nn.Linear, net[0]), cast(torch.nn.Linear, net[2])
        with torch.no_grad():
            w1 = (first.weight / sd).T.contiguous()
            b1 = first.bias - (first.weight * (mu / sd)).sum(1)
            b2 = last.bias + mask
        layers.append({"w1": w1.numpy(), "b1": b1.numpy(), "w2": last.weight.T.contiguous().detach().numpy(),
                       "b2": b2.numpy()})
    bar.close()
    same = float(np.mean([q["same_cell"] for q in quality]))
    rand = float(np.mean([q["random_balanced"] for q in quality]))
    meta = {"trained_tokens": int(len(ids)), "steps": steps,
            "sample_sha256": hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest(),
            "placement_quality": {"co_active_pairs_same_cell": same, "random_balanced_placement": rand,
                                  "lift": same / rand if rand else None,
                                  "per_layer": [round(q["same_cell"], 5) for q in quality]}}
    return Router("learned", layers, p * m, meta=meta)
