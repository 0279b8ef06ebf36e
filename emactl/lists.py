"""The one parser of comma-separated lists, as options (``--sizes 33,65``) and axes write them."""
from __future__ import annotations


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``a,[1,2],'x,y'`` → 3 items, unstripped.

    Brackets and quotes matter for ``ablate --set KEY=V1,V2``, whose values are YAML; plain
    lists (``33,65``) split as ``str.split(",")`` would. Callers strip, drop or refuse empty items.
    """
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def items(text: str) -> list[str]:
    """The non-empty, stripped items of ``text``: ``" a, ,b"`` → ``["a", "b"]``."""
    return [s.strip() for s in split_values(text) if s.strip()]
