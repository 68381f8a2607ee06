"""GPT-2 and Llama-family forward passes, written once against the backend interface.

The forward pass asks the runtime for blocks (``rt.use(key)``: load -> use -> release), never
looks at which backend runs it, and computes the FFN as a sum over the layer's cells: dense mode
takes every cell, top-k mode the cells the router picked for each token (a per-token mask when
tokens disagree).  The sum over cells equals the full FFN up to float summation order.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from spherefmt import constants as C
from spherefmt.errors import FormatError
from spherefmt.format.package import Package
from spherefmt.runtime.config import check_gpt2_config, read_decoder_config
from spherefmt.runtime.loader import BlockLoader, Key

__all__ = ["Model", "GPT2", "Llama", "build"]


def _cfg(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    if default is None:
        raise FormatError(f"model config lacks {names[0]!r}")
    return default


class Model(ABC):
    """A decoder-only transformer over one package."""

    arch: str
    #: the block reader; each subclass's ``__init__`` builds it once it knows the tensor names
    loader: BlockLoader

    @property
    def cols(self) -> dict[str, tuple[int, int]]:
        """Each field's column range in a cell's rows as the device holds them (a quantized
        row has its fields on block boundaries)."""
        return self.loader.cols

    def __init__(self, pkg: Package) -> None:
        self.pkg = pkg
        self.config = dict(pkg.config or {})
        self.n_layers = len(pkg.layer_depth)
        first = pkg.layout.layers[0][pkg.layout.fields[0].name]
        hf = re.match(r"^(.*)\.0\.(?:mlp|block_sparse_moe)\.", first)
        #: llama.cpp's tensor names (a package converted from GGUF: ``blk.N.ffn_gate.weight``)
        self.gguf = hf is None and re.match(r"^blk\.0\.ffn_", first) is not None
        if hf is None and not self.gguf:
            raise FormatError(f"{pkg.where}: the runtime reads Hugging Face or llama.cpp tensor names, not {first!r}")
        self.prefix = "blk." if hf is None else hf[1] + "."  # e.g. "transformer.h." or "model.layers."
        self.root = self.prefix.rsplit(".", 2)[0] + "." if self.prefix.count(".") > 1 else ""
        self.period = self.n_layers + 2  # embed, layers..., head
        #: called with ``(layer, FFN input as host float32)`` before each FFN (router training and
        #: co-activation placement learn from these; ``Session.ffn_inputs``)
        self.ffn_input_hook: Callable[[int, np.ndarray], None] | None = None
        #: dense runs: a layer's cells are one ``("ffn", layer)`` block (set by the session when
        #: every weight stays resident), so its FFN is one product per field, not one per cell
        self.fused_ffn = False

    # --- geometry -------------------------------------------------------------------------
    d: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context: int

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    #: the table the input embedding reads: "head" when tied to the LM head, else "embed"
    embed_table: str

    def position(self, key: Key) -> int:
        kind = key[0]
        if kind in ("cell", "ffn", "attn", "mlp", "moe"):
            return 1 + key[1]
        if kind == "vocab" and key[1] == "embed":
            return 0  # (a tied table is used by the head every step: it counts as the head's)
        if kind == "pos":
            return 0
        return self.period - 1  # final norm and LM-head rows

    def blocks_at(self, position: int) -> list[Key]:
        """Every block a dense pass uses at ``position`` (the prefetch plan)."""
        if position == 0:
            return [("pos",)] if ("pos",) in self.loader.core else []
        if position == self.period - 1:
            return [("final",)] + [("vocab", "head", b) for b in range(self.loader.table_blocks("head"))]
        layer = position - 1
        first = [k for k in (("attn", layer), ("mlp", layer), ("moe", layer)) if k in self.loader.core]
        if self.fused_ffn:
            return first + [("ffn", layer)]
        return first + [("cell", layer, a, b) for a, b in self.loader.cells(layer)]

    def all_blocks(self) -> list[Key]:
        keys = [k for p in range(self.period) for k in self.blocks_at(p)]
        if "embed" in self.loader.tables:
            keys += [("vocab", "embed", b) for b in range(self.loader.table_blocks("embed"))]
        return keys

    def scratch_bytes(self, tokens: int, kv_len: int) -> int:
        """An upper bound of live activation bytes for a chunk of ``tokens`` over ``kv_len``
        positions: residual, norms, Q/K/V, attention scores and probabilities (counted on
        allocators that see op temporaries), per-cell FFN activations, one LM-head block."""
        cell = int(self.loader.counts.max()) if self.loader.counts.size else 0
        rows = max(self.loader.table_rows.values())
        per_token = 14 * self.d + 4 * cell + 2 * rows + 4 * self.head_dim
        return 4 * (tokens * per_token + 3 * self.n_heads * tokens * kv_len)

    # --- shared pieces --------------------------------------------------------------------
    def embed_rows(self, rt: Any, table: str, ids: np.ndarray) -> Any:
        """Rows of an embedding table for ``ids``, one vocabulary block at a time."""
        r = self.loader.table_rows[table]
        out = None
        for blk in np.unique(ids // r):
            local = np.where(ids // r == blk, ids - blk * r, -1)
            with rt.use(("vocab", table, int(blk))) as t:
                part = rt.backend.gather_rows(t["table"], local)
            out = part if out is None else rt.backend.add(out, part)
        return out

    def head(self, rt: Any, x: Any) -> np.ndarray:
        """Logits ``(T, vocab)`` on the host, one LM-head block at a time."""
        t = self.loader.table_rows["head"]
        out = np.empty((self.shape0(x), self.vocab), dtype=np.float32)
        for blk in range(self.loader.table_blocks("head")):
            with rt.use(("vocab", "head", blk)) as w:
                y = rt.backend.matmul(x, w["table"], transpose_w=True)
            out[:, blk * t : blk * t + y.shape[1]] = rt.backend.to_host(y)
        return out

    @staticmethod
    def shape0(x: Any) -> int:
        return int(x.shape[0])

    def ffn(self, rt: Any, layer: int, m: Any) -> Any:
        """Sum over the routed cells of the layer of each cell's FFN contribution."""
        if self.ffn_input_hook is not None:
            self.ffn_input_hook(layer, rt.backend.to_host(m))
        routes = rt.route(layer, m)
        if self.fused_ffn and all(mask is None for _, _, mask in routes):
            with rt.use(("ffn", layer)) as c:  # every cell, as one matrix
                return self.cell_ffn(rt.backend, m, c, None) if c else None
        acc = None
        for lat, lon, mask in routes:
            with rt.use(("cell", layer, lat, lon)) as c:
                y = self.cell_ffn(rt.backend, m, c, mask)
            acc = y if acc is None else rt.backend.add(acc, y)
        return acc

    @abstractmethod
    def cell_ffn(self, b: Any, m: Any, c: dict[str, Any], mask: Any) -> Any: ...

    @abstractmethod
    def forward(self, rt: Any, ids: np.ndarray, start: int, last_only: bool) -> np.ndarray: ...

    #: the field whose mean row is a cell's centroid (the router's training-free key)
    router_field: str


class GPT2(Model):
    arch = C.ARCH_GPT2
    router_field = "w_in"

    def __init__(self, pkg: Package) -> None:
        super().__init__(pkg)
        c = self.config
        check_gpt2_config(c, pkg.where)
        self.d = int(_cfg(c, "n_embd", "hidden_size"))
        self.n_heads = self.n_kv_heads = int(_cfg(c, "n_head", "num_attention_heads"))
        self.head_dim = self.d // self.n_heads
        self.eps = float(_cfg(c, "layer_norm_epsilon", default=1e-5))
        self.context = int(_cfg(c, "n_positions", "n_ctx", default=1024))
        act = str(_cfg(c, "activation_function", default="gelu_new"))
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_fast"):
            raise FormatError(f"{pkg.where}: GPT-2 activation {act!r} is not supported (gelu_new, gelu)")
        self.approx = act != "gelu"
        self.scale_attn = bool(c.get("scale_attn_weights", True))
        self.inv_layer = bool(c.get("scale_attn_by_inverse_layer_idx", False))
        p, r = self.prefix, self.root
        keys = set(pkg.keys())
        core: dict[Key, dict[str, str]] = {}
        for i in range(self.n_layers):
            core[("attn", i)] = {"ln_w": f"{p}{i}.ln_1.weight", "ln_b": f"{p}{i}.ln_1.bias",
                                 "qkv_w": f"{p}{i}.attn.c_attn.weight", "qkv_b": f"{p}{i}.attn.c_attn.bias",
                                 "o_w": f"{p}{i}.attn.c_proj.weight", "o_b": f"{p}{i}.attn.c_proj.bias"}
            core[("mlp", i)] = {"ln_w": f"{p}{i}.ln_2.weight", "ln_b": f"{p}{i}.ln_2.bias",
                                "b_out": f"{p}{i}.mlp.c_proj.bias"}
        core[("pos",)] = {"wpe": f"{r}wpe.weight"}
        core[("final",)] = {"ln_w": f"{r}ln_f.weight", "ln_b": f"{r}ln_f.bias"}
        missing = sorted(t for blk in core.values() for t in blk.values() if t not in keys)
        if missing:
            raise FormatError(f"{pkg.where}: GPT-2 package lacks {missing[0]!r} ({len(missing)} missing)")
        wte = f"{r}wte.weight"
        head = "lm_head.weight" if "lm_head.weight" in keys else wte
        tables = {"head": head} if head == wte else {"embed": wte, "head": head}
        self.embed_table = "head" if head == wte else "embed"
        self.vocab = pkg.tensor_info(head).shape[0]
        # the fused QKV weight stays whole (read as column ranges); its bias is split on the host
        self.loader = BlockLoader(pkg, core, tables, split={"qkv_b": (0, ["q_b", "k_b", "v_b"])})

    def cell_ffn(self, b: Any, m: Any, c: dict[str, Any], mask: Any) -> Any:
        h = b.gelu(b.matmul(m, c["rows"], c["b_in"], transpose_w=True, cols=self.cols["w_in"]), self.approx)
        if mask is not None:
            h = b.mul(h, mask)
        return b.matmul(h, c["rows"], cols=self.cols["w_out"])

    def forward(self, rt: Any, ids: np.ndarray, start: int, last_only: bool) -> np.ndarray:
        b = rt.backend
        rt.at(0)
        x = self.embed_rows(rt, self.embed_table, ids)
        with rt.use(("pos",)) as pos:
            x = b.add(x, b.gather_rows(pos["wpe"], np.arange(start, start + len(ids))))
        for i in range(self.n_layers):
            rt.at(1 + i)
            k_cache, v_cache = rt.kv[i]
            with rt.use(("attn", i)) as a:
                h = b.layernorm(x, a["ln_w"], a["ln_b"], self.eps)
                d = self.d
                q = b.matmul(h, a["qkv_w"], a["q_b"], cols=(0, d))
                b.write_rows(k_cache, start, b.matmul(h, a["qkv_w"], a["k_b"], cols=(d, 2 * d)))
                b.write_rows(v_cache, start, b.matmul(h, a["qkv_w"], a["v_b"], cols=(2 * d, 3 * d)))
                scale = (1.0 / math.sqrt(self.head_dim) if self.scale_attn else 1.0) / ((i + 1) if self.inv_layer else 1)
                o = b.attention(q, k_cache, v_cache, start, self.n_heads, self.n_heads, scale)
                x = b.add(x, b.matmul(o, a["o_w"], a["o_b"]))
            del h, q, o
            with rt.use(("mlp", i)) as mp:
                m = b.layernorm(x, mp["ln_w"], mp["ln_b"], self.eps)
                y = self.ffn(rt, i, m)
                x = b.add(x, y) if y is not None else x
                x = b.add(x, mp["b_out"])
            del m, y
        rt.at(self.period - 1)
        if last_only:
            x = b.gather_rows(x, np.array([len(ids) - 1]))
        with rt.use(("final",)) as f:
            x = b.layernorm(x, f["ln_w"], f["ln_b"], self.eps)
        return self.head(rt, x)


class Llama(Model):
    """The Llama family: Llama 2/3, Mistral, Qwen2/3, Gemma, Granite, OLMo2, each exactly as
    ``transformers`` runs it (what the config asks is read by :func:`read_decoder_config`, which
    refuses any config key it does not implement)."""

    arch = C.ARCH_LLAMA
    router_field = "gate"

    def __init__(self, pkg: Package) -> None:
        super().__init__(pkg)
        cfg = self.config
        if self.gguf and cfg.get("num_local_experts"):
            # llama.cpp's `llama` architecture with experts is Mixtral's computation (softmax over
            # the router's logits, the top k, renormalised: its build_moe_ffn with norm_w)
            cfg = {**cfg, "model_type": "mixtral"}
        s = self.spec = read_decoder_config(cfg, self.n_layers, pkg.where)
        self.d, self.n_heads, self.n_kv_heads, self.head_dim = s.d, s.n_heads, s.n_kv_heads, s.head_dim
        self.eps, self.context = s.eps, s.context
        p, r = self.prefix, self.root
        keys = set(pkg.keys())
        core: dict[Key, dict[str, str]] = {}
        norms = ["ln_w", "q_norm", "k_norm", "post_w"]
        if self.gguf:
            self._gguf_names(pkg, keys, core)
            return
        for i in range(self.n_layers):
            a = {} if s.post_norms else {"ln_w": f"{p}{i}.input_layernorm.weight"}
            for n in ("q", "k", "v", "o"):
                a[f"{n}_w"] = f"{p}{i}.self_attn.{n}_proj.weight"
                if f"{p}{i}.self_attn.{n}_proj.bias" in keys:
                    a[f"{n}_b"] = f"{p}{i}.self_attn.{n}_proj.bias"
            if s.qk_norm:
                a["q_norm"], a["k_norm"] = f"{p}{i}.self_attn.q_norm.weight", f"{p}{i}.self_attn.k_norm.weight"
            if s.post_norms:
                a["post_w"] = f"{p}{i}.post_attention_layernorm.weight"
                core[("mlp", i)] = {"post_w": f"{p}{i}.post_feedforward_layernorm.weight"}
            else:
                core[("mlp", i)] = {"ln_w": f"{p}{i}.post_attention_layernorm.weight"}
            core[("attn", i)] = a
        core[("final",)] = {"ln_w": f"{r}norm.weight"}
        #: native experts: the model's router of each layer (on the host, ``(E, d)``) and, for
        #: Qwen2-MoE, the shared expert (a device block) and its gate (host, ``(1, d)``)
        self.router_names: list[str] = []
        self.shared_gates: list[str] = []
        if s.moe is not None:
            if pkg.header.experts is None or pkg.header.experts["count"] != s.moe[0]:
                raise FormatError(f"{pkg.where}: the config names {s.moe[0]} experts per layer; the package does not "
                                  "hold them as native experts (convert the checkpoint again)")
            module = "block_sparse_moe" if s.model_type == "mixtral" else "mlp"
            for i in range(self.n_layers):
                self.router_names.append(f"{p}{i}.{module}.gate.weight")
                sh = f"{p}{i}.mlp.shared_expert."
                if s.model_type == "qwen2_moe":
                    core[("moe", i)] = {"gate": f"{sh}gate_proj.weight", "up": f"{sh}up_proj.weight",
                                        "down": f"{sh}down_proj.weight"}
                    self.shared_gates.append(f"{p}{i}.mlp.shared_expert_gate.weight")
            need = self.router_names + self.shared_gates
            missing_moe = sorted(t for t in need if t not in keys)
            if missing_moe:
                raise FormatError(f"{pkg.where}: {s.model_type} package lacks {missing_moe[0]!r}")
        missing = sorted(t for blk in core.values() for t in blk.values() if t not in keys)
        if missing:
            raise FormatError(f"{pkg.where}: {s.model_type} package lacks {missing[0]!r} ({len(missing)} missing)")
        embed = f"{r}embed_tokens.weight"
        head = "lm_head.weight" if "lm_head.weight" in keys else embed
        tables = {"embed": embed, "head": head} if head != embed else {"head": head}
        self.embed_table = "embed" if head != embed else "head"
        self.vocab = pkg.tensor_info(head).shape[0]
        offsets = {n: s.norm_offset for n in norms} if s.norm_offset else None
        self.loader = BlockLoader(pkg, core, tables, offsets=offsets)
        self.routers = [self.loader.host_tensor(t) for t in self.router_names]
        self.shared_gate_w = [self.loader.host_tensor(t) for t in self.shared_gates]

    def _gguf_names(self, pkg: Package, keys: set[str], core: dict[Key, dict[str, str]]) -> None:
        """The blocks of a package converted from a llama.cpp GGUF (``spec/FORMAT.md`` 9.1): its
        names, and Q/K rows permuted back from llama.cpp's RoPE pairs to transformers' halves."""
        s = self.spec
        if s.model_type not in ("llama", "mixtral") or s.qk_norm or s.post_norms:
            raise FormatError(f"{pkg.where}: the runtime runs llama GGUFs (dense or with experts); this one is "
                              f"{s.model_type!r}")
        if s.moe is not None and (pkg.header.experts is None or pkg.header.experts["count"] != s.moe[0]):
            raise FormatError(f"{pkg.where}: the GGUF names {s.moe[0]} experts per layer; the package does not hold "
                              "them as native experts")
        if "rope_freqs.weight" in keys:  # llama.cpp's per-dimension RoPE factors (Llama 3 scaling)
            raise FormatError(f"{pkg.where}: rope_freqs.weight (llama.cpp's RoPE frequency factors) is not implemented")
        for i in range(self.n_layers):
            a = {"ln_w": f"blk.{i}.attn_norm.weight"}
            for n, g in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                a[f"{n}_w"] = f"blk.{i}.{g}.weight"
                if f"blk.{i}.{g}.bias" in keys:
                    a[f"{n}_b"] = f"blk.{i}.{g}.bias"
            core[("attn", i)] = a
            core[("mlp", i)] = {"ln_w": f"blk.{i}.ffn_norm.weight"}
        core[("final",)] = {"ln_w": "output_norm.weight"}
        missing = sorted(t for blk in core.values() for t in blk.values() if t not in keys)
        if missing:
            raise FormatError(f"{pkg.where}: llama GGUF package lacks {missing[0]!r} ({len(missing)} missing)")
        embed, head = "token_embd.weight", "output.weight" if "output.weight" in keys else "token_embd.weight"
        tables = {"embed": embed, "head": head} if head != embed else {"head": head}
        self.embed_table = "embed" if head != embed else "head"
        self.loader = BlockLoader(pkg, core, tables, permute_rows={"q_w": s.n_heads, "k_w": s.n_kv_heads})
        self.vocab = self.loader.shape_of(head)[0]
        self.router_names = [f"blk.{i}.ffn_gate_inp.weight" for i in range(self.n_layers)] if s.moe else []
        missing_moe = [t for t in self.router_names if t not in keys]
        if missing_moe:
            raise FormatError(f"{pkg.where}: llama GGUF package with experts lacks {missing_moe[0]!r}")
        self.shared_gates, self.shared_gate_w = [], []
        self.routers = [self.loader.host_tensor(t) for t in self.router_names]

    @property
    def native_moe(self) -> bool:
        return self.spec.moe is not None

    def route_experts(self, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's own routing of FFN inputs ``x`` ``(T, d)``: the chosen experts ``(T, k)``
        and their weights, as transformers computes them (softmax in float32 over the router's
        logits, the top k, renormalised when the architecture does: Mixtral always, Qwen-MoE and
        OLMoE when ``norm_topk_prob``)."""
        e, k, renorm = self.spec.moe or (0, 0, False)
        logits = x @ self.routers[layer].T
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(probs, top, axis=1)
        if renorm:
            w = w / w.sum(axis=1, keepdims=True)
        return top, w.astype(np.float32)

    def ffn(self, rt: Any, layer: int, m: Any) -> Any:
        if not self.native_moe:
            return super().ffn(rt, layer, m)
        b = rt.backend
        x = b.to_host(m)
        if self.ffn_input_hook is not None:
            self.ffn_input_hook(layer, x)
        top, w = self.route_experts(layer, x)
        cells = self.loader.expert_cells or []
        if layer + 1 < self.n_layers and hasattr(rt, "expect"):
            # the next layer's router on this hidden state predicts its experts well enough to
            # start loading them now (Mixtral-offloading's speculative prefetch)
            nxt, _ = self.route_experts(layer + 1, x)
            rt.expect([("cell", layer + 1, *cells[layer + 1][int(j)]) for j in np.unique(nxt)])
        chosen = np.unique(top)
        if hasattr(rt, "note_experts"):
            rt.note_experts(layer, [cells[layer][int(j)] for j in chosen], [int((top == j).sum()) for j in chosen],
                            len(cells[layer]) * top.shape[0])
        acc = None
        for j in chosen:  # in expert order, as transformers adds them
            col = np.where(top == j, w, 0).sum(axis=1, keepdims=True).astype(np.float32)
            with rt.use(("cell", layer, *cells[layer][int(j)])) as c:
                y = self.cell_ffn(b, m, c, b.upload(col))
            acc = y if acc is None else b.add(acc, y)
        if ("moe", layer) in self.loader.core:  # Qwen2-MoE's shared expert, gated by a sigmoid
            with rt.use(("moe", layer)) as sh:
                g = b.silu(b.matmul(m, sh["gate"], transpose_w=True))
                h = b.mul(g, b.matmul(m, sh["up"], transpose_w=True))
                gate = 1.0 / (1.0 + np.exp(-(x @ self.shared_gate_w[layer].T)))
                y = b.matmul(b.mul(h, b.upload(gate.astype(np.float32))), sh["down"], transpose_w=True)
            acc = y if acc is None else b.add(acc, y)
        return acc

    def cell_ffn(self, b: Any, m: Any, c: dict[str, Any], mask: Any) -> Any:
        rows, cols = c["rows"], self.cols
        g = b.matmul(m, rows, transpose_w=True, cols=cols["gate"])
        g = b.silu(g) if self.spec.act == "silu" else b.gelu(g, True)
        h = b.mul(g, b.matmul(m, rows, transpose_w=True, cols=cols["up"]))
        if mask is not None:
            h = b.mul(h, mask)
        return b.matmul(h, rows, cols=cols["down"])

    def _factor(self, b: Any, factor: float) -> Any:
        """A model's constant multiplier as a device row to multiply by (``None`` when it is 1)."""
        return None if factor == 1.0 else b.upload(np.full(self.d, factor, dtype=np.float32))

    @staticmethod
    def _scaled(b: Any, x: Any, factor: Any) -> Any:
        return x if factor is None else b.mul(x, factor)

    def head(self, rt: Any, x: Any) -> np.ndarray:
        out = super().head(rt, x)
        if self.spec.logit_divisor != 1.0:
            out /= np.float32(self.spec.logit_divisor)  # Granite: logits / logits_scaling, as transformers does
        return out

    def forward(self, rt: Any, ids: np.ndarray, start: int, last_only: bool) -> np.ndarray:
        b, s = rt.backend, self.spec
        rt.at(0)
        embed_scale, res = self._factor(b, s.embed_scale), self._factor(b, s.residual_scale)  # once per pass
        x = self._scaled(b, self.embed_rows(rt, self.embed_table, ids), embed_scale)
        cos_h, sin_h = s.rope.tables(start, len(ids))
        cos, sin = b.upload(cos_h), b.upload(sin_h)
        for i in range(self.n_layers):
            rt.at(1 + i)
            k_cache, v_cache = rt.kv[i]
            with rt.use(("attn", i)) as a:
                h = x if s.post_norms else b.rmsnorm(x, a["ln_w"], self.eps)
                q = b.matmul(h, a["q_w"], a.get("q_b"), transpose_w=True)
                k = b.matmul(h, a["k_w"], a.get("k_b"), transpose_w=True)
                if s.qk_norm:
                    per_head = s.qk_norm == "head"
                    q = b.rmsnorm(q, a["q_norm"], self.eps, heads=self.n_heads if per_head else 1)
                    k = b.rmsnorm(k, a["k_norm"], self.eps, heads=self.n_kv_heads if per_head else 1)
                q, k = b.rope(q, cos, sin, self.n_heads), b.rope(k, cos, sin, self.n_kv_heads)
                b.write_rows(k_cache, start, k)
                b.write_rows(v_cache, start, b.matmul(h, a["v_w"], a.get("v_b"), transpose_w=True))
                o = b.attention(q, k_cache, v_cache, start, self.n_heads, self.n_kv_heads, s.attn_scale,
                                window=s.windows[i])
                y = b.matmul(o, a["o_w"], a.get("o_b"), transpose_w=True)
                if s.post_norms:
                    y = b.rmsnorm(y, a["post_w"], self.eps)
                x = b.add(x, self._scaled(b, y, res))
            del h, q, k, o, y
            if s.post_norms:
                m = x
            else:
                with rt.use(("mlp", i)) as mp:
                    m = b.rmsnorm(x, mp["ln_w"], self.eps)
            y = self.ffn(rt, i, m)
            if y is not None:
                if s.post_norms:
                    with rt.use(("mlp", i)) as mp:
                        y = b.rmsnorm(y, mp["post_w"], self.eps)
                x = b.add(x, self._scaled(b, y, res))
            del m, y
        del cos, sin, embed_scale, res
        rt.at(self.period - 1)
        if last_only:
            x = b.gather_rows(x, np.array([len(ids) - 1]))
        with rt.use(("final",)) as f:
            x = b.rmsnorm(x, f["ln_w"], self.eps)
        return self.head(rt, x)


def build(pkg: Package) -> Model:
    """The forward pass for a package's architecture."""
    if pkg.architecture == C.ARCH_GPT2:
        return GPT2(pkg)
    if pkg.architecture == C.ARCH_LLAMA:
        return Llama(pkg)
    mt = (pkg.config or {}).get("model_type") if isinstance(pkg.config, dict) else None
    raise FormatError(f"{pkg.where}: the runtime runs GPT-2 and Llama-family packages; this one is "
                      f"{pkg.architecture!r}" + (f" (model_type {mt!r})" if mt else ""))
