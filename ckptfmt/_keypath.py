"""Key paths: how users name a value inside the saved tree (spec §4.4).

Path elements are joined by ``/``; inside an element ``~`` is written ``~0`` and ``/`` is written
``~1`` (the escaping of RFC 6901, JSON Pointer). A dict key that is an int and a list index are
written in decimal.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InvalidKeyError

SEPARATOR = "/"


def escape(element: str | int) -> str:
    """One path element as it appears in a key path."""
    if isinstance(element, int):
        return str(element)
    if "~" in element or "/" in element:
        return element.replace("~", "~0").replace("/", "~1")
    return element


def join(elements: Iterable[str | int]) -> str:
    """The key path of a sequence of dict keys and list indices."""
    return SEPARATOR.join(escape(e) for e in elements)


def split(path: str) -> list[str]:
    """The unescaped elements of ``path``; :class:`InvalidKeyError` on a malformed escape."""
    if not isinstance(path, str):
        raise InvalidKeyError(f"a key path is a str, got {type(path).__name__}")
    parts = path.split(SEPARATOR)
    if "~" not in path:
        return parts
    out = []
    for part in parts:
        i = part.find("~")
        while i != -1:
            if i + 1 >= len(part) or part[i + 1] not in "01":
                raise InvalidKeyError(f"key path {path!r}: '~' must be followed by 0 or 1 (write '~0' for '~')")
            i = part.find("~", i + 2)
        out.append(part.replace("~1", "/").replace("~0", "~"))
    return out
