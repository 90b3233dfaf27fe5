"""Plain msgpack data (spec §4.6): what ``user`` and ``producer`` metadata may hold, checked on save and on open."""

from __future__ import annotations

from typing import Any

from ._tables import Limits
from .errors import ObjectLimitError, UnsupportedObjectError

_KEYS = frozenset((str, int))


def check_plain(value: Any, *, max_depth: int = Limits.max_depth, what: str = "user metadata",
                tuples: bool = True) -> int:
    """Raise :class:`UnsupportedObjectError` unless ``value`` is plain msgpack data (§4.6); count containers.

    Writers may pass tuples (msgpack stores them as arrays); a decoded file must hold none. Nesting
    deeper than ``max_depth`` containers (the root is level 1) raises :class:`ObjectLimitError`.
    """
    stack = [(value, 0)]
    containers = 0
    while stack:
        v, d = stack.pop()
        t = type(v)
        if t is dict:
            if d >= max_depth:
                raise ObjectLimitError(f"{what} nests deeper than {max_depth}")
            containers += 1
            if not set(map(type, v)) <= _KEYS:
                raise UnsupportedObjectError(f"{what}: map keys must be str or int")
            for k in v:
                if type(k) is int and not -(1 << 63) <= k < (1 << 64):
                    raise UnsupportedObjectError(f"{what}: int key {k} does not fit in 64 bits")
            stack.extend((x, d + 1) for x in v.values())
        elif t is list or (t is tuple and tuples):
            if d >= max_depth:
                raise ObjectLimitError(f"{what} nests deeper than {max_depth}")
            containers += 1
            stack.extend((x, d + 1) for x in v)
        elif t is int:
            if not -(1 << 63) <= v < (1 << 64):
                raise UnsupportedObjectError(f"{what}: int {v} does not fit in 64 bits")
        elif not (t is str or t is bytes or t is float or t is bool or v is None):
            raise UnsupportedObjectError(f"{what} holds a {t.__name__}; only dict, list, str, bytes, int, float, "
                                         "bool and None are allowed")
    return containers
