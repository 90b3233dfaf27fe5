"""The save plan: which arrays become tensor rows, which become views, how the tree refers to them.

Arrays are found while the tree is encoded. Those that live in one allocation (spec §4.7) are then
grouped: identical ones share a row, the others become views of one blob holding the bytes the group
touches. Most checkpoints share nothing, and then the first encoding is the final one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ._backend import ArrayBackend, Source, backend_for
from ._dtypes import DTYPES, DType, numpy_dtypes
from ._encode import EncodeError, TreeEncoder
from ._tables import EXT_SCALAR, EXT_VIEW, ViewEntry, ViewTable
from .errors import UnsupportedDTypeError, UnsupportedObjectError

_UINT8 = DTYPES["uint8"]
_BOOL = DTYPES["bool"]
_BIG = sys.byteorder == "big"


@dataclass
class Leaf:
    """One distinct array of the object being saved."""

    obj: Any
    backend: ArrayBackend | None  # None: a plain numpy array taken on the fast path
    source: Source
    dtype: DType
    scalar: bool


@dataclass
class Plan:
    """What to write: the encoded tree, the tensor rows in table order, and the view table."""

    tree: Any
    rows: list[tuple[Source, DType]]
    views: ViewTable | None
    #: lists, tuples and dicts in the tree (a reader caps them, spec §8.1)
    containers: int = 0


def plan(obj: Any) -> Plan:
    """Encode ``obj`` and decide its rows and views."""
    # one entry per distinct array, in parallel lists (no object per leaf: 20,000 small arrays are common)
    objs: list[Any] = []
    sources: list[Source] = []
    dtypes: list[DType] = []
    backends: dict[int, ArrayBackend] = {}  # leaf index -> its backend, for leaves not on the numpy fast path
    scalars: list[int] = []
    shared: list[int] = []  # leaves that may share bytes: fast-path views (.base set) and backend arrays
    seen: dict[int, tuple[Any, Any]] = {}
    by_numpy = numpy_dtypes()
    ndarray = np.ndarray

    def add_array(leaf: Any) -> Any:
        hit = seen.get(id(leaf))
        if hit is not None:
            return hit[1]
        row = len(objs)
        if type(leaf) is ndarray:  # the common case, without dispatch
            dtype = by_numpy.get(leaf.dtype)
            if dtype is not None:
                if leaf.base is not None:
                    shared.append(row)
                seen[id(leaf)] = (leaf, row)  # holding the leaf keeps its id from being reused during this save
                objs.append(leaf)
                sources.append(canonical_bool(leaf) if dtype is _BOOL else leaf)
                dtypes.append(dtype)
                return row
        be = backend_for(leaf)
        if be is None:
            return None
        try:
            source, dtype, scalar = be.host_view(leaf)
        except (UnsupportedDTypeError, UnsupportedObjectError) as e:
            reason, kind = str(e), type(e)
            raise EncodeError(lambda where: kind(f"{where}: {reason}")) from None
        enc: Any = row
        if scalar:
            enc = msgpack.ExtType(EXT_SCALAR, row.to_bytes(4, "little"))
            scalars.append(row)
        else:
            shared.append(row)
        backends[row] = be
        seen[id(leaf)] = (leaf, enc)
        objs.append(leaf)
        sources.append(canonical_bool(source) if dtype is _BOOL else source)
        dtypes.append(dtype)
        return enc

    encoder = TreeEncoder(add_array)
    tree = encoder.encode(obj)
    groups: list[list[int]] = []
    if shared:
        leaves = [Leaf(o, backends.get(i), s, d, False)
                  for i, (o, s, d) in enumerate(zip(objs, sources, dtypes, strict=True))]
        for i in scalars:
            leaves[i].scalar = True
        groups = [c for g in _shared_groups(leaves, shared) for c in _overlapping(leaves, g) if len(c) > 1]
    if not groups:
        return Plan(tree, list(zip(sources, dtypes, strict=True)), None, encoder.containers)
    encodings, rows, views = _assign(leaves, groups)
    final = {id(leaf.obj): enc for leaf, enc in zip(leaves, encodings, strict=True)}
    tree = TreeEncoder(lambda leaf: final.get(id(leaf))).encode(obj)
    return Plan(tree, rows, ViewTable.build(views), encoder.containers)


def canonical_bool(src: Source) -> Source:
    """A bool array's bytes as the format stores them: 0 or 1 (§6), whatever other nonzero bytes it holds.

    numpy and torch keep any byte a buffer gave them (``np.frombuffer(b"\\x02", bool)``) and read it as
    true; written as is, such a file would fail its own ``verify``. The array is copied only when it
    holds such a byte.
    """
    if isinstance(src, np.ndarray):
        raw = src.view(np.uint8)
        return np.minimum(raw, 1).view(np.bool_) if raw.size and int(raw.max()) > 1 else src
    return _CanonicalBoolSource(src)


class _CanonicalBoolSource:
    """A device source of bools whose chunks come out as 0 or 1 bytes."""

    def __init__(self, src: Source) -> None:
        self._src = src
        self.shape, self.ndim, self.itemsize, self.nbytes = src.shape, src.ndim, src.itemsize, src.nbytes

    def chunks(self, limit: int) -> Any:
        for chunk in self._src.chunks(limit):  # type: ignore[union-attr]  # not an ndarray: a DeviceSource
            yield np.minimum(chunk, 1)


def _backend(leaf: Leaf) -> ArrayBackend:
    if leaf.backend is None:
        found = backend_for(leaf.obj)
        assert found is not None  # leaves were claimed by a backend when they were found
        leaf.backend = found
    return leaf.backend


def _shared_groups(leaves: list[Leaf], candidates: list[int]) -> list[list[int]]:
    """Indices of leaves that live in one allocation, for allocations holding two leaves or more.

    ``candidates``: the leaves that may share (views and backend arrays); a plain numpy array that
    owns its memory can share only with a view of it, and is looked up by the views' allocation key.
    """
    by_key: dict[Any, list[int]] = {}
    for i in candidates:
        leaf = leaves[i]
        src = leaf.source
        if leaf.scalar or src.nbytes == 0:
            continue
        if isinstance(src, np.ndarray) and _swapped(src):
            continue  # stored converted to little-endian: its bytes are not the allocation's
        key = _backend(leaf).alias_key(leaf.obj)
        if key is not None:
            by_key.setdefault(key, []).append(i)
    if by_key:
        owners: dict[int, int] = {}  # id of an owning plain numpy array -> its leaf
        for i, leaf in enumerate(leaves):
            if leaf.backend is None and leaf.obj.base is None and leaf.source.nbytes and not _swapped(leaf.source):
                owners[id(leaf.obj)] = i
        for key, group in by_key.items():
            if key[0] == "numpy":  # the numpy backend's alias_key: ("numpy", id of the owner)
                owner = owners.get(key[1])
                if owner is not None:
                    group.append(owner)
    return [sorted(g) for g in by_key.values() if len(g) > 1]


def _swapped(src: Any) -> bool:
    """Whether a numpy array is stored byte-swapped (big-endian): then its bytes are not the allocation's."""
    order = src.dtype.byteorder
    return bool(order == ">" or (order == "=" and _BIG))


def _overlapping(leaves: list[Leaf], members: list[int]) -> list[list[int]]:
    """Split one allocation's leaves into runs whose byte ranges overlap.

    Arrays of one allocation that touch disjoint bytes (the tensors of one memory-mapped file, two
    halves of a buffer) are stored apart: merging them would also store the bytes between them.
    """
    spans = []
    for i in members:
        leaf = leaves[i]
        addr, strides = _backend(leaf).alias_info(leaf.obj)
        lo, hi = _extent(tuple(leaf.source.shape), strides, leaf.dtype.itemsize)
        spans.append((addr + lo, addr + hi, i))
    spans.sort()
    out: list[list[int]] = []
    end = None
    for lo, hi, i in spans:
        if end is None or lo >= end:
            out.append([i])
            end = hi
        else:
            out[-1].append(i)
            end = max(end, hi)
    return out


def _extent(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """Bytes [lo, hi) touched relative to element 0."""
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides, strict=True))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides, strict=True)) + itemsize
    return lo, hi


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _assign(leaves: list[Leaf], groups: list[list[int]]
            ) -> tuple[list[Any], list[tuple[Source, DType]], list[ViewEntry]]:
    """Final encoding of every leaf, the stored rows, and the view rows."""
    # per shared leaf: (address of element 0, byte strides, lo, hi)
    layout: dict[int, tuple[int, tuple[int, ...], int, int]] = {}
    group_of: dict[int, int] = {}
    for g, members in enumerate(groups):
        for i in members:
            leaf = leaves[i]
            addr, strides = _backend(leaf).alias_info(leaf.obj)
            lo, hi = _extent(leaf.source.shape, strides, leaf.dtype.itemsize)
            layout[i] = (addr, strides, addr + lo, addr + hi)
            group_of[i] = g

    encodings: list[Any] = [None] * len(leaves)
    rows: list[tuple[Source, DType]] = []
    views: list[ViewEntry] = []
    view_rows: dict[tuple[Any, ...], int] = {}
    group_base: dict[int, tuple[int, int]] = {}  # group -> (row, address where the row's blob starts)

    def view_of(i: int, base_row: int, base_addr: int) -> msgpack.ExtType:
        leaf = leaves[i]
        addr, strides, _, _ = layout[i]
        entry = ViewEntry(len(views), leaf.dtype.name, tuple(leaf.source.shape), strides, base_row, addr - base_addr)
        sig = (entry.dtype, entry.shape, entry.strides, entry.base, entry.offset)
        row = view_rows.setdefault(sig, len(views))
        if row == len(views):
            views.append(entry)
        return msgpack.ExtType(EXT_VIEW, row.to_bytes(4, "little"))

    for i, leaf in enumerate(leaves):
        gi = group_of.get(i)
        if gi is None:
            encodings[i] = msgpack.ExtType(EXT_SCALAR, len(rows).to_bytes(4, "little")) if leaf.scalar else len(rows)
            rows.append((leaf.source, leaf.dtype))
            continue
        if gi not in group_base:
            members = groups[gi]
            lo = min(layout[j][2] for j in members)
            hi = max(layout[j][3] for j in members)
            sigs = {(layout[j][0], layout[j][1], tuple(leaves[j].source.shape), leaves[j].dtype.name) for j in members}
            whole = [j for j in members if layout[j][2] == lo and layout[j][3] == hi
                     and layout[j][1] == _c_strides(tuple(leaves[j].source.shape), leaves[j].dtype.itemsize)]
            if len(sigs) == 1 or whole:
                owner = whole[0] if whole else members[0]
                group_base[gi] = (len(rows), lo)
                rows.append((leaves[owner].source, leaves[owner].dtype))
                for j in members:
                    same = layout[j][:2] == layout[owner][:2] and leaves[j].source.shape == leaves[owner].source.shape \
                        and leaves[j].dtype.name == leaves[owner].dtype.name
                    encodings[j] = group_base[gi][0] if same else None
            else:
                first = leaves[members[0]]
                group_base[gi] = (len(rows), lo)
                rows.append((_backend(first).storage_bytes(first.obj, lo, hi - lo), _UINT8))
        if encodings[i] is None:
            encodings[i] = view_of(i, *group_base[gi])
    return encodings, rows, views
