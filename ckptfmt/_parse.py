"""The reader's side of the metadata (spec §4, §8): untrusted bytes decoded, checked, and made a :class:`Manifest`.

Untrusted bytes become a :class:`~ckptfmt._tables.Manifest` only through :func:`parse_manifest`, which
applies every validation rule of §8 that does not need the blob bytes themselves: the caps of §8.1
(metadata length, nesting depth, containers per byte, rows, dimensions), the tree's leaf and key types
(§4.2), the tensor table's columns and sizes (§4.3, §8.2), the view table's extents (§4.7), that every
row is referenced exactly by the tree (§8.2), and the blob layout (§4.5). Here: the tree's decoding
(§4.2) and the references it holds; the maps are split by ``_sections``, the tables checked by ``_columns``.
"""

from __future__ import annotations

import gc
from functools import partial
from itertools import chain
from typing import Any

import msgpack
import numpy as np

from ._columns import check_layout, parse_tensor_table, parse_views
from ._features import parse_features
from ._plain import check_plain
from ._sections import ManyObjects, bin_payload, map_header, sections, skip
from ._tables import (
    EMPTY_VIEWS,
    EXT_INT,
    EXT_MAP,
    EXT_SCALAR,
    EXT_TUPLE,
    EXT_VIEW,
    KNOWN_SECTIONS,
    TENSOR_COLUMNS,
    VIEW_COLUMNS,
    Limits,
    Manifest,
    PlainInt,
    TensorRef,
    ViewRef,
    container_budget,
)
from .errors import (
    InvalidMetadataError,
    MetadataLimitError,
    ObjectLimitError,
    UnsupportedObjectError,
)

_KEYS = frozenset((str, int))


def _lists_in(values: Any) -> int:
    """How many lists ``values`` holds, at any depth through lists (not inside dicts and tuples)."""
    stack = [v for v in values if type(v) is list]
    count = 0
    while stack:
        count += 1
        stack.extend([v for v in stack.pop() if type(v) is list])
    return count


class _Deferred:
    """A tuple (ext 2) or dict (ext 5) whose payload is decoded later, by :meth:`_Decoder._expand`.

    Decoding a nested ext payload inside its parent's decode would keep every ancestor's payload
    copy alive at once (depth x L bytes); deferred, the live payloads are disjoint pieces of the
    metadata, so decoding costs a small multiple of L at any depth (§8.1).
    """

    __slots__ = ("code", "payload")

    def __init__(self, code: int, payload: bytes | None) -> None:
        self.code = code
        self.payload = payload


_LEAVES = frozenset((str, bytes, bool, int, PlainInt, float, type(None), TensorRef, ViewRef))
#: what a decoded tree holds before its walk: leaves, lists, deferred payloads and small dicts and tuples
#: decoded at once (:meth:`_Decoder._eager`)
_TREE_TYPES = _LEAVES | {list, dict, tuple, _Deferred}
_CONTAINERS = frozenset((list, dict, tuple))
#: a tuple or dict payload (ext 2, ext 5) up to this size is decoded inside its parent's decode: the live
#: copies stay below max_depth x this many bytes, and the per-container Python work of deferral is saved
_EAGER_BYTES = 4096


class _Decoder:
    """Decodes the sections of one metadata map, counting containers against the budget of §8.1."""

    def __init__(self, path: str | None, limits: Limits, budget: int) -> None:
        self.path = path
        self.limits = limits
        self.left = budget
        #: tensor rows the tree references, in lists (one per container that holds any)
        self.refs: list[list[int]] = []
        self.scalars: list[int] = []
        self.view_refs: list[int] = []
        #: how many eager payload decodes are running, one inside another
        self._nested = 0
        #: msgpack's decode of a small payload, its options bound once (it runs once per small dict)
        self._unpack_small = partial(msgpack.unpackb, raw=False, strict_map_key=False, ext_hook=self._ext,
                                     object_pairs_hook=self._no_maps)

    # -- counting: every msgpack array and map decoded passes through one of these hooks
    def _spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise MetadataLimitError(self.path, "metadata decodes to more containers (lists, maps, tuples) than "
                                                f"its length allows (one per {self.limits.bytes_per_container} bytes; "
                                                "lower Limits.bytes_per_container, or 0 for no cap)")

    def _list(self, items: list[Any]) -> list[Any]:
        self.left -= 1
        if self.left < 0:
            self._spend(0)
        return items

    def _pairs(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self._spend()
        d = dict(pairs)
        if len(d) != len(pairs):
            raise InvalidMetadataError(self.path, "a map has duplicate keys")
        return d

    def _no_maps(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        raise InvalidMetadataError(self.path, "a msgpack map in the tree (maps in the tree are ext 5)")

    def _no_ext(self, code: int, payload: bytes) -> Any:
        raise InvalidMetadataError(self.path, f"msgpack ext type {code} outside the tree (only the tree and unknown "
                                              "entries may hold ext types)")

    def plain(self, buf: Any) -> Any:
        """A section of plain msgpack data (``user``, ``producer``, ``created``, table values)."""
        return msgpack.unpackb(buf, raw=False, strict_map_key=False, ext_hook=self._no_ext,
                               object_pairs_hook=self._pairs, list_hook=self._list)

    def columns(self, buf: Any, known: frozenset[str], what: str, *, copy: bool) -> dict[str, Any]:
        """The tensor or view map: known columns decoded, unknown entries (any msgpack value) skipped (§4.3).

        Binary columns come back as views of ``buf`` (read in place), or as copies with ``copy`` (when
        they are a small part of the metadata, so that the table does not keep all of it alive); the
        rest is decoded.
        An entry of many objects (only an unknown one can be) sends the whole map to msgpack's skip.
        """
        left = self.left
        try:
            return self._columns_in_place(buf, known, what, copy)
        except ManyObjects:
            self.left = left
            return self._columns_copied(buf, known, what)

    def _columns_in_place(self, buf: Any, known: frozenset[str], what: str, copy: bool) -> dict[str, Any]:
        head = map_header(buf)
        if head is None:
            raise InvalidMetadataError(self.path, f"'{what}' is not a map")
        count, pos = head
        self._spend()
        out: dict[str, Any] = {}
        for _ in range(count):
            end = skip(buf, pos)
            key = self.plain(buf[pos:end])
            if type(key) is not str:
                raise InvalidMetadataError(self.path, f"'{what}' has a key {key!r} that is not a str")
            pos, end = end, skip(buf, end)
            if key in known:
                if key in out:
                    raise InvalidMetadataError(self.path, f"'{what}' has two {key!r} entries")
                value = buf[pos:end]
                raw = bin_payload(value)
                out[key] = self.plain(value) if raw is None else bytes(raw) if copy else raw
            pos = end
        return out

    def _columns_copied(self, buf: Any, known: frozenset[str], what: str) -> dict[str, Any]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=self._no_ext,
                                    object_pairs_hook=self._pairs, list_hook=self._list,
                                    max_buffer_size=max(len(buf), 1))
        unpacker.feed(buf)
        try:
            count = unpacker.read_map_header()
        except ValueError:  # msgpack: "Unexpected type"
            raise InvalidMetadataError(self.path, f"'{what}' is not a map") from None
        self._spend()
        out: dict[str, Any] = {}
        for _ in range(count):
            key = unpacker.unpack()
            if type(key) is not str:
                raise InvalidMetadataError(self.path, f"'{what}' has a key {key!r} that is not a str")
            if key not in known:
                unpacker.skip()
                continue
            if key in out:
                raise InvalidMetadataError(self.path, f"'{what}' has two {key!r} entries")
            out[key] = unpacker.unpack()
        return out

    # -- the tree (§4.2)
    def _ext(self, code: int, payload: bytes) -> Any:
        if code in (EXT_MAP, EXT_TUPLE):
            return self._eager(code, payload) if len(payload) <= _EAGER_BYTES else _Deferred(code, payload)
        if code == EXT_INT:
            value = msgpack.unpackb(payload)
            if type(value) is not int:
                raise InvalidMetadataError(self.path, "ext 4 (int) payload is not a msgpack integer")
            return PlainInt(value)
        if code in (EXT_SCALAR, EXT_VIEW):
            if len(payload) != 4:
                raise InvalidMetadataError(self.path, f"ext {code} reference of {len(payload)} bytes, expected 4")
            row = int.from_bytes(payload, "little")
            return TensorRef(row) if code == EXT_SCALAR else ViewRef(row)
        raise InvalidMetadataError(self.path, f"unknown msgpack ext type {code} in the tree")

    def _eager(self, code: int, payload: bytes) -> Any:
        """A small tuple or dict (ext 2, ext 5) built at once, nested small ones inside it too.

        It and its lists are counted against the container cap as soon as it is built (its nested
        small ones were counted when they were); :meth:`_check_built` checks the subtree afterwards.
        """
        self._nested += 1
        try:
            if self._nested > self.limits.max_depth:
                raise self._too_deep()
            items = self._unpack_small(payload)
        finally:
            self._nested -= 1
        node = self._build(code, items)
        # counted now, not after the parent's decode: the cap bounds memory while the file decodes (§8.1)
        self.left -= 1 + _lists_in(node.values() if code == EXT_MAP else node)
        if self.left < 0:
            self._spend(0)
        return node

    def _build(self, code: int, items: Any) -> Any:
        """The tuple or dict that a decoded ext 2 or ext 5 payload stands for (§4.2), its keys checked."""
        if type(items) is not list:
            raise InvalidMetadataError(self.path, f"ext {code} payload is not a msgpack array")
        if code == EXT_TUPLE:
            return tuple(items)
        if len(items) != 2 or type(items[0]) is not list or type(items[1]) is not list \
                or len(items[0]) != len(items[1]):
            raise InvalidMetadataError(self.path, "a map payload is not two arrays of equal length")
        keys, values = items
        key_types = set(map(type, keys))
        if not key_types <= _KEYS:
            raise InvalidMetadataError(self.path, "a tree map key is neither str nor int")
        d = dict(zip(keys, values, strict=False))  # equal lengths, checked above
        if len(d) != len(keys) or (int in key_types and len({str(k) for k in keys}) != len(keys)):
            raise InvalidMetadataError(self.path, "a tree map has duplicate keys (or an int and a str key with the "
                                                  "same key path)")
        return d

    def _check_built(self, root: Any, depth: int) -> None:
        """Check a subtree built by :meth:`_eager` (root at nesting level ``depth``), in one loop: depth, leaves."""
        max_depth = self.limits.max_depth
        stack = [(root, depth)]
        while stack:
            node, level = stack.pop()
            if level > max_depth:
                raise self._too_deep()
            values = list(node.values()) if type(node) is dict else node
            types = self._leaves(values)
            if list in types or dict in types or tuple in types:
                stack.extend((v, level + 1) for v in values if type(v) in _CONTAINERS)

    def _unpack_tree(self, buf: Any) -> Any:
        return msgpack.unpackb(buf, raw=False, strict_map_key=False, ext_hook=self._ext,
                               object_pairs_hook=self._no_maps, list_hook=self._list)

    def tree(self, buf: Any) -> Any:
        """Decode and check the tree: leaf types, map keys, nesting depth; collects every reference."""
        root = self._unpack_tree(buf)
        t = type(root)
        if t is _Deferred:
            return self._expand(root, 1)
        if t is list:
            self._walk(root, 1)
            return root
        if t is dict or t is tuple:
            self._check_built(root, 1)
            return root
        self._leaves([root])
        return root

    def _too_deep(self) -> MetadataLimitError:
        return MetadataLimitError(self.path, f"tree nesting deeper than {self.limits.max_depth} (raise "
                                             "Limits.max_depth)")

    def _leaves(self, values: list[Any]) -> set[type]:
        """Check the types of one container's values and collect its references; returns the types.

        One C-level pass for the types; the references are collected only for the types present, and a
        list of nothing but tensor rows (a flat state dict) is kept as it is, without a Python loop.
        """
        types = set(map(type, values))
        if not types <= _TREE_TYPES:
            bad = sorted(x.__name__ for x in types - _TREE_TYPES)
            raise InvalidMetadataError(self.path, f"tree leaf of type {', '.join(bad)} is not allowed")
        if int in types:
            self.refs.append(values if len(types) == 1 else [v for v in values if type(v) is int])
        if TensorRef in types:
            self.scalars.extend([v.index for v in values if type(v) is TensorRef])
        if ViewRef in types:
            self.view_refs.extend([v.index for v in values if type(v) is ViewRef])
        return types

    def _walk(self, node: list[Any], depth: int) -> None:
        """Check a list at nesting level ``depth`` (the root is 1) and expand what it holds."""
        if depth > self.limits.max_depth:
            raise self._too_deep()
        types = self._leaves(node)
        if list in types or _Deferred in types or dict in types or tuple in types:
            self._children(enumerate(node), node, depth)

    def _children(self, items: Any, node: Any, depth: int) -> None:
        """Walk the lists and expand the deferred payloads among ``items``, (key, value) pairs of ``node``."""
        for k, v in items:
            tv = type(v)
            if tv is list:
                self._walk(v, depth + 1)
            elif tv is _Deferred:
                node[k] = self._expand(v, depth + 1)  # a value replaced in place: the dict keeps its size
            elif tv is dict or tv is tuple:
                self._check_built(v, depth + 1)

    def _expand(self, deferred: _Deferred, depth: int) -> Any:
        """Decode a large tuple or dict payload, then its children; its bytes are freed before the children's."""
        if depth > self.limits.max_depth:
            raise self._too_deep()
        payload, deferred.payload = deferred.payload, None
        code = deferred.code
        items = self._unpack_tree(payload)
        del payload
        if code == EXT_TUPLE:
            if type(items) is not list:
                raise InvalidMetadataError(self.path, f"ext {code} payload is not a msgpack array")
            self._walk(items, depth)
            return tuple(items)
        node = self._build(code, items)
        values = items[1]
        types = self._leaves(values)
        del items, values
        self.left += 2  # the payload's outer and key arrays are gone; the values now live in the dict
        if list in types or _Deferred in types or dict in types or tuple in types:
            self._children(node.items(), node, depth)
        return node


def parse_manifest(data: bytes, *, path: str | None, minor: int, alignment: int, metadata_offset: int,
                   limits: Limits, features: int = 0) -> Manifest:
    """Decode and validate the metadata bytes (§4, §8). Every failure is an :class:`InvalidMetadataError`.

    Memory stays within a small multiple of ``len(data)`` (§8.1): no byte is copied once per nesting
    level, and the number of decoded containers is capped in proportion to the length.
    """
    if len(data) > limits.max_metadata_bytes:
        raise MetadataLimitError(path, f"metadata is {len(data)} bytes, over the cap of "
                                       f"{limits.max_metadata_bytes} (raise Limits.max_metadata_bytes to read it)")
    dec = _Decoder(path, limits, container_budget(len(data), limits))
    meta: dict[str, Any] = {}
    unknown: dict[str, bytes] = {}
    buf = memoryview(data)
    was_enabled = gc.isenabled()
    gc.disable()  # decoding makes no cycles; collections during a large decode only cost time
    try:
        for key, (start, end) in sections(buf, path).items():
            part = buf[start:end]
            if key not in KNOWN_SECTIONS:
                unknown[key] = bytes(part)  # any well-formed msgpack value, kept undecoded (§4.1)
            elif key == "tree":
                meta[key] = dec.tree(part)
            elif key == "tensors":
                meta[key] = dec.columns(part, TENSOR_COLUMNS, key, copy=2 * len(part) < len(data))
            elif key == "views":
                meta[key] = dec.columns(part, VIEW_COLUMNS, key, copy=2 * len(part) < len(data))
            else:
                meta[key] = dec.plain(part)
    except (InvalidMetadataError, MemoryError):
        raise  # running out of memory is not corruption
    except (RecursionError, msgpack.exceptions.StackError):
        raise MetadataLimitError(path, f"metadata nests deeper than the decoder allows (cap {limits.max_depth})"
                                 ) from None
    except Exception as e:  # msgpack raises several unrelated types on malformed input
        raise InvalidMetadataError(path, f"metadata is not valid msgpack: {type(e).__name__}: {e}") from None
    finally:
        buf.release()
        if was_enabled:
            gc.enable()
    for key in ("tree", "tensors"):
        if key not in meta:
            raise InvalidMetadataError(path, f"metadata has no {key!r} entry")
    producer = meta.get("producer", {})
    user = meta.get("user", {})
    created = meta.get("created", "")
    if type(producer) is not dict or type(user) is not dict or type(created) is not str:
        raise InvalidMetadataError(path, "metadata 'producer' and 'user' must be maps and 'created' a str")
    try:
        check_plain(user, max_depth=limits.max_depth, tuples=False)
        check_plain(producer, max_depth=limits.max_depth, what="producer", tuples=False)
    except ObjectLimitError as e:
        raise MetadataLimitError(path, str(e)) from None
    except UnsupportedObjectError as e:
        raise InvalidMetadataError(path, str(e)) from None
    tensors = parse_tensor_table(meta["tensors"], path=path, minor=minor, limits=limits)
    parse_features(meta["tensors"], tensors, features=features, alignment=alignment, path=path)
    views = parse_views(meta["views"], tensors, path=path, minor=minor, limits=limits) if "views" in meta \
        else EMPTY_VIEWS
    _check_refs(np.array(dec.view_refs, np.int64), len(views), path, what="views")
    _check_refs(np.concatenate((_rows(dec.refs, path), np.array(dec.scalars, np.int64),
                                views.base.astype(np.int64))), len(tensors), path)
    for row in dec.scalars:
        if tensors.ndim[row] != 0:
            raise InvalidMetadataError(path, f"an array-scalar reference names tensor {row}, which is not 0-d")
    check_layout(tensors, alignment=alignment, metadata_offset=metadata_offset, path=path)
    return Manifest(meta["tree"], tensors, producer, created, user, views, unknown)


def _rows(chunks: list[list[int]], path: str | None) -> np.ndarray:
    """The tensor rows the tree references, collected in lists by the decoder, as one int64 array."""
    try:
        if len(chunks) == 1:
            return np.array(chunks[0], np.int64)
        return np.fromiter(chain.from_iterable(chunks), np.int64, sum(map(len, chunks)))
    except OverflowError:
        raise InvalidMetadataError(path, "tree references a tensor row beyond 2**63") from None


def _check_refs(refs: np.ndarray, count: int, path: str | None, what: str = "tensors") -> None:
    """Every reference names a row, and every row is referenced (no hidden payload, §8.2)."""
    if not refs.size:
        if count:
            raise InvalidMetadataError(path, f"{count} {what} are not referenced by the tree")
        return
    lo, hi = int(refs.min()), int(refs.max())
    if lo < 0 or hi >= count:
        raise InvalidMetadataError(path, f"a reference to row {lo if lo < 0 else hi} of {what}, which has "
                                         f"rows 0..{count - 1}")
    if np.count_nonzero(np.bincount(refs, minlength=count)) != count:
        raise InvalidMetadataError(path, f"some {what} are not referenced (hidden payload)")
