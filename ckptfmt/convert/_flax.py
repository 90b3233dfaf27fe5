"""Flax ``flax.serialization.to_bytes`` / ``msgpack_serialize`` files, read without JAX, Flax or msgpack.

The file is one msgpack map (the state dict). Flax encodes arrays as msgpack extension type 1 whose
payload is itself msgpack: ``[shape, dtype name, bytes]`` (C order, the writer's byte order: little-endian
on every platform Flax runs on); numpy scalars as type 3 (the same payload, 0-d); Python complex
numbers as type 2 (``[real, imag]``). Arrays over Flax's chunk size are written as
``{"__msgpack_chunked_array__": True, "shape": {"0": n, ...}, "chunks": {"0": flat part, ...}}``.

The parser here walks the msgpack structure over the file, checking every length against the bytes
left, and turns each array into a :class:`FileArray` over its bytes (a chunked array into one lazy
array over its parts), so nothing is read until written. Dicts keep their keys (str, or int), lists
stay lists; numpy scalars become numpy scalars, complex numbers ``numpy.complex128`` scalars.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._dtypes import DTYPES, DType, numpy_dtype
from .._tree import walk
from ._errors import CorruptSourceError, UnsupportedSourceError
from ._lazy import FileArray, LazyArray

__all__ = ["CHUNKED_KEY", "ChunkedArray", "looks_like_flax", "read_flax"]

CHUNKED_KEY = "__msgpack_chunked_array__"
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_MAX_DEPTH = 64
_MAX_SMALL = 1 << 20  # plain str/bin values and small payloads read into memory


class ChunkedArray(LazyArray):
    """An array stored as consecutive flat parts (Flax's chunked arrays)."""

    def __init__(self, dtype: DType, shape: tuple[int, ...], parts: list[LazyArray]) -> None:
        self.dtype = dtype
        self.shape = shape
        self.parts = parts

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Each part's bytes in turn."""
        for part in self.parts:
            yield from part.chunks(limit)


class _Reader:
    def __init__(self, path: str, f: Any, size: int) -> None:
        self.path, self.f, self.size, self.pos = path, f, size, 0

    def fail(self, what: str) -> CorruptSourceError:
        return CorruptSourceError(self.path, f"flax msgpack: {what} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{n} bytes wanted, {self.size - self.pos} left (truncated or hostile)")
        self.f.seek(self.pos)
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail("the file ended early")
        self.pos += n
        return bytes(data)

    def skip(self, n: int) -> int:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{n} bytes wanted, {self.size - self.pos} left (truncated or hostile)")
        start = self.pos
        self.pos += n
        return start

    def num(self, fmt: str) -> Any:
        return struct.unpack(">" + fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, n: int, what: str) -> int:
        if n > self.size - self.pos:  # every element takes at least one byte
            raise self.fail(f"{what} of {n} elements cannot fit in the {self.size - self.pos} bytes left")
        return n

    def header(self) -> tuple[str, int]:
        """(kind, value or length): kind in int, float, nil, bool, str, bin, array, map, ext:<type>."""
        b = self.take(1)[0]
        if b <= 0x7F:
            return "int", b
        if b >= 0xE0:
            return "int", b - 0x100
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        simple = {0xC0: ("nil", 0), 0xC2: ("bool", 0), 0xC3: ("bool", 1)}
        if b in simple:
            return simple[b]
        sized = {0xC4: ("bin", "B"), 0xC5: ("bin", "H"), 0xC6: ("bin", "I"), 0xD9: ("str", "B"), 0xDA: ("str", "H"),
                 0xDB: ("str", "I"), 0xDC: ("array", "H"), 0xDD: ("array", "I"), 0xDE: ("map", "H"),
                 0xDF: ("map", "I")}
        if b in sized:
            kind, fmt = sized[b]
            return kind, self.num(fmt)
        ints = {0xCC: "B", 0xCD: "H", 0xCE: "I", 0xCF: "Q", 0xD0: "b", 0xD1: "h", 0xD2: "i", 0xD3: "q"}
        if b in ints:
            return "int", self.num(ints[b])
        if b in (0xCA, 0xCB):
            return "float", 0 if b == 0xCA else 1
        fixext = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if b in fixext or b in (0xC7, 0xC8, 0xC9):
            n = fixext[b] if b in fixext else self.num({0xC7: "B", 0xC8: "H", 0xC9: "I"}[b])
            return f"ext:{self.num('b')}", n
        raise self.fail(f"byte 0x{b:02x} is not a msgpack type")

    def value(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self.fail(f"nesting deeper than {_MAX_DEPTH}")
        kind, n = self.header()
        if kind in ("int", "bool"):
            return bool(n) if kind == "bool" else n
        if kind == "nil":
            return None
        if kind == "float":
            return float(self.num("d" if n else "f"))
        if kind in ("str", "bin"):
            if n > _MAX_SMALL:
                raise UnsupportedSourceError(self.path, f"flax msgpack: a {kind} value of {n} bytes (cap {_MAX_SMALL})")
            raw = self.take(n)
            if kind == "bin":
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("a str that is not UTF-8") from None
        if kind == "array":
            return [self.value(depth + 1) for _ in range(self.count(n, "an array"))]
        if kind == "map":
            out: dict[Any, Any] = {}
            for _ in range(self.count(n, "a map")):
                k = self.value(depth + 1)
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise self.fail(f"a map key of type {type(k).__name__}")
                if k in out:
                    raise self.fail(f"map key {k!r} twice")
                out[k] = self.value(depth + 1)
            return _chunked(self, out) if out.get(CHUNKED_KEY) is True else out
        return self.ext(int(kind[4:]), n)

    def ext(self, code: int, n: int) -> Any:
        end = self.pos + n
        if n > self.size - self.pos:
            raise self.fail(f"an extension of {n} bytes runs past the end")
        if code == _EXT_COMPLEX:
            parts = self.value(_MAX_DEPTH - 1)
            if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, (int, float)) for p in parts)):
                raise self.fail("a complex number that is not [real, imag]")
            value: Any = np.complex128(complex(parts[0], parts[1]))
        elif code in (_EXT_NDARRAY, _EXT_SCALAR):
            value = self.array(scalar=code == _EXT_SCALAR)
        else:
            raise UnsupportedSourceError(self.path, f"flax msgpack: extension type {code} at byte {self.pos - 1} "
                                                    "is not one Flax writes")
        if self.pos != end:
            raise self.fail("an extension whose content does not fill it")
        return value

    def array(self, *, scalar: bool) -> Any:
        kind, n = self.header()
        if kind != "array" or n != 3:
            raise self.fail("an array extension that is not [shape, dtype, bytes]")
        shape = self.value(_MAX_DEPTH - 2)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise self.fail(f"a bad array shape {shape!r:.80}")
        name = self.value(_MAX_DEPTH - 2)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise UnsupportedSourceError(self.path, f"flax msgpack: array dtype {name!r:.40}, which ckptfmt cannot "
                                                    "store")
        kind, nbytes = self.header()
        if kind != "bin":
            raise self.fail("array bytes that are not a bin")
        want = math.prod(shape) * dtype.itemsize
        if nbytes != want:
            raise self.fail(f"{nbytes} array bytes for a {name} array of shape {shape} ({want} expected)")
        start = self.skip(nbytes)
        if scalar and not shape:
            try:
                return np.frombuffer(self.take_at(start, nbytes), dtype=numpy_dtype(dtype))[0]
            except (TypeError, ValueError):  # bfloat16 / float8 without ml_dtypes: a 0-d array
                pass
        return FileArray(self.path, start, dtype, tuple(shape), file_size=self.size)

    def take_at(self, start: int, n: int) -> bytes:
        self.f.seek(start)
        return bytes(self.f.read(n))


def _chunked(r: _Reader, d: dict[Any, Any]) -> ChunkedArray:
    shape_d, chunks_d = d.get("shape"), d.get("chunks")
    if not (isinstance(shape_d, dict) and isinstance(chunks_d, dict)):
        raise r.fail("a chunked array without shape and chunks")
    raw_shape = [shape_d.get(str(i)) for i in range(len(shape_d))]
    raw_parts = [chunks_d.get(str(i)) for i in range(len(chunks_d))]
    if not all(type(s) is int and s >= 0 for s in raw_shape) or not all(isinstance(p, FileArray) for p in raw_parts):
        raise r.fail("a chunked array with a bad shape or parts")
    shape: tuple[int, ...] = tuple(int(s) for s in raw_shape if s is not None)
    parts: list[FileArray] = [p for p in raw_parts if isinstance(p, FileArray)]
    if len({p.dtype.name for p in parts}) > 1 or any(p.ndim != 1 for p in parts):
        raise r.fail("a chunked array whose parts differ in dtype or are not flat")
    dtype = parts[0].dtype if parts else DTYPES["float32"]
    held = sum(p.shape[0] for p in parts)
    if held != math.prod(shape):
        raise r.fail(f"a chunked array of shape {shape} whose parts hold {held} elements")
    return ChunkedArray(dtype, shape, list[LazyArray](parts))


def looks_like_flax(path: str, head: bytes, size: int) -> bool:
    """True if the file is one msgpack map holding at least one Flax array, parsed to its last byte."""
    if not head or not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return False
    try:
        tree = read_flax(path)
    except (CorruptSourceError, UnsupportedSourceError, OSError, RecursionError):
        return False
    return any(isinstance(leaf, (FileArray, ChunkedArray, np.generic)) for _, leaf in walk(tree))


def read_flax(path: str) -> dict[Any, Any]:
    """The state dict of a Flax msgpack file, its arrays lazy."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 16) as f:
        r = _Reader(path, f, size)
        tree = r.value(0)
        if r.pos != size:
            raise CorruptSourceError(path, f"flax msgpack: {size - r.pos} bytes after the state dict")
    if not isinstance(tree, dict):
        raise CorruptSourceError(path, "flax msgpack: the file does not hold a map")
    return tree
