"""Text <-> token ids for a package: its own ``tokenizer.json`` (the ``tokenizers`` library) when
the source carried one, else UTF-8 bytes (ids 0..255)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spherefmt.errors import BackendUnavailableError, FormatError, InputError

if TYPE_CHECKING:
    from spherefmt.format.package import Package

__all__ = ["ByteTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """Token id = byte of the UTF-8 text; decoding replaces invalid sequences."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from the package's ``tokenizer.json``."""

    name = "tokenizer.json"

    def __init__(self, blob: bytes, where: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise BackendUnavailableError(f"{where} carries tokenizer.json; pip install tokenizers to use it") from e
        try:
            self.tok = Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - a malformed file is a format error, not a crash
            raise FormatError(f"{where}: tokenizer.json cannot be loaded ({str(e)[:120]})") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=False))


def load_tokenizer(pkg: Package, vocab: int | None = None) -> Any:
    """The package's tokenizer, or bytes when it has none and its vocabulary holds 256 ids
    (``vocab``: the model's vocabulary size; default read from its embedding table)."""
    if vocab is None:
        embed = [k for k in pkg.keys() if k.endswith(("wte.weight", "embed_tokens.weight"))]
        vocab = pkg.tensor_info(embed[0]).shape[0] if embed else 0
    if "tokenizer.json" in pkg.metadata.get("files", []):
        return HFTokenizer(pkg.file("tokenizer.json"), pkg.where)
    if vocab < 256:
        raise InputError(f"{pkg.where} has no tokenizer.json and its vocabulary ({vocab}) is too small for "
                         "byte-level text; pass token ids instead")
    return ByteTokenizer()
