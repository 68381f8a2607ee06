"""``Session``: streaming inference over a package under a device memory budget.

    >>> from spherefmt.runtime import Session
    >>> with Session("gpt2.sphere", backend="numpy", budget="25%", top_k=None) as s:
    ...     ids = s.generate("The sphere", max_new_tokens=20)
    ...     print(s.decode(ids), s.stats()["tokens_per_s"])

The budget bounds every byte the backend holds for this session: resident blocks (core weights
and experts), the KV cache and activations.  It is split up front into the KV cache for the
run's context, a scratch bound for one prefill chunk, and the block cache; a budget that cannot
hold two of the largest block plus those is refused with the minimum that would work.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from spherefmt.backends import get_backend
from spherefmt.errors import BudgetExceededError, InputError
from spherefmt.format.package import Package
from spherefmt.format.package import open as open_package
from spherefmt.format.routers import Router, always_on, k_for_share, read_router, router_names
from spherefmt.heap import reusing_heap
from spherefmt.runtime.cache import WeightCache
from spherefmt.runtime.loader import Key
from spherefmt.runtime.models import Model, build
from spherefmt.runtime.routing import centroid_router
from spherefmt.runtime.tokenizer import load_tokenizer
from spherefmt.units import format_size, parse_size

__all__ = ["Session", "ffn_inputs", "parse_budget"]

_UNLIMITED = 1 << 62
#: prefill tokens per forward chunk by default: bounds attention scratch.  A fixed size (not one
#: derived from the budget) keeps logits bit-identical across budgets; only a budget too small
#: for it makes chunks smaller (``stats()["prefill_chunk"]`` shows the size used).
DEFAULT_CHUNK = 32


def parse_budget(budget: int | str | None, weight_bytes: int) -> int | None:
    """``None``/``"none"`` (unlimited), bytes, ``"512MiB"`` or a share of the weights ``"25%"``."""
    if budget is None or (isinstance(budget, str) and budget.strip().lower() in ("", "none", "unlimited")):
        return None
    if isinstance(budget, bool) or (isinstance(budget, (int, float)) and budget <= 0):
        raise InputError(f"budget {budget!r}: expected a positive size")
    if isinstance(budget, (int, float)):
        return int(budget)
    text = str(budget).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise InputError(f"budget {budget!r}: expected a size (512MiB) or a share of the weights (25%)") from None
        if not 0 < share <= 1000:
            raise InputError(f"budget {budget!r}: the share must be above 0%")
        return int(weight_bytes * share / 100)
    try:
        return parse_size(text)
    except InputError:
        raise InputError(f"budget {budget!r}: expected a size (512MiB, 2G) or a share of the weights (25%)") from None


class _Router:
    """Per token and layer, the ``k`` best-scoring occupied cells under a router (see
    :mod:`spherefmt.format.routers`), or ``k`` random ones (the baseline any router must beat)."""

    def __init__(self, model: Model, k_of: Sequence[int], router: Any, seed: int = 0) -> None:
        self.k_of = list(k_of)
        self.router = router
        self.rng = np.random.default_rng(seed)
        m = model.pkg.require_graticule()[1]
        self.cells = [model.loader.cells(i) for i in range(model.n_layers)]
        self.flat = [np.array([lat * m + lon for lat, lon in cells], dtype=np.int64) for cells in self.cells]
        self.name = "random" if router == "random" else router.kind
        #: per layer, which of its cells every token computes (the package's ``routing.always_on``,
        #: spec/FORMAT.md 7.3): the rule ``sphere sparsify`` trained with
        on = always_on(model.pkg)
        self.on = [np.isin(f, on[i]) for i, f in enumerate(self.flat)]

    def pick(self, layer: int, m_host: np.ndarray) -> np.ndarray:
        """``(T, cells)`` boolean selection for one layer (cells in ``self.cells[layer]`` order)."""
        n = len(self.cells[layer])
        if self.router == "random":
            scores = self.rng.standard_normal((m_host.shape[0], n))
        else:
            scores = self.router.scores(layer, m_host)[:, self.flat[layer]]
        k = min(self.k_of[layer], n)
        sel = np.zeros(scores.shape, dtype=bool)
        if k >= n:
            sel[:] = True
            return sel
        scores = np.where(self.on[layer], np.inf, scores)  # always-on cells first, then the best others
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.put_along_axis(sel, top, True, axis=1)
        return sel

    def host_bytes(self) -> int:
        return 0 if self.router == "random" else self.router.nbytes()


class Session:
    """Streaming inference over one package.

    Parameters
    ----------
    pkg
        A package path/URL (directory, ``.zip``, ``.vhd``, fsspec URL) or an open :class:`Package`.
    backend
        Backend name (``numpy``, ``torch``, ``torch:cuda:1``, ...) or instance; default from
        ``$SPHEREFMT_BACKEND`` or the first that starts.
    budget
        Device bytes for everything this session holds: ``None`` (unlimited), an int, ``"512MiB"``,
        or ``"25%"`` of the model's float32 weight bytes.
    top_k
        Cells per token and layer (``None``: dense, every cell, the exact model).
    active
        Alternatively the share of each layer's cells per token (``0.25`` or ``"25%"``).
    router
        For top-k: a stored router's name, ``"centroid"``, ``"random"`` or a
        :class:`~spherefmt.format.routers.Router`; default the stored ``learned`` one, else centroid.
    prefetch
        Load the next layer's likely blocks in background threads while this one computes.
        ``None`` (default): on when the backend computes on a GPU, on a CPU with at least 4
        cores, or when the package is compressed (decoding the next blocks overlaps compute); for
        an uncompressed package on 2 cores the loader threads and the CPU forward pass compete for
        the same cores and memory bandwidth, which measured slower (``bench/bench_decode.py``).
    chunk
        Prefill tokens per forward chunk (see :data:`DEFAULT_CHUNK`).
    fused_ffn
        Dense runs: compute each layer's FFN from one block holding all its cells (a few large
        products) rather than cell by cell.  ``None`` (default): when the budget holds every
        weight (nothing streams).  The two sum the neurons in different orders, so their logits
        differ in the last bits (about 1e-7 relative); runs with the same setting are
        bit-identical at any budget.
    weights
        How the device holds weight matrices stored as float16, bfloat16, ``Q8_0`` or ``Q4_K``:
        ``"stored"`` as stored (the fewest bytes held and moved: more of them fit a budget),
        ``"float32"`` widened once when loaded, ``"auto"`` (default) as stored on backends whose
        products read them at full speed (GPUs), else widened unless only the stored blocks fit
        the budget.  The logits are the same either way (every stored value widens exactly).
    """

    def __init__(self, pkg: str | Path | Package, backend: Any = None, budget: int | str | None = None,
                 top_k: int | None = None, active: float | str | None = None, prefetch: bool | None = None,
                 chunk: int = DEFAULT_CHUNK, router: Any = None, fused_ffn: bool | None = None,
                 weights: str = "auto") -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"chunk {chunk!r}: expected a positive number of tokens")
        self.chunk = chunk
        self._own = not isinstance(pkg, Package)
        self.pkg: Package = pkg if isinstance(pkg, Package) else open_package(pkg)
        self._exit = ExitStack()
        try:
            self._init(backend, budget, top_k, active, prefetch, router, fused_ffn, weights)
        except BaseException:
            self._exit.close()
            if self._own:
                self.pkg.close()
            raise

    def _init(self, backend: Any, budget: Any, top_k: int | None, active: Any, prefetch: bool | None,
              router: Any, fused_ffn: bool | None = None, weights: str = "auto") -> None:
        self.backend = get_backend(backend)
        self.model = build(self.pkg)
        m = self.model
        held = frozenset(self.backend.weight_formats)
        fast = held & frozenset(self.backend.fast_formats or held)
        m.loader.keep = held
        #: bytes of every weight as stored (``--budget N%`` is a share of these)
        self.stored_bytes = sum(m.loader.nbytes(k) for k in m.all_blocks())
        self.budget = parse_budget(budget, self.stored_bytes)
        if weights == "float32":
            m.loader.keep = frozenset({"F32"})
        elif weights == "auto":
            # a backend whose products read stored formats at full speed (GPUs) holds them so; a
            # CPU backend widens each piece before its product (2-8x the time of float32), which
            # costs more than the reads the smaller blocks save from a local package
            # (bench/bench_precision.py), so it widens once at load unless only the stored
            # blocks fit the budget.  numpy's block kernels read Q8_0/Q4_K in place about as fast
            # as float32 BLAS reads float32 (a quarter to an eighth of the bytes): held as stored
            m.loader.keep = fast
            if self.budget is not None and fast != held:
                least = max(m.loader.nbytes(k) for k in m.all_blocks())
                small = max(m.loader.nbytes(("mlp", i)) for i in range(m.n_layers))
                if self.budget < 2 * least + small + self._kv_bytes(1) + m.scratch_bytes(1, 1):  # minimum_budget(1)
                    m.loader.keep = held
        elif weights != "stored":
            raise InputError(f"weights {weights!r}: expected 'auto', 'stored' or 'float32'")
        #: bytes of every weight as this session holds them on the device
        self.weight_bytes = sum(m.loader.nbytes(k) for k in m.all_blocks())
        #: the largest block cell by cell (what the smallest budget must hold), and in this plan
        self.least_block = self.max_block = max(m.loader.nbytes(k) for k in m.all_blocks())
        self.small_block = max(m.loader.nbytes(("mlp", i)) for i in range(m.n_layers))
        cells = [len(m.loader.cells(i)) for i in range(m.n_layers)]
        if top_k is not None and active is not None:
            raise InputError("give top_k or active, not both")
        self.active_share: dict[str, float] | None = None
        self.share_warning: str | None = None
        native = bool(getattr(m, "native_moe", False))
        #: native experts: ``(experts, top_k, renormalised)`` of the model's own router
        self._moe: tuple[int, int, bool] | None = getattr(m, "spec").moe if native else None  # noqa: B009
        if native and (top_k is not None or active is not None):
            e, k, _ = getattr(m, "spec").moe  # noqa: B009 - only the Llama family has native experts
            raise InputError(f"{self.pkg.where} holds native experts and routes with the model's own router (top {k} "
                             f"of {e} per layer); top_k/active choose cells of dense models")
        if active is not None:
            share = float(str(active).rstrip("%")) / (100 if str(active).endswith("%") else 1)
            if not 0 < share <= 1:
                raise InputError(f"active {active!r}: expected a share of the cells in (0, 1] or (0%, 100%]")
            on = always_on(self.pkg)
            k_of = [k_for_share(share, c, len(on[i])) for i, c in enumerate(cells)]
            used = sum(k_of) / sum(cells)
            #: the share asked for and the share the package's cells give (never a silent share)
            self.active_share = {"requested": share, "used": used}
            if abs(used - share) > 0.005:
                per = sorted({(k, c) for k, c in zip(k_of, cells, strict=True)})
                self.share_warning = (
                    f"active {share:.4g}: {', '.join(f'{k} of {c}' for k, c in per)} cells per layer, so "
                    f"{used:.1%} of the FFN is computed (the graticule has too few cells for {share:.4g}; "
                    "sphere sparsify --cells N places the model on more)")
                warnings.warn(self.share_warning, stacklevel=3)
        elif top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise InputError(f"top_k {top_k!r}: expected a positive number of cells")
            k_of = [min(top_k, c) for c in cells]
        else:
            k_of = None
        self.top_k = k_of
        dense = not native and (k_of is None or all(k >= c for k, c in zip(k_of, cells, strict=True)))
        if native and fused_ffn:
            raise InputError("native experts are weighted one by one by the model's router: fused_ffn cannot be set")
        if dense and fused_ffn is not False:
            # one block per layer's FFN (see Model.fused_ffn), only when every weight stays
            # resident: joining a layer's cells costs a copy of them, which a run that streams
            # would pay on every load (bench/bench_decode.py: 25% budget, codec none, 13.4 tokens/s
            # cell by cell against 7.9 joined); with room for a whole default chunk over a few
            # chunks of context beside them, so that prefill chunks stay the same
            m.fused_ffn = True
            fused_max = max(m.loader.nbytes(k) for k in m.all_blocks())
            ctx = min(m.context, 4 * DEFAULT_CHUNK)
            resident = (self.weight_bytes + self.small_block + self._kv_bytes(ctx)
                        + m.scratch_bytes(min(self.chunk, ctx), ctx))
            if self.budget is not None and self.budget < resident:
                if fused_ffn:
                    raise BudgetExceededError(
                        f"budget {format_size(self.budget)} cannot hold every weight with whole-layer FFN blocks of "
                        f"{format_size(fused_max)}; leave fused_ffn unset to stream cell by cell")
                m.fused_ffn = False
            else:
                self.max_block = fused_max
        need = self.minimum_budget(1)
        if self.budget is not None and self.budget < need:
            raise BudgetExceededError(
                f"budget {format_size(self.budget)} is too small to run {self.pkg.where}: at least "
                f"{format_size(need)} ({need} bytes) is needed (two {format_size(self.least_block)} blocks in "
                f"flight plus KV cache and scratch for one token); the weights are {format_size(self.weight_bytes)}")
        if prefetch is None:
            import os

            # compressed packages too: decoding the next blocks overlaps compute even on 2 cores
            # (bench/bench_decode.py: 25% budget, default codec 2.8 -> 3.9 tokens/s; codec none
            # is faster without, 10.8 against 8.3)
            prefetch = (self.backend.describe().get("device") != "cpu" or (os.cpu_count() or 1) >= 4
                        or self.pkg.header.codec != "none")
        self.router = None
        if k_of is not None and any(k < c for k, c in zip(k_of, cells, strict=True)):
            self.router = _Router(m, k_of, self._load_router(router))
        if self.budget is not None and self.budget < self.weight_bytes:
            # blocks are read and freed all the time: their pages are reused instead of faulted
            # in afresh for every read (spherefmt.heap; 25% budget over a .vhd: 3.7 -> 7 tokens/s)
            self._exit.enter_context(reusing_heap(min(self.budget, 16 * self.least_block)))
        self.cache = WeightCache(self.backend, m.loader.load, m.loader.nbytes, m.position, m.period,
                                 capacity=_UNLIMITED if self.budget is None else self.budget, prefetch=prefetch)
        if self.router is not None or native:
            self.cache.sparse = lambda key: key[0] == "cell"
        self._native = native
        p, mm = self.pkg.require_graticule()
        #: token-selections per (layer, cell ``lat * M + lon``) since the session started
        self.usage = np.zeros((m.n_layers, p * mm), dtype=np.int64)
        self.kv: list[tuple[Any, Any]] = []
        self._tokenizer: Any = None
        self._counters = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0, "decode_bytes_read": 0,
                          "routed_cells": 0, "possible_cells": 0}
        self._prefetch_ok = prefetch
        self._last_chunk = 0
        self._resident = False
        self.backend.reset_peak()

    def _load_router(self, router: Any) -> Any:
        """``None``: the stored ``learned`` router if any, else ``centroid``; a stored name;
        ``"random"``; or a :class:`~spherefmt.format.routers.Router`."""
        if isinstance(router, Router) or hasattr(router, "scores") or router == "random":
            return router
        stored = router_names(self.pkg)
        if router is None:
            router = "learned" if "learned" in stored else "centroid"
        if router in stored:
            return read_router(self.pkg, router)
        if router == "centroid":
            return centroid_router(self.pkg)
        raise InputError(f"router {router!r}: stored in {self.pkg.where}: {', '.join(stored) or 'none'}; "
                         "also centroid (computed) and random")

    # --- budget ---------------------------------------------------------------------------
    def _kv_bytes(self, n_ctx: int) -> int:
        return 2 * self.model.n_layers * n_ctx * self.model.kv_dim * 4

    def minimum_budget(self, n_ctx: int, chunk: int = 1, *, max_block: int | None = None) -> int:
        """Smallest budget that runs a context of ``n_ctx`` positions in chunks of ``chunk``
        (cell by cell: the smallest blocks; ``max_block`` for another plan's)."""
        # one block in use, one landing (a prefetch, or the next load), and the small norm block
        # held over the FFN
        blocks = 2 * (self.least_block if max_block is None else max_block) + self.small_block
        return blocks + self._kv_bytes(n_ctx) + self.model.scratch_bytes(chunk, n_ctx)

    def _plan(self, n_ctx: int, n_tokens: int) -> int:
        """Allocate the KV cache for ``n_ctx`` positions, size the block cache; returns the chunk."""
        self._free_kv()
        chunk = max(1, min(self.chunk, n_tokens))
        if self.budget is None and not self._resident:
            # resident: every weight is loaded before the first token, as other runtimes do, so
            # that experts a token routes to for the first time are not read during decoding
            for key in self.model.all_blocks():
                with self.cache.use(key):
                    pass
            self._resident = True
        if self.budget is not None:
            while chunk > 1 and self.minimum_budget(n_ctx, chunk, max_block=self.max_block) > self.budget:
                chunk //= 2
            need = self.minimum_budget(n_ctx, chunk, max_block=self.max_block)
            if need > self.budget:
                raise BudgetExceededError(
                    f"budget {format_size(self.budget)} cannot hold a context of {n_ctx} tokens: at least "
                    f"{format_size(need)} is needed ({format_size(self._kv_bytes(n_ctx))} of it KV cache)")
            self.cache.resize(self.budget - self._kv_bytes(n_ctx) - self.model.scratch_bytes(chunk, n_ctx))
        self._last_chunk = chunk
        kv_dim = self.model.kv_dim
        self.kv = [(self.backend.zeros((n_ctx, kv_dim)), self.backend.zeros((n_ctx, kv_dim))) for _ in range(self.model.n_layers)]
        return chunk

    def _free_kv(self) -> None:
        for k, v in self.kv:
            self.backend.free(k)
            self.backend.free(v)
        self.kv = []

    # --- the runtime context the forward pass sees ----------------------------------------------
    def use(self, key: Key) -> Any:
        return self.cache.use(key)

    def at(self, position: int) -> None:
        self.cache.set_position(position)
        if not self._prefetch_ok:
            return
        nxt = (position + 1) % self.model.period
        plan = self.model.blocks_at(nxt)
        if (self.router is not None or self._native) and 1 <= nxt <= self.model.n_layers:
            plan = [k for k in plan if k[0] != "cell"]  # cells come from the router's prediction
        self.cache.prefetch(plan)

    def expect(self, keys: list[Key]) -> None:
        """Blocks the forward pass will likely want soon (the next layer's predicted experts)."""
        if self._prefetch_ok:
            self.cache.prefetch(keys)

    def note_experts(self, layer: int, cells: list[tuple[int, int]], tokens: list[int], possible: int) -> None:
        """Usage of a native-MoE layer: the cells of the chosen experts and how many tokens chose each."""
        g = self.pkg.require_graticule()[1]
        for (lat, lon), n in zip(cells, tokens, strict=True):
            self.usage[layer, lat * g + lon] += n
        self._counters["routed_cells"] += sum(tokens)
        self._counters["possible_cells"] += possible

    def route(self, layer: int, m: Any) -> list[tuple[int, int, Any]]:
        cells = self.model.loader.cells(layer)
        if self.router is None:
            g = self.pkg.require_graticule()[1]
            for lat, lon in cells:
                self.usage[layer, lat * g + lon] += self.model.shape0(m)
            self._counters["routed_cells"] += len(cells) * self.model.shape0(m)
            self._counters["possible_cells"] += len(cells) * self.model.shape0(m)
            return [(lat, lon, None) for lat, lon in cells]
        m_host = self.backend.to_host(m)
        sel = self.router.pick(layer, m_host)
        self.usage[layer, self.router.flat[layer]] += sel.sum(axis=0)
        self._counters["routed_cells"] += int(sel.sum())
        self._counters["possible_cells"] += sel.size
        if self._prefetch_ok and layer + 1 < self.model.n_layers:
            # the next layer's router on this hidden state predicts the next layer's cells well
            nxt = self.router.pick(layer + 1, m_host).any(axis=0)
            self.cache.prefetch([("cell", layer + 1, *self.router.cells[layer + 1][j]) for j in np.flatnonzero(nxt)])
        out = []
        for j in np.flatnonzero(sel.any(axis=0)):
            lat, lon = self.router.cells[layer][j]
            col = sel[:, j]
            out.append((lat, lon, None if col.all() else self.backend.upload(col[:, None].astype(np.float32))))
        return out

    # --- inputs ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.pkg, self.model.vocab)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _ids(self, prompt_or_ids: str | Sequence[int] | np.ndarray, limit: bool = True) -> np.ndarray:
        if isinstance(prompt_or_ids, str):
            ids = np.asarray(self.encode(prompt_or_ids), dtype=np.int64)
        else:
            ids = np.asarray(prompt_or_ids)
            if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
                raise InputError(f"token ids must be a 1-D integer sequence, got {ids.dtype}{ids.shape}")
            ids = ids.astype(np.int64)
        if ids.size == 0:
            raise InputError("the prompt is empty")
        bad = (ids < 0) | (ids >= self.model.vocab)
        if bad.any():
            raise InputError(f"token id {int(ids[bad][0])} at position {int(np.flatnonzero(bad)[0])} is outside "
                             f"the vocabulary (0..{self.model.vocab - 1})")
        if limit and ids.size > self.model.context:
            raise InputError(f"the prompt has {ids.size} tokens; the model's context is {self.model.context}")
        return ids

    # --- running --------------------------------------------------------------------------
    def _forward(self, ids: np.ndarray, start: int, chunk: int, last_only: bool) -> np.ndarray:
        outs = []
        for s in range(0, len(ids), chunk):
            part = ids[s : s + chunk]
            outs.append(self.model.forward(self, part, start + s, last_only and s + chunk >= len(ids)))
        return outs[-1] if last_only else np.concatenate(outs)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits ``(T, vocab)`` (float32, host) of every position of ``ids``."""
        ids = self._ids(ids)
        chunk = self._plan(len(ids), len(ids))
        try:
            t0 = time.perf_counter()
            out = self._forward(ids, 0, chunk, last_only=False)
            self.backend.synchronize()
            self._counters["prefill_tokens"] += len(ids)
            self._counters["prefill_s"] += time.perf_counter() - t0
            return out
        finally:
            self._free_kv()

    def ffn_inputs(self, ids: Sequence[int] | np.ndarray, window: int) -> list[np.ndarray]:
        """Per layer, the FFN inputs ``(tokens, d)`` of the model on ``ids`` (host float32), run
        in windows of ``window`` tokens: what router training and co-activation placement learn
        from."""
        captured: list[list[np.ndarray]] = []

        def keep(layer: int, x: np.ndarray) -> None:
            while len(captured) <= layer:
                captured.append([])
            captured[layer].append(x)

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.model.ffn_input_hook = keep
        try:
            for st in range(0, len(ids) - 1, window):
                self.logits(ids[st : st + window])
        finally:
            self.model.ffn_input_hook = None
        return [np.concatenate(c) for c in captured]

    def nll(self, ids: Sequence[int] | np.ndarray, progress: bool = False) -> tuple[float, int]:
        """Summed negative log-likelihood of ``ids[1:]`` given their prefixes, over windows of the
        model's context (each window starts fresh), and the number of predicted tokens."""
        ids = self._ids(ids, limit=False)
        if ids.size < 2:
            raise InputError("need at least 2 tokens to score")
        total, n = 0.0, 0
        w = self.model.context
        starts = range(0, len(ids) - 1, w)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="eval", unit="window", disable=None)  # (off unless stderr is a terminal)
        for s in starts:
            window = ids[s : s + w + 1]
            if len(window) < 2:
                break
            logits = self.logits(window[:-1])
            z = logits - logits.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            total -= float(logp[np.arange(len(window) - 1), window[1:]].sum(dtype=np.float64))
            n += len(window) - 1
        return total, n

    def stream(self, prompt_or_ids: str | Sequence[int] | np.ndarray, max_new_tokens: int = 32,
               temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield new token ids one at a time (greedy at ``temperature`` 0, else sampled)."""
        ids = self._ids(prompt_or_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens {max_new_tokens!r}: expected a non-negative integer")
        n_new = min(max_new_tokens, self.model.context - len(ids))
        if n_new <= 0:
            return
        rng = np.random.default_rng(seed)
        eos = (self.model.config.get("eos_token_id") if stop_at_eos else None)
        chunk = self._plan(len(ids) + n_new, len(ids))
        try:
            t0 = time.perf_counter()
            logits = self._forward(ids, 0, chunk, last_only=True)[-1]
            self.backend.synchronize()
            self._counters["prefill_tokens"] += len(ids)
            self._counters["prefill_s"] += time.perf_counter() - t0
            pos = len(ids)
            for i in range(n_new):
                tok = self._pick(logits, temperature, rng)
                yield tok
                if tok == eos or i == n_new - 1:
                    break
                t0, read0 = time.perf_counter(), self.model.loader.bytes_read
                logits = self.model.forward(self, np.array([tok]), pos, True)[-1]
                self.backend.synchronize()
                dt = time.perf_counter() - t0
                self.backend.decode_step(dt)
                self._counters["decode_tokens"] += 1
                self._counters["decode_s"] += dt
                self._counters["decode_bytes_read"] += self.model.loader.bytes_read - read0
                pos += 1
        finally:
            self._free_kv()

    def generate(self, prompt_or_ids: str | Sequence[int] | np.ndarray, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True) -> list[int]:
        """The new token ids (see :meth:`stream`)."""
        return list(self.stream(prompt_or_ids, max_new_tokens, temperature, seed, stop_at_eos))

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))

    # --- figures --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since the session started (see the README for each figure)."""
        s = self.cache.stats
        c = self._counters
        lookups = s.hits + s.misses
        return {
            **self.backend.describe(),
            "package": self.pkg.where,
            "prefetch": self._prefetch_ok,
            "mode": (f"native MoE (top {self._moe[1]} of {self._moe[0]} experts, the model's router)"
                     if self._moe else "dense" if self.router is None else
                     f"top-k ({'/'.join(map(str, sorted(set(self.top_k or []))))} cells"
                     + (f" incl. {'/'.join(map(str, sorted({int(o.sum()) for o in self.router.on})))} always on"
                        if any(o.any() for o in self.router.on) else "") + f", {self.router.name} router)"),
            "budget_bytes": self.budget,
            "weight_bytes": self.weight_bytes,
            "stored_bytes": self.stored_bytes,
            "weight_formats": self.model.loader.held_formats(),
            "peak_device_bytes": self.backend.peak_memory(),
            "resident_bytes": self.cache.used,
            "bytes_read": self.model.loader.bytes_read,
            "bytes_uploaded": s.bytes_uploaded,
            "blocks_loaded": s.loads,
            "blocks_evicted": s.evictions,
            "experts_loaded": s.expert_loads,
            "experts_evicted": s.expert_evictions,
            "cache_hits": s.hits,
            "cache_misses": s.misses,
            "cache_hit_rate": s.hits / lookups if lookups else None,
            "prefetch_loads": s.prefetch_loads,
            "prefetch_hits": s.prefetch_hits,
            "prefetch_hit_rate": s.prefetch_hits / s.prefetch_loads if s.prefetch_loads else None,
            "active_cell_fraction": c["routed_cells"] / c["possible_cells"] if c["possible_cells"] else None,
            "active_share_requested": self.active_share["requested"] if self.active_share else None,
            "active_share_used": self.active_share["used"] if self.active_share else None,
            "router_host_bytes": (self.router.host_bytes() if self.router else 0)
            + sum(int(a.nbytes) for a in getattr(self.model, "routers", []) + getattr(self.model, "shared_gate_w", [])),
            "prefill_chunk": self._last_chunk,
            "prefill_tokens": c["prefill_tokens"],
            "prefill_tokens_per_s": c["prefill_tokens"] / c["prefill_s"] if c["prefill_s"] else None,
            "decode_tokens": c["decode_tokens"],
            #: every token through the model (prompt and generated): bytes per token is one division
            "tokens": c["prefill_tokens"] + c["decode_tokens"],
            "tokens_per_s": c["decode_tokens"] / c["decode_s"] if c["decode_s"] else None,
            # storage bytes read during decode steps only (a prefetch of the next step's blocks
            # that lands during this one counts here too), per decode token
            "decode_bytes_per_token": c["decode_bytes_read"] / c["decode_tokens"] if c["decode_tokens"] else None,
        }

    def close(self) -> None:
        self._free_kv()
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()
        self._exit.close()
        if self._own:
            self.pkg.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ffn_inputs(pkg: Package, ids: np.ndarray, window: int) -> list[np.ndarray]:
    """Per layer, the FFN inputs ``(tokens, d)`` of the dense model on ``ids`` (numpy backend),
    run in windows of ``window`` tokens (:meth:`Session.ffn_inputs`)."""
    with Session(pkg, backend="numpy", prefetch=False) as s:
        return s.ffn_inputs(ids, window)
