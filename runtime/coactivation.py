"""Co-activation placement (``coactivation-balanced``, ``spec/FORMAT.md`` 7.1): neurons that are
active together on sample text share cells, which is what top-k routing needs.

The plan runs the model, so it is made here, above the format, and handed to
:func:`spherefmt.format.write.save` as a :class:`~spherefmt.format.placement.PlacementPlan`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np

from spherefmt import constants as C
from spherefmt.dtypes import to_float32
from spherefmt.errors import InputError
from spherefmt.format.package import open as open_package
from spherefmt.format.placement import PlacementPlan, coactivation_cells, own_directions
from spherefmt.format.write import save
from spherefmt.runtime.routing import ffn_activations
from spherefmt.runtime.session import ffn_inputs
from spherefmt.runtime.tokenizer import load_tokenizer

__all__ = ["coactivation_plan"]


def coactivation_plan(src: Any, *, sample: Any, config: Mapping[str, Any] | None = None,
                      graticule: str | tuple[int, int] | None = None, depth: int | None = None) -> PlacementPlan:
    """Cells per layer for ``coactivation-balanced``: the model is first placed by PCA in memory,
    run densely on the sample to get each layer's FFN inputs, and each layer's neurons clustered
    by their activation profiles."""
    if sample is None:
        raise InputError("coactivation placement needs sample text or token ids")
    tmp = save(src, f"memory://spherefmt-coact-{uuid.uuid4().hex}", config=config, graticule=graticule,
               depth=depth, codec=C.CODEC_NONE)
    pkg = open_package(tmp)
    try:
        if pkg.graticule is None:
            raise InputError(f"{pkg.where}: coactivation placement needs a GPT-2 or Llama model")
        if isinstance(sample, str):
            ids = np.asarray(load_tokenizer(pkg).encode(sample), dtype=np.int64)
        else:
            ids = np.asarray(sample, dtype=np.int64).reshape(-1)
        ids = ids[:8192]
        if len(ids) < 64:
            raise InputError(f"coactivation placement needs at least 64 sample tokens, got {len(ids)}")
        ctx = int((pkg.config or {}).get("n_positions") or (pkg.config or {}).get("max_position_embeddings") or 1024)
        xs = ffn_inputs(pkg, ids, min(ctx, 256))
        p, m = pkg.graticule
        sl = pkg.layout.slices()
        cells = {}
        for layer, x in enumerate(xs):
            rows = to_float32(pkg.layer_rows(layer), pkg.layout.dtype)
            act = ffn_activations(pkg.architecture, x, rows, sl)
            # a neuron's weight on a token: how much it moves the output, |activation| * |w_out row|
            act = np.abs(act) * np.linalg.norm(rows[:, sl[pkg.layout.out_field or pkg.layout.fields[-1].name]], axis=1)
            cap = pkg.slots(pkg.layer_depth[layer])
            cells[layer] = coactivation_cells(act, own_directions(rows[:, sl[pkg.layout.fields[0].name]]), p, m, cap)
        record = {"policy": C.PLACEMENT_COACTIVATION, "version": 1, "sample_tokens": len(ids),
                  "sample_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()}
        return PlacementPlan(cells, record)
    finally:
        pkg.close()
        fsspec.filesystem("memory").rm(tmp.removeprefix("memory://"), recursive=True)

