"""The reader's side of the metadata (spec §4, §8): untrusted bytes decoded, checked, and made a :class:`Manifest`.

Untrusted bytes become a :class:`~ckptfmt._tables.Manifest` only through :func:`parse_manifest`, which
applies every validation rule of §8 that does not need the blob bytes themselves: the caps of §8.1
(metadata length, nesting depth, containers per byte, rows, dimensions), the tree's leaf and key types
(§4.2), the tensor table's columns and sizes (§4.3, §8.2), the view table's extents (§4.7), that every
row is referenced exactly by the tree (§8.2), and the blob layout (§4.5).
"""

from __future__ import annotations

import gc
from functools import partial
from itertools import chain
from typing import Any

import msgpack
import numpy as np

from ._checksum import EMPTY_CHECKSUM
from ._dtypes import DTYPES
from ._features import packed_layout, parse_features
from ._plain import check_plain
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
    TensorTable,
    ViewRef,
    ViewTable,
    blob_region_start,
    container_budget,
    nonzero_bytes,
)
from ._versions import FORMAT_MINOR
from .errors import (
    InvalidMetadataError,
    MetadataLimitError,
    ObjectLimitError,
    UnsupportedObjectError,
)

_I64 = np.dtype("<i8")
_U64 = np.dtype("<u8")
_U8 = np.dtype("u1")
_KEYS = frozenset((str, int))


#: msgpack first bytes (format spec, "Overview") -> total size of a fixed-size object
_FIXED_SIZE = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
               0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
#: first byte -> (bytes of the length field, bytes after it before the payload) of bin, str and ext
_VAR_SIZE = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
             0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
#: first byte -> (bytes of the count field, objects per counted element) of array16/32 and map16/32
_CONTAINER_SIZE = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
#: objects :func:`_skip` steps over in Python before it hands the rest to msgpack's own skip
_SKIP_STEPS = 256


class _ManyObjects(Exception):
    """Raised by :func:`_skip` when a value holds more objects than are worth stepping over in Python."""


def _skip(data: Any, pos: int) -> int:
    """Where the msgpack object starting at ``data[pos]`` ends, read from its headers alone (no copy, no decode).

    Structure only, as msgpack's ``Unpacker.skip``: ``ValueError`` on a truncated or malformed object,
    :class:`_ManyObjects` past :data:`_SKIP_STEPS` objects (the caller then redoes the whole map with
    msgpack's skip, over one copy: never once per value, which would be quadratic).
    """
    size = len(data)
    pending = 1
    steps = 0
    while pending:
        if pos >= size:
            raise ValueError("truncated msgpack data")
        pending -= 1
        steps += 1
        if steps > _SKIP_STEPS:
            raise _ManyObjects
        b = data[pos]
        if b < 0x80 or b >= 0xE0:  # fixint
            pos += 1
        elif b < 0x90:  # fixmap
            pending += 2 * (b & 0x0F)
            pos += 1
        elif b < 0xA0:  # fixarray
            pending += b & 0x0F
            pos += 1
        elif b < 0xC0:  # fixstr
            pos += 1 + (b & 0x1F)
        elif b in _FIXED_SIZE:
            pos += _FIXED_SIZE[b]
        elif b in _VAR_SIZE:
            width, extra = _VAR_SIZE[b]
            if pos + 1 + width > size:
                raise ValueError("truncated msgpack data")
            pos += 1 + width + extra + int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        elif b in _CONTAINER_SIZE:
            width, per = _CONTAINER_SIZE[b]
            if pos + 1 + width > size:
                raise ValueError("truncated msgpack data")
            pending += per * int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        else:
            raise ValueError(f"byte 0x{b:02x} does not start a msgpack object")
    if pos > size:
        raise ValueError("truncated msgpack data")
    return pos


def _bin(data: Any) -> Any:
    """The payload of a msgpack bin object spanning all of ``data``, as a view (no copy); None if not a bin."""
    b = data[0]
    if b in (0xC4, 0xC5, 0xC6):
        return data[1 + _VAR_SIZE[b][0]:]
    return None


def _map_header(data: Any) -> tuple[int, int] | None:
    """(entry count, header length) of a msgpack map starting at ``data[0]``; None if it is not a map."""
    b = data[0] if len(data) else -1
    if 0x80 <= b < 0x90:
        return b & 0x0F, 1
    if b in (0xDE, 0xDF):
        width = _CONTAINER_SIZE[b][0]
        if len(data) < 1 + width:
            raise ValueError("truncated msgpack data")
        return int.from_bytes(data[1 : 1 + width], "big"), 1 + width
    return None


def _lists_in(values: Any) -> int:
    """How many lists ``values`` holds, at any depth through lists (not inside dicts and tuples)."""
    stack = [v for v in values if type(v) is list]
    count = 0
    while stack:
        count += 1
        stack.extend([v for v in stack.pop() if type(v) is list])
    return count


class _Deferred:
    """A tuple (ext 2) or dict (ext 5) whose payload is decoded later, by :func:`_TreeDecoder._expand`.

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
        except _ManyObjects:
            self.left = left
            return self._columns_copied(buf, known, what)

    def _columns_in_place(self, buf: Any, known: frozenset[str], what: str, copy: bool) -> dict[str, Any]:
        head = _map_header(buf)
        if head is None:
            raise InvalidMetadataError(self.path, f"'{what}' is not a map")
        count, pos = head
        self._spend()
        out: dict[str, Any] = {}
        for _ in range(count):
            end = _skip(buf, pos)
            key = self.plain(buf[pos:end])
            if type(key) is not str:
                raise InvalidMetadataError(self.path, f"'{what}' has a key {key!r} that is not a str")
            pos, end = end, _skip(buf, end)
            if key in known:
                if key in out:
                    raise InvalidMetadataError(self.path, f"'{what}' has two {key!r} entries")
                value = buf[pos:end]
                raw = _bin(value)
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
        for key, (start, end) in _sections(buf, path).items():
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
    tensors = _parse_tensor_table(meta["tensors"], path=path, minor=minor, limits=limits)
    parse_features(meta["tensors"], tensors, features=features, alignment=alignment, path=path)
    views = _parse_views(meta["views"], tensors, path=path, minor=minor, limits=limits) if "views" in meta \
        else EMPTY_VIEWS
    _check_refs(np.array(dec.view_refs, np.int64), len(views), path, what="views")
    _check_refs(np.concatenate((_rows(dec.refs, path), np.array(dec.scalars, np.int64),
                                views.base.astype(np.int64))), len(tensors), path)
    for row in dec.scalars:
        if tensors.ndim[row] != 0:
            raise InvalidMetadataError(path, f"an array-scalar reference names tensor {row}, which is not 0-d")
    check_layout(tensors, alignment=alignment, metadata_offset=metadata_offset, path=path)
    return Manifest(meta["tree"], tensors, producer, created, user, views, unknown)


def _sections(data: Any, path: str | None) -> dict[str, tuple[int, int]]:
    """Byte ranges of the top-level map's values, by key; refuses duplicate keys and trailing bytes.

    Found from the msgpack headers in place (:func:`_skip`): the metadata is neither copied nor decoded
    here, unless a value holds many objects (large user metadata): then msgpack skips over one copy.
    """
    try:
        return _sections_in_place(data, path)
    except _ManyObjects:
        return _sections_copied(data, path)


def _sections_in_place(data: Any, path: str | None) -> dict[str, tuple[int, int]]:
    head = _map_header(data)
    if head is None:
        raise InvalidMetadataError(path, "metadata is not a msgpack map")
    count, pos = head
    out: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        end = _skip(data, pos)
        key = msgpack.unpackb(data[pos:end], raw=False)
        if not isinstance(key, str):
            raise InvalidMetadataError(path, f"metadata key {key!r} is not a str")
        if key in out:
            raise InvalidMetadataError(path, f"metadata has two {key!r} entries")
        pos, end = end, _skip(data, end)
        out[key] = (pos, end)
        pos = end
    if pos != len(data):
        raise InvalidMetadataError(path, f"{len(data) - pos} bytes follow the metadata map")
    return out


def _sections_copied(data: Any, path: str | None) -> dict[str, tuple[int, int]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        count = unpacker.read_map_header()
    except Exception:
        raise InvalidMetadataError(path, "metadata is not a msgpack map") from None
    out: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        key = unpacker.unpack()
        if not isinstance(key, str):
            raise InvalidMetadataError(path, f"metadata key {key!r} is not a str")
        if key in out:
            raise InvalidMetadataError(path, f"metadata has two {key!r} entries")
        start = unpacker.tell()
        unpacker.skip()
        out[key] = (start, unpacker.tell())
    if unpacker.tell() != len(data):
        raise InvalidMetadataError(path, f"{len(data) - unpacker.tell()} bytes follow the metadata map")
    return out


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


def _column(table: dict[str, Any], name: str, dtype: np.dtype, count: int, path: str | None,
            what: str = "tensor table") -> np.ndarray:
    raw = table.get(name)
    if not isinstance(raw, (bytes, memoryview)):
        raise InvalidMetadataError(path, f"{what} column {name!r} is missing or not binary")
    if len(raw) != count * dtype.itemsize:
        raise InvalidMetadataError(path, f"{what} column {name!r} has {len(raw)} bytes, "
                                         f"expected {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def _typed_columns(table: Any, what: str, rows: str, *, path: str | None, minor: int, limits: Limits
                   ) -> tuple[int, list[str], np.ndarray, np.ndarray, int]:
    """The columns the tensor and view tables share: count, dtype names and codes, ndim (§4.3, §4.7).

    Returns (count, dtype names, dtype codes, ndim, total number of dimensions).
    """
    if not isinstance(table, dict):
        raise InvalidMetadataError(path, f"'{rows}' is not a map")
    count = table.get("count")
    if type(count) is not int or count < 0:
        raise InvalidMetadataError(path, f"{what} 'count' is not a non-negative int")
    if count > limits.max_tensors:
        raise MetadataLimitError(path, f"{count} {rows}, over the cap of {limits.max_tensors}")
    names = _dtype_names(table, what, path, minor)
    code = _column(table, "dtype", _U8, count, path, what)
    ndim = _column(table, "ndim", _U8, count, path, what)
    if count and int(code.max()) >= len(names):
        raise InvalidMetadataError(path, f"{what}: dtype code {int(code.max())} has no entry in 'dtypes'")
    if count and int(ndim.max()) > limits.max_ndim:
        raise MetadataLimitError(path, f"{what}: a row has {int(ndim.max())} dimensions, over {limits.max_ndim}")
    return count, names, code, ndim, int(ndim.sum(dtype=np.int64))


def _parse_tensor_table(table: Any, *, path: str | None, minor: int, limits: Limits) -> TensorTable:
    count, names, code, ndim, total_dims = _typed_columns(table, "tensor table", "tensors", path=path, minor=minor,
                                                          limits=limits)
    shape_flat = _column(table, "shape", _U64, total_dims, path)
    offset = _column(table, "offset", _U64, count, path)
    nbytes = _column(table, "nbytes", _U64, count, path)
    checksum = _column(table, "checksum", _U64, count, path) if "checksum" in table else None
    tt = TensorTable(names, code, ndim, shape_flat, offset, nbytes, checksum)
    _check_sizes(tt, path)
    return tt


def _parse_views(table: Any, tensors: TensorTable, *, path: str | None, minor: int, limits: Limits) -> ViewTable:
    """Decode and check the view table (§4.7)."""
    count, names, code, ndim, total = _typed_columns(table, "view table", "views", path=path, minor=minor,
                                                     limits=limits)
    w = "view table"
    vt = ViewTable(names, code, ndim, _column(table, "shape", _U64, total, path, w),
                   _column(table, "strides", _I64, total, path, w), _column(table, "base", _U64, count, path, w),
                   _column(table, "offset", _U64, count, path, w))
    if not count:
        return vt
    if int(vt.base.max()) >= len(tensors):
        raise InvalidMetadataError(path, f"a view's base is row {int(vt.base.max())}, but the tensor table has "
                                         f"{len(tensors)} rows")
    if vt.shape_flat.size and int(vt.shape_flat.max()) >= 1 << 63:
        raise InvalidMetadataError(path, "a view dimension is 2**63 or larger")
    # per dimension: (shape - 1) * stride, negative and positive parts; exact in int64 once bounded
    span_f = (vt.shape_flat.astype(np.float64) - 1) * vt.strides_flat.astype(np.float64)
    if span_f.size and float(np.abs(span_f).max()) >= 2.0**56:
        raise InvalidMetadataError(path, "a view's extent (shape - 1) x stride reaches 2**56 bytes or more")
    span = (vt.shape_flat.astype(np.int64) - 1) * vt.strides_flat
    empty_dim = vt.shape_flat == 0
    owner = np.repeat(np.arange(count), ndim.astype(np.int64))
    lo = np.zeros(count, np.int64)
    hi = np.zeros(count, np.int64)
    np.add.at(lo, owner, np.where(empty_dim, 0, np.minimum(span, 0)))
    np.add.at(hi, owner, np.where(empty_dim, 0, np.maximum(span, 0)))
    is_empty = np.zeros(count, bool)
    np.logical_or.at(is_empty, owner, empty_dim)
    itemsize = np.array([DTYPES[n].itemsize if n in DTYPES else 1 for n in names], np.int64)[code]
    base_nbytes = tensors.nbytes[vt.base.astype(np.int64)].astype(np.int64)
    _check_view_sizes(vt, itemsize, base_nbytes, path, limits)
    offset = vt.offset
    if int(offset.max()) >= 1 << 62:
        raise InvalidMetadataError(path, "a view offset is 2**62 or larger")
    off = offset.astype(np.int64)
    bad = np.where(is_empty, off > base_nbytes, (off + lo < 0) | (off + hi + itemsize > base_nbytes))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetadataError(path, f"view {i} reaches outside the blob of its base row {int(vt.base[i])}")
    return vt


def _check_view_sizes(vt: ViewTable, itemsize: np.ndarray, base_nbytes: np.ndarray, path: str | None,
                      limits: Limits) -> None:
    """A view's elements x itemsize stays below 2**63 and within ``max_view_expansion`` x its base (§4.7)."""
    count = len(vt)
    dims_f = vt.shape_flat.astype(np.float64)
    owner = np.repeat(np.arange(count), vt.ndim.astype(np.int64))
    logical = np.ones(count, np.float64)
    nonzero = np.ones(count, np.float64)
    np.multiply.at(logical, owner, dims_f)
    dims_f[dims_f == 0] = 1
    np.multiply.at(nonzero, owner, dims_f)
    isz = itemsize.astype(np.float64)
    for i in np.flatnonzero(~(nonzero * isz < 2.0**62)).tolist():
        v = vt.entry(i)
        if nonzero_bytes(v.shape, int(itemsize[i])) >= 1 << 63:
            raise InvalidMetadataError(path, f"view {i}: shape {v.shape}: its non-zero dimensions make 2**63 bytes "
                                             "or more, which no array can hold (§4.7)")
    cap = np.maximum(base_nbytes.astype(np.float64), 1.0) * float(limits.max_view_expansion)
    over = logical * isz > cap
    if over.any():
        i = int(np.flatnonzero(over)[0])
        raise MetadataLimitError(path, f"view {i} spans {int(logical[i])} elements of {int(itemsize[i])} bytes, over "
                                       f"{limits.max_view_expansion} times its base's {int(base_nbytes[i])} bytes "
                                       "(raise Limits.max_view_expansion)")


def _dtype_names(table: dict[str, Any], what: str, path: str | None, minor: int) -> list[str]:
    names = table.get("dtypes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) > 255:
        raise InvalidMetadataError(path, f"{what} 'dtypes' is not a list of at most 255 str")
    if len(set(names)) != len(names):
        raise InvalidMetadataError(path, f"{what} 'dtypes' names a dtype twice")
    if minor <= FORMAT_MINOR:
        for n in names:
            if n not in DTYPES:
                raise InvalidMetadataError(path, f"unknown dtype {n!r} in a version 1.{minor} file")
    return names


def _check_sizes(tt: TensorTable, path: str | None) -> None:
    """shape x itemsize == nbytes for every tensor of a known dtype (§8.2).

    Whole-column numpy passes with few temporaries (each a fresh column costs page faults on open).
    """
    n = len(tt)
    if not n:
        return
    shape = tt.shape_flat
    if shape.size and int(shape.max()) >= 1 << 63:
        raise InvalidMetadataError(path, "a dimension is 2**63 or larger")
    ends = np.cumsum(tt.ndim, dtype=np.int64)
    tt._ends = ends  # what TensorTable.shape(i) needs for a lazy get: computed once, here
    # itemsizes are at most 16 (§6): a uint8 column, widened element by element where it is multiplied
    sizes = [DTYPES[nm].itemsize if nm in DTYPES else 0 for nm in tt.dtype_names]
    itemsize = np.array(sizes, dtype=np.uint8 if max(sizes, default=0) < 256 else np.uint64)
    isz = itemsize[tt.dtype_code]
    all_known = bool(itemsize.all()) or not bool((isz == 0).any())
    if shape.size:
        has = tt.ndim != 0
        every = bool(has.all())
        starts = ends - tt.ndim
        if not every:
            starts = starts[has]
        # The float product skips zero dimensions: an empty tensor must still have a shape numpy
        # can represent. Overflow to inf is what we are looking for, not an accident.
        dims_f = shape.astype(np.float64)
        np.maximum(dims_f, 1.0, out=dims_f)
        with np.errstate(over="ignore", invalid="ignore"):
            prod_u = np.multiply.reduceat(shape, starts)
            prod_f = np.multiply.reduceat(dims_f, starts)
        del dims_f
        if not every:
            full_u, full_f = np.ones(n, np.uint64), np.ones(n, np.float64)
            full_u[has], full_f[has] = prod_u, prod_f
            prod_u, prod_f = full_u, full_f
    else:
        prod_u, prod_f = np.ones(n, np.uint64), np.ones(n, np.float64)
    prod_f *= np.maximum(isz, 1)
    if float(prod_f.max()) >= 2.0**62:
        huge = prod_f >= 2.0**62
        if not all_known:
            huge &= isz > 0
        for i in np.flatnonzero(huge).tolist():  # near the bound: decide exactly, with Python ints
            if nonzero_bytes(tt.shape(i), int(isz[i])) >= 1 << 63:
                raise InvalidMetadataError(path, f"tensor {i}: shape {tt.shape(i)} x itemsize {int(isz[i])}: its "
                                                 "non-zero dimensions make 2**63 bytes or more, which no array can "
                                                 "hold (§8.2)")
    del prod_f
    with np.errstate(over="ignore", invalid="ignore"):
        prod_u *= isz
    bad = prod_u != tt.nbytes
    if not all_known:
        bad &= isz > 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetadataError(path, f"tensor {i}: shape {tt.shape(i)} x itemsize {int(isz[i])} != "
                                         f"nbytes {int(tt.nbytes[i])}")
    if tt.checksum is not None:
        wrong = (tt.nbytes == 0) & (tt.checksum != np.uint64(EMPTY_CHECKSUM))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise InvalidMetadataError(path, f"tensor {i} is empty but its checksum is not xxh3 of no bytes")


def check_layout(tt: TensorTable, *, alignment: int, metadata_offset: int, path: str | None) -> None:
    """Blobs lie in table order, each at the next multiple of the alignment, with nothing between (§4.5)."""
    if tt.pack_alignment:  # format 1.1 packed blobs: two alignments (§14.2)
        end = packed_layout(tt, alignment=alignment, first=blob_region_start(alignment), path=path)
        if end != metadata_offset:
            raise InvalidMetadataError(path, f"metadata starts at {metadata_offset}, expected {end} (after the "
                                             "last blob's padding)")
        return
    a = np.uint64(alignment)
    first = np.uint64(blob_region_start(alignment))
    nb = tt.stored_sizes()  # format 1.1: compressed blobs occupy their stored size (§13.2)
    if not len(nb):
        end = int(first)
    else:
        if float(nb.sum(dtype=np.float64)) > 2.0**62:
            raise InvalidMetadataError(path, "blob sizes add up to more than 2**62 bytes")
        span = nb + (a - np.uint64(1))
        span &= ~(a - np.uint64(1))
        ends = np.cumsum(span, dtype=np.uint64)
        ends += first
        end = int(ends[-1])
        expected = np.subtract(ends, span, out=span)  # where each blob starts; an empty blob's offset is 0
        del ends
        expected[nb == 0] = 0
        if not np.array_equal(expected, tt.offset):
            i = int(np.flatnonzero(expected != tt.offset)[0])
            raise InvalidMetadataError(path, f"tensor {i}: offset {int(tt.offset[i])}, expected "
                                             f"{int(expected[i])} (blobs must follow each other in table order at "
                                             "aligned offsets)")
    if end != metadata_offset:
        raise InvalidMetadataError(path, f"metadata starts at {metadata_offset}, expected {end} (after the "
                                         "last blob's padding)")
