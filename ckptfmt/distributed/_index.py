"""The global index of a distributed checkpoint (spec/DISTRIBUTED.md §3): build, encode, parse.

One msgpack map written by the coordinator when every rank has written its container file. It is
the commit record: a directory without a valid index is not a checkpoint. Parsing treats the bytes
as hostile: sizes are capped, every field is type- and range-checked, errors name the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .._codec import MAX_CHUNK_BYTES, MAX_RATIO, PLANES_ZSTD, ZSTD
from .._dtypes import DTYPES
from ..errors import InvalidMetadataError, MetadataLimitError

#: the name of the index inside a checkpoint directory (also its commit marker)
INDEX_NAME = "ckptfmt-index.msgpack"
FORMAT_NAME = "ckptfmt.distributed"
INDEX_VERSION = 1
#: the version of an index with compressed extents (§3.1); a version-1 reader refuses it, as it must
CODED_INDEX_VERSION = 2
VERSIONS = (INDEX_VERSION, CODED_INDEX_VERSION)
#: default bytes per checksummed block of an extent (4 KiB: a partial read over-reads < 4 KiB per end)
DEFAULT_BLOCK_SIZE = 1 << 12
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1 << 10, 1 << 30
#: default cap on the index size a reader accepts
MAX_INDEX_BYTES = 1 << 30
MAX_DIMS = 64
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_U64 = (1 << 64) - 1
#: the format 1.1 codecs an extent may name (FORMAT.md §13); ``raw`` is an extent without ``codec``
CODECS = (ZSTD, PLANES_ZSTD)


@dataclass(frozen=True)
class Coding:
    """How a compressed extent is stored (§3.1): format 1.1 chunks of ``chunk_bytes`` decoded bytes, in pieces.

    ``planes`` pieces per chunk (the itemsize for ``planes-zstd``, else 1); ``pieces`` is each piece's
    stored size as little-endian u64. ``stored`` bytes in the container in all.
    """

    codec: str
    stored: int
    chunk_bytes: int
    pieces: bytes
    planes: int

    def piece_sizes(self) -> np.ndarray:
        """Stored size of every piece, in order."""
        return np.frombuffer(self.pieces, "<u8")


@dataclass(frozen=True)
class Extent:
    """``length`` bytes of data in container file ``file`` at ``offset``, with one xxh3 per block.

    Raw (``coding`` None): the bytes are ``[offset, offset + length)``, one checksum per ``block_size``
    block. Compressed: ``coding.stored`` bytes at ``offset`` decode to ``length``, one checksum per chunk.
    """

    file: int
    offset: int
    length: int
    checksums: bytes  # little-endian u64 per block (raw) or per chunk's stored bytes (compressed)
    coding: Coding | None = None

    @property
    def stored(self) -> int:
        """Bytes the extent occupies in its container."""
        return self.length if self.coding is None else self.coding.stored


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: the box ``offsets``/``sizes`` of the global shape, row-major bytes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    extent: Extent


@dataclass(frozen=True)
class TensorRecord:
    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class ValueRecord:
    key: str
    extent: Extent


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    rank: int


@dataclass(frozen=True)
class Index:
    """The parsed global index."""

    name: str
    created: str
    world_size: int
    block_size: int
    files: tuple[FileRecord, ...]
    tensors: dict[str, TensorRecord]
    values: dict[str, ValueRecord]
    planner_data: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)


def n_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def _extent_map(e: Extent) -> dict[str, Any]:
    m: dict[str, Any] = {"file": e.file, "offset": e.offset, "length": e.length, "checksums": e.checksums}
    if e.coding is not None:
        c = e.coding
        m.update(codec=c.codec, stored=c.stored, chunk_bytes=c.chunk_bytes, pieces=c.pieces)
    return m


def index_version(idx: Index) -> int:
    """1, or 2 when any extent is compressed (§3.1): plain checkpoints stay readable by version-1 readers."""
    coded = any(c.extent.coding is not None for t in idx.tensors.values() for c in t.chunks) or \
        any(v.extent.coding is not None for v in idx.values.values())
    return CODED_INDEX_VERSION if coded else INDEX_VERSION


def encode_index(idx: Index) -> bytes:
    """The msgpack bytes of ``idx`` (map keys in the order of spec/DISTRIBUTED.md §3)."""
    return msgpack.packb({
        "format": FORMAT_NAME,
        "version": index_version(idx),
        "name": idx.name,
        "created": idx.created,
        "producer": idx.producer,
        "world_size": idx.world_size,
        "block_size": idx.block_size,
        "files": [{"name": f.name, "size": f.size, "rank": f.rank} for f in idx.files],
        "tensors": [{"key": t.key, "dtype": t.dtype, "shape": list(t.shape),
                     "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes), **_extent_map(c.extent)}
                                for c in t.chunks]} for t in idx.tensors.values()],
        "values": [{"key": v.key, **_extent_map(v.extent)} for v in idx.values.values()],
        "planner_data": {k: list(p) for k, p in idx.planner_data.items()},
        "metadata": idx.metadata,
    }, use_bin_type=True)


class _Parser:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def fail(self, where: str, msg: str) -> InvalidMetadataError:
        return InvalidMetadataError(self.path, f"index {where}: {msg}")

    def get(self, m: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if key not in m:
            raise self.fail(where, f"missing field {key!r}")
        v = m[key]
        ok = type(v) in kind if isinstance(kind, tuple) else type(v) is kind
        if not ok:
            raise self.fail(f"{where}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
        return v

    def uint(self, m: dict[str, Any], key: str, where: str, hi: int = _U64) -> int:
        v = self.get(m, key, int, where)
        if not 0 <= v <= hi:
            raise self.fail(f"{where}.{key}", f"{v} out of range [0, {hi}]")
        return int(v)

    def dims(self, m: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
        v = self.get(m, key, list, where)
        if len(v) > MAX_DIMS:
            raise self.fail(f"{where}.{key}", f"more than {MAX_DIMS} dimensions")
        out = []
        for i, d in enumerate(v):
            if type(d) is not int or not 0 <= d <= _U64:
                raise self.fail(f"{where}.{key}[{i}]", f"not a dimension: {d!r}")
            out.append(d)
        return tuple(out)

    def extent(self, m: dict[str, Any], where: str, files: tuple[FileRecord, ...], block: int, itemsize: int,
               coded_ok: bool) -> Extent:
        if not files:
            raise self.fail(where, "refers to a file but the index lists none")
        f = self.uint(m, "file", where, len(files) - 1)
        off = self.uint(m, "offset", where)
        length = self.uint(m, "length", where)
        sums = self.get(m, "checksums", bytes, where)
        coding = self.coding(m, where, length, itemsize, coded_ok)
        stored = length if coding is None else coding.stored
        if off + stored > files[f].size:
            raise self.fail(where, f"bytes [{off}, {off + stored}) run past the end of {files[f].name} "
                                   f"({files[f].size} bytes)")
        if coding is None:
            want, per = n_blocks(length, block), f"block of {block}"
        else:
            want, per = n_blocks(length, coding.chunk_bytes), f"chunk of {coding.chunk_bytes} decoded bytes"
        if len(sums) != 8 * want:
            raise self.fail(f"{where}.checksums", f"{len(sums)} bytes, expected {8 * want} (8 per {per})")
        return Extent(f, off, length, sums, coding)

    def coding(self, m: dict[str, Any], where: str, length: int, itemsize: int, coded_ok: bool) -> Coding | None:
        """The compressed-extent fields (§3.1), checked against each other and the decoded ``length``."""
        fields = ("codec", "stored", "chunk_bytes", "pieces")
        if not any(k in m for k in fields):
            return None
        if not coded_ok:
            raise self.fail(f"{where}.codec", f"compressed extent in a version {INDEX_VERSION} index")
        codec = self.get(m, "codec", str, where)
        if codec not in CODECS:
            raise self.fail(f"{where}.codec", f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
        stored = self.uint(m, "stored", where)
        cb = self.uint(m, "chunk_bytes", where, MAX_CHUNK_BYTES)
        k = itemsize if codec == PLANES_ZSTD else 1
        if cb < 64 or cb % 64 or cb % k:
            raise self.fail(f"{where}.chunk_bytes", f"{cb} is not a multiple of 64 and of {k} in [64, "
                                                    f"{MAX_CHUNK_BYTES}]")
        if length % k:
            raise self.fail(f"{where}.length", f"{length} bytes do not split into {k} planes")
        pieces = self.get(m, "pieces", bytes, where)
        n = n_blocks(length, cb)
        if len(pieces) != 8 * k * n:
            raise self.fail(f"{where}.pieces", f"{len(pieces)} bytes, expected {8 * k * n} (8 per piece, {k} "
                                               f"pieces per chunk, {n} chunks)")
        sizes = np.frombuffer(pieces, "<u8")
        if int(sizes.sum(dtype=np.uint64)) != stored or (n and int(sizes.max()) > stored):
            raise self.fail(f"{where}.pieces", f"piece sizes do not add up to stored={stored}")
        if n:
            # each piece decodes to its plane's share of its chunk: never more than that (a raw piece
            # is exactly that), never less than 1/MAX_RATIO of it (FORMAT.md §13.4)
            plane = np.full(n, cb // k, np.uint64)
            plane[-1] = (length - (n - 1) * cb) // k
            want = np.repeat(plane, k)
            if (sizes > want).any() or (sizes == 0).any() or (want > sizes * np.uint64(MAX_RATIO)).any():
                j = int(np.flatnonzero((sizes > want) | (sizes == 0) | (want > sizes * np.uint64(MAX_RATIO)))[0])
                raise self.fail(f"{where}.pieces[{j}]", f"{int(sizes[j])} stored bytes for a plane of "
                                                         f"{int(want[j])} decoded bytes")
        return Coding(codec, stored, cb, pieces, k)


def parse_index(data: bytes, *, path: str | None = None, max_bytes: int = MAX_INDEX_BYTES) -> Index:
    """Parse and validate index bytes; any defect raises :class:`InvalidMetadataError` naming the field."""
    p = _Parser(path)
    if len(data) > max_bytes:
        raise MetadataLimitError(path, f"index of {len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises ValueError, TypeError, ExtraData, StackError, FormatError
        raise InvalidMetadataError(path, f"index is not valid msgpack: {type(e).__name__}: {e}") from None
    if type(m) is not dict:
        raise p.fail("root", "not a map")
    if m.get("format") != FORMAT_NAME:
        raise p.fail("format", f"expected {FORMAT_NAME!r}, got {m.get('format')!r}")
    version = p.uint(m, "version", "root")
    if version not in VERSIONS:
        from ..errors import UnsupportedVersionError

        raise UnsupportedVersionError(path, f"distributed index version {version}; this reader knows "
                                            f"{', '.join(map(str, VERSIONS))}")
    coded_ok = version >= CODED_INDEX_VERSION
    block = p.uint(m, "block_size", "root", MAX_BLOCK_SIZE)
    if block < MIN_BLOCK_SIZE or block & (block - 1):
        raise p.fail("block_size", f"{block} is not a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
    world = p.uint(m, "world_size", "root", 1 << 24)
    files_raw = p.get(m, "files", list, "root")
    files: list[FileRecord] = []
    seen_names: set[str] = set()
    for i, f in enumerate(files_raw):
        w = f"files[{i}]"
        if type(f) is not dict:
            raise p.fail(w, "not a map")
        name = p.get(f, "name", str, w)
        if not _FILE_RE.match(name) or ".." in name or name == INDEX_NAME:
            raise p.fail(f"{w}.name", f"{name!r} is not a plain file name of this directory")
        if name in seen_names:
            raise p.fail(f"{w}.name", f"{name!r} listed twice")
        seen_names.add(name)
        files.append(FileRecord(name, p.uint(f, "size", w), p.uint(f, "rank", w, max(world - 1, 0))))
    ft = tuple(files)
    tensors: dict[str, TensorRecord] = {}
    for i, t in enumerate(p.get(m, "tensors", list, "root")):
        w = f"tensors[{i}]"
        if type(t) is not dict:
            raise p.fail(w, "not a map")
        key = p.get(t, "key", str, w)
        if key in tensors:
            raise p.fail(f"{w}.key", f"{key!r} listed twice")
        dtype = p.get(t, "dtype", str, w)
        if dtype not in DTYPES:
            raise p.fail(f"{w}.dtype", f"unknown dtype {dtype!r}")
        item = DTYPES[dtype].itemsize
        shape = p.dims(t, "shape", w)
        chunks = []
        for j, c in enumerate(p.get(t, "chunks", list, w)):
            cw = f"{w}.chunks[{j}]"
            if type(c) is not dict:
                raise p.fail(cw, "not a map")
            offs, sizes = p.dims(c, "offsets", cw), p.dims(c, "sizes", cw)
            if len(offs) != len(shape) or len(sizes) != len(shape):
                raise p.fail(cw, f"offsets {list(offs)} / sizes {list(sizes)} do not match shape {list(shape)}")
            if any(o + s > d for o, s, d in zip(offs, sizes, shape, strict=False)):
                raise p.fail(cw, f"box at {list(offs)} of {list(sizes)} exceeds shape {list(shape)}")
            ext = p.extent(c, cw, ft, block, item, coded_ok)
            if ext.length != math.prod(sizes) * item:
                raise p.fail(f"{cw}.length", f"{ext.length} bytes for {list(sizes)} of {dtype}")
            chunks.append(Chunk(offs, sizes, ext))
        tensors[key] = TensorRecord(key, dtype, shape, tuple(chunks))
    values: dict[str, ValueRecord] = {}
    for i, v in enumerate(p.get(m, "values", list, "root")):
        w = f"values[{i}]"
        if type(v) is not dict:
            raise p.fail(w, "not a map")
        key = p.get(v, "key", str, w)
        if key in values or key in tensors:
            raise p.fail(f"{w}.key", f"{key!r} listed twice")
        values[key] = ValueRecord(key, p.extent(v, w, ft, block, 1, coded_ok))
    planner: dict[str, tuple[str | int, ...]] = {}
    for k, path_ in p.get(m, "planner_data", dict, "root").items():
        if type(path_) is not list or not all(type(e) in (str, int) for e in path_) or len(path_) > MAX_DIMS:
            raise p.fail(f"planner_data[{k!r}]", "not a list of str and int")
        planner[k] = tuple(path_)
    meta = p.get(m, "metadata", dict, "root")
    producer = m.get("producer", {})
    return Index(name=p.get(m, "name", str, "root"), created=p.get(m, "created", str, "root"), world_size=world,
                 block_size=block, files=ft, tensors=tensors, values=values, planner_data=planner,
                 metadata=meta, producer=producer if type(producer) is dict else {})
