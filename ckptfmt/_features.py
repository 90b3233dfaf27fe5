"""The tensor-table additions of format 1.1 (spec §13-§14), parsed and checked before they are trusted.

Each addition belongs to a required feature bit: its keys appear in the ``tensors`` map exactly when
the header sets the bit, so a 1.0 reader refuses the file (§9.2) instead of misreading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._codec import KNOWN_CODECS, MAX_CHUNK_BYTES, MAX_RATIO, PLANES_ZSTD, RAW, chunk_bytes_ok
from ._dtypes import DTYPES
from ._versions import FEATURE_COMPRESSED, FEATURE_PACKED
from .errors import InvalidMetadataError

if TYPE_CHECKING:
    from ._tables import TensorTable

_U8 = np.dtype("u1")
_U64 = np.dtype("<u8")
COMPRESSED_KEYS = ("codecs", "codec", "stored", "pieces", "piece_bytes", "chunk_bytes")
PACKED_KEYS = ("pack_alignment", "pack_below")


def _col(table: dict[str, Any], name: str, dtype: np.dtype, count: int, path: str | None) -> np.ndarray:
    raw = table.get(name)
    if not isinstance(raw, (bytes, memoryview)) or len(raw) != count * dtype.itemsize:
        raise InvalidMetadataError(path, f"tensor table column {name!r} is missing, not binary, or not "
                                         f"{count * dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype=dtype)


def _int(table: dict[str, Any], name: str, path: str | None) -> int:
    value = table.get(name)
    if type(value) is not int or value <= 0:
        raise InvalidMetadataError(path, f"tensor table {name!r} is missing or not a positive int")
    return value


def parse_features(table: dict[str, Any], tt: TensorTable, *, features: int, alignment: int,
                   path: str | None) -> None:
    """Fill ``tt``'s 1.1 columns from the ``tensors`` map, checking each rule of §13.2 and §14."""
    for bit, keys in ((FEATURE_COMPRESSED, COMPRESSED_KEYS), (FEATURE_PACKED, PACKED_KEYS)):
        present = [k for k in keys if k in table]
        if not features & bit and present:
            raise InvalidMetadataError(path, f"tensor table has {present[0]!r} but the header does not set feature "
                                             f"bit 0x{bit:x}")
    if features & FEATURE_PACKED:
        tt.pack_alignment = _int(table, "pack_alignment", path)
        tt.pack_below = _int(table, "pack_below", path)
        if tt.pack_alignment & (tt.pack_alignment - 1) or not 16 <= tt.pack_alignment <= alignment:
            raise InvalidMetadataError(path, f"pack_alignment {tt.pack_alignment} is not a power of two between 16 "
                                             f"(the largest itemsize) and the alignment {alignment}")
    if features & FEATURE_COMPRESSED:
        _parse_compressed(table, tt, path)


def _parse_compressed(table: dict[str, Any], tt: TensorTable, path: str | None) -> None:
    n = len(tt)
    names = table.get("codecs")
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names) or len(names) > 255 \
            or len(set(names)) != len(names):
        raise InvalidMetadataError(path, "tensor table 'codecs' is not a list of at most 255 distinct str")
    code = _col(table, "codec", _U8, n, path)
    if n and int(code.max()) >= len(names):
        raise InvalidMetadataError(path, f"codec code {int(code.max())} has no entry in 'codecs'")
    stored = _col(table, "stored", _U64, n, path)
    counts = _col(table, "pieces", _U64, n, path)
    chunk = _int(table, "chunk_bytes", path)
    if not chunk_bytes_ok(chunk):
        raise InvalidMetadataError(path, f"chunk_bytes {chunk} is not a multiple of 64 up to {MAX_CHUNK_BYTES}")
    if n and float(counts.astype(np.float64).sum()) > 2.0**40:
        raise InvalidMetadataError(path, "the piece counts add up to more than 2**40")
    total = int(counts.sum()) if n else 0
    piece_bytes = _col(table, "piece_bytes", _U64, total, path)
    nbytes = tt.nbytes
    is_raw = np.array([x == RAW for x in names], bool)[code] if n else np.zeros(0, bool)
    known = np.array([x in KNOWN_CODECS for x in names], bool)[code] if n else np.zeros(0, bool)
    itemsize = np.array([DTYPES[x].itemsize if x in DTYPES else 0 for x in tt.dtype_names], np.int64)[tt.dtype_code]
    k = np.where(np.array([x == PLANES_ZSTD for x in names], bool)[code], itemsize, 1) if n else np.zeros(0, np.int64)
    coded = known & ~is_raw & (itemsize > 0)  # rows whose pieces this reader can check one by one
    bad = (stored == 0) != (nbytes == 0)
    bad |= is_raw & ((stored != nbytes) | (counts != 0))
    nchunks = -(-nbytes.astype(np.int64) // chunk)
    bad |= coded & (counts.astype(np.int64) != nchunks * np.maximum(k, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetadataError(path, f"tensor {i}: stored size {int(stored[i])}, {int(counts[i])} pieces and "
                                         f"codec {names[int(code[i])]!r} do not fit its {int(nbytes[i])} bytes")
    starts = np.cumsum(counts.astype(np.int64)) - counts.astype(np.int64) if n else np.zeros(0, np.int64)
    if total:
        row = np.repeat(np.arange(n), counts.astype(np.int64))
        if float(piece_bytes.astype(np.float64).max()) > MAX_CHUNK_BYTES or int(piece_bytes.min()) == 0:
            raise InvalidMetadataError(path, "a piece is empty or larger than chunk_bytes")
        sums = np.add.reduceat(piece_bytes, starts[counts > 0])
        if not np.array_equal(sums, stored[counts > 0]):
            raise InvalidMetadataError(path, "a row's piece sizes do not add up to its stored size")
        check = coded[row]
        if check.any():
            kk = np.maximum(k[row], 1)
            c = (np.arange(total) - starts[row]) // kk
            decoded = np.minimum(chunk, nbytes[row].astype(np.int64) - c * chunk) // kk
            pb = piece_bytes.astype(np.int64)
            wrong = check & ((pb > decoded) | (decoded > MAX_RATIO * pb))
            if wrong.any():
                i = int(row[np.flatnonzero(wrong)[0]])
                raise InvalidMetadataError(path, f"tensor {i}: a piece's stored size is larger than its decoded "
                                                 f"size, or more than {MAX_RATIO} times smaller")
    tt.codec_names, tt.codec, tt.stored, tt.piece_count, tt.piece_bytes = names, code, stored, counts, piece_bytes
    tt.chunk_bytes, tt.piece_start = chunk, starts


def packed_layout(tt: TensorTable, *, alignment: int, first: int, path: str | None) -> int:
    """Check a packed file's offsets (§14.2) and record each blob's padding end; return the metadata offset."""
    stored = tt.stored_sizes().tolist()
    nbytes, offsets = tt.nbytes.tolist(), tt.offset.tolist()
    small, big, below = tt.pack_alignment - 1, alignment - 1, tt.pack_below
    pos = first
    gap = [0] * len(stored)
    last = -1
    for i, (nb, size, off) in enumerate(zip(nbytes, stored, offsets, strict=True)):
        if not nb:
            if off:
                raise InvalidMetadataError(path, f"tensor {i}: empty blob at offset {off}, expected 0")
            continue
        mask = small if nb < below else big
        want = (pos + mask) & ~mask
        if off != want:
            raise InvalidMetadataError(path, f"tensor {i}: offset {off}, expected {want} (packed blobs follow each "
                                             "other in table order, §14.2)")
        if last >= 0:
            gap[last] = want
        last, pos = i, want + size
    end = (pos + big) & ~big
    if last >= 0:
        gap[last] = end
    tt.gap_end = np.asarray(gap, np.uint64)
    return end
