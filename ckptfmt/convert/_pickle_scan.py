"""Where in a pickle's object tree a refused global is used, found without running anything it names.

The pickle is replayed with an unpickler whose every global is an inert stand-in class (:class:`Stub`):
calling it, instantiating it or setting its state only records the arguments, and persistent ids
(tensor storages) become ``None``. Walking the skeleton so built gives the key path of each use.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from .._keypath import join

__all__ = ["MAX_SCAN", "Stub", "global_paths", "skeleton"]

#: pickles larger than this are not replayed (the refusal then names the globals without key paths)
MAX_SCAN = 256 << 20
_SHOWN = 10


class Stub:
    """An instance of a global the skeleton unpickler stood in for; records how the pickle built it."""

    global_name = ""
    args: tuple[Any, ...]
    items: list[tuple[Any, Any]]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        self = object.__new__(cls)
        self.args = args
        self.items = []
        self.state = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        """A list-like global's APPEND."""
        self.items.append((len(self.items), value))

    def extend(self, values: Any) -> None:
        """A list-like global's APPENDS."""
        for v in values:
            self.append(v)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Skeleton(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._classes: dict[str, type[Stub]] = {}

    def find_class(self, module: str, name: str) -> type[Stub]:
        full = f"{module}.{name}"
        cls = self._classes.get(full)
        if cls is None:
            cls = type("Stub", (Stub,), {"global_name": full})
            self._classes[full] = cls
        return cls

    def persistent_load(self, pid: Any) -> None:
        return None


def skeleton(data: bytes, index: int = 0) -> Any:
    """The object tree of pickle ``data`` with every global replaced by a :class:`Stub` subclass.

    ``index``: which of several pickles written one after the other to replay (the legacy torch.save
    layout holds the magic number, the protocol version and the system info before the object).
    """
    unpickler = _Skeleton(data)
    for _ in range(index):
        unpickler.load()
    return unpickler.load()


def _key(k: Any) -> str | int:
    return k if isinstance(k, (str, int)) and not isinstance(k, bool) else repr(k) if not isinstance(k, Stub) else \
        f"<{k.global_name}>"


def global_paths(data: bytes, names: set[str], index: int = 0) -> dict[str, list[str]]:
    """``{global: [key path, ...]}`` of the uses of ``names`` in pickle ``data`` ({} if it cannot be replayed).

    ``index``: as for :func:`skeleton`.
    """
    if len(data) > MAX_SCAN:
        return {}
    try:
        root = skeleton(data, index)
    except Exception:  # a broken pickle: torch reports it when loading
        return {}
    found: dict[str, list[str]] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Stub):
            if obj.global_name in names:
                found.setdefault(obj.global_name, []).append(join(path))
                continue
            children: list[tuple[Any, tuple[str | int, ...]]] = [(v, (*path, _key(k))) for k, v in obj.items]
            children += [(a, path) for a in obj.args]
            if obj.state is not None:
                children.append((obj.state, path))
            stack.extend(children)
        elif isinstance(obj, type) and issubclass(obj, Stub):
            if obj.global_name in names:  # the global itself stored as a value
                found.setdefault(obj.global_name, []).append(join(path))
        elif isinstance(obj, dict):
            stack.extend((v, (*path, _key(k))) for k, v in obj.items())
            stack.extend((k, path) for k in obj if isinstance(k, Stub))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, (*path, i)) for i, v in enumerate(obj))
    return found


def describe(found: dict[str, list[str]]) -> str:
    """``"numpy.foo at 'a/b', 'c'"``-style text for an error message."""
    parts = []
    for name, paths in sorted(found.items()):
        shown = ", ".join(repr(p) for p in paths[:_SHOWN]) + (f" and {len(paths) - _SHOWN} more"
                                                                if len(paths) > _SHOWN else "")
        parts.append(f"{name} at {shown}")
    return "; ".join(parts)
