"""LevelDB-format tables (SSTables), as TensorFlow writes checkpoint indexes (``tensorflow/core/lib/io/table``).

Layout: data blocks, a metaindex block, an index block, then a 48-byte footer: the metaindex and index
block handles (two varints each, padded to 40 bytes) and the magic number ``0xdb4775248b80fb57``
(little-endian). Every block is followed by a 5-byte trailer: its compression type (0: none) and the
masked CRC-32C of the block and that type byte. A block is a run of entries ``shared, non_shared,
value_length`` (varints), the key's new suffix and the value, the key being the previous key's first
``shared`` bytes plus the suffix (prefix compression); the block ends with its restart points (uint32
offsets of entries whose ``shared`` is 0) and their count. The index block maps a separator key to
each data block's handle.

Reading is sequential and strictly checked: every handle lies inside the file, before the footer and
after the previous block; keys strictly increase across the whole table; the bytes of keys rebuilt
from shared prefixes are capped relative to the file's size (prefix compression can otherwise make a
small file expand into huge keys). Snappy-compressed blocks (type 1) are refused: TensorFlow never
compresses checkpoint indexes.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

from ._crc32c import crc32c, unmask
from ._protowire import WireError, varint

__all__ = ["FOOTER_SIZE", "MAGIC", "TableError", "UnsupportedTableError", "has_magic", "read_table"]

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
_TRAILER = 5
#: rebuilt keys may total at most this many times the file's size (plus a floor): enough for any prefix
#: compression TensorFlow achieves, far below what a hostile run of shared prefixes could reach
_KEY_EXPANSION = 16
_KEY_FLOOR = 1 << 20


class TableError(ValueError):
    """The bytes break the table format; the caller names the file."""


class UnsupportedTableError(TableError):
    """A valid table using a feature not read here (a compressed block)."""


def has_magic(tail: bytes) -> bool:
    """True if ``tail`` (at least the last 8 bytes of a file) ends with the table magic number."""
    return len(tail) >= 8 and struct.unpack_from("<Q", tail, len(tail) - 8)[0] == MAGIC


def _handle(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    try:
        offset, pos = varint(buf, pos, end)
        size, pos = varint(buf, pos, end)
    except WireError as e:
        raise TableError(f"{what}: {e}") from None
    return offset, size, pos


class _Reader:
    def __init__(self, data: bytes, verify: bool) -> None:
        self.data = data
        self.verify = verify
        self.limit = len(data) - FOOTER_SIZE
        self.key_bytes = 0
        self.key_cap = _KEY_FLOOR + _KEY_EXPANSION * len(data)

    def block(self, offset: int, size: int, what: str) -> tuple[int, int]:
        """The ``(start, end)`` of a block's contents, its trailer checked."""
        if offset > self.limit or size > self.limit - offset or self.limit - offset - size < _TRAILER:
            raise TableError(f"{what} at [{offset}, {offset + size}) plus its trailer runs past the table's "
                             f"{self.limit} bytes of blocks (truncated?)")
        end = offset + size
        kind = self.data[end]
        if self.verify:
            (stored,) = struct.unpack_from("<I", self.data, end + 1)
            got = crc32c(memoryview(self.data)[offset : end + 1])
            if got != unmask(stored):
                raise TableError(f"{what} at [{offset}, {end}): CRC-32C mismatch (stored {unmask(stored):#010x}, "
                                 f"computed {got:#010x})")
        if kind == 1:
            raise UnsupportedTableError(f"{what} is snappy-compressed; TensorFlow never compresses checkpoint "
                                        "indexes and this reader does not decompress")
        if kind != 0:
            raise TableError(f"{what} has unknown compression type {kind}")
        return offset, end

    def entries(self, start: int, end: int, what: str) -> Iterator[tuple[bytes, bytes]]:
        """A block's (key, value) pairs in order."""
        data = self.data
        if end - start < 4:
            raise TableError(f"{what} is {end - start} bytes, too short for its restart count")
        (n_restarts,) = struct.unpack_from("<I", data, end - 4)
        if n_restarts > (end - start - 4) // 4:
            raise TableError(f"{what} claims {n_restarts} restart points, more than its {end - start} bytes hold")
        limit = end - 4 - 4 * n_restarts
        restarts = struct.unpack_from(f"<{n_restarts}I", data, limit)
        if limit > start and (not restarts or restarts[0] != 0):
            raise TableError(f"{what}: the first entry is not a restart point")
        if any(b <= a for a, b in itertools.pairwise(restarts)) or (restarts and restarts[-1] >= max(limit - start, 1)):
            raise TableError(f"{what}: restart points {list(restarts[:8])}... are not increasing offsets of entries")
        restart_set = set(restarts)
        key = b""
        pos = start
        try:
            while pos < limit:
                at = pos - start
                shared, pos = varint(data, pos, limit)
                unshared, pos = varint(data, pos, limit)
                vlen, pos = varint(data, pos, limit)
                if at in restart_set and shared:
                    raise TableError(f"{what}: the entry at restart point {at} shares {shared} bytes")
                if shared > len(key):
                    raise TableError(f"{what}: the entry at byte {at} shares {shared} bytes of a {len(key)}-byte key")
                if unshared > limit - pos or vlen > limit - pos - unshared:
                    raise TableError(f"{what}: the entry at byte {at} runs past the block's entries")
                self.key_bytes += shared + unshared
                if self.key_bytes > self.key_cap:
                    raise TableError(f"keys rebuilt from shared prefixes exceed {self.key_cap} bytes, "
                                     f"{_KEY_EXPANSION}x the file's size (a hostile prefix chain?)")
                key = key[:shared] + data[pos : pos + unshared]
                pos += unshared
                yield key, data[pos : pos + vlen]
                pos += vlen
        except WireError as e:
            raise TableError(f"{what}: {e}") from None


def read_table(data: bytes, *, verify: bool = True) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of the table held in ``data``, in key order; :class:`TableError` if it is broken.

    ``verify``: check each block's CRC-32C.
    """
    if len(data) < FOOTER_SIZE:
        raise TableError(f"{len(data)} bytes, fewer than the {FOOTER_SIZE}-byte footer (truncated?)")
    if not has_magic(data):
        raise TableError("no table magic number at the end (truncated, or not a TensorFlow index)")
    r = _Reader(data, verify)
    foot = r.limit
    _, _, pos = _handle(data, foot, foot + 40, "the metaindex handle")
    index_off, index_size, _ = _handle(data, pos, foot + 40, "the index handle")
    istart, iend = r.block(index_off, index_size, "the index block")
    prev: bytes | None = None
    next_block = 0
    for sep, value in r.entries(istart, iend, "the index block"):
        off, size, used = _handle(value, 0, len(value), f"the index entry {sep[:40]!r}")
        if used != len(value):
            raise TableError(f"the index entry {sep[:40]!r} has {len(value) - used} bytes after its block handle")
        if off < next_block:
            raise TableError(f"the data block at {off} overlaps the one before it (which ends at {next_block})")
        what = f"the data block at [{off}, {off + size})"
        start, end = r.block(off, size, what)
        next_block = end + _TRAILER
        for key, val in r.entries(start, end, what):
            if prev is not None and key <= prev:
                raise TableError(f"{what}: key {key[:60]!r} does not sort after {prev[:60]!r}")
            if key > sep:
                raise TableError(f"{what}: key {key[:60]!r} sorts after its index separator {sep[:60]!r}")
            prev = key
            yield key, val
