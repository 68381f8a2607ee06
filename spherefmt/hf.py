"""Packages as Hugging Face ``transformers`` models.

    >>> import spherefmt.hf
    >>> model = spherefmt.hf.load_model("model.sphere")        # a transformers model, dense
    >>> model.generate(...)                                     # everything downstream works

The model is built from the package's config (``AutoConfig.for_model``) and gets every tensor of
the package: FFN tensors are rebuilt from the experts (bit-exact), and after growth padded with
zero neurons to the config's FFN size.  Converting a ``save_pretrained`` folder and loading it back
gives the same logits as ``from_pretrained`` on the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import constants as C
from .errors import BackendUnavailableError, FormatError
from .package import Package
from .package import open as open_package

__all__ = ["load_model"]

_PREFIXES = ("transformer.", "model.")  # packages converted from bare (prefix-less) state dicts


def _transformers() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise BackendUnavailableError("spherefmt.hf needs torch and transformers: "
                                      "pip install torch==2.13.0 'spherefmt[hf]'") from e
    return transformers


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
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(pkg._layout.dtype,
                                                                                          torch.float32)
    try:
        cfg = transformers.AutoConfig.for_model(**pkg.config)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{pkg.where}: transformers cannot build a config from the package ({e})") from None
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    own = model.state_dict()
    sd = {}
    for name, value in pkg.state_dict(framework="torch", padded=True).items():
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
