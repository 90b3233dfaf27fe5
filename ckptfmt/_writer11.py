"""The format 1.1 writer: compressed blobs (spec §13) and packed small blobs (§14).

Chosen only when a save asks for one of them, so a save that asks for neither writes a 1.0 file
byte for byte as before. Chunks are compressed on worker threads, at most a few in flight, and
their pieces are written in order as they finish: memory stays bounded by a few chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby
from typing import Any

import numpy as np

from ._backend import Source
from ._checksum import EMPTY_CHECKSUM, hasher
from ._codec import _WORKERS, CHUNK_BYTES, KNOWN_CODECS, RAW, check_level, codec_for, encode_chunk, ordered, zstd
from ._dtypes import DType
from ._tables import TensorTable
from ._versions import FEATURE_COMPRESSED, FEATURE_PACKED
from ._writer import CHUNK_SIZE, ProgressCallback, Sink, Writer, _as_bytes, _needs_conversion, contiguous_chunks

#: Blobs below ``PACK_BELOW`` bytes are placed at ``PACK_ALIGNMENT`` when packing (§14.1).
PACK_ALIGNMENT = 64


def byte_chunks(arr: Source, nbytes: int, chunk: int) -> Iterator[np.ndarray]:
    """``arr``'s bytes in C order, little-endian, as uint8 arrays of exactly ``chunk`` bytes (the last shorter)."""
    if isinstance(arr, np.ndarray) and not _needs_conversion(arr):
        raw = _as_bytes(arr)
        for i in range(0, nbytes, chunk):
            yield raw[i : i + chunk]
        return
    parts: Any = contiguous_chunks(arr) if isinstance(arr, np.ndarray) else arr.chunks(CHUNK_SIZE)
    buf = np.empty(min(chunk, nbytes), np.uint8)
    fill = 0
    for part in parts:
        data = np.frombuffer(part, np.uint8) if not isinstance(part, np.ndarray) else part.reshape(-1).view(np.uint8)
        while data.size:
            n = min(data.size, buf.size - fill)
            buf[fill : fill + n] = data[:n]
            fill, data = fill + n, data[n:]
            if fill == buf.size:
                yield buf
                nbytes -= fill
                buf, fill = np.empty(min(chunk, max(nbytes, 1)), np.uint8), 0
    if fill:
        yield buf[:fill]


class Writer11(Writer):
    """A :class:`Writer` whose rows may be compressed (``compression`` != ``"none"``) or packed (``pack``)."""

    def __init__(self, fd: Sink, *, alignment: int, checksum: bool = True, compression: str = "none",
                 pack: bool = False, workers: int = _WORKERS, chunk_bytes: int = CHUNK_BYTES,
                 progress: ProgressCallback | None = None) -> None:
        self._level = check_level(compression)
        if self._level != "none":
            zstd()  # MissingDependencyError before the file is begun
        self._pack_below = alignment if pack else 0
        self._workers = workers
        self._chunk = chunk_bytes
        self.required_features = (FEATURE_COMPRESSED if self._level != "none" else 0) | \
            (FEATURE_PACKED if pack else 0)
        self._codecs: dict[str, int] = {c: i for i, c in enumerate(KNOWN_CODECS)} if self._level != "none" else {}
        self._codec_col: list[int] = []
        self._stored: list[int] = []
        self._counts: list[int] = []
        self._pieces: list[int] = []
        super().__init__(fd, alignment=alignment, checksum=checksum, progress=progress)

    def _place(self, nbytes: int) -> int:
        """Pad to where a blob of ``nbytes`` decoded bytes starts (§14.2) and return that offset."""
        a = PACK_ALIGNMENT if nbytes < self._pack_below else self._alignment
        off = (self._pos + a - 1) & ~(a - 1)
        self._pad_to(off)
        return off

    def _row(self, arr: Source, dtype: DType) -> int:
        """Record a row's dtype and shape columns; return its decoded size."""
        if arr.itemsize != dtype.itemsize:
            raise ValueError(f"array itemsize {arr.itemsize} does not match dtype {dtype.name}")
        code = self._dtype_codes.setdefault(dtype.name, len(self._dtype_codes))
        self._code.append(code)
        self._ndim.append(arr.ndim)
        self._shape.extend(arr.shape)
        return int(arr.nbytes)

    def write_blobs(self, items: list[tuple[Source, DType]]) -> None:
        """Append tensors' blobs in table order, compressing and packing them as asked."""
        if self._level == "none":
            # packing only: runs of small and of large rows go through the 1.0 writer's loop, each
            # run at its own alignment (§14.2), so packing costs nothing per row
            full = self._alignment
            try:
                for small, run in groupby(items, key=lambda item: item[0].nbytes < self._pack_below):
                    self._alignment = PACK_ALIGNMENT if small else full
                    super().write_blobs(list(run))
            finally:
                self._alignment = full
            return
        h: Any = None
        count = 0
        for tag, pieces in ordered(self._tasks(items), self._workers):
            if tag is not None:  # a new row begins: (codec, nbytes)
                if h is not None:
                    self._end_row(h, count)
                codec, nb = tag
                self._codec_col.append(self._codecs[codec])
                self._nbytes.append(nb)
                self._offset.append(self._place(nb) if nb else 0)
                self._stored.append(0)
                h, count = hasher(), 0
                continue
            for p in pieces:
                mv = memoryview(p).cast("B")
                if self._checksum:
                    h.update(mv)
                self._emit(mv)
                self._stored[-1] += len(mv)
                if self._codec_col[-1] != self._codecs[RAW]:
                    self._pieces.append(len(mv))
                    count += 1
            if self._progress is not None:  # one chunk of the row's decoded bytes is written
                self._advance(min(self._chunk, self._nbytes[-1] - self._in_row))
        if h is not None:
            self._end_row(h, count)

    def _end_row(self, h: Any, count: int) -> None:
        self._row_done(self._nbytes[-1])
        self._counts.append(count)
        self._sums.append(h.intdigest() if self._checksum and self._stored[-1] else EMPTY_CHECKSUM)

    def _tasks(self, items: list[tuple[Source, DType]]) -> Iterator[tuple[Any, Any, Any]]:
        level, chunk = self._level, self._chunk
        for arr, dtype in items:
            nb = self._row(arr, dtype)
            codec = codec_for(level, dtype.itemsize, nb)
            yield (codec, nb), None, None
            if not nb:
                continue
            for c in byte_chunks(arr, nb, chunk):
                if codec == RAW:
                    yield None, None, [c]
                else:
                    yield None, (lambda c=c, codec=codec, k=dtype.itemsize: encode_chunk(c, codec, k, level)), None

    def _table(self) -> TensorTable:
        table = super()._table()
        if self._level != "none":
            table.codec_names = list(self._codecs)
            table.codec = np.asarray(self._codec_col, np.uint8)
            table.stored = np.asarray(self._stored, np.uint64)
            table.piece_count = np.asarray(self._counts, np.uint64)
            table.piece_bytes = np.asarray(self._pieces, np.uint64)
            table.chunk_bytes = self._chunk
        if self._pack_below:
            table.pack_alignment, table.pack_below = PACK_ALIGNMENT, self._pack_below
        return table
