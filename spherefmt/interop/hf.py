"""Hugging Face: ``save_pretrained`` folders in and out, and packages as ``transformers`` models.

A folder is read as a source (``config.json``, ``model.safetensors`` or its sharded index, or
``pytorch_model.bin``, plus the tokenizer's side files) and written back as one
(``config.json``, ``model.safetensors``, the side files the package carries).

    >>> import spherefmt.interop.hf
    >>> model = spherefmt.interop.hf.load_model("model.sphere")        # a transformers model, dense
    >>> model.generate(...)                                     # everything downstream works

The model is built from the package's config (``AutoConfig.for_model``) and gets every tensor of
the package: FFN tensors are rebuilt from the experts (bit-exact), and after growth padded with
zero neurons to the config's FFN size.  Converting a ``save_pretrained`` folder and loading it back
gives the same logits as ``from_pretrained`` on the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spherefmt import constants as C
from spherefmt.errors import BackendUnavailableError, FormatError
from spherefmt.format.package import Package
from spherefmt.format.package import open as open_package
from spherefmt.interop.base import MappingSource, TensorSource, inside, no_escape, read_json
from spherefmt.interop.experts import stacked_state_dict
from spherefmt.interop.fused import fuse_state_dict
from spherefmt.interop.safetensors import SafetensorsSource, export_safetensors
from spherefmt.interop.torchfile import torch_load

__all__ = ["CARRIED_FILES", "build", "export_hf_folder", "load_model", "open_hf_folder"]

_PREFIXES = ("transformer.", "model.")  # packages converted from bare (prefix-less) state dicts


def _transformers() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise BackendUnavailableError("spherefmt.interop.hf needs torch and transformers: "
                                      "pip install torch==2.13.0 'spherefmt[hf]'") from e
    return transformers


def _torch_ready(a: np.ndarray) -> np.ndarray:
    """A writable float32 copy for ``torch.from_numpy`` (bfloat16 widened: numpy has no torch bfloat16)."""
    return np.array(a, dtype=np.float32)


def build(pkg: Package, dtype: Any = "auto") -> Any:
    """The ``transformers`` causal-LM model of an open package, with its weights.

    Parameters
    ----------
    pkg
        An open GPT-2 or Llama package.
    dtype
        A torch dtype, or ``"auto"``: the dtype the package's FFN tensors are stored in.

    Raises
    ------
    FormatError
        The package is not a GPT-2/Llama package, or lacks a weight the model needs.
    """
    transformers = _transformers()
    import torch

    if pkg.architecture not in (C.ARCH_GPT2, C.ARCH_LLAMA) or not isinstance(pkg.config, dict):
        raise FormatError(f"{pkg.where}: only GPT-2 and Llama packages with a config become transformers models")
    if dtype == "auto":
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(pkg.layout.dtype,
                                                                                          torch.float32)
    config = dict(pkg.config)
    gguf_names = C.GGUF_SIDE_FILE in pkg.header.files and "token_embd.weight" in pkg.keys()  # llama.cpp's names
    if gguf_names and config.get("num_local_experts"):
        config["model_type"] = "mixtral"  # llama.cpp's llama architecture with experts
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{pkg.where}: transformers cannot build a config from the package ({e})") from None
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    own = model.state_dict()
    sd = {}
    if gguf_names:
        from spherefmt.interop.gguf import hf_state_dict

        state = {n: torch.from_numpy(_torch_ready(a)) for n, a in hf_state_dict(pkg).items()}
    else:
        state = fuse_state_dict(pkg.state_dict(framework="torch", padded=True), pkg.header.fused)
    if pkg.header.experts:  # native experts: in the stacked form transformers 5 holds in memory
        state = stacked_state_dict(state, pkg.header.experts)
    for name, value in state.items():
        target = name if name in own else next((p + name for p in _PREFIXES if p + name in own), None)
        if target is None:
            raise FormatError(f"{pkg.where}: tensor {name!r} has no place in a transformers {cfg.model_type} model")
        if tuple(own[target].shape) != tuple(value.shape):
            raise FormatError(f"{pkg.where}: tensor {name!r} is {tuple(value.shape)}, the model wants "
                              f"{tuple(own[target].shape)}")
        sd[target] = value.to(dtype) if value.is_floating_point() else value
    result = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    params = {n for n, _ in model.named_parameters(remove_duplicate=True)}
    tie = bool(getattr(cfg, "tie_word_embeddings", True))
    missing = [n for n in result.missing_keys if n in params and not (tie and n.endswith("lm_head.weight"))]
    if missing:
        raise FormatError(f"{pkg.where}: the package lacks {missing[0]!r} for {cfg.model_type}")
    model.eval()
    return model


def load_model(pkg: str | Path | Package, *, dtype: Any = "auto") -> Any:
    """A ``transformers`` model with the package's weights (dense; see the module docstring).

    Parameters
    ----------
    pkg
        A package path/URL or an open :class:`Package`.
    dtype
        A torch dtype, or ``"auto"`` for the package's own (float32, float16 or bfloat16).
    """
    if isinstance(pkg, Package):
        return build(pkg, dtype)
    with open_package(pkg) as p:
        return build(p, dtype)


#: Side files of a Hugging Face folder carried into the package verbatim.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "vocab.json", "merges.txt")


def open_hf_folder(folder: Path) -> TensorSource:
    """A ``save_pretrained`` folder as a source: config, safetensors shards (or ``pytorch_model.bin``)
    and the side files a tokenizer needs."""
    cfg_path = no_escape(folder, folder / "config.json", folder)
    config = read_json(cfg_path) if cfg_path.exists() else None
    if config is not None and not isinstance(config, dict):
        raise FormatError(f"{cfg_path}: config must be a JSON object")
    src: TensorSource
    if (folder / "model.safetensors.index.json").exists():
        ip = no_escape(folder, folder / "model.safetensors.index.json", folder)
        index = read_json(ip)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise FormatError(f"{ip}: weight_map must be a non-empty object")
        shards: list[Path] = []
        for name in dict.fromkeys(wm.values()):
            p = no_escape(folder, inside(folder, name, ip), ip)
            if not p.exists():
                raise FormatError(f"{ip}: shard {name!r} is missing")
            shards.append(p)
        src = SafetensorsSource(shards, str(folder))
        missing = set(wm) - set(src.keys())
        if missing:
            src.close()
            raise FormatError(f"{ip}: tensors listed but absent from the shards: {sorted(missing)[:3]}")
    elif (folder / "model.safetensors").exists():
        src = SafetensorsSource([no_escape(folder, folder / "model.safetensors", folder)], str(folder))
    elif (folder / "pytorch_model.bin").exists():
        src = MappingSource(torch_load(no_escape(folder, folder / "pytorch_model.bin", folder)), str(folder))
    else:
        raise FormatError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    src.config = config
    src.files = {n: no_escape(folder, folder / n, folder).read_bytes() for n in CARRIED_FILES if (folder / n).is_file()}
    return src


def export_hf_folder(pkg: Package, dst: Path, storage: Callable[[str], np.ndarray], progress: Callable[[int], Any]
                     ) -> None:
    """Write a ``save_pretrained``-style folder: ``config.json``, ``model.safetensors`` and the side
    files the package carries (tokenizer...).  ``from_pretrained`` loads it."""
    if dst.exists() and not dst.is_dir():
        raise FormatError(f"{dst}: exists and is not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    export_safetensors(pkg, dst / "model.safetensors", storage, progress)
    for name in pkg.header.files:
        if name in CARRIED_FILES:  # names from a package are checked against the list: no path escapes
            (dst / name).write_bytes(pkg.file(name))
    if pkg.config is not None:
        tmp = dst / ".config.json.partial"
        tmp.write_text(json.dumps(pkg.config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dst / "config.json")
