"""``spherefmt.save``: the format's writer, with placements that run the model made first.

:func:`spherefmt.format.write.save` places neurons by their weights (``pca``) or takes a
:class:`~spherefmt.format.placement.PlacementPlan`.  Co-activation placement runs the model on
sample text, which is the runtime's job, so this module (above both) makes that plan and hands
it to the format.
"""

from __future__ import annotations

from typing import Any

from spherefmt.errors import InputError
from spherefmt.format.placement import PlacementPlan
from spherefmt.format.write import save as save_package

__all__ = ["save"]


def save(src: Any, dst: Any, *, placement: str | PlacementPlan = "pca", sample: Any = None, **options: Any) -> str:
    """Convert a model to a sphere package; every option of :func:`spherefmt.format.write.save`.

    Parameters
    ----------
    placement
        ``"pca"`` (``lightning-pca-balanced``: cells from weight directions), ``"coactivation"``
        (``coactivation-balanced``: neurons active together on ``sample`` share cells, which is
        what top-k routing needs; ``spec/FORMAT.md`` 7.1), or a ready
        :class:`~spherefmt.format.placement.PlacementPlan`.
    sample
        Text (``str``, tokenized with the model's tokenizer) or token ids for ``"coactivation"``.

    Examples
    --------
    >>> import numpy as np, spherefmt
    >>> spherefmt.save({"w": np.ones(3, np.float32)}, "memory://doc-example")
    'memory://doc-example'
    """
    if placement == "coactivation":
        from spherefmt.runtime.coactivation import coactivation_plan  # noqa: PLC0415 - runs the model

        placement = coactivation_plan(src, sample=sample, config=options.get("config"),
                                      graticule=options.get("graticule"), depth=options.get("depth"))
    elif not isinstance(placement, PlacementPlan) and placement != "pca":
        raise InputError(f"placement {placement!r}: expected pca or coactivation")
    return save_package(src, dst, placement=placement, **options)
