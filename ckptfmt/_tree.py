"""Walking, mapping and rebuilding trees (spec §4.2 tree, §4.4 key paths), written once.

Two kinds of tree pass through ckptfmt: the user's object (dicts, lists, tuples of arrays and
plain values) and the *decoded* tree of a file, whose tensor leaves are references (a plain ``int``
row, :class:`~ckptfmt._tables.TensorRef`, :class:`~ckptfmt._tables.ViewRef`) and whose
integers are :class:`~ckptfmt._tables.PlainInt`. Every walk is iterative, so depth is bounded by
the caller's limits, never by Python's recursion limit (except :func:`map_tree` and :func:`rebuild`,
which copy a tree already checked to be at most ``Limits.max_depth`` deep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import _keypath
from ._tables import PlainInt, TensorRef, ViewRef, tensor_ref
from .errors import CheckpointKeyError

__all__ = ["Path", "children", "count_leaves", "is_decimal", "map_tree", "plain", "rebuild", "resolve", "short",
           "tensor_rows", "walk", "walk_leaves", "walk_nodes"]

#: A key path as its elements (dict keys, or list/tuple positions).
Path = tuple[str | int, ...]


def children(node: Any) -> Iterable[tuple[str | int, Any]] | None:
    """(key, child) pairs of a dict, list or tuple (exact types); None for a leaf."""
    t = type(node)
    if t is dict:
        return node.items()  # type: ignore[no-any-return,unused-ignore]
    if t is list or t is tuple:
        return enumerate(node)
    return None


def walk(node: Any, path: Path = (), *, empty_leaves: bool = False) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every leaf in tree order.

    An empty container has no leaves, unless ``empty_leaves``: then it is yielded as a leaf of its own
    (what exporters need to keep an empty dict). One iterator per open container: memory O(depth),
    whatever the width (a tree of 10**7 leaves).
    """
    items = children(node)
    if items is None or (empty_leaves and not len(node)):
        yield path, node
        return
    stack: list[tuple[Iterator[tuple[str | int, Any]], Path]] = [(iter(items), path)]
    while stack:
        it, p = stack[-1]
        for k, v in it:
            sub = children(v)
            if sub is None or (empty_leaves and not len(v)):
                yield (*p, k), v
                continue
            stack.append((iter(sub), (*p, k)))
            break
        else:
            stack.pop()


def walk_leaves(node: Any, path: Path = ()) -> Iterator[tuple[str, Any]]:
    """(key path, leaf) for every leaf of a decoded tree, in tree order (empty containers have none)."""
    for p, leaf in walk(node, path):
        yield _keypath.join(p), leaf


def count_leaves(node: Any) -> int:
    """How many leaves :func:`walk_leaves` yields, without building key paths."""
    n = 0
    stack = [node]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is not dict and t is not list and t is not tuple:
            n += 1
            continue
        values = x.values() if t is dict else x
        if not set(map(type, values)) & {dict, list, tuple}:
            n += len(values)
            continue
        for v in values:
            tv = type(v)
            if tv is dict or tv is list or tv is tuple:
                stack.append(v)
            else:
                n += 1
    return n


def walk_nodes(node: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, node) for every node, containers included, parents before their children, in tree order."""
    yield path, node
    items = children(node)
    if items is None:
        return
    stack: list[tuple[Iterator[tuple[str | int, Any]], Path]] = [(iter(items), path)]
    while stack:
        it, p = stack[-1]
        for k, v in it:
            yield (*p, k), v
            sub = children(v)
            if sub is not None:
                stack.append((iter(sub), (*p, k)))
                break
        else:
            stack.pop()


def short(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut in the middle when long (a hostile key path can be megabytes)."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[: limit // 2]}...{r[-limit // 2 :]} ({len(text)} chars)"


def plain(value: Any) -> Any:
    """A decoded plain leaf as the user saved it."""
    return int(value) if type(value) is PlainInt else value


def map_tree(node: Any, leaf: Callable[[int, Any, str], Any], path: Path = ()) -> Any:
    """Copy a decoded tree, replacing each tensor leaf by ``leaf(row, is_scalar, key_path)``.

    A view leaf comes as ``leaf(view_row, None, key_path)``.
    """
    ref = tensor_ref(node)
    if ref is not None:
        return leaf(ref[0], ref[1], _keypath.join(path))
    t = type(node)
    if t is ViewRef:
        return leaf(node.index, None, _keypath.join(path))
    if t is dict:
        return {k: map_tree(v, leaf, (*path, k)) for k, v in node.items()}
    if t is list:
        return [map_tree(v, leaf, (*path, i)) for i, v in enumerate(node)]
    if t is tuple:
        return tuple(map_tree(v, leaf, (*path, i)) for i, v in enumerate(node))
    return plain(node)


def rebuild(node: Any, convert: Callable[[int, bool | None], Any]) -> Any:
    """Copy a decoded tree with ``convert(row, is_scalar)`` in place of references: the hot loop of a load.

    ``is_scalar`` None means row ``row`` of the view table.
    """
    t = type(node)
    if t is int:
        return convert(node, False)
    if t is dict:
        out = {}
        for k, v in node.items():
            tv = type(v)
            if tv is int:
                out[k] = convert(v, False)
            elif tv is dict or tv is list or tv is tuple or tv is TensorRef or tv is PlainInt or tv is ViewRef:
                out[k] = rebuild(v, convert)
            else:
                out[k] = v
        return out
    if t is list:
        return [rebuild(v, convert) for v in node]
    if t is tuple:
        return tuple(rebuild(v, convert) for v in node)
    if t is TensorRef:
        return convert(node.index, True)
    if t is ViewRef:
        return convert(node.index, None)
    return plain(node)


def is_decimal(el: str) -> bool:
    """Whether a key path element spells an integer exactly as ``str(int)`` would (§4.4)."""
    body = el[1:] if el.startswith("-") else el
    # the length cap keeps int() away from Python's 4300-digit limit; no list or dict key is that long
    return 0 < len(body) <= 20 and body.isdigit() and body.isascii() and str(int(el)) == el


def resolve(tree: Any, key: str, *, where: str = "the checkpoint") -> Any:
    """The node of a decoded tree at key path ``key``; ``""`` is the whole tree (§4.4).

    O(depth): one dict or list lookup per element. Raises :class:`CheckpointKeyError` naming ``where``.
    """
    node = tree
    if key == "" and not (type(node) is dict and "" in node):
        return node  # §4.4: the whole tree, unless the root dict has a key ""
    for el in _keypath.split(key):
        t = type(node)
        if t is dict:
            if el in node:
                node = node[el]
                continue
            if is_decimal(el) and int(el) in node:
                node = node[int(el)]
                continue
        elif (t is list or t is tuple) and is_decimal(el) and 0 <= int(el) < len(node):
            node = node[int(el)]
            continue
        raise CheckpointKeyError(f"{where}: no key {short(key)} in the checkpoint (element {short(el)} not found)")
    return node


def tensor_rows(node: Any, view_base: Callable[[int], int]) -> dict[int, None]:
    """The tensor-table rows a decoded subtree needs, in order, once each (a view needs its base row)."""
    rows: dict[int, None] = {}
    ref = tensor_ref(node)
    if ref is not None:  # the common case of a lazy get: one tensor, no walk
        rows[ref[0]] = None
        return rows
    for _, leaf in walk(node):
        ref = tensor_ref(leaf)
        if ref is not None:
            rows[ref[0]] = None
        elif type(leaf) is ViewRef:
            rows[view_base(leaf.index)] = None
    return rows
