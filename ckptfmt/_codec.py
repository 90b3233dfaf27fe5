"""Compressed blobs (format 1.1, spec §13): byte planes + zstd, in independent chunks.

A compressed row's decoded bytes are cut into chunks of ``chunk_bytes`` (the last one shorter). A
``planes-zstd`` chunk of ``n`` elements of ``k`` bytes is split into ``k`` planes of ``n`` bytes
(byte ``j`` of every element: exponents compress, mantissas mostly do not), a ``zstd`` chunk is one
plane. Each plane is one *piece*: a zstd frame when that is shorter, else the plane itself (raw).
Pieces are independent, so chunks compress and decompress on every core (zstandard releases the
GIL) and a partial read decodes only the chunks it needs.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np

from .errors import ChecksumMismatchError, MissingDependencyError, UnsupportedCodecError

#: Codec names (the ``codecs`` list of §13.2). ``raw``: stored as is.
RAW, ZSTD, PLANES_ZSTD = "raw", "zstd", "planes-zstd"
KNOWN_CODECS = (RAW, ZSTD, PLANES_ZSTD)
#: Compression levels of ``save(..., compression=...)`` (measured: benchmarks/RESULTS.md). ``balanced``
#: writes what ``fast`` writes: no zstd level or parameter tried compressed byte planes of real weights
#: better at a cost between fast's and maximum's, so it is kept as a name only (spec §13.3).
LEVELS = ("none", "fast", "balanced", "maximum")
#: Decoded bytes per chunk written by this writer (any multiple of 64 up to MAX_CHUNK_BYTES is read).
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 26
#: Rows smaller than this are stored raw: a zstd frame header would eat what they could save.
MIN_COMPRESS = 256
#: No zstd frame decodes to more than this many times its size (a 4-byte RLE block holds 128 KiB), §13.4.
MAX_RATIO = 32768
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_LITTLE = sys.byteorder == "little"


def zstd() -> Any:
    """The ``zstandard`` module, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        import zstandard
    except ImportError:
        raise MissingDependencyError(
            "compressed checkpoints need the zstandard package: pip install 'ckptfmt[compress]'") from None
    return zstandard


def check_level(level: str) -> str:
    """``level`` if it names a compression level, else ValueError."""
    if level not in LEVELS:
        raise ValueError(f"compression {level!r} is not one of {', '.join(LEVELS)}")
    return level


def chunk_bytes_ok(chunk_bytes: object) -> bool:
    """Whether the format allows ``chunk_bytes`` (spec §13): an int, a positive multiple of 64, at most 2^26."""
    return isinstance(chunk_bytes, int) and not isinstance(chunk_bytes, bool) \
        and 0 < chunk_bytes <= MAX_CHUNK_BYTES and chunk_bytes % 64 == 0


def check_chunk_bytes(chunk_bytes: int) -> int:
    """``chunk_bytes`` if the format allows it (:func:`chunk_bytes_ok`), else ValueError."""
    if not chunk_bytes_ok(chunk_bytes):
        raise ValueError(f"chunk_bytes must be a positive multiple of 64 of at most {MAX_CHUNK_BYTES}, "
                         f"not {chunk_bytes!r}")
    return chunk_bytes


def planes(codec: str, itemsize: int) -> int:
    """How many pieces one chunk of this codec makes."""
    return itemsize if codec == PLANES_ZSTD else 1


def codec_for(level: str, itemsize: int, nbytes: int) -> str:
    """The codec the writer picks for a row at ``level``."""
    if level == "none" or nbytes < MIN_COMPRESS:
        return RAW
    return PLANES_ZSTD if itemsize > 1 else ZSTD


# ------------------------------------------------------------------ encoding

_local = threading.local()


#: A plane whose first SAMPLE bytes save less than SKIP of their size is stored raw at once (fast, balanced).
SAMPLE = 1 << 16
SKIP = 0.05


def _compressor(level: int) -> Any:
    """A per-thread compressor (they are not thread-safe) writing content size and checksum (§13.3)."""
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    c = cache.get(level)
    if c is None:
        z = zstd()
        # Level 1 with 7-byte minimum matches and the smallest hash table (2^6): byte planes gain
        # from entropy coding, not from matches; on MiniLM's exponent plane this is both smaller
        # (2.97x vs 2.84x with hash_log 12) and 2.7x faster to compress (benchmarks/RESULTS.md).
        params = z.ZstdCompressionParameters.from_level(
            level, **({"min_match": 7, "hash_log": 6, "search_log": 1} if level == 1 else {}),
            write_checksum=True, write_content_size=True)
        c = cache[level] = z.ZstdCompressor(compression_params=params)
    return c


def _squeeze(plane: Any, level: str) -> Any:
    """One piece: the zstd frame of ``plane`` if shorter, else ``plane`` itself (§13.3)."""
    if level in ("fast", "balanced") and len(plane) >= 4 * SAMPLE and \
            len(_compressor(1).compress(plane[:SAMPLE])) > (1 - SKIP) * SAMPLE:
        return plane  # mantissa-like plane: not worth a full pass
    frame = _compressor(1).compress(plane)
    if level == "maximum" and len(frame) < 0.9 * len(plane):  # only planes that compress pay for a high level
        better = _compressor(19).compress(plane)
        if len(better) < len(frame):
            frame = better
    return frame if len(frame) < len(plane) else plane


def encode_chunk(chunk: np.ndarray, codec: str, itemsize: int, level: str) -> list[Any]:
    """The pieces of one chunk (uint8, C order), in plane order."""
    k = planes(codec, itemsize)
    if k == 1:
        return [_squeeze(chunk.data, level)]
    cols = chunk.reshape(-1, k)
    return [_squeeze(cols[:, j].copy().data, level) for j in range(k)]


def ordered(tasks: Iterable[tuple[Any, Callable[[], Any] | None, Any]], workers: int, window: int = 0
            ) -> Iterator[tuple[Any, Any]]:
    """Run ``(tag, fn, value)`` tasks on ``workers`` threads; yield ``(tag, fn() or value)`` in order.

    At most ``window`` tasks are in flight, so memory stays bounded however many tasks come.
    """
    window = window or 2 * workers
    if workers <= 1:
        for tag, fn, value in tasks:
            yield tag, fn() if fn is not None else value
        return
    pending: deque[tuple[Any, Future[Any] | None, Any]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="ckptfmt-codec") as pool:
        try:
            for tag, fn, value in tasks:
                pending.append((tag, pool.submit(fn) if fn is not None else None, value))
                while len(pending) > window or (pending and pending[0][1] is None):
                    t, f, v = pending.popleft()
                    yield t, f.result() if f is not None else v
            while pending:
                t, f, v = pending.popleft()
                yield t, f.result() if f is not None else v
        finally:
            for _, f, _ in pending:
                if f is not None:
                    f.cancel()


# ------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class StoredRow:
    """Where a compressed row's pieces are: what :func:`decode_into` needs (§13.2)."""

    codec: str
    itemsize: int
    nbytes: int
    offset: int
    pieces: tuple[int, ...]  # stored size of each piece, in order
    chunk_bytes: int

    def chunk_count(self) -> int:
        """Number of chunks (0 for an empty row)."""
        return -(-self.nbytes // self.chunk_bytes)

    @cached_property
    def starts(self) -> list[int]:
        """Where each piece starts, relative to ``offset`` (one more entry: the stored size), computed once."""
        return np.concatenate(([0], np.cumsum(self.pieces, dtype=np.int64))).tolist()


def piece_sizes(row: StoredRow, chunk: int) -> list[int]:
    """Decoded sizes of chunk ``chunk``'s pieces."""
    size = min(row.chunk_bytes, row.nbytes - chunk * row.chunk_bytes)
    k = planes(row.codec, row.itemsize)
    return [size // k] * k


def _decompressor() -> Any:
    """A per-thread decompressor: making one per piece costs more than decoding a small piece."""
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstd().ZstdDecompressor()
    return d


def _decode_piece(data: Any, size: int, where: Callable[[], str]) -> Any:
    """A piece's decoded bytes: the piece itself when stored raw, else its zstd frame, checked (§13.4)."""
    if len(data) == size:
        return data
    z = zstd()
    try:
        params = z.get_frame_parameters(data)
    except z.ZstdError as e:
        raise ChecksumMismatchError(None, f"{where()}: not a zstd frame ({e})", region="blob") from None
    if params.content_size != size or not params.has_checksum:
        raise ChecksumMismatchError(None, f"{where()}: zstd frame declares {params.content_size} bytes "
                                          f"(checksum flag {params.has_checksum}), expected {size} bytes with a "
                                          "content checksum", region="blob")
    try:
        out = _decompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except z.ZstdError as e:
        raise ChecksumMismatchError(None, f"{where()}: zstd frame does not decode ({e})", region="blob") from None
    if len(out) != size:
        raise ChecksumMismatchError(None, f"{where()}: decoded {len(out)} bytes, expected {size}", region="blob")
    return out


def decode_chunk(row: StoredRow, chunk: int, stored: Any, first_piece: int, dest: np.ndarray,
                 where: Callable[[], str]) -> None:
    """Decode chunk ``chunk`` of ``row`` into ``dest`` (its decoded bytes, uint8).

    ``stored`` holds the chunk's pieces back to back, the first being piece ``first_piece``.
    """
    if row.codec not in KNOWN_CODECS or row.codec == RAW:
        raise UnsupportedCodecError(f"{where()}: codec {row.codec!r} is unknown to this reader; upgrade ckptfmt")
    sizes = piece_sizes(row, chunk)
    pos = 0
    parts = []
    for j, size in enumerate(sizes):
        n = row.pieces[first_piece + j]
        parts.append(_decode_piece(stored[pos : pos + n], size, where))
        pos += n
    if len(parts) == 1:
        dest[:] = np.frombuffer(parts[0], np.uint8)
        return
    k = len(parts)
    if k == 2 and _LITTLE:  # two planes (bf16, fp16): one shift-or pass, twice as fast as two scatters
        out = dest.view(np.uint16)
        np.left_shift(np.frombuffer(parts[1], np.uint8), 8, out=out, dtype=np.uint16)
        out |= np.frombuffer(parts[0], np.uint8)
        return
    view = dest.reshape(-1, k)
    for j, p in enumerate(parts):
        view[:, j] = np.frombuffer(p, np.uint8)


def decode_into(row: StoredRow, read: Callable[[int, int], Any], dest: np.ndarray, where: Callable[[], str], *,
                start: int = 0, stop: int | None = None, workers: int = _WORKERS) -> None:
    """Decode decoded bytes [start, stop) of ``row`` into ``dest``, touching only the chunks they overlap.

    ``read(offset, n)`` returns ``n`` stored bytes at file offset ``offset``.
    """
    stop = row.nbytes if stop is None else stop
    if stop <= start:
        return
    k = planes(row.codec, row.itemsize)
    first, last = start // row.chunk_bytes, (stop - 1) // row.chunk_bytes
    starts = row.starts

    def job(c: int) -> None:
        lo, hi = c * row.chunk_bytes, min(row.nbytes, (c + 1) * row.chunk_bytes)
        a, b = starts[c * k], starts[(c + 1) * k]
        data = read(row.offset + a, b - a)
        if lo >= start and hi <= stop:
            decode_chunk(row, c, data, c * k, dest[lo - start : hi - start], where)
            return
        tmp = np.empty(hi - lo, np.uint8)
        decode_chunk(row, c, data, c * k, tmp, where)
        s, e = max(lo, start), min(hi, stop)
        dest[s - start : e - start] = tmp[s - lo : e - lo]

    chunks = range(first, last + 1)
    for _ in ordered(((c, partial(job, c), None) for c in chunks), min(workers, len(chunks))):
        pass
