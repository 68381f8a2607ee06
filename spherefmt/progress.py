"""Progress bars (tqdm) for long work: conversion, export, verification, training."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B") -> Any:
    """A tqdm bar over ``total`` units (bytes by default), hidden unless ``enabled`` and stderr is
    a terminal (a log file or a pipe gets no carriage-return lines: an error stays one line)."""
    from tqdm.auto import tqdm  # noqa: PLC0415 - only long work pays for importing tqdm

    # disable=None: tqdm's own "off unless the stream is a terminal"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=None if enabled else True,
                leave=False)
