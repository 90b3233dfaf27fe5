"""The writer's side of the metadata (spec §4.1, §4.2, §8.1): the user's tree encoded, the map serialised.

:class:`TreeEncoder` turns a user object into the msgpack tree of §4.2 (dicts as ext 5, tuples as
ext 2, integers as ext 4, array leaves as the plan decides); :func:`fit_metadata` refuses, before any
byte is written, metadata that a reader's caps (§8.1) would refuse; :func:`pack_metadata` writes the
top-level map of §4.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from ._tables import (
    EXT_INT,
    EXT_MAP,
    EXT_TUPLE,
    Limits,
    TensorTable,
    ViewTable,
    container_budget,
    nonzero_bytes,
)
from .errors import (
    CheckpointError,
    InvalidKeyError,
    ObjectLimitError,
    UnsupportedObjectError,
)


class EncodeError(Exception):
    """Raised inside encoding for an unsupported value; the key path is filled in as it unwinds.

    ``make(where)`` builds the user-facing error once the path is known.
    """

    def __init__(self, make: Callable[[str], CheckpointError]) -> None:
        self.make = make
        self.path: list[str | int] = []


class TreeEncoder:
    """Turns a user object into a msgpack-ready tree (§4.2), handing each array leaf to ``add_array``.

    ``add_array(leaf)`` returns the leaf's encoding (a tensor-table row, or an ext for array
    scalars), or None when the leaf is not an array.
    """

    def __init__(self, add_array: Callable[[Any], Any], *, max_depth: int = Limits.max_depth) -> None:
        self._add_array = add_array
        self._max_depth = max_depth
        #: lists, tuples and dicts encoded: a reader caps their number (§8.1)
        self.containers = 0

    def encode(self, obj: Any) -> Any:
        """Encode ``obj``; raises :class:`UnsupportedObjectError` naming the key path of a bad value."""
        try:
            return self._encode(obj, 0)
        except EncodeError as e:
            raise e.make(_where(tuple(reversed(e.path)))) from None

    def _encode(self, obj: Any, depth: int) -> Any:
        t = type(obj)
        if t is dict:
            return self._encode_dict(obj, depth)
        if t is str or t is float or t is bool or obj is None or t is bytes:
            return obj
        if t is int:
            return _encode_int(obj)
        enc = self._add_array(obj)
        if enc is not None:
            return enc
        if depth >= self._max_depth and isinstance(obj, (dict, list, tuple)):
            raise EncodeError(lambda w: ObjectLimitError(f"{w}: nesting deeper than {self._max_depth}"))
        if isinstance(obj, dict):
            return self._encode_dict(obj, depth)
        if isinstance(obj, list):
            return self._encode_seq(obj, depth)
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return msgpack.ExtType(EXT_TUPLE, msgpack.packb(self._encode_seq(obj, depth), use_bin_type=True))
        if isinstance(obj, (bool, int, float, str, bytes)):  # subclasses such as IntEnum: stored as the base type
            return self._encode(_base_value(obj), depth)
        raise EncodeError(lambda w: UnsupportedObjectError(
            f"{w}: cannot save a {t.__module__}.{t.__qualname__}; leaves must be arrays, int, float, bool, str, "
            "bytes or None (convert it, e.g. to a dict or str, first)"))

    def _encode_seq(self, obj: list[Any] | tuple[Any, ...], depth: int) -> list[Any]:
        if depth >= self._max_depth:
            raise EncodeError(lambda w: ObjectLimitError(f"{w}: nesting deeper than {self._max_depth}"))
        self.containers += 1
        out = []
        for i, v in enumerate(obj):
            try:
                out.append(self._encode(v, depth + 1))
            except EncodeError as e:
                e.path.append(i)
                raise
        return out

    def _encode_dict(self, obj: dict[Any, Any], depth: int) -> msgpack.ExtType:
        if depth >= self._max_depth:
            raise EncodeError(lambda w: ObjectLimitError(f"{w}: nesting deeper than {self._max_depth}"))
        self.containers += 1
        out: dict[Any, Any] = {}
        has_int = False
        add, enc, d1 = self._add_array, self._encode, depth + 1
        for k, v in obj.items():
            if type(k) is not str:
                if type(k) is int and -(1 << 63) <= k < (1 << 64):
                    has_int = True
                else:
                    raise EncodeError(_bad_key(k))
            tv = type(v)
            try:
                if tv is str or tv is float or tv is bool or v is None:
                    out[k] = v
                elif tv is dict or tv is list:
                    out[k] = enc(v, d1)
                else:
                    found = add(v)
                    out[k] = found if found is not None else enc(v, d1)
            except EncodeError as e:
                e.path.append(k)
                raise
        if has_int and len({str(k) for k in out}) != len(out):
            raise EncodeError(lambda w: InvalidKeyError(
                f"{w}: dict has an int key and a str key with the same text (e.g. 1 and '1'); their key "
                "paths would be equal"))
        return msgpack.ExtType(EXT_MAP, msgpack.packb([list(out), list(out.values())], use_bin_type=True))


def _encode_int(value: int) -> msgpack.ExtType:
    if not -(1 << 63) <= value < (1 << 64):
        raise EncodeError(lambda w: UnsupportedObjectError(f"{w}: int {value} does not fit in 64 bits"))
    return msgpack.ExtType(EXT_INT, msgpack.packb(value))


def _bad_key(key: object) -> Callable[[str], CheckpointError]:
    if type(key) is int:
        return lambda where: UnsupportedObjectError(f"{where}: int dict key {key} does not fit in 64 bits "
                                                    "(int keys are in [-2**63, 2**64))")
    return lambda where: UnsupportedObjectError(
        f"{where}: dict key {key!r} is a {type(key).__name__}; keys must be str or int")


def _base_value(obj: Any) -> Any:
    for base in (bool, int, float, str, bytes):
        if isinstance(obj, base):
            return base(obj)  # type: ignore[arg-type]
    return obj


def _where(path: tuple[str | int, ...]) -> str:
    from ._keypath import join

    return f"at key path {join(path)!r}" if path else "at the top level"


class PackedTree(bytes):
    """The tree already serialised by :func:`fit_metadata`, spliced verbatim by :func:`pack_metadata`."""


def pack_metadata(tree: Any, tensors: TensorTable, producer: dict[str, Any], created: str,
                  user: dict[str, Any], views: ViewTable | None = None) -> bytes:
    """Serialise the metadata map (§4.1); the view table only when there are views."""
    meta = {"tree": tree, "tensors": tensors.pack(), "producer": producer, "created": created, "user": user}
    if views is not None and len(views):
        meta["views"] = views.pack()
    if type(tree) is not PackedTree:
        return msgpack.packb(meta, use_bin_type=True)
    out = [bytes([0x80 | len(meta)]), msgpack.packb("tree"), tree]
    for key, value in list(meta.items())[1:]:
        out += (msgpack.packb(key), msgpack.packb(value, use_bin_type=True))
    return b"".join(out)


def fit_metadata(tree: Any, *, shapes: list[tuple[int, ...]], dtypes: set[str], views: ViewTable | None,
                 user: dict[str, Any], producer: dict[str, Any], created: str, containers: int,
                 limits: Limits, itemsizes: list[int] | None = None) -> PackedTree:
    """Serialise the tree, and refuse (before any byte is written) metadata a reader with ``limits`` refuses.

    What ``save`` writes, ``load`` reads: the metadata length, tensor count and container count are
    checked against the caps of §8.1 (an upper bound on the length: the table is not built yet).
    """
    for i, shape in enumerate(shapes):  # only an empty array can claim more than memory holds
        if 0 in shape and itemsizes is not None and nonzero_bytes(shape, itemsizes[i]) >= 1 << 63:
            raise UnsupportedObjectError(f"an empty array of shape {shape}: its non-zero dimensions make 2**63 "
                                         "bytes or more, which no reader can represent (spec §4.3)")
    packed = PackedTree(msgpack.packb(tree, use_bin_type=True))
    n, dims = len(shapes), sum(map(len, shapes))
    nv = len(views) if views is not None else 0
    vdims = int(views.ndim.sum(dtype=np.int64)) if views is not None and nv else 0
    rest = msgpack.packb({"producer": producer, "created": created, "user": user}, use_bin_type=True)
    names = sum(len(d) + 2 for d in dtypes) + (sum(len(d) + 2 for d in views.dtype_names) if views is not None else 0)
    size = len(packed) + len(rest) + 34 * n + 8 * dims + 26 * nv + 16 * vdims + names + 512
    how = ("store large values as arrays (e.g. numpy.frombuffer(b, numpy.uint8)), or pass "
           "limits=ckptfmt.Limits(...) raising that cap to save and to every open/load of the file")
    if n > limits.max_tensors or nv > limits.max_tensors:
        raise ObjectLimitError(f"{max(n, nv)} tensors, over the reader's cap of {limits.max_tensors} "
                               f"(Limits.max_tensors): {how}")
    if size > limits.max_metadata_bytes:
        raise ObjectLimitError(f"the metadata would be about {size} bytes, over the reader's cap of "
                               f"{limits.max_metadata_bytes} (Limits.max_metadata_bytes): {how}")
    if containers + 8 > container_budget(len(packed) + len(rest), limits):
        raise ObjectLimitError(f"{containers} lists, tuples and dicts in {len(packed) + len(rest)} bytes of metadata, "
                               f"over the reader's cap of one per {limits.bytes_per_container} bytes "
                               f"(Limits.bytes_per_container): {how}")
    return packed
