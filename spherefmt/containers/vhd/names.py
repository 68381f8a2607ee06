"""How a store key's path components become FAT names (``spec/VHD.md`` section 3.1).

A FAT directory compares names without regard to case, drops trailing dots and spaces, and
holds long names of at most 255 characters (pyfatfs writes at most 127: it counts the UTF-16
bytes against that limit).  A component that FAT can hold as it is, is stored as it is, so a
package copied onto the volume by Windows or mtools reads, and a user browsing the volume sees
the tensor names.  Any other component is stored *encoded*, a name no plain component can take:

- ``!=`` followed by the component with ``!`` written ``!!``, each capital ASCII letter ``X``
  written ``!x`` and a trailing dot or space written ``!0`` / ``!1``: no capital letter is
  left, so two components that differ only in case get two encoded names that differ however
  FAT compares them;
- an encoded name longer than :data:`FAT_WRITE_NAME` is cut into parts, each but the last a
  directory named ``!+`` followed by its part, nested, the last named ``!=`` followed by its part.

Which components are encoded: every one that contains ``!``, ends with a dot or a space, or is
longer than :data:`FAT_WRITE_NAME`, and one whose plain name a different-case sibling already
holds.  A reader looks a component up as its plain name with its exact case, then as its
encoded name, then as its plain name in any case (how FAT itself would look it up).
"""

from __future__ import annotations

__all__ = ["FAT_WRITE_NAME", "ENCODED", "CONTINUED", "needs_encoding", "encode", "decode"]

#: the longest long name written (pyfatfs refuses more: it counts UTF-16 bytes against FAT's 255)
FAT_WRITE_NAME = 127
#: prefix of an encoded name that ends here, and of one that continues in the directory it names
ENCODED, CONTINUED = "!=", "!+"


def needs_encoding(component: str) -> bool:
    """Whether ``component`` is encoded whatever its siblings are called."""
    return "!" in component or component.endswith((".", " ")) or len(component) > FAT_WRITE_NAME


def _tokens(component: str) -> list[str]:
    tail = len(component) - len(component.rstrip(". "))
    out = []
    for i, ch in enumerate(component):
        if ch == "!":
            out.append("!!")
        elif "A" <= ch <= "Z":
            out.append("!" + ch.lower())
        elif i >= len(component) - tail:
            out.append("!0" if ch == "." else "!1")
        else:
            out.append(ch)
    return out


def encode(component: str) -> list[str]:
    """The FAT names (one, or nested parts) of ``component`` in its encoded form."""
    width = FAT_WRITE_NAME - len(ENCODED)
    parts, cur = [], ""
    for t in _tokens(component):  # an escape pair never straddles two parts
        if len(cur) + len(t) > width:
            parts.append(cur)
            cur = ""
        cur += t
    parts.append(cur)
    return [CONTINUED + p for p in parts[:-1]] + [ENCODED + parts[-1]]


def decode(part: str) -> str:
    """The text an encoded name part stands for (``part`` without its two-character prefix)."""
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch == "!" and i + 1 < len(part):
            nxt = part[i + 1]
            out.append({"!": "!", "0": ".", "1": " "}.get(nxt, nxt.upper()))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
