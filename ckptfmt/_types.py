"""Container and config types the tree cannot hold, kept in a side table (spec/FORMAT.md §4.8).

A torch ``state_dict()`` is an ``OrderedDict`` whose ``_metadata`` attribute carries module versions
that ``load_state_dict`` hands to ``_load_from_state_dict``; configs hold ``torch.Size``,
``torch.dtype`` and ``torch.device`` values. The tree stores their plain forms (a map, an array of
ints, a str) so every reader can read them; the table ``user["ckptfmt.types"]`` records, by key path,
what each was, so a load gives back the original types (torch ones with the torch backend only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from . import _keypath
from .errors import InvalidMetadataError, UnsupportedObjectError

#: The key of the side table in the user metadata; reserved, and hidden from ``Checkpoint.metadata``.
TYPES_KEY = "ckptfmt.types"
ORDERED_DICT = "OrderedDict"
TORCH_SIZE, TORCH_DTYPE, TORCH_DEVICE = "torch.Size", "torch.dtype", "torch.device"
_TORCH = {"Size": TORCH_SIZE, "dtype": TORCH_DTYPE, "device": TORCH_DEVICE}


#: Per type: 0 a leaf left as it is, 1 a container to walk, 2 a torch value to tag (filled as types are met).
_KIND: dict[type, int] = {str: 0, int: 0, float: 0, bool: 0, bytes: 0, type(None): 0, dict: 1, list: 1, tuple: 1}


def _kind(t: type) -> int:
    k = _KIND.get(t)
    if k is None:
        if t.__module__ == "torch" and t.__name__ in _TORCH:
            k = 2
        elif issubclass(t, (dict, list)) or (issubclass(t, tuple) and not hasattr(t, "_fields")):
            k = 1
        else:
            k = 0
        _KIND[t] = k
    return k


def _torch_kind(value: Any) -> str | None:
    t = type(value)
    return _TORCH.get(t.__name__) if t.__module__ == "torch" else None


def _plain_metadata(meta: Any, where: str) -> dict[Any, Any]:
    """A state dict's ``_metadata`` (prefix -> {"version": n, ...}) as plain maps, or a clear refusal."""
    if not isinstance(meta, dict):
        raise UnsupportedObjectError(f"{where}: _metadata of a state dict is a {type(meta).__name__}, not a dict")
    out: dict[Any, Any] = {}
    for prefix, entry in meta.items():
        if not isinstance(prefix, str) or not isinstance(entry, dict):
            raise UnsupportedObjectError(f"{where}: _metadata entry {prefix!r} is not str -> dict")
        out[prefix] = dict(entry)
    return out


def encode_types(obj: Any) -> tuple[Any, dict[str, Any]]:
    """``obj`` with torch dtypes and devices as str, and the side table of every typed node.

    Containers are copied only on the way to a changed value; array leaves are never copied (their
    identity decides shared storage).
    """
    table: dict[str, Any] = {}

    def walk(node: Any, path: tuple[str | int, ...], depth: int) -> Any:
        t = type(node)
        if t is str or t is int or t is float or t is bool or node is None:
            return node
        if depth > 64:  # the encoder reports nesting too deep, with the key path
            return node
        if isinstance(node, dict):
            if isinstance(node, OrderedDict):
                entry: dict[str, Any] = {"type": ORDERED_DICT}
                meta = getattr(node, "_metadata", None)
                if meta is not None:
                    entry["metadata"] = _plain_metadata(meta, _keypath.join(path) or "the root")
                table[_keypath.join(path)] = entry
            out: dict[Any, Any] | None = None
            for k, v in node.items():
                if not _kind(type(v)) or not isinstance(k, (str, int)):
                    continue
                nv = walk(v, (*path, k), depth + 1)
                if nv is not v:
                    if out is None:
                        out = dict(node)
                    out[k] = nv
            return node if out is None else out
        kind = _torch_kind(node)
        if kind == TORCH_SIZE:
            table[_keypath.join(path)] = {"type": kind}
            return tuple(int(d) for d in node)
        if kind is not None:
            table[_keypath.join(path)] = {"type": kind}
            return str(node)
        if t is list or (t is tuple and not hasattr(node, "_fields")):
            items = [walk(v, (*path, i), depth + 1) if _kind(type(v)) else v for i, v in enumerate(node)]
            if any(a is not b for a, b in zip(items, node, strict=True)):
                return items if t is list else tuple(items)
        return node

    return walk(obj, (), 0), table


def _bad(path: str, why: str) -> InvalidMetadataError:
    return InvalidMetadataError(path, f"user metadata {TYPES_KEY!r}: {why}")


def parse_types(table: Any, path: str) -> dict[str, dict[str, Any]]:
    """The side table of a file, checked: key path -> {"type": ..., "metadata"?: ...}; unknown types skipped."""
    if table is None:
        return {}
    if type(table) is not dict:
        raise _bad(path, "is not a map")
    out: dict[str, dict[str, Any]] = {}
    for key, entry in table.items():
        if type(key) is not str or type(entry) is not dict or type(entry.get("type")) is not str:
            raise _bad(path, f"entry {key!r} is not key path -> {{'type': str, ...}}")
        meta = entry.get("metadata")
        if meta is not None and (type(meta) is not dict or
                                 not all(type(k) is str and type(v) is dict for k, v in meta.items())):
            raise _bad(path, f"entry {key!r}: 'metadata' is not a map of str -> map")
        if entry["type"] in (ORDERED_DICT, TORCH_SIZE, TORCH_DTYPE, TORCH_DEVICE):  # newer kinds: left plain
            out[key] = entry
    return out


def _torch_value(kind: str, value: Any, key: str, path: str) -> Any:
    import torch

    if kind == TORCH_SIZE:
        if type(value) is not tuple or not all(type(d) is int and d >= 0 for d in value):
            raise _bad(path, f"{key!r} is marked torch.Size but holds {type(value).__name__}")
        return torch.Size(value)
    if type(value) is not str:
        raise _bad(path, f"{key!r} is marked {kind} but holds {type(value).__name__}")
    if kind == TORCH_DTYPE:
        found = getattr(torch, value[6:], None) if value.startswith("torch.") else None
        if not isinstance(found, torch.dtype):
            raise _bad(path, f"{key!r}: {value!r} is not a torch dtype")
        return found
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise _bad(path, f"{key!r}: {value!r} is not a torch device") from None


def _replace(node: Any, parts: list[str], fn: Callable[[Any, str, str], Any], key: str, path: str) -> Any:
    if not parts:
        return fn(node, key, path)
    el, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        k: Any = el
        if el not in node:
            k = int(el) if el.lstrip("-").isdigit() and int(el) in node else None
        if k is None:
            raise _bad(path, f"key path {key!r} is not in the tree")
        node[k] = _replace(node[k], rest, fn, key, path)
        return node
    if type(node) in (list, tuple) and el.isdigit() and int(el) < len(node):
        i = int(el)
        new = _replace(node[i], rest, fn, key, path)
        if type(node) is list:
            node[i] = new
            return node
        return (*node[:i], new, *node[i + 1 :])
    raise _bad(path, f"key path {key!r} is not in the tree")


def restore_types(value: Any, table: dict[str, dict[str, Any]], *, at: str, torch_types: bool, path: str) -> Any:
    """Give back the types of ``table`` inside ``value``, the loaded subtree at key path ``at``."""
    for key in sorted(table, key=len):  # parents before children: each replacement keeps what is below
        if at and key != at and not key.startswith(at + "/"):
            continue
        rel = key[len(at) + 1 :] if at and key != at else ("" if at else key)
        entry = table[key]
        kind = entry["type"]
        if kind != ORDERED_DICT and not torch_types:
            continue
        fn = partial(_ordered, entry=entry) if kind == ORDERED_DICT else partial(_torch_value, kind)
        value = _replace(value, _keypath.split(rel) if rel else [], fn, key, path)
    return value


def _ordered(node: Any, key: str, path: str, *, entry: dict[str, Any]) -> Any:
    if not isinstance(node, dict):
        raise _bad(path, f"{key!r} is marked OrderedDict but holds {type(node).__name__}")
    out: Any = OrderedDict(node)
    if "metadata" in entry:
        out._metadata = OrderedDict((k, dict(v)) for k, v in entry["metadata"].items())
    return out
