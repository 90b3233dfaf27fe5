"""A minimal LevelDB-table and tensor-bundle writer for tests: builds hostile TensorFlow indexes on purpose.

Written from the format description in ``ckptfmt/convert/_sstable.py`` (not from TensorFlow's code);
the committed checkpoints in ``data/tensorflow`` check that the reader agrees with real TensorFlow.
"""

from __future__ import annotations

import struct

from ckptfmt.convert._crc32c import crc32c, mask
from ckptfmt.convert._sstable import MAGIC


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint for an int, length-delimited for bytes."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value)


def shape(*dims: int) -> bytes:
    return b"".join(field(2, field(1, d)) for d in dims)


def entry(dtype: int, dims: tuple[int, ...], *, shard: int = 0, offset: int = 0, size: int = 0,
          crc: int | None = None, slices: list[list[tuple[int, int]]] | None = None) -> bytes:
    """A BundleEntryProto."""
    out = field(1, dtype) + field(2, shape(*dims))
    if shard:
        out += field(3, shard)
    if offset:
        out += field(4, offset)
    if size:
        out += field(5, size)
    if crc is not None:
        out += fixed32(6, crc)
    for sl in slices or []:
        out += field(7, b"".join(field(1, field(1, s) + (field(2, n) if n >= 0 else b"")) for s, n in sl))
    return out


def header(num_shards: int = 1, endianness: int = 0) -> bytes:
    return field(1, num_shards) + (field(2, endianness) if endianness else b"") + field(3, field(1, 1))


def _common(a: bytes, b: bytes) -> int:
    """Length of the common prefix, by bisection on slice comparisons (long keys stay fast)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _block(items: list[tuple[bytes, bytes]], restart_every: int) -> bytes:
    out = bytearray()
    restarts = []
    prev = b""
    for i, (key, value) in enumerate(items):
        if i % restart_every == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = _common(prev, key)
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        prev = key
    if not restarts:
        restarts = [0]
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def table(items: list[tuple[bytes, bytes]], *, per_block: int = 3, restart_every: int = 2,
          compression: int = 0) -> bytes:
    """An SSTable of ``items`` (sorted by the caller): data blocks, an empty metaindex, the index, the footer."""
    out = bytearray()
    index = []

    def put(block: bytes) -> tuple[int, int]:
        where = (len(out), len(block))
        kind = bytes([compression])
        out.extend(block + kind + struct.pack("<I", mask(crc32c(block + kind))))
        return where

    for i in range(0, len(items), per_block):
        chunk = items[i : i + per_block]
        off, size = put(_block(chunk, restart_every))
        index.append((chunk[-1][0], varint(off) + varint(size)))
    meta = put(_block([], 1))
    idx = put(_block(index, 1))
    handles = varint(meta[0]) + varint(meta[1]) + varint(idx[0]) + varint(idx[1])
    out += handles + b"\0" * (40 - len(handles)) + struct.pack("<Q", MAGIC)
    return bytes(out)
