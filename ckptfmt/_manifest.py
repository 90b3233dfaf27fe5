"""The metadata map: the object tree, the columnar tensor table, producer and user metadata (spec §4).

Untrusted bytes become a :class:`Manifest` only through :func:`parse_manifest`, which applies every
validation rule of §8 that does not need the blob bytes themselves.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ._checksum import EMPTY_CHECKSUM
from ._dtypes import DTYPES
from ._header import HEADER_SIZE
from ._versions import FORMAT_MINOR
from .errors import (
    CheckpointError,
    InvalidKeyError,
    InvalidMetadataError,
    MetadataLimitError,
    ObjectLimitError,
    UnsupportedObjectError,
)

EXT_TENSOR = 1
EXT_TUPLE = 2
EXT_SCALAR = 3
EXT_INT = 4
EXT_MAP = 5
EXT_VIEW = 6
_I64 = np.dtype("<i8")
_U64 = np.dtype("<u8")
_U8 = np.dtype("u1")


@dataclass(frozen=True)
class Limits:
    """Caps a reader applies to untrusted metadata before trusting it (spec §8.1); all configurable."""

    max_metadata_bytes: int = 256 << 20
    max_depth: int = 64
    #: below what the metadata cap allows (a row costs at least 27 bytes), so that this cap can trigger
    max_tensors: int = 1 << 23
    max_ndim: int = 64
    #: at most one decoded container (list, map, tuple) per this many metadata bytes, plus 4096 (0: no cap)
    bytes_per_container: int = 4
    #: a view may span at most this many times its base's bytes (stride 0 repeats elements)
    max_view_expansion: int = 1 << 16


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A decoded array-scalar leaf (ext 3): row ``index`` of the tensor table, returned as a scalar.

    In a decoded tree a plain ``int`` (exactly type int) is a tensor reference (§4.2); plain integer
    values decode as :class:`PlainInt`.
    """

    index: int
    scalar: bool = True


@dataclass(frozen=True, slots=True)
class ViewRef:
    """A decoded view leaf (ext 6): row ``index`` of the view table (§4.7)."""

    index: int


class PlainInt(int):
    """An integer value of the tree (ext 4), told apart from tensor references by its type."""


def tensor_ref(node: Any) -> tuple[int, bool] | None:
    """(row, is_scalar) if ``node`` is a tensor leaf of a decoded tree, else None."""
    t = type(node)
    if t is int:
        return node, False
    if t is TensorRef:
        return node.index, True
    return None


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table (§4.3): what a blob holds and where."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: int | None


@dataclass
class TensorTable:
    """The tensor table as columns, so that a million rows cost a few numpy arrays, not a million objects."""

    dtype_names: list[str]
    dtype_code: np.ndarray
    ndim: np.ndarray
    shape_flat: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    checksum: np.ndarray | None
    _shapes: list[tuple[int, ...]] | None = field(default=None, repr=False)
    _ends: np.ndarray | None = field(default=None, repr=False)
    # format 1.1, compressed blobs (§13.2): None/0 when the file has none
    codec_names: list[str] | None = None
    codec: np.ndarray | None = None
    stored: np.ndarray | None = None
    piece_count: np.ndarray | None = None
    piece_bytes: np.ndarray | None = None
    chunk_bytes: int = 0
    piece_start: np.ndarray | None = field(default=None, repr=False)
    # format 1.1, packed blobs (§14): 0 when the file has none
    pack_alignment: int = 0
    pack_below: int = 0
    #: where each blob's zero padding ends (set by the layout check of a packed file)
    gap_end: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.offset)

    def stored_sizes(self) -> np.ndarray:
        """Bytes each blob occupies in the file: ``stored`` (§13.2), else ``nbytes``."""
        return self.nbytes if self.stored is None else self.stored

    def codec_of(self, i: int) -> str:
        """Row ``i``'s codec name (``raw`` in a file without compressed blobs)."""
        return "raw" if self.codec is None or self.codec_names is None else self.codec_names[int(self.codec[i])]

    def padding_end(self, i: int, alignment: int) -> int:
        """Where the zero padding after row ``i``'s blob ends: the next blob, or the metadata."""
        if self.gap_end is not None:
            return int(self.gap_end[i])
        return align_up(int(self.offset[i]) + int(self.stored_sizes()[i]), alignment)

    def shape(self, i: int) -> tuple[int, ...]:
        """Shape of row ``i`` (without building every row's shape: a lazy get reads one row)."""
        if self._shapes is not None:
            return self._shapes[i]
        if self._ends is None:
            self._ends = np.cumsum(self.ndim, dtype=np.int64)
        end = int(self._ends[i])
        return tuple(self.shape_flat[end - int(self.ndim[i]) : end].tolist())

    def shapes(self) -> list[tuple[int, ...]]:
        """Every row's shape, computed once."""
        if self._shapes is None:
            flat = self.shape_flat.tolist()
            ndim = self.ndim.tolist()
            ends = np.cumsum(self.ndim, dtype=np.int64).tolist()
            self._shapes = [tuple(flat[e - n : e]) for e, n in zip(ends, ndim, strict=True)]
        return self._shapes

    def entry(self, i: int) -> TensorEntry:
        """Row ``i`` as a :class:`TensorEntry`."""
        return TensorEntry(
            index=i,
            dtype=self.dtype_names[int(self.dtype_code[i])],
            shape=self.shape(i),
            offset=int(self.offset[i]),
            nbytes=int(self.nbytes[i]),
            checksum=None if self.checksum is None else int(self.checksum[i]),
        )

    def pack(self) -> dict[str, Any]:
        """The ``tensors`` map as written to the file."""
        out: dict[str, Any] = {
            "count": len(self),
            "dtypes": self.dtype_names,
            "dtype": self.dtype_code.astype(_U8).tobytes(),
            "ndim": self.ndim.astype(_U8).tobytes(),
            "shape": self.shape_flat.astype(_U64).tobytes(),
            "offset": self.offset.astype(_U64).tobytes(),
            "nbytes": self.nbytes.astype(_U64).tobytes(),
        }
        if self.checksum is not None:
            out["checksum"] = self.checksum.astype(_U64).tobytes()
        if self.codec is not None and self.stored is not None and self.piece_count is not None \
                and self.piece_bytes is not None:  # §13.2
            out.update(codecs=self.codec_names, codec=self.codec.astype(_U8).tobytes(),
                       stored=self.stored.astype(_U64).tobytes(), pieces=self.piece_count.astype(_U64).tobytes(),
                       piece_bytes=self.piece_bytes.astype(_U64).tobytes(), chunk_bytes=self.chunk_bytes)
        if self.pack_alignment:  # §14
            out.update(pack_alignment=self.pack_alignment, pack_below=self.pack_below)
        return out


@dataclass(frozen=True)
class ViewEntry:
    """One row of the view table (§4.7)."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    base: int
    offset: int


@dataclass
class ViewTable:
    """The view table as columns (§4.7)."""

    dtype_names: list[str]
    dtype_code: np.ndarray
    ndim: np.ndarray
    shape_flat: np.ndarray
    strides_flat: np.ndarray
    base: np.ndarray
    offset: np.ndarray
    _ends: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.base)

    def entry(self, i: int) -> ViewEntry:
        """Row ``i`` as a :class:`ViewEntry`."""
        if self._ends is None:
            self._ends = np.cumsum(self.ndim, dtype=np.int64)
        e, n = int(self._ends[i]), int(self.ndim[i])
        return ViewEntry(i, self.dtype_names[int(self.dtype_code[i])],
                         tuple(self.shape_flat[e - n : e].tolist()), tuple(self.strides_flat[e - n : e].tolist()),
                         int(self.base[i]), int(self.offset[i]))

    def pack(self) -> dict[str, Any]:
        """The ``views`` map as written to the file."""
        return {
            "count": len(self),
            "dtypes": self.dtype_names,
            "dtype": self.dtype_code.astype(_U8).tobytes(),
            "ndim": self.ndim.astype(_U8).tobytes(),
            "shape": self.shape_flat.astype(_U64).tobytes(),
            "strides": self.strides_flat.astype(_I64).tobytes(),
            "base": self.base.astype(_U64).tobytes(),
            "offset": self.offset.astype(_U64).tobytes(),
        }

    @classmethod
    def build(cls, entries: list[ViewEntry]) -> ViewTable:
        """A table from rows, in order."""
        names: dict[str, int] = {}
        codes = [names.setdefault(e.dtype, len(names)) for e in entries]
        return cls(list(names), np.asarray(codes, np.uint8), np.asarray([len(e.shape) for e in entries], np.uint8),
                   np.asarray([d for e in entries for d in e.shape], np.uint64),
                   np.asarray([s for e in entries for s in e.strides], np.int64),
                   np.asarray([e.base for e in entries], np.uint64), np.asarray([e.offset for e in entries], np.uint64))


EMPTY_VIEWS = ViewTable([], np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint64),
                        np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64))


@dataclass(frozen=True)
class Manifest:
    """The parsed metadata map (§4.1)."""

    tree: Any
    tensors: TensorTable
    producer: dict[str, Any]
    created: str
    user: dict[str, Any]
    views: ViewTable
    #: top-level keys this reader does not know (from a later minor version), kept verbatim.
    unknown: dict[str, Any]


# ------------------------------------------------------------------ writing


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
        if 0 in shape and itemsizes is not None and _nonzero_bytes(shape, itemsizes[i]) >= 1 << 63:
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


# ------------------------------------------------------------------ reading


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


_CONTAINERS = frozenset((dict, list, tuple))
_LEAVES = frozenset((str, bytes, bool, int, PlainInt, float, type(None), TensorRef, ViewRef))
_TREE_TYPES = _LEAVES | {list, _Deferred}
_KEYS = frozenset((str, int))
_KNOWN_SECTIONS = frozenset(("tree", "tensors", "producer", "created", "user", "views"))
#: Columns of the tensor and view tables this reader knows (1.0, then the 1.1 feature columns of §13-§14,
#: which ``_features`` checks against the header's feature bits); any other key is skipped undecoded (§4.3).
TENSOR_COLUMNS = frozenset(("count", "dtypes", "dtype", "ndim", "shape", "offset", "nbytes", "checksum",
                            "codecs", "codec", "stored", "pieces", "piece_bytes", "chunk_bytes",
                            "pack_alignment", "pack_below"))
VIEW_COLUMNS = frozenset(("count", "dtypes", "dtype", "ndim", "shape", "strides", "base", "offset"))


def container_budget(metadata_length: int, limits: Limits) -> int:
    """How many containers (lists, maps, tuples) metadata of this length may decode to (§8.1)."""
    if limits.bytes_per_container <= 0:
        return 1 << 62
    return metadata_length // limits.bytes_per_container + 4096


class _Decoder:
    """Decodes the sections of one metadata map, counting containers against the budget of §8.1."""

    def __init__(self, path: str | None, limits: Limits, budget: int) -> None:
        self.path = path
        self.limits = limits
        self.left = budget
        self.refs: list[int] = []
        self.scalars: list[int] = []
        self.view_refs: list[int] = []

    # -- counting: every msgpack array and map decoded passes through one of these hooks
    def _spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise MetadataLimitError(self.path, "metadata decodes to more containers (lists, maps, tuples) than "
                                                f"its length allows (one per {self.limits.bytes_per_container} bytes; "
                                                "lower Limits.bytes_per_container, or 0 for no cap)")

    def _list(self, items: list[Any]) -> list[Any]:
        self._spend()
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

    def columns(self, buf: Any, known: frozenset[str], what: str) -> dict[str, Any]:
        """The tensor or view map: known columns decoded, unknown entries (any msgpack value) skipped (§4.3)."""
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
        if code in (EXT_TUPLE, EXT_MAP):
            return _Deferred(code, payload)
        raise InvalidMetadataError(self.path, f"unknown msgpack ext type {code} in the tree")

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
        self._leaves((root,))
        return root

    def _too_deep(self) -> MetadataLimitError:
        return MetadataLimitError(self.path, f"tree nesting deeper than {self.limits.max_depth} (raise "
                                             "Limits.max_depth)")

    def _leaves(self, values: Any) -> set[type]:
        types = set(map(type, values))
        if not types <= _TREE_TYPES:
            bad = sorted(x.__name__ for x in types - _TREE_TYPES)
            raise InvalidMetadataError(self.path, f"tree leaf of type {', '.join(bad)} is not allowed")
        if int in types:
            self.refs.extend(v for v in values if type(v) is int)
        if TensorRef in types:
            self.scalars.extend(v.index for v in values if type(v) is TensorRef)
        if ViewRef in types:
            self.view_refs.extend(v.index for v in values if type(v) is ViewRef)
        return types

    def _walk(self, node: Any, depth: int) -> None:
        """Check a list or dict at nesting level ``depth`` (the root is 1) and expand what it holds."""
        if depth > self.limits.max_depth:
            raise self._too_deep()
        types = self._leaves(node.values() if type(node) is dict else node)
        if list in types or _Deferred in types:
            for k, v in (node.items() if type(node) is dict else enumerate(node)):
                tv = type(v)
                if tv is list:
                    self._walk(v, depth + 1)
                elif tv is _Deferred:
                    node[k] = self._expand(v, depth + 1)  # a value replaced in place: the dict keeps its size

    def _expand(self, deferred: _Deferred, depth: int) -> Any:
        """Decode a tuple or dict payload, then its children; its bytes are freed before the children's."""
        if depth > self.limits.max_depth:
            raise self._too_deep()
        payload, deferred.payload = deferred.payload, None
        code = deferred.code
        items = self._unpack_tree(payload)
        del payload
        if type(items) is not list:
            raise InvalidMetadataError(self.path, f"ext {code} payload is not a msgpack array")
        if code == EXT_TUPLE:
            self._walk(items, depth)
            return tuple(items)
        if len(items) != 2 or type(items[0]) is not list or type(items[1]) is not list \
                or len(items[0]) != len(items[1]):
            raise InvalidMetadataError(self.path, "a map payload is not two arrays of equal length")
        keys, values = items
        key_types = set(map(type, keys))
        if not key_types <= _KEYS:
            raise InvalidMetadataError(self.path, "a tree map key is neither str nor int")
        d = dict(zip(keys, values, strict=True))
        if len(d) != len(keys) or (int in key_types and len({str(k) for k in keys}) != len(keys)):
            raise InvalidMetadataError(self.path, "a tree map has duplicate keys (or an int and a str key with the "
                                                  "same key path)")
        del items, keys, values
        self.left += 2  # the payload's outer and key arrays are gone; the values now live in the dict
        self._walk(d, depth)
        return d


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
        for key, (start, end) in _sections(data, path).items():
            part = buf[start:end]
            if key not in _KNOWN_SECTIONS:
                unknown[key] = bytes(part)  # any well-formed msgpack value, kept undecoded (§4.1)
            elif key == "tree":
                meta[key] = dec.tree(part)
            elif key == "tensors":
                meta[key] = dec.columns(part, TENSOR_COLUMNS, key)
            elif key == "views":
                meta[key] = dec.columns(part, VIEW_COLUMNS, key)
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
    from ._features import parse_features  # format 1.1 columns (§13-§14)

    parse_features(meta["tensors"], tensors, features=features, alignment=alignment, path=path)
    views = _parse_views(meta["views"], tensors, path=path, minor=minor, limits=limits) if "views" in meta \
        else EMPTY_VIEWS
    _check_refs(dec.view_refs, len(views), path, what="views")
    _check_refs(dec.refs + dec.scalars + views.base.astype(np.int64).tolist(), len(tensors), path)
    for row in dec.scalars:
        if tensors.ndim[row] != 0:
            raise InvalidMetadataError(path, f"an array-scalar reference names tensor {row}, which is not 0-d")
    check_layout(tensors, alignment=alignment, metadata_offset=metadata_offset, path=path)
    return Manifest(meta["tree"], tensors, producer, created, user, views, unknown)


def _sections(data: bytes, path: str | None) -> dict[str, tuple[int, int]]:
    """Byte ranges of the top-level map's values, by key; refuses duplicate keys and trailing bytes."""
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


def _check_refs(refs: list[int], count: int, path: str | None, what: str = "tensors") -> None:
    """Every reference names a row, and every row is referenced (no hidden payload)."""
    if not refs:
        if count:
            raise InvalidMetadataError(path, f"{count} {what} are not referenced by the tree")
        return
    try:
        arr = np.asarray(refs, dtype=np.int64)
    except OverflowError:
        raise InvalidMetadataError(path, "tree references a tensor row beyond 2**63") from None
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= count:
        raise InvalidMetadataError(path, f"a reference to row {lo if lo < 0 else hi} of {what}, which has "
                                         f"rows 0..{count - 1}")
    if np.count_nonzero(np.bincount(arr, minlength=count)) != count:
        raise InvalidMetadataError(path, f"some {what} are not referenced (hidden payload)")


def _column(table: dict[str, Any], name: str, dtype: np.dtype, count: int, path: str | None,
            what: str = "tensor table") -> np.ndarray:
    raw = table.get(name)
    if not isinstance(raw, bytes):
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
        if _nonzero_bytes(v.shape, int(itemsize[i])) >= 1 << 63:
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
    """shape x itemsize == nbytes for every tensor of a known dtype (§8.2)."""
    n = len(tt)
    if not n:
        return
    if tt.shape_flat.size and int(tt.shape_flat.max()) >= 1 << 63:
        raise InvalidMetadataError(path, "a dimension is 2**63 or larger")
    prod_u = np.ones(n, dtype=np.uint64)
    prod_f = np.ones(n, dtype=np.float64)
    has = tt.ndim > 0
    if has.any():
        starts = (np.cumsum(tt.ndim, dtype=np.int64) - tt.ndim)[has]
        # The float product skips zero dimensions: an empty tensor must still have a shape numpy
        # can represent. Overflow to inf is what we are looking for, not an accident.
        dims_f = tt.shape_flat.astype(np.float64)
        dims_f[dims_f == 0] = 1
        with np.errstate(over="ignore", invalid="ignore"):
            prod_u[has] = np.multiply.reduceat(tt.shape_flat, starts)
            prod_f[has] = np.multiply.reduceat(dims_f, starts)
    itemsize = np.array([DTYPES[nm].itemsize if nm in DTYPES else 0 for nm in tt.dtype_names], dtype=np.uint64)
    isz = itemsize[tt.dtype_code]
    known = isz > 0
    huge = known & ~(prod_f * np.maximum(isz, 1) < 2.0**62)
    for i in np.flatnonzero(huge).tolist():  # near the bound: decide exactly, with Python ints
        if _nonzero_bytes(tt.shape(i), int(isz[i])) >= 1 << 63:
            raise InvalidMetadataError(path, f"tensor {i}: shape {tt.shape(i)} x itemsize {int(isz[i])}: its non-zero "
                                             "dimensions make 2**63 bytes or more, which no array can hold (§8.2)")
    with np.errstate(over="ignore", invalid="ignore"):
        bad = known & (prod_u * isz != tt.nbytes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetadataError(path, f"tensor {i}: shape {tt.shape(i)} x itemsize {int(isz[i])} != "
                                         f"nbytes {int(tt.nbytes[i])}")
    if tt.checksum is not None:
        wrong = (tt.nbytes == 0) & (tt.checksum != np.uint64(EMPTY_CHECKSUM))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise InvalidMetadataError(path, f"tensor {i} is empty but its checksum is not xxh3 of no bytes")


def _nonzero_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Product of the non-zero dimensions times the itemsize: what an array library must be able to index."""
    n = itemsize
    for d in shape:
        n *= d or 1
    return n


def check_layout(tt: TensorTable, *, alignment: int, metadata_offset: int, path: str | None) -> None:
    """Blobs lie in table order, each at the next multiple of the alignment, with nothing between (§4.5)."""
    if tt.pack_alignment:  # format 1.1 packed blobs: two alignments (§14.2)
        from ._features import packed_layout

        end = packed_layout(tt, alignment=alignment, first=blob_region_start(alignment), path=path)
        if end != metadata_offset:
            raise InvalidMetadataError(path, f"metadata starts at {metadata_offset}, expected {end} (after the "
                                             "last blob's padding)")
        return
    a = np.uint64(alignment)
    first = np.uint64(blob_region_start(alignment))
    nb = tt.stored_sizes()  # format 1.1: compressed blobs occupy their stored size (§13.2)
    if len(nb) and float(nb.astype(np.float64).sum()) > 2.0**62:
        raise InvalidMetadataError(path, "blob sizes add up to more than 2**62 bytes")
    span = (nb + (a - np.uint64(1))) & ~(a - np.uint64(1))
    ends = np.cumsum(span, dtype=np.uint64) + first if len(nb) else np.zeros(0, np.uint64)
    expected = np.where(nb == 0, np.uint64(0), ends - span)
    if not np.array_equal(expected, tt.offset):
        i = int(np.flatnonzero(expected != tt.offset)[0])
        raise InvalidMetadataError(path, f"tensor {i}: offset {int(tt.offset[i])}, expected {int(expected[i])} "
                                         "(blobs must follow each other in table order at aligned offsets)")
    end = int(ends[-1]) if len(ends) else int(first)
    if end != metadata_offset:
        raise InvalidMetadataError(path, f"metadata starts at {metadata_offset}, expected {end} (after the "
                                         "last blob's padding)")


def blob_region_start(alignment: int) -> int:
    """Offset of the first blob: the header rounded up to the alignment."""
    return -(-HEADER_SIZE // alignment) * alignment


def align_up(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (n + alignment - 1) & ~(alignment - 1)
