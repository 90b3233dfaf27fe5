"""Zarr arrays (format 2 ``.zarray`` and format 3 ``zarr.json``) as tensorstore writes them, read without zarr.

An array is a key prefix of a :class:`Store` (a directory of files, or the keys of an OCDBT database): its
JSON metadata and one value per chunk of a regular grid, keyed by the chunk's grid index (format 2: ``i.j`` or
``i/j``; format 3: ``c/i/j``, or ``i.j`` with the ``v2`` key encoding). Each chunk holds the chunk's full
shape, edge chunks padded; a chunk that is absent holds the fill value. Codecs read here: format 2 compressors
``zstd``, ``gzip`` and ``zlib`` (or none) without filters, byte order from the dtype, C or F chunk order;
format 3 ``bytes`` (either endian), ``zstd``, ``gzip``, ``crc32c`` (checked), and ``sharding_indexed`` (a
shard file of inner chunks with an ``(offset, nbytes)`` index, at its end or start). Anything else (``blosc``,
filters, ``transpose``, variable-size strings) is refused with :class:`UnsupportedSourceError` naming it.

Everything here is hostile: metadata is size-capped, every chunk key is built from integers under the
array's prefix and, for files, its real path must stay inside the checkpoint root, decoded chunks must
have exactly the size the metadata gives (a decompressor is never allowed to produce more), and shard
indexes are checked against the shard's size before any chunk is read.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any, Union

import numpy as np

from .._dtypes import DTYPES, DType
from ._errors import CorruptSourceError, UnsupportedSourceError
from ._lazy import LazyArray

__all__ = ["MAX_META", "Store", "Value", "ZarrArray", "crc32c", "inflate", "inside_root", "open_zarr",
           "parse_json_file", "read_value", "value_size"]

#: size cap of a ``.zarray`` / ``zarr.json`` / Orbax metadata file
MAX_META = 64 << 20
_MAX_NDIM = 64
_MISSING = (1 << 64) - 1
#: zarr 2 dtype strings read: byte order, kind, size (``|b1``, ``<f4``, ``>i8``, ``<c8`` ...)
_V2_DTYPE = re.compile(r"^[<>|]([biufc])(\d{1,2})$")
#: tensorstore's zarr 2 names of the dtypes numpy lacks
_V2_NAMED = {"bfloat16": "bfloat16", "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}
_V3_DTYPES = {name: name for name in DTYPES}
_READ_STEP = 1 << 20


def parse_json_file(path: str, what: str, cap: int = MAX_META) -> Any:
    """The JSON value of a small metadata file (size-capped; duplicate keys and deep nesting refused)."""
    from ._safetensors import parse_json

    try:
        size = os.path.getsize(path)
        if size > cap:
            raise UnsupportedSourceError(path, f"{what} is {size} bytes, over the cap of {cap}")
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
    except OSError as e:
        raise CorruptSourceError(path, f"{what} cannot be read ({e})") from None
    return parse_json(raw, path, what)


def inside_root(root: str, rel: str, *, cited: str, what: str) -> str:
    """The real path of ``rel`` under ``root`` (a real path); refused if it is absolute, has ``..``, or links out."""
    parts = rel.split("/")
    if (not rel or os.path.isabs(rel) or "\\" in rel or "\0" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise CorruptSourceError(cited, f"{what} {rel!r} is not a relative path inside the checkpoint")
    full = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, full]) != root:
        raise CorruptSourceError(cited, f"{what} {rel!r} lies outside the checkpoint {root} (a link to {full})")
    return full


#: where a stored value lies: its bytes, or (real path of a file, offset, length)
Value = Union[bytes, tuple[str, int, int]]  # noqa: UP007 (a runtime alias on Python 3.10)


class Store:
    """Keys (``/``-separated) to values: the files under a directory, or the entries of an OCDBT database."""

    def __init__(self, root: str, entries: dict[str, Value] | None = None) -> None:
        #: the checkpoint directory (a real path)
        self.root = root
        self.entries = entries
        self._sums: dict[str, int] | None = None

    def get(self, key: str, cited: str) -> Value | None:
        """Where ``key``'s value lies; None if there is none."""
        if self.entries is not None:
            return self.entries.get(key)
        full = inside_root(self.root, key, cited=cited, what="file")
        if not os.path.lexists(full):
            return None
        if not os.path.isfile(full):
            raise CorruptSourceError(full, "zarr: not a regular file")
        return (full, 0, os.path.getsize(full))

    def cited(self, key: str) -> str:
        """The path an error names for ``key``."""
        return os.path.join(self.root, key) if self.entries is None else f"{self.root} (OCDBT key {key!r})"

    def stored_bytes(self, prefix: str) -> int:
        """Bytes stored under ``prefix/`` (files: links not followed)."""
        if self.entries is not None:
            if self._sums is None:  # once, for every prefix: a model has thousands of arrays
                self._sums = {}
                for k, v in self.entries.items():
                    at = k.find("/")
                    while at != -1:
                        self._sums[k[:at]] = self._sums.get(k[:at], 0) + value_size(v)
                        at = k.find("/", at + 1)
            return self._sums.get(prefix, 0)
        total = 0
        stack = [inside_root(self.root, prefix, cited=self.root, what="array directory")]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        return total


def value_size(value: Value) -> int:
    """Bytes of a stored value."""
    return len(value) if isinstance(value, bytes) else value[2]


def read_value(value: Value, cited: str, start: int = 0, n: int | None = None) -> bytes:
    """Bytes ``[start, start + n)`` of a stored value (all of it by default)."""
    size = value_size(value)
    n = size - start if n is None else n
    if start < 0 or n < 0 or start + n > size:
        raise CorruptSourceError(cited, f"zarr: bytes [{start}, {start + n}) of a value of {size}")
    if isinstance(value, bytes):
        return value[start : start + n]
    path, offset, _ = value
    try:
        with open(path, "rb") as f:
            f.seek(offset + start)
            data = f.read(n)
    except OSError as e:
        raise CorruptSourceError(cited, f"zarr: {path} cannot be read ({e})") from None
    if len(data) != n:
        raise CorruptSourceError(cited, f"zarr: {path} ends before the value does (truncated?)")
    return data


class _Range(io.RawIOBase):
    """A file-like reader of bytes ``[offset, offset + length)`` of a file."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.f.seek(offset)
        self.left = length

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        data = self.f.read(n)
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def _ints(value: Any, n: int | None, what: str, cited: str, *, positive: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_NDIM or (n is not None and len(value) != n) or not all(
            type(d) is int and (d > 0 if positive else d >= 0) and d < 1 << 62 for d in value):
        raise CorruptSourceError(cited, f"zarr: bad {what} {value!r:.120}")
    return tuple(value)


def _v2_dtype(code: Any, cited: str) -> tuple[DType, str]:
    """(canonical dtype, byte order "<" or ">") of a zarr 2 dtype string."""
    if isinstance(code, str) and code in _V2_NAMED:
        return DTYPES[_V2_NAMED[code]], "<"
    m = _V2_DTYPE.match(code) if isinstance(code, str) else None
    if m is None:
        raise UnsupportedSourceError(cited, f"zarr: dtype {code!r:.80} is not a numeric dtype ckptfmt stores")
    name = np.dtype("<" + code[1:] if code[0] != "|" else code).name
    if name not in DTYPES:
        raise UnsupportedSourceError(cited, f"zarr: dtype {code!r} ({name}) has no ckptfmt equivalent")
    return DTYPES[name], ">" if code[0] == ">" else "<"


def _host_dtype(dtype: DType, order: str) -> np.dtype:
    """The numpy dtype the bytes are handled as: the dtype itself, or same-size unsigned ints (bfloat16, float8)."""
    if dtype.name in _V2_NAMED:
        return np.dtype(f"{order}u{dtype.itemsize}")
    base = np.dtype(dtype.name)
    return base.newbyteorder(">") if order == ">" else base.newbyteorder("<")


def _fill(value: Any, dtype: DType, cited: str) -> np.ndarray:
    """The fill value as one element of the host dtype (little-endian); null means zero."""
    host = _host_dtype(dtype, "<")
    if value is None or value == 0 or value is False:
        return np.zeros((), host)
    if dtype.name in _V2_NAMED:
        if dtype.name == "bfloat16" and isinstance(value, (int, float)):
            bits = int(np.array(value, "<f4").view("<u4")) >> 16
            if float(np.array(bits << 16, "<u4").view("<f4")) == value:
                return np.array(bits, host)
        raise UnsupportedSourceError(cited, f"zarr: fill value {value!r:.40} of a {dtype.name} array")
    specials = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if isinstance(value, str) and value in specials:
        value = specials[value]
    if isinstance(value, list) and len(value) == 2 and dtype.name.startswith("complex"):
        value = complex(*(specials.get(v, v) if isinstance(v, str) else v for v in value))
    if not isinstance(value, (bool, int, float, complex)):
        raise CorruptSourceError(cited, f"zarr: fill value {value!r:.40} is not a number")
    try:
        return np.array(value, host)
    except (OverflowError, ValueError, TypeError) as e:
        raise CorruptSourceError(cited, f"zarr: fill value {value!r:.40} does not fit {dtype.name} ({e})") from None


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as zarr 3's ``crc32c`` codec stores it."""
    c = 0xFFFFFFFF
    table = _CRC32C
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def inflate(data: bytes, codec: str, limit: int, cited: str) -> bytes:
    """``data`` decompressed by ``codec``, never producing more than ``limit`` bytes (more is corrupt)."""
    if codec == "zstd":
        from .._codec import zstd

        zstandard = zstd()
        try:
            size = zstandard.frame_content_size(data)
            if size > limit:
                raise CorruptSourceError(cited, f"zarr: a zstd chunk says it holds {size} bytes, over {limit}")
            out = bytearray()
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
                while len(out) <= limit:
                    piece = reader.read(min(_READ_STEP, limit + 1 - len(out)))
                    if not piece:
                        break
                    out += piece
        except zstandard.ZstdError as e:
            raise CorruptSourceError(cited, f"zarr: a zstd chunk does not decompress ({e})") from None
    else:
        wbits = {"gzip": 31, "zlib": 15}[codec]
        d = zlib.decompressobj(wbits)
        try:
            out = bytearray(d.decompress(data, limit + 1))
            if len(out) <= limit and not d.eof:
                out += d.flush()
        except zlib.error as e:
            raise CorruptSourceError(cited, f"zarr: a {codec} chunk does not decompress ({e})") from None
        if len(out) <= limit and not d.eof:
            raise CorruptSourceError(cited, f"zarr: a {codec} chunk is truncated")
    if len(out) > limit:
        raise CorruptSourceError(cited, f"zarr: a {codec} chunk decompresses to more than the {limit} bytes it holds")
    return bytes(out)


def _pieces(value: Value, codec: str | None, cited: str) -> Iterator[bytes]:
    """The decoded bytes of a stored chunk, ``_READ_STEP`` at a time (the caller bounds how many it takes)."""
    raw: Any = io.BytesIO(value) if isinstance(value, bytes) else _Range(*value)
    with raw as f:
        if codec is None:
            while piece := f.read(_READ_STEP):
                yield piece
            return
        if codec == "zstd":
            from .._codec import zstd

            zstandard = zstd()
            try:
                with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as reader:
                    while piece := reader.read(_READ_STEP):
                        yield piece
            except zstandard.ZstdError as e:
                raise CorruptSourceError(cited, f"zarr: a zstd chunk does not decompress ({e})") from None
            return
        d = zlib.decompressobj({"gzip": 31, "zlib": 15}[codec])
        try:
            while True:
                data = d.unconsumed_tail or f.read(_READ_STEP)
                if not data:
                    break
                piece = d.decompress(data, _READ_STEP)
                if piece:
                    yield piece
                if d.eof:
                    break
        except zlib.error as e:
            raise CorruptSourceError(cited, f"zarr: a {codec} chunk does not decompress ({e})") from None
        if not d.eof:
            raise CorruptSourceError(cited, f"zarr: a {codec} chunk is truncated")


_RESAVE = ("restore it with orbax (or tensorstore) and save it again with zstd, gzip, zlib or no compression "
           "(Orbax's default is zstd), then convert that")


def _v3_chain(codecs: Any, cited: str) -> tuple[str, list[str], dict[str, Any] | None]:
    """(byte order, bytes-to-bytes codec names in encoding order, sharding configuration or None)."""
    if not isinstance(codecs, list) or not codecs or not all(isinstance(c, dict) for c in codecs):
        raise CorruptSourceError(cited, "zarr: \"codecs\" is not a list of objects")
    order, after, shard = "<", [], None
    seen_bytes = False
    for c in codecs:
        name, conf = c.get("name"), c.get("configuration") or {}
        if not isinstance(conf, dict):
            raise CorruptSourceError(cited, f"zarr: codec {name!r:.40} has a configuration that is not an object")
        if not seen_bytes:
            if name == "bytes":
                endian = conf.get("endian", "little")
                if endian not in ("little", "big"):
                    raise CorruptSourceError(cited, f"zarr: bytes codec endian {endian!r:.20}")
                order = "<" if endian == "little" else ">"
            elif name == "sharding_indexed":
                shard = conf
            else:
                raise UnsupportedSourceError(cited, f"zarr: codec {name!r:.40} (before the bytes codec) is not one "
                                                    f"ckptfmt reads; {_RESAVE}")
            seen_bytes = True
        elif name in ("zstd", "gzip", "crc32c"):
            after.append(name)
        else:
            raise UnsupportedSourceError(cited, f"zarr: codec {name!r:.40} is not one ckptfmt reads; {_RESAVE}")
    return order, after, shard


class ZarrArray(LazyArray):
    """One zarr array, its chunks decoded a row of chunks at a time (memory: one row of the chunk grid)."""

    def __init__(self, *, store: Store, directory: str, rel: str, dtype: DType, shape: tuple[int, ...],
                 chunk: tuple[int, ...], order: str, chunk_order: str, codecs: list[str], key: Any,
                 fill: np.ndarray, allow_missing: bool, shard: tuple[tuple[int, ...], str, list[str], bool] | None
                 ) -> None:
        self.store, self.directory, self.rel = store, directory, rel
        self.dtype, self.shape, self.chunk = dtype, shape, chunk
        self.order, self.chunk_order, self.codecs, self.key = order, chunk_order, codecs, key
        self.fill, self.allow_missing = fill, allow_missing
        #: (shard shape in chunks, index byte order, index codecs, index at end) for sharding_indexed arrays
        self.shard = shard
        self._shard_cache: tuple[Value, list[tuple[int, int]]] | None = None

    @property
    def _chunk_bytes(self) -> int:
        return math.prod(self.chunk) * self.dtype.itemsize

    def _file(self, grid: tuple[int, ...]) -> tuple[Value | None, str]:
        """(the stored chunk or shard of outer-grid index ``grid``, or None; the path errors name)."""
        key = f"{self.rel}/{self.key(grid)}"
        return self.store.get(key, self.directory), self.store.cited(key)

    def _decode(self, raw: bytes, codecs: list[str], cited: str) -> bytes:
        limit = self._chunk_bytes
        for name in reversed(codecs):
            if name == "crc32c":
                if len(raw) < 4 or crc32c(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
                    raise CorruptSourceError(cited, "zarr: a chunk fails its crc32c checksum")
                raw = raw[:-4]
            else:
                raw = inflate(raw, name, limit, cited)
        if len(raw) != limit:
            raise CorruptSourceError(cited, f"zarr: a chunk holds {len(raw)} bytes; its shape {list(self.chunk)} of "
                                            f"{self.dtype.name} needs {limit}")
        return raw

    def _shard_index(self, shard: Value, cited: str, n: int) -> list[tuple[int, int]]:
        assert self.shard is not None
        _, order, index_codecs, at_end = self.shard
        if self._shard_cache is not None and self._shard_cache[0] == shard:
            return self._shard_cache[1]
        size = value_size(shard)
        want = 16 * n + (4 if "crc32c" in index_codecs else 0)
        if want > size:
            raise CorruptSourceError(cited, f"zarr: a shard of {size} bytes cannot hold its index of {want} bytes")
        raw = read_value(shard, cited, size - want if at_end else 0, want)
        if "crc32c" in index_codecs:
            if crc32c(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
                raise CorruptSourceError(cited, "zarr: a shard index fails its crc32c checksum")
            raw = raw[:-4]
        pairs = list(struct.iter_unpack(f"{order}QQ", raw))
        data_start, data_end = (0, size - want) if at_end else (want, size)
        for off, nb in pairs:
            if (off, nb) != (_MISSING, _MISSING) and not (data_start <= off and off + nb <= data_end):
                raise CorruptSourceError(cited, f"zarr: a shard index entry ({off}, {nb}) lies outside the shard's "
                                                f"data [{data_start}, {data_end})")
        self._shard_cache = (shard, pairs)
        return pairs

    def _chunk_data(self, grid: tuple[int, ...]) -> np.ndarray | None:
        """Chunk ``grid`` (inner grid for sharded arrays) in C order, host dtype little-endian; None if absent."""
        if self.shard is None:
            stored, cited = self._file(grid)
            if stored is None:
                self._missing(grid)
                return None
            size = value_size(stored)
            if size > self._chunk_bytes * 2 + (1 << 20):  # no codec here expands its input by more
                raise CorruptSourceError(cited, f"zarr: a stored chunk of {size} bytes for a chunk of "
                                                f"{self._chunk_bytes}")
            raw = read_value(stored, cited)
        else:
            per, _, _, _ = self.shard
            outer = tuple(g // p for g, p in zip(grid, per, strict=True))
            local = tuple(g % p for g, p in zip(grid, per, strict=True))
            stored, cited = self._file(outer)
            if stored is None:
                self._missing(grid)
                return None
            pairs = self._shard_index(stored, cited, math.prod(per))
            flat = int(np.ravel_multi_index(local, per)) if per else 0
            off, nb = pairs[flat]
            if (off, nb) == (_MISSING, _MISSING):
                self._missing(grid)
                return None
            if nb > self._chunk_bytes * 2 + (1 << 20):
                raise CorruptSourceError(cited, f"zarr: a shard entry of {nb} bytes for a chunk of {self._chunk_bytes}")
            raw = read_value(stored, cited, off, nb)
        data = self._decode(raw, self.codecs, cited)
        host = _host_dtype(self.dtype, self.order)
        arr = np.frombuffer(data, dtype=host).reshape(self.chunk, order="F" if self.chunk_order == "F" else "C")
        if self.order == ">" and host.itemsize > 1:
            arr = arr.byteswap().view(host.newbyteorder("<"))
        return np.ascontiguousarray(arr)

    def _missing(self, grid: tuple[int, ...]) -> None:
        if not self.allow_missing:
            raise CorruptSourceError(self.directory, f"zarr: the chunk {list(grid)} of {self.rel or 'the array'} is "
                                                     "missing, and the checkpoint says it stores every chunk "
                                                     "(truncated or incomplete copy?)")
        return None

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The array in C order: each row of chunks (along the first axis) assembled, then cut to ``limit``."""
        if self.nbytes == 0:
            return
        host = _host_dtype(self.dtype, "<")
        if not self.shape:
            data = self._chunk_data(())
            out = self.fill.reshape(()).astype(host) if data is None else data.reshape(())
            yield np.ascontiguousarray(out).reshape(-1).view(np.uint8)
            return
        grid = [math.ceil(s / c) for s, c in zip(self.shape, self.chunk, strict=True)]
        rest = self.shape[1:]
        if self.shard is None and self.chunk[1:] == rest and (self.chunk_order == "C" or self.ndim == 1) \
                and "crc32c" not in self.codecs:
            for i0 in range(grid[0]):  # a chunk is a run of whole rows: decoded and written as it streams
                yield from self._streamed_row(i0, limit)
            return
        for i0 in range(grid[0]):
            lo = i0 * self.chunk[0]
            rows = min(self.chunk[0], self.shape[0] - lo)
            slab = np.empty((rows, *rest), dtype=host)
            for tail in np.ndindex(*grid[1:]):
                index = (i0, *tail)
                data = self._chunk_data(index)
                dst = (slice(0, rows), *(slice(i * c, min((i + 1) * c, s))
                                         for i, c, s in zip(tail, self.chunk[1:], rest, strict=True)))
                if data is None:
                    slab[dst] = self.fill
                else:
                    slab[dst] = data[tuple(slice(0, d.stop - d.start) for d in dst)]
            flat = slab.reshape(-1).view(np.uint8)
            for start in range(0, flat.size, limit):
                yield flat[start : start + limit]


    def _streamed_row(self, i0: int, limit: int) -> Iterator[np.ndarray]:
        """Row ``i0`` of chunks (one chunk spanning every other axis) in pieces of at most ``limit`` bytes."""
        host = _host_dtype(self.dtype, "<")
        rows = min(self.chunk[0], self.shape[0] - i0 * self.chunk[0])
        need = rows * math.prod(self.shape[1:]) * self.dtype.itemsize
        step = max(self.dtype.itemsize, (min(limit, _READ_STEP) // self.dtype.itemsize) * self.dtype.itemsize)
        stored, file = self._file((i0,) + (0,) * (self.ndim - 1))
        if stored is None:
            self._missing((i0,) + (0,) * (self.ndim - 1))
            block = np.full(step // self.dtype.itemsize, self.fill, dtype=host).view(np.uint8)
            for start in range(0, need, step):
                yield block[: min(step, need - start)]
            return
        swap = self.order == ">" and self.dtype.itemsize > 1
        pending = bytearray()
        got = 0
        for piece in _pieces(stored, self.codecs[0] if self.codecs else None, file):
            got += len(piece)
            if got > self._chunk_bytes:
                raise CorruptSourceError(file, f"zarr: a chunk decodes to more than the {self._chunk_bytes} bytes of "
                                               f"its shape {list(self.chunk)}")
            if need > 0:
                pending += piece[:need]
                need -= min(need, len(piece))
                while len(pending) >= step or (need == 0 and pending):
                    n = min(step, len(pending))
                    out = np.frombuffer(bytes(pending[:n]), dtype=np.uint8)
                    del pending[:n]
                    if swap:
                        out = out.view(host.newbyteorder(">")).byteswap().view(np.uint8)
                    yield out
        if got != self._chunk_bytes:
            raise CorruptSourceError(file, f"zarr: a chunk holds {got} bytes; its shape {list(self.chunk)} of "
                                           f"{self.dtype.name} needs {self._chunk_bytes}")


def _checked(array: ZarrArray) -> ZarrArray:
    """``array``, unless it declares far more bytes than its stored chunks could decode to (a hostile shape)."""
    from .._codec import MAX_RATIO

    stored = array.store.stored_bytes(array.rel)
    declared = max(array.nbytes, math.prod(array.chunk) * array.dtype.itemsize)  # a chunk may exceed the shape
    if declared > MAX_RATIO * stored + (64 << 20):
        raise UnsupportedSourceError(array.directory, f"zarr: the array declares {declared} bytes (array or chunk), "
                                                      f"over {MAX_RATIO} times the {stored} bytes stored for it")
    return array


def open_zarr(store: Store, rel: str, *, allow_missing: bool) -> ZarrArray:
    """The zarr array under key prefix ``rel`` of ``store`` (a directory of the checkpoint, or OCDBT keys)."""
    directory = store.cited(rel)
    for name, opener in ((".zarray", _open_v2), ("zarr.json", _open_v3)):
        value = store.get(f"{rel}/{name}", directory)
        if value is not None:
            cited = store.cited(f"{rel}/{name}")
            if value_size(value) > MAX_META:
                raise UnsupportedSourceError(cited, f"zarr {name} of {value_size(value)} bytes (cap {MAX_META})")
            from ._safetensors import parse_json

            meta = parse_json(read_value(value, cited), cited, f"zarr {name}")
            return _checked(opener(store, rel, directory, meta, allow_missing))
    raise CorruptSourceError(directory, f"the array {rel!r} has neither .zarray nor zarr.json (missing?)")


def _open_v2(store: Store, rel: str, directory: str, meta: Any, allow_missing: bool) -> ZarrArray:
    cited = store.cited(f"{rel}/.zarray")
    if not isinstance(meta, dict) or meta.get("zarr_format") != 2:
        raise CorruptSourceError(cited, "zarr: not a zarr_format 2 array")
    shape = _ints(meta.get("shape"), None, "shape", cited, positive=False)
    chunk = _ints(meta.get("chunks"), len(shape), "chunks", cited, positive=True)
    dtype, order = _v2_dtype(meta.get("dtype"), cited)
    if meta.get("filters"):
        ids = [f.get("id") if isinstance(f, dict) else f for f in meta["filters"]] \
            if isinstance(meta["filters"], list) else meta["filters"]
        raise UnsupportedSourceError(cited, f"zarr: filters {ids!r:.80} are not read by ckptfmt; {_RESAVE}")
    comp = meta.get("compressor")
    codecs: list[str] = []
    if comp is not None:
        cid = comp.get("id") if isinstance(comp, dict) else comp
        if cid not in ("zstd", "gzip", "zlib"):
            raise UnsupportedSourceError(cited, f"zarr: compressor {cid!r:.40} is not one ckptfmt reads "
                                                f"(zstd, gzip, zlib); {_RESAVE}")
        codecs = [cid]
    chunk_order = meta.get("order", "C")
    if chunk_order not in ("C", "F"):
        raise CorruptSourceError(cited, f"zarr: order {chunk_order!r:.20}")
    sep = meta.get("dimension_separator", ".")
    if sep not in (".", "/"):
        raise CorruptSourceError(cited, f"zarr: dimension_separator {sep!r:.20}")

    def key(grid: tuple[int, ...]) -> str:
        return sep.join(str(i) for i in grid) if grid else "0"

    return ZarrArray(store=store, directory=directory, rel=rel, dtype=dtype, shape=shape, chunk=chunk or (),
                     order=order, chunk_order=chunk_order, codecs=codecs, key=key,
                     fill=_fill(meta.get("fill_value"), dtype, cited), allow_missing=allow_missing, shard=None)


def _open_v3(store: Store, rel: str, directory: str, meta: Any, allow_missing: bool) -> ZarrArray:
    cited = store.cited(f"{rel}/zarr.json")
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise CorruptSourceError(cited, "zarr: not a zarr_format 3 array")
    shape = _ints(meta.get("shape"), None, "shape", cited, positive=False)
    grid_meta = meta.get("chunk_grid")
    if not (isinstance(grid_meta, dict) and grid_meta.get("name") == "regular"
            and isinstance(grid_meta.get("configuration"), dict)):
        raise UnsupportedSourceError(cited, f"zarr: chunk grid {grid_meta!r:.80} is not a regular grid")
    outer = _ints(grid_meta["configuration"].get("chunk_shape"), len(shape), "chunk_shape", cited, positive=True)
    name = meta.get("data_type")
    if not isinstance(name, str) or name not in _V3_DTYPES:
        raise UnsupportedSourceError(cited, f"zarr: data_type {name!r:.40} has no ckptfmt equivalent")
    dtype = DTYPES[_V3_DTYPES[name]]
    enc = meta.get("chunk_key_encoding") or {"name": "default"}
    if not isinstance(enc, dict) or enc.get("name") not in ("default", "v2"):
        raise UnsupportedSourceError(cited, f"zarr: chunk_key_encoding {enc!r:.80}")
    conf = enc.get("configuration") or {}
    sep = conf.get("separator", "/" if enc["name"] == "default" else ".") if isinstance(conf, dict) else None
    if sep not in (".", "/"):
        raise CorruptSourceError(cited, f"zarr: chunk key separator {sep!r:.20}")
    v2_keys = enc["name"] == "v2"

    def key(grid: tuple[int, ...]) -> str:
        if v2_keys:
            return sep.join(str(i) for i in grid) if grid else "0"
        return sep.join(["c", *(str(i) for i in grid)])

    order, after, shard_conf = _v3_chain(meta.get("codecs"), cited)
    chunk, codecs, shard = outer, after, None
    if shard_conf is not None:
        if after:
            raise UnsupportedSourceError(cited, f"zarr: codecs {after} after sharding_indexed; {_RESAVE}")
        inner = _ints(shard_conf.get("chunk_shape"), len(shape), "inner chunk_shape", cited, positive=True)
        if any(o % i for o, i in zip(outer, inner, strict=True)):
            raise CorruptSourceError(cited, f"zarr: inner chunks {list(inner)} do not tile shards {list(outer)}")
        order, codecs, nested = _v3_chain(shard_conf.get("codecs"), cited)
        if nested is not None:
            raise UnsupportedSourceError(cited, f"zarr: nested sharding; {_RESAVE}")
        index = shard_conf.get("index_codecs") or [{"name": "bytes", "configuration": {"endian": "little"}}]
        index_order, index_after, index_shard = _v3_chain(index, cited)
        if index_shard is not None or any(c != "crc32c" for c in index_after):
            raise UnsupportedSourceError(cited, f"zarr: shard index codecs {index!r:.80}")
        location = shard_conf.get("index_location", "end")
        if location not in ("start", "end"):
            raise CorruptSourceError(cited, f"zarr: index_location {location!r:.20}")
        chunk = inner
        shard = (tuple(o // i for o, i in zip(outer, inner, strict=True)), index_order, index_after, location == "end")
    return ZarrArray(store=store, directory=directory, rel=rel, dtype=dtype, shape=shape, chunk=chunk, order=order,
                     chunk_order="C", codecs=codecs, key=key, fill=_fill(meta.get("fill_value"), dtype, cited),
                     allow_missing=allow_missing, shard=shard)

