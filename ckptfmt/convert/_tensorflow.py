"""TensorFlow checkpoints (TF1 ``Saver`` and TF2 ``tf.train.Checkpoint``), read without TensorFlow.

A checkpoint is a *tensor bundle*: ``PREFIX.index``, a LevelDB-format table (:mod:`._sstable`), and the
data shards ``PREFIX.data-0000K-of-0000N``. The index maps ``""`` to a ``BundleHeaderProto``
(``num_shards``, endianness, version) and every tensor name to a ``BundleEntryProto`` (dtype, shape,
shard, offset, size, masked CRC-32C of the bytes). A partitioned tensor's entry lists its slices
(``TensorSliceProto``); each slice is an entry of its own under a key made of the name and the slice's
extents (TensorFlow's ``EncodeTensorNameSlice``, an ``OrderedCode`` string). The protos are decoded
with :mod:`._protowire`; field numbers follow ``tensor_bundle.proto``, ``tensor_shape.proto`` and
``tensor_slice.proto``.

The tree is flat: ``{TF key: tensor}`` with each key exactly as TensorFlow wrote it
(``"dense/kernel"``, ``"model/layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"``). No nested view is made: TF1
names may be both a variable and the prefix of others (``"dense/kernel"`` and
``"dense/kernel/Adam"``), and TF2's object graph is kept whole in ``_CHECKPOINTABLE_OBJECT_GRAPH``.
Numeric tensors (every float, int, uint, bool and complex type, bfloat16 and float8) stream lazily
from the shards, each checked against its CRC-32C as it is read; a partitioned tensor is reassembled
from its slices after checking that they tile its shape exactly once. ``DT_STRING`` tensors become
``bytes`` (a scalar) or nested lists of ``bytes``; one larger than :data:`MAX_STRING_BYTES` is skipped
and named in the metadata. Quantized types (``qint8`` ...) are stored as their integer type, their TF
name recorded. Resource, variant, 4-bit and unknown dtypes are refused.

Files opened: the index, and ``PREFIX.data-%05d-of-%05d`` for the shards the entries name (the shard
count from the header, no path from the file). Every offset and size is checked against the shard's
size before anything is read or allocated. The CRC-32C checks (index blocks, tensors, string
lengths) are on by default; :func:`read_tensorflow` takes ``verify=False`` to skip them, since the
numpy CRC (used when google-crc32c is not installed) runs at ~100-200 MB/s. Little-endian bundles
only; snappy-compressed index blocks are refused (TensorFlow never writes them).
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._dtypes import DTYPES, DType
from .._lazy import LazyArray
from ._crc32c import Crc32c, crc32c, implementation, unmask
from ._errors import CorruptSourceError, UnknownFormatError, UnsupportedSourceError
from ._lazy import FileArray
from ._protowire import LEN, VARINT, WireError, fields, signed64, varint
from ._sstable import FOOTER_SIZE, TableError, UnsupportedTableError, has_magic, read_table

__all__ = ["METADATA_KEY", "MAX_STRING_BYTES", "TF_DTYPES", "find_prefix", "looks_like_index", "read_tensorflow"]

METADATA_KEY = "tensorflow"
#: a DT_STRING tensor is read whole into the tree; larger ones are skipped (and named in the metadata)
MAX_STRING_BYTES = 64 << 20
#: ... and one that nests more lists than this beyond its byte count (an empty (10**9, 0) tensor) too
MAX_STRING_LISTS = 1 << 16
#: TensorFlow ``DataType`` enum -> (TF name, canonical dtype name or None when refused)
TF_DTYPES: dict[int, tuple[str, str | None]] = {
    1: ("float32", "float32"), 2: ("float64", "float64"), 3: ("int32", "int32"), 4: ("uint8", "uint8"),
    5: ("int16", "int16"), 6: ("int8", "int8"), 7: ("string", None), 8: ("complex64", "complex64"),
    9: ("int64", "int64"), 10: ("bool", "bool"), 11: ("qint8", "int8"), 12: ("quint8", "uint8"),
    13: ("qint32", "int32"), 14: ("bfloat16", "bfloat16"), 15: ("qint16", "int16"), 16: ("quint16", "uint16"),
    17: ("uint16", "uint16"), 18: ("complex128", "complex128"), 19: ("float16", "float16"),
    20: ("resource", None), 21: ("variant", None), 22: ("uint32", "uint32"), 23: ("uint64", "uint64"),
    24: ("float8_e5m2", "float8_e5m2"), 25: ("float8_e4m3fn", "float8_e4m3fn"), 26: ("float8_e4m3fnuz", None),
    27: ("float8_e4m3b11fnuz", None), 28: ("float8_e5m2fnuz", None), 29: ("int4", None), 30: ("uint4", None),
    31: ("int2", None), 32: ("uint2", None),
}
_DT_STRING = 7
_QUANTIZED = {11, 12, 13, 15, 16}
INDEX_SUFFIX = ".index"
STATE_FILE = "checkpoint"
_DATA_RE = re.compile(r"^(?P<prefix>.+)\.data-(?P<k>\d{5,})-of-(?P<n>\d{5,})$")
_STATE_RE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"(?P<path>(?:[^"\\]|\\.)*)"\s*$', re.MULTILINE)
_MAX_DIMS = 64
_MAX_SHARDS = 1 << 20
_MAX_STATE = 1 << 20


# ------------------------------------------------------------------ finding the checkpoint


def looks_like_index(path: str, head: bytes, size: int) -> bool:
    """True if the file starts like a bundle index (the empty header key first) and ends with the table magic."""
    if size < FOOTER_SIZE + 3 or head[:2] != b"\x00\x00":  # first entry: shared 0, key length 0 (the key "")
        return False
    with open(path, "rb") as f:
        f.seek(size - 8)
        return has_magic(f.read(8))


def _index_of(prefix: str) -> str | None:
    index = prefix + INDEX_SUFFIX
    if not os.path.isfile(index):
        return None
    size = os.path.getsize(index)
    with open(index, "rb") as f:
        head = f.read(16)
    return index if looks_like_index(index, head, size) else None


def _from_state_file(directory: str) -> str | None:
    """The prefix the ``checkpoint`` state file names, looked for in ``directory`` only (by its base name)."""
    state = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(state) or os.path.getsize(state) > _MAX_STATE:
        return None
    with open(state, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    m = _STATE_RE.search(text)
    if m is None:
        return None
    named = re.sub(r"\\(.)", r"\1", m.group("path"))
    # absolute paths (TF1's default) and relative ones alike are looked up by base name beside the state file
    base = os.path.basename(named.replace("\\", "/").rstrip("/"))
    if not base or base in (".", ".."):
        return None
    return os.path.join(directory, base)


def find_prefix(path: str) -> str | None:
    """The bundle prefix ``path`` names (the prefix, its ``.index``, a data shard, or a directory), or None.

    A directory names the checkpoint its ``checkpoint`` state file names, else its one ``*.index``,
    else a SavedModel's ``variables/variables``.
    """
    if os.path.isdir(path):
        named = _from_state_file(path)
        if named is not None and _index_of(named) is not None:
            return named
        found = sorted(n[: -len(INDEX_SUFFIX)] for n in os.listdir(path) if n.endswith(INDEX_SUFFIX))
        hits = [os.path.join(path, n) for n in found if _index_of(os.path.join(path, n)) is not None]
        if len(hits) > 1:
            names = ", ".join(os.path.basename(h) for h in hits)
            raise UnknownFormatError(path, f"several TensorFlow checkpoints ({names}) "
                                           "and no 'checkpoint' state file naming one; pass the prefix to convert")
        if hits:
            return hits[0]
        saved_model = os.path.join(path, "variables", "variables")  # a SavedModel directory's variables
        return saved_model if _index_of(saved_model) is not None else None
    if path.endswith(INDEX_SUFFIX) and os.path.isfile(path):
        prefix = path[: -len(INDEX_SUFFIX)]
        return prefix if _index_of(prefix) is not None else None
    m = _DATA_RE.match(path)
    if m is not None and os.path.isfile(path):
        return m.group("prefix") if _index_of(m.group("prefix")) is not None else None
    if not os.path.exists(path) and os.path.isfile(path + INDEX_SUFFIX):
        return path  # named by its prefix: the index is checked (and a broken one reported) when read
    return None


def shard_path(prefix: str, shard: int, num_shards: int) -> str:
    """TensorFlow's ``DataFilename``: ``PREFIX.data-%05d-of-%05d``."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


# ------------------------------------------------------------------ protos


@dataclass
class _Entry:
    """A ``BundleEntryProto``."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int | None = None
    slices: list[tuple[tuple[int, int], ...]] = field(default_factory=list)


def _shape(buf: bytes, start: int, end: int) -> tuple[int, ...]:
    """A ``TensorShapeProto``: ``dim`` (2) of ``size`` (1); ``unknown_rank`` (3) refused."""
    dims: list[int] = []
    for num, wt, val in fields(buf, start, end):
        if num == 2 and wt == LEN:
            assert isinstance(val, tuple)
            size = 0
            for n2, w2, v2 in fields(buf, *val):
                if n2 == 1 and w2 == VARINT:
                    assert isinstance(v2, int)
                    size = signed64(v2)
            if size < 0:
                raise WireError(f"a dimension of size {size} (partially known shapes are not stored in checkpoints)")
            dims.append(size)
            if len(dims) > _MAX_DIMS:
                raise WireError(f"more than {_MAX_DIMS} dimensions")
        elif num == 3 and wt == VARINT and val:
            raise WireError("the shape has unknown rank")
    return tuple(dims)


def _slice(buf: bytes, start: int, end: int) -> tuple[tuple[int, int], ...]:
    """A ``TensorSliceProto``: ``extent`` (1) of ``start`` (1) and ``length`` (2, absent: the whole axis, -1)."""
    out: list[tuple[int, int]] = []
    for num, wt, val in fields(buf, start, end):
        if num == 1 and wt == LEN:
            assert isinstance(val, tuple)
            first, length = 0, -1
            for n2, w2, v2 in fields(buf, *val):
                if w2 == VARINT and n2 in (1, 2):
                    assert isinstance(v2, int)
                    if n2 == 1:
                        first = signed64(v2)
                    else:
                        length = signed64(v2)
            out.append((first, length))
            if len(out) > _MAX_DIMS:
                raise WireError(f"more than {_MAX_DIMS} extents")
    return tuple(out)


def _entry(buf: bytes) -> _Entry:
    """A ``BundleEntryProto``: dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6 (fixed32), slices 7."""
    e = _Entry()
    for num, wt, val in fields(buf):
        if wt == VARINT and isinstance(val, int):
            if num == 1:
                e.dtype = val
            elif num == 3:
                e.shard_id = signed64(val)
            elif num == 4:
                e.offset = signed64(val)
            elif num == 5:
                e.size = signed64(val)
        elif wt == LEN and isinstance(val, tuple):
            if num == 2:
                e.shape = _shape(buf, *val)
            elif num == 7:
                e.slices.append(_slice(buf, *val))
        elif num == 6 and isinstance(val, int):
            e.crc32c = val
    return e


def _header(buf: bytes) -> tuple[int, int, dict[str, Any]]:
    """A ``BundleHeaderProto``: (num_shards 1, endianness 2, version 3 as a dict)."""
    num_shards, endianness = 0, 0
    version: dict[str, Any] = {"producer": 0, "min_consumer": 0, "bad_consumers": []}
    for num, wt, val in fields(buf):
        if num == 1 and wt == VARINT and isinstance(val, int):
            num_shards = signed64(val)
        elif num == 2 and wt == VARINT and isinstance(val, int):
            endianness = val
        elif num == 3 and wt == LEN and isinstance(val, tuple):
            for n2, w2, v2 in fields(buf, *val):
                if n2 == 1 and w2 == VARINT and isinstance(v2, int):
                    version["producer"] = signed64(v2)
                elif n2 == 2 and w2 == VARINT and isinstance(v2, int):
                    version["min_consumer"] = signed64(v2)
                elif n2 == 3 and w2 == VARINT and isinstance(v2, int):
                    version["bad_consumers"].append(signed64(v2))
                elif n2 == 3 and w2 == LEN and isinstance(v2, tuple):  # packed
                    pos, stop = v2
                    while pos < stop:
                        v, pos = varint(buf, pos, stop)
                        version["bad_consumers"].append(signed64(v))
    return num_shards, endianness, version


# ------------------------------------------------------------------ slice keys (OrderedCode)


def _num_increasing(n: int) -> bytes:
    """``OrderedCode::WriteNumIncreasing``: a length byte, then the value big-endian."""
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def _string(s: bytes) -> bytes:
    """``OrderedCode::WriteString``: 0x00 as 0x00 0xff, 0xff as 0xff 0x00, then the terminator 0x00 0x01."""
    out = bytearray()
    for b in s:
        out.append(b)
        if b == 0:
            out.append(0xFF)
        elif b == 0xFF:
            out.append(0)
    return bytes(out) + b"\x00\x01"


def _signed_increasing(v: int) -> bytes:
    """``OrderedCode::WriteSignedNumIncreasing``: length in unary in the leading bits, then the value."""
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    length = x.bit_length() // 7 + 1
    body = bytearray((v & ((1 << 80) - 1)).to_bytes(10, "big")[10 - length :])
    if length <= 8:
        body[0] ^= (0xFF << (8 - length)) & 0xFF
    else:
        body[0] ^= 0xFF
        body[1] ^= 0x80 if length == 9 else 0xC0
    return bytes(body)


def slice_key(name: bytes, extents: tuple[tuple[int, int], ...]) -> bytes:
    """TensorFlow's ``EncodeTensorNameSlice``: the index key of one slice of tensor ``name``."""
    out = [_num_increasing(0), _string(name), _num_increasing(len(extents))]
    for first, length in extents:
        out.append(_signed_increasing(first))
        out.append(_signed_increasing(length))
    return b"".join(out)


# ------------------------------------------------------------------ lazy tensors


class _CheckedArray(FileArray):
    """A tensor's bytes in a shard, checked against the entry's masked CRC-32C as they stream."""

    def __init__(self, path: str, offset: int, dtype: DType, shape: tuple[int, ...], *, name: str,
                 file_size: int, crc: int | None) -> None:
        super().__init__(path, offset, dtype, shape, name=name, file_size=file_size)
        self.crc = crc

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The bytes ``limit`` at a time; a CRC mismatch raises after the last chunk (the save then fails)."""
        if self.crc is None:
            yield from super().chunks(limit)
            return
        running = Crc32c()
        for chunk in super().chunks(limit):
            running.update(chunk)
            yield chunk
        if running.value != unmask(self.crc):
            raise CorruptSourceError(self.path, f"tensorflow: {self._what()}: CRC-32C mismatch over bytes "
                                                f"[{self.offset}, {self.offset + self.nbytes}) (stored "
                                                f"{unmask(self.crc):#010x}, computed {running.value:#010x})")


@dataclass
class _Part:
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    array: _CheckedArray


class _SlicedArray(LazyArray):
    """A partitioned tensor, assembled from its slices (which tile its shape exactly once) as it is written."""

    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...], parts: list[_Part]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.parts = [p for p in parts if p.array.nbytes]
        self.parts.sort(key=lambda p: p.lo)

    def _rows_only(self) -> bool:
        """Every slice spans all axes but the first: the slices, in order, are the C-order bytes."""
        return all(p.lo[1:] == (0,) * (len(self.shape) - 1) and p.hi[1:] == self.shape[1:] for p in self.parts)

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The whole tensor in C order: slice after slice, or rebuilt block by block from memory maps."""
        if self._rows_only():
            for p in self.parts:
                yield from p.array.chunks(limit)
            return
        for p in self.parts:  # check every slice's CRC first (one streaming pass), then assemble
            for _ in p.array.chunks(limit):
                pass
        void = np.dtype(f"V{self.itemsize}")
        maps: list[tuple[tuple[int, ...], tuple[int, ...], np.ndarray]] = []
        for p in self.parts:
            shape = tuple(h - lo for lo, h in zip(p.lo, p.hi, strict=True))
            maps.append((p.lo, p.hi, np.memmap(p.array.path, dtype=void, mode="r", offset=p.array.offset,
                                               shape=shape)))
        try:
            yield from _assemble(self.shape, maps, void, limit)
        finally:
            del maps


def _assemble(shape: tuple[int, ...], parts: list[tuple[tuple[int, ...], tuple[int, ...], np.ndarray]],
              void: np.dtype, limit: int) -> Iterator[np.ndarray]:
    """C-order bytes of a ``shape`` tensor tiled by ``parts`` (lo, hi, values), in blocks of about ``limit``."""
    row = math.prod(shape[1:]) * void.itemsize
    if row <= limit or len(shape) == 1:
        step = max(1, limit // max(row, 1))
        for a in range(0, shape[0], step):
            b = min(shape[0], a + step)
            buf = np.empty((b - a, *shape[1:]), dtype=void)
            for lo, hi, arr in parts:
                s, e = max(a, lo[0]), min(b, hi[0])
                if s < e:
                    where = (slice(s - a, e - a), *(slice(x, y) for x, y in zip(lo[1:], hi[1:], strict=True)))
                    buf[where] = arr[s - lo[0] : e - lo[0]]
            yield buf.reshape(-1).view(np.uint8)
        return
    for i in range(shape[0]):  # one row is larger than a chunk: go down an axis
        sub = [(lo[1:], hi[1:], arr[i - lo[0]]) for lo, hi, arr in parts if lo[0] <= i < hi[0]]
        yield from _assemble(shape[1:], sub, void, limit)


# ------------------------------------------------------------------ reading


@dataclass
class _Bundle:
    prefix: str
    index: str
    num_shards: int
    verify: bool
    shard_sizes: dict[int, int] = field(default_factory=dict)

    def shard(self, shard_id: int, key: str) -> tuple[str, int]:
        """(path, size) of a shard an entry names; the shard must exist."""
        if not 0 <= shard_id < self.num_shards:
            raise CorruptSourceError(self.index, f"tensorflow: tensor {key!r} is in shard {shard_id}, but the header "
                                                 f"declares {self.num_shards} shards")
        path = shard_path(self.prefix, shard_id, self.num_shards)
        if shard_id not in self.shard_sizes:
            if not os.path.isfile(path):
                raise CorruptSourceError(path, f"tensorflow: the data shard holding tensor {key!r} is missing")
            self.shard_sizes[shard_id] = os.path.getsize(path)
        return path, self.shard_sizes[shard_id]


def _canonical(tf_dtype: int, path: str, key: str) -> DType:
    name, canonical = TF_DTYPES.get(tf_dtype, (f"DataType {tf_dtype}", None))
    if canonical is None:
        hint = (" (a handle to a resource, not its value)" if tf_dtype == 20 else
                " (an opaque serialized C++ object such as a dataset iterator)" if tf_dtype == 21 else "")
        raise UnsupportedSourceError(path, f"tensorflow: tensor {key!r} has dtype {name}{hint}, which cannot be "
                                           "converted")
    return DTYPES[canonical]


def _located(bundle: _Bundle, e: _Entry, key: str) -> tuple[str, int]:
    """(shard path, shard size) of a stored entry, its byte range checked against that size."""
    path, size = bundle.shard(e.shard_id, key)
    if e.offset < 0 or e.size < 0 or e.offset > size or e.size > size - e.offset:
        raise CorruptSourceError(path, f"tensorflow: tensor {key!r} claims bytes [{e.offset}, {e.offset + e.size}) "
                                       f"but the shard has {size} bytes (truncated?)")
    return path, size


def _numeric(bundle: _Bundle, e: _Entry, key: str, dtype: DType) -> _CheckedArray:
    path, size = _located(bundle, e, key)
    if math.prod(d for d in e.shape if d) * dtype.itemsize >= 1 << 63:
        raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r} of shape {list(e.shape)}: its dimensions "
                                               "make 2**63 bytes or more (TensorFlow caps a tensor below that)")
    want = math.prod(e.shape) * dtype.itemsize
    if want != e.size:
        raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r} of shape {list(e.shape)} and dtype "
                                               f"{dtype.name} needs {want} bytes; its entry says {e.size}")
    return _CheckedArray(path, e.offset, dtype, e.shape, name=key, file_size=size,
                         crc=e.crc32c if bundle.verify else None)


def _strings(bundle: _Bundle, e: _Entry, key: str) -> Any:
    """A DT_STRING tensor: ``[varint64 length]*n``, the masked CRC-32C of the lengths, then the bytes."""
    path, _ = _located(bundle, e, key)
    n = math.prod(e.shape)
    if n == 0:
        value: list[bytes] = []
    else:
        if n + 4 > e.size:
            raise CorruptSourceError(path, f"tensorflow: string tensor {key!r} has {n} elements, more than its "
                                           f"{e.size} bytes can describe")
        with open(path, "rb") as f:
            f.seek(e.offset)
            raw = f.read(e.size)
        if len(raw) != e.size:
            raise CorruptSourceError(path, f"tensorflow: string tensor {key!r}: the shard ended early")
        lengths = []
        pos = 0
        try:
            for _ in range(n):
                length, pos = varint(raw, pos, len(raw))
                lengths.append(length)
        except WireError as err:
            raise CorruptSourceError(path, f"tensorflow: string tensor {key!r}: {err}") from None
        if pos + 4 > len(raw):
            raise CorruptSourceError(path, f"tensorflow: string tensor {key!r}: no room for the lengths' checksum")
        if sum(lengths) != len(raw) - pos - 4:
            raise CorruptSourceError(path, f"tensorflow: string tensor {key!r}: its lengths sum to {sum(lengths)}, "
                                           f"but {len(raw) - pos - 4} bytes follow them")
        if bundle.verify:
            # TensorFlow checksums the lengths as little-endian uint32 (uint64 past 2**32-1), not as varints,
            # then the stored (masked) checksum of those, then the strings
            packed = b"".join(struct.pack("<I" if v <= 0xFFFFFFFF else "<Q", v) for v in lengths)
            running = crc32c(packed)
            (stored,) = struct.unpack_from("<I", raw, pos)
            if running != unmask(stored):
                raise CorruptSourceError(path, f"tensorflow: string tensor {key!r}: the CRC-32C of its lengths does "
                                               "not match")
            if e.crc32c is not None and crc32c(memoryview(raw)[pos:], running) != unmask(e.crc32c):
                raise CorruptSourceError(path, f"tensorflow: string tensor {key!r}: CRC-32C mismatch")
        pos += 4
        flat = []
        for length in lengths:
            flat.append(raw[pos : pos + length])
            pos += length
        value = flat
    return _nest(value, e.shape)


def _nest(flat: list[bytes], shape: tuple[int, ...]) -> Any:
    """The flat C-order values as nested lists of ``shape`` (a bytes value for a scalar)."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _box(lo: Any, hi: Any) -> list[tuple[int, int]]:
    """A slice as ``[(start, stop) per axis]``, for messages."""
    return list(zip(lo, hi, strict=True))


def _sliced(bundle: _Bundle, e: _Entry, key: str, raw_key: bytes, dtype: DType,
            slices: dict[bytes, _Entry], used: set[bytes]) -> _SlicedArray:
    """A partitioned tensor: every slice found, of the right shape and dtype, tiling the whole exactly once."""
    shape = e.shape
    parts: list[_Part] = []
    volume = 0
    for extents in e.slices:
        if len(extents) != len(shape):
            raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r} of shape {list(shape)} has a slice "
                                                   f"of {len(extents)} dimensions")
        lo, hi = [], []
        for (first, length), dim in zip(extents, shape, strict=True):
            if length == -1:
                if first != 0:
                    raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r}: a full extent starts at "
                                                           f"{first}")
                first, length = 0, dim
            if first < 0 or length < 0 or first + length > dim:
                raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r}: slice extent [{first}, "
                                                       f"{first + length}) lies outside the axis of {dim}")
            lo.append(first)
            hi.append(first + length)
        skey = slice_key(raw_key, extents)
        part = slices.get(skey)
        if part is None:
            raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r}: its slice {_box(lo, hi)} has "
                                                   "no entry in the index")
        if skey in used:
            raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r} lists the slice {_box(lo, hi)} "
                                                   "twice")
        used.add(skey)
        sub = tuple(h - low for low, h in zip(lo, hi, strict=True))
        if part.dtype != e.dtype or part.shape != sub or part.slices:
            raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r}: the slice {_box(lo, hi)} is "
                                                   f"stored with dtype {part.dtype} and shape {list(part.shape)}, not "
                                                   f"{e.dtype} and {list(sub)}")
        parts.append(_Part(tuple(lo), tuple(hi), _numeric(bundle, part, f"{key}[slice {_box(lo, hi)}]", dtype)))
        volume += math.prod(sub)
    if volume != math.prod(shape):
        raise CorruptSourceError(bundle.index, f"tensorflow: the slices of tensor {key!r} cover {volume} elements; "
                                               f"its shape {list(shape)} has {math.prod(shape)}")
    ordered = sorted(parts, key=lambda p: p.lo)
    for i, a in enumerate(ordered):  # equal volume and no overlap: an exact tiling
        for b in ordered[i + 1 :]:
            if b.lo[0] >= a.hi[0]:
                break
            if all(max(x0, y0) < min(x1, y1) for x0, x1, y0, y1 in zip(a.lo, a.hi, b.lo, b.hi, strict=True)):
                raise CorruptSourceError(bundle.index, f"tensorflow: tensor {key!r}: slices "
                                                       f"{_box(a.lo, a.hi)} and {_box(b.lo, b.hi)} overlap")
    return _SlicedArray(key, dtype, shape, parts)


def read_tensorflow(path: str, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``{TF key: tensor or bytes}``, ``{"tensorflow": {...}}``) of the checkpoint ``path`` names.

    ``path``: the prefix, its ``.index`` file, one of its data shards, or a directory (the prefix its
    ``checkpoint`` state file names, else its only ``*.index``, else a SavedModel's
    ``variables/variables``). ``verify``: check each tensor's and
    each index block's CRC-32C (numpy, or google-crc32c when installed).
    """
    prefix = find_prefix(path)
    if prefix is None:
        raise UnknownFormatError(path, "not a TensorFlow checkpoint (no PREFIX.index table found)")
    index = prefix + INDEX_SUFFIX
    with open(index, "rb") as f:
        data = f.read()
    try:
        items = list(read_table(data, verify=verify))
    except UnsupportedTableError as err:
        raise UnsupportedSourceError(index, f"tensorflow index: {err}") from None
    except TableError as err:
        raise CorruptSourceError(index, f"tensorflow index: {err}") from None
    if not items or items[0][0] != b"":
        raise CorruptSourceError(index, "tensorflow index: the first key is not the bundle header (\"\")")
    try:
        num_shards, endianness, version = _header(items[0][1])
    except WireError as err:
        raise CorruptSourceError(index, f"tensorflow index: the BundleHeaderProto: {err}") from None
    if not 0 < num_shards <= _MAX_SHARDS:
        raise CorruptSourceError(index, f"tensorflow index: num_shards {num_shards} is not in [1, {_MAX_SHARDS}]")
    if endianness != 0:
        raise UnsupportedSourceError(index, "tensorflow: the checkpoint was written big-endian; only little-endian "
                                            "checkpoints are read")
    bundle = _Bundle(prefix, index, num_shards, verify)
    entries: dict[bytes, _Entry] = {}
    slices: dict[bytes, _Entry] = {}
    for raw_key, value in items[1:]:
        try:
            entry = _entry(value)
        except WireError as err:
            raise CorruptSourceError(index, f"tensorflow index: the entry of {raw_key[:80]!r}: {err}") from None
        (slices if raw_key[:1] == b"\x00" else entries)[raw_key] = entry
    tree: dict[str, Any] = {}
    tf_names: dict[str, str] = {}
    partitioned: dict[str, int] = {}
    skipped: dict[str, str] = {}
    used: set[bytes] = set()
    for raw_key, e in entries.items():
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptSourceError(index, f"tensorflow index: the tensor name {raw_key[:80]!r} is not "
                                            "UTF-8") from None
        if e.dtype == _DT_STRING:
            if e.slices:
                raise UnsupportedSourceError(index, f"tensorflow: string tensor {key!r} is partitioned; only "
                                                    "numeric tensors are reassembled from slices")
            lists = math.prod(e.shape[:-1]) if len(e.shape) > 1 else 0
            if e.size > MAX_STRING_BYTES or lists > e.size + MAX_STRING_LISTS:
                skipped[key] = (f"string tensor of shape {list(e.shape)} and {e.size} bytes, over the caps for "
                                f"values read into the tree ({MAX_STRING_BYTES} bytes, {MAX_STRING_LISTS} lists)")
                continue
            tree[key] = _strings(bundle, e, key)
            continue
        dtype = _canonical(e.dtype, index, key)
        if e.dtype in _QUANTIZED:
            tf_names[key] = TF_DTYPES[e.dtype][0]
        if e.slices:
            tree[key] = _sliced(bundle, e, key, raw_key, dtype, slices, used)
            partitioned[key] = len(e.slices)
        else:
            tree[key] = _numeric(bundle, e, key, dtype)
    meta: dict[str, Any] = {"num_shards": num_shards, "version": version,
                            "crc32c": implementation() if verify else "not verified"}
    if partitioned:
        meta["partitioned"] = partitioned
    if tf_names:
        meta["dtypes"] = tf_names
    if skipped:
        meta["skipped"] = skipped
    if len(used) != len(slices):
        meta["unreferenced_slices"] = len(slices) - len(used)
    return tree, {METADATA_KEY: meta}
