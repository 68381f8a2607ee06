"""Byte sizes written by people (``512MiB``, ``4G``) and for people."""

from __future__ import annotations

from spherefmt.errors import InputError

__all__ = ["parse_size", "format_size"]


def parse_size(text: str) -> int:
    """``"16G"``, ``"512MiB"``, ``"1000000"`` -> bytes (binary units); :class:`InputError` otherwise."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        value = float(num)
    except ValueError:
        raise InputError(f"size {text!r}: expected a number with an optional K, M, G or T suffix") from None
    if not 0 < value * mult < 1 << 50:
        raise InputError(f"size {text!r} is out of range")
    return int(value * mult)


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
