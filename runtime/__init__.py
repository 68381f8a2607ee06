"""Streaming inference runtime of spherefmt, installed as ``spherefmt.runtime``.

GPT-2 and Llama forward passes written once against :mod:`spherefmt.backends`, reading blocks
(core weights and one layer of one expert at a time) from any package under a device memory
budget: load -> use -> release, with a Belady-style cache and a background prefetcher.

    >>> from spherefmt.runtime import Session
    >>> s = Session("model.sphere", backend="numpy", budget="25%")
    >>> s.generate([464, 3290], max_new_tokens=8)
"""

from __future__ import annotations

from spherefmt.runtime.session import Session, parse_budget

__all__ = ["Session", "parse_budget"]
