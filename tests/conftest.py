"""Shared helpers: paths, byte surgery, and a file builder that packs the 1.0 format by hand.

The builder follows the format description (header, aligned blobs, msgpack metadata, footer), not
the library's own writer, so a crafted file can break exactly one rule while every checksum is right.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash

# This folder is on sys.path (pytest's rootdir-relative imports), so where torch is not installed
# `import torch` would find tests/torch/ (the tests of ckptfmt.torch) as an empty namespace package
# and torch-less environments (tox -e minimal, numpy1, py3xx) would fail instead of skipping.
_torch_spec = importlib.util.find_spec("torch")
if _torch_spec is not None and _torch_spec.origin in (None, "namespace"):
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError: tests skip

MAGIC = b"\x89CKPT\r\n\x1a"
FOOTER_MAGIC = b"CKPTFOOT"
BOM = 0x0A0B0C0D
HEADER_SIZE = 64
FOOTER_SIZE = 64

EXT_TUPLE = 2
EXT_SCALAR = 3
EXT_INT = 4
EXT_MAP = 5

try:
    import ml_dtypes
except ImportError:  # the "minimal" tox environment
    ml_dtypes = None

requires_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")


def xxh(data: bytes) -> int:
    """XXH3-64, seed 0: the format's only checksum."""
    return xxhash.xxh3_64_intdigest(data)


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def tmp_ckpt(tmp_path: Path) -> Path:
    """A checkpoint path in a fresh, otherwise empty directory."""
    return tmp_path / "model.ckpt"


# ---------------------------------------------------------------- byte surgery


def flip_byte(path: os.PathLike[str] | str, offset: int, mask: int = 0xFF) -> None:
    """XOR the byte at ``offset`` with ``mask`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"offset {offset} is past the end of the file"
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def truncate(path: os.PathLike[str] | str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def read_footer(data: bytes) -> tuple[int, int, int]:
    """(metadata offset, metadata length, metadata checksum) of a whole file's bytes."""
    return struct.unpack_from("<QQQ", data, len(data) - FOOTER_SIZE)


def temp_leftovers(directory: os.PathLike[str] | str) -> list[str]:
    """Names in ``directory`` that look like ckptfmt temporaries (anything with 'ckptfmt-tmp')."""
    return sorted(n for n in os.listdir(directory) if "ckptfmt-tmp" in n)


# ---------------------------------------------------------------- the format, packed by hand


def header_bytes(*, major: int = 1, minor: int = 0, bom: int = BOM, required: int = 0, optional: int = 0,
                 alignment: int = 4096, reserved: bytes = bytes(28), magic: bytes = MAGIC,
                 checksum: int | None = None) -> bytes:
    """The 64-byte header; the checksum over bytes 0..55 is computed unless given."""
    assert len(reserved) == 28
    body = struct.pack("<8sHHIIII28s", magic, major, minor, bom, required, optional, alignment, reserved)
    return body + struct.pack("<Q", xxh(body) if checksum is None else checksum)


def footer_bytes(offset: int, length: int, meta_checksum: int, *, reserved: bytes = bytes(24),
                 magic: bytes = FOOTER_MAGIC) -> bytes:
    """The 64-byte footer with a correct checksum over bytes 0..55."""
    assert len(reserved) == 24
    body = struct.pack("<QQQ24s8s", offset, length, meta_checksum, reserved, magic)
    return body + struct.pack("<Q", xxh(body))


class MapPairs(list):  # type: ignore[type-arg]
    """A dict given as (key, value) pairs, so that it may repeat a key (in the tree or as a msgpack map)."""


@dataclass(frozen=True)
class Raw:
    """Bytes emitted verbatim by :func:`pack` (e.g. a str with invalid UTF-8, or a msgpack map in the tree)."""

    data: bytes


@dataclass(frozen=True)
class PlainInt:
    """A plain integer value of the tree (ext 4), as opposed to a bare int (a tensor reference)."""

    value: int


@dataclass(frozen=True)
class ScalarRef:
    """A numpy array-scalar reference (ext 3) to a tensor row."""

    row: int


def _head(n: int, fix: int, b16: int, b32: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    if n < 1 << 16:
        return bytes([b16]) + struct.pack(">H", n)
    return bytes([b32]) + struct.pack(">I", n)


def pack(obj: Any) -> bytes:
    """Plain msgpack (bin for bytes), where :class:`MapPairs` may repeat keys and :class:`Raw` is verbatim.

    Used for the top-level metadata map and its sections; the tree goes through :func:`encode_tree` first.
    """
    if isinstance(obj, Raw):
        return obj.data
    if isinstance(obj, (dict, MapPairs)):
        pairs = list(obj.items()) if isinstance(obj, dict) else list(obj)
        return _head(len(pairs), 0x80, 0xDE, 0xDF) + b"".join(pack(k) + pack(v) for k, v in pairs)
    if isinstance(obj, list):
        return _head(len(obj), 0x90, 0xDC, 0xDD) + b"".join(pack(v) for v in obj)
    return msgpack.packb(obj, use_bin_type=True)


def ext(code: int, payload: Any) -> msgpack.ExtType:
    """An ext value whose payload is ``payload`` packed with :func:`pack` (bytes are used as they are)."""
    return msgpack.ExtType(code, payload if isinstance(payload, bytes) else pack(payload))


def encode_tree(obj: Any) -> Any:
    """A Python-like tree in the 1.0 tree encoding (§4.2).

    dict / MapPairs -> ext 5 ``[keys, values]``; tuple -> ext 2; list -> array; bare int -> tensor
    row; :class:`PlainInt` -> ext 4; :class:`ScalarRef` -> ext 3; other values (and ExtType, Raw) as they are.
    """
    if isinstance(obj, (msgpack.ExtType, Raw)):  # already encoded (ExtType is a namedtuple: test it first)
        return obj
    if isinstance(obj, (dict, MapPairs)):
        pairs = list(obj.items()) if isinstance(obj, dict) else list(obj)
        return ext(EXT_MAP, [[k for k, _ in pairs], [encode_tree(v) for _, v in pairs]])
    if isinstance(obj, tuple):
        return ext(EXT_TUPLE, [encode_tree(v) for v in obj])
    if isinstance(obj, list):
        return [encode_tree(v) for v in obj]
    if isinstance(obj, PlainInt):
        return ext(EXT_INT, msgpack.packb(obj.value))
    if isinstance(obj, ScalarRef):
        return ext(EXT_SCALAR, obj.row.to_bytes(4, "little"))
    return obj


def decode_tree(value: Any) -> Any:
    """Inverse of :func:`encode_tree` for a value decoded by ``msgpack.unpackb(..., raw=False)`` (spec-based)."""
    if isinstance(value, msgpack.ExtType):
        if value.code == EXT_MAP:
            keys, values = msgpack.unpackb(value.data, raw=False, strict_map_key=False)
            return {k: decode_tree(v) for k, v in zip(keys, values, strict=True)}
        if value.code == EXT_TUPLE:
            return tuple(decode_tree(v) for v in msgpack.unpackb(value.data, raw=False, strict_map_key=False))
        if value.code == EXT_INT:
            return PlainInt(msgpack.unpackb(value.data))
        if value.code == EXT_SCALAR:
            assert len(value.data) == 4
            return ScalarRef(int.from_bytes(value.data, "little"))
        raise AssertionError(f"unexpected ext {value.code}")
    if isinstance(value, list):
        return [decode_tree(v) for v in value]
    assert not isinstance(value, dict), "a msgpack map in the tree"
    return value


def read_metadata(data: bytes) -> dict[str, Any]:
    """The metadata map of a whole file's bytes, with the tree decoded by :func:`decode_tree`."""
    off, length, _ = read_footer(data)
    meta = msgpack.unpackb(data[off : off + length], raw=False, strict_map_key=False)
    meta["tree"] = decode_tree(meta["tree"])
    return meta


def nested(depth: int, kind: str, leaf: Any = "x") -> Any:
    """``depth`` containers of ``kind`` ("dict", "list" or "tuple") around ``leaf``."""
    node = leaf
    for _ in range(depth):
        node = {"k": node} if kind == "dict" else [node] if kind == "list" else (node,)
    return node


@dataclass
class Blob:
    """One tensor to lay out: canonical dtype name, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def blob(arr: np.ndarray, dtype: str | None = None) -> Blob:
    """A :class:`Blob` from a numpy array (its dtype name unless ``dtype`` says otherwise)."""
    a = np.array(arr, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    return Blob(dtype or a.dtype.name, tuple(a.shape), a.astype(a.dtype.newbyteorder("<")).tobytes())


@dataclass
class Crafted:
    """Every part of a 1.0 file; :meth:`build` packs them in order with correct checksums.

    Defaults make a valid file; a test changes one field (or one entry of :attr:`meta`) to break one rule.
    """

    blobs: list[Blob] = field(default_factory=list)
    tree: Any = field(default_factory=dict)  # Python-like, see encode_tree()
    alignment: int = 64
    header: dict[str, Any] = field(default_factory=dict)  # extra header_bytes() arguments
    user: Any = field(default_factory=dict)
    checksums: bool = True
    #: filled by :meth:`layout`; tests may edit them before :meth:`build`
    table: dict[str, Any] | None = None
    meta: dict[str, Any] | MapPairs | None = None
    offsets: list[int] | None = None
    body: bytes | None = None

    def layout(self) -> Crafted:
        """Place the blobs and build the metadata map (call again after changing blobs or tree)."""
        a = self.alignment
        pos = align_up(HEADER_SIZE, a)
        start = pos
        body = bytearray()
        offsets = []
        for b in self.blobs:
            if not b.data:
                offsets.append(0)
                continue
            pos = align_up(pos, a)
            body += bytes(pos - start - len(body))
            offsets.append(pos)
            body += b.data
            pos += len(b.data)
        body += bytes(align_up(pos, a) - pos)
        self.offsets, self.body = offsets, bytes(body)
        names: list[str] = []
        for b in self.blobs:
            if b.dtype not in names:
                names.append(b.dtype)
        u8 = lambda xs: np.asarray(xs, dtype="u1").tobytes()  # noqa: E731
        u64 = lambda xs: np.asarray(xs, dtype="<u8").tobytes()  # noqa: E731
        self.table = {
            "count": len(self.blobs),
            "dtypes": names,
            "dtype": u8([names.index(b.dtype) for b in self.blobs]),
            "ndim": u8([len(b.shape) for b in self.blobs]),
            "shape": u64([d for b in self.blobs for d in b.shape]),
            "offset": u64(offsets),
            "nbytes": u64([len(b.data) for b in self.blobs]),
        }
        if self.checksums:
            self.table["checksum"] = u64([xxh(b.data) for b in self.blobs])
        self.meta = {
            "tree": encode_tree(self.tree),
            "tensors": self.table,
            "producer": {"name": "tests", "version": "0"},
            "created": "2024-01-01T00:00:00Z",
            "user": self.user,
        }
        return self

    def metadata_bytes(self) -> bytes:
        if self.meta is None:
            self.layout()
        return pack(self.meta)

    def build(self, *, meta_bytes: bytes | None = None, footer: dict[str, Any] | None = None) -> bytes:
        """The whole file. ``meta_bytes`` replaces the packed metadata; ``footer`` overrides footer fields."""
        if self.meta is None:
            self.layout()
        assert self.body is not None
        meta = self.metadata_bytes() if meta_bytes is None else meta_bytes
        head = header_bytes(**{"alignment": self.alignment, **self.header})
        pad = bytes(align_up(HEADER_SIZE, self.alignment) - HEADER_SIZE)
        meta_offset = HEADER_SIZE + len(pad) + len(self.body)
        f = {"offset": meta_offset, "length": len(meta), "meta_checksum": xxh(meta)}
        f.update(footer or {})
        foot = footer_bytes(f.pop("offset"), f.pop("length"), f.pop("meta_checksum"), **f)
        return head + pad + self.body + meta + foot

    def write(self, path: os.PathLike[str] | str, **kw: Any) -> Path:
        Path(path).write_bytes(self.build(**kw))
        return Path(path)


def two_tensor_file() -> Crafted:
    """A small valid crafted file: {"a": float32[3], "b": [int64[2, 2], 7]}, alignment 64."""
    return Crafted(
        blobs=[blob(np.arange(3, dtype=np.float32)), blob(np.arange(4, dtype=np.int64).reshape(2, 2))],
        tree={"a": 0, "b": [1, PlainInt(7)]},
    ).layout()


@pytest.fixture
def crafted() -> Callable[[], Crafted]:
    """Factory for the baseline crafted file (a fresh copy per call)."""
    return two_tensor_file
