"""The streaming Writer: header, then blobs as they come, then metadata and footer (spec §2).

Memory stays bounded: small blobs are batched into one reusable buffer, large contiguous blobs are
written straight from the caller's memory, a cache-sized piece at a time, each piece hashed just
before it is written (so the write reads it from cache, not from memory a second time), and
non-contiguous or byte-swapped arrays are converted a bounded chunk at a time. The output is a file
descriptor or any callable that writes all of a buffer (a file object, a pipe, a socket): the format
needs no seek.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Union

import numpy as np

from ._backend import Source
from ._checksum import EMPTY_CHECKSUM, checksum, hasher
from ._dtypes import DType
from ._encode import pack_metadata
from ._footer import Footer
from ._header import Header
from ._tables import TensorTable, ViewTable, align_up, blob_region_start
from ._versions import minor_for

#: Blobs below this are copied into the batch buffer; larger ones are written in place (gathered with
#: what the buffer holds into one ``writev``), so neither copied nor followed by a zeroing of the buffer.
SMALL_BLOB = 64 << 10
BUFFER_SIZE = 4 << 20
#: Largest temporary made when converting a non-contiguous or byte-swapped array.
CHUNK_SIZE = 8 << 20
#: Large blobs are hashed and written this much at a time: small enough to stay in cache between the two.
HASH_PIECE = 1 << 20
_MAX_WRITE = 1 << 30
_BIG_ENDIAN_HOST = sys.byteorder == "big"

#: Where the bytes go: a file descriptor, or a callable that writes all of a buffer.
Sink = Union[int, Callable[[memoryview], object]]  # noqa: UP007 (a runtime alias: Python 3.10 has no `type`)


def write_all(fd: Sink, data: memoryview | list[memoryview]) -> None:
    """``os.write`` until every byte of ``data`` (one buffer, or a list written with ``writev``) is written.

    A callable sink is handed each buffer in turn.
    """
    if isinstance(data, list):
        if isinstance(fd, int) and hasattr(os, "writev"):
            done = os.writev(fd, data)
            for part in data:  # the rest of a short writev, buffer by buffer
                if done >= len(part):
                    done -= len(part)
                    continue
                write_all(fd, part[done:])
                done = 0
            return
        for part in data:
            write_all(fd, part)
        return
    if not isinstance(fd, int):
        fd(data)
        return
    while len(data):
        n = os.write(fd, data[:_MAX_WRITE])
        data = data[n:]


def _needs_conversion(arr: np.ndarray) -> bool:
    order = arr.dtype.byteorder
    return not arr.flags.c_contiguous or order == ">" or (order == "=" and _BIG_ENDIAN_HOST)


def _as_bytes(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous little-endian array as a flat uint8 view (no copy)."""
    return arr.reshape(-1).view(np.uint8)


def contiguous_chunks(arr: np.ndarray, limit: int = CHUNK_SIZE) -> Any:
    """Yield ``arr``'s elements in C order, little-endian, as uint8 arrays of about ``limit`` bytes or less."""
    if arr.ndim == 0 or arr.nbytes <= limit:
        out = np.ascontiguousarray(arr)
        if out.dtype.byteorder == ">" or (out.dtype.byteorder == "=" and _BIG_ENDIAN_HOST):
            out = out.astype(out.dtype.newbyteorder("<"))
        yield _as_bytes(out)
        return
    row = arr.nbytes // arr.shape[0]
    if row > limit:
        for i in range(arr.shape[0]):
            yield from contiguous_chunks(arr[i], limit)
        return
    step = max(1, limit // row)
    for i in range(0, arr.shape[0], step):
        yield from contiguous_chunks(arr[i : i + step], limit)


class Writer:
    """Writes one checkpoint to an open file descriptor, in the order the format lays it out.

    Call sequence: 1. ``Writer(fd, ...)`` writes the header; 2. :meth:`write_blobs` (any number of
    times) with the tensors in table order; 3. :meth:`finish` writes the metadata and the footer.
    """

    #: required feature bits the header announces (format 1.1 writers set them before __init__)
    required_features = 0

    def __init__(self, fd: Sink, *, alignment: int, checksum: bool = True) -> None:
        self._fd = fd
        self._alignment = alignment
        self._checksum = checksum
        self._buf = bytearray(BUFFER_SIZE)  # zero except [0, _fill): padding is skipped over, not written
        self._mv = memoryview(self._buf)
        self._as_array = np.frombuffer(self._buf, dtype=np.uint8)
        self._fill = 0
        self._pos = 0
        self._dtype_codes: dict[str, int] = {}
        self._code: list[int] = []
        self._ndim: list[int] = []
        self._shape: list[int] = []
        self._offset: list[int] = []
        self._nbytes: list[int] = []
        self._sums: list[int] = []
        header = Header(minor=minor_for(self.required_features), required_features=self.required_features,
                        alignment=alignment)
        self._emit(memoryview(header.pack()))
        self._pad_to(blob_region_start(alignment))

    # -- byte output
    def _flush(self) -> None:
        if self._fill:
            write_all(self._fd, self._mv[: self._fill])
            self._as_array[: self._fill] = 0
            self._fill = 0

    def _direct(self, data: memoryview) -> None:
        """Write ``data`` in place, after what the buffer holds (one gathered write)."""
        if self._fill and len(data) <= _MAX_WRITE:
            write_all(self._fd, [self._mv[: self._fill], data])
            self._as_array[: self._fill] = 0
            self._fill = 0
        else:
            self._flush()
            write_all(self._fd, data)
        self._pos += len(data)

    def _emit(self, data: memoryview) -> None:
        n = len(data)
        if n >= SMALL_BLOB:
            self._direct(data)
            return
        if n > BUFFER_SIZE - self._fill:
            self._flush()
        self._mv[self._fill : self._fill + n] = data
        self._fill += n
        self._pos += n

    def _pad_to(self, offset: int) -> None:
        pad = offset - self._pos
        while pad > 0:
            if self._fill == BUFFER_SIZE:
                self._flush()
            n = min(pad, BUFFER_SIZE - self._fill)
            self._fill += n
            self._pos += n
            pad -= n

    # -- blobs
    def write_blobs(self, items: list[tuple[Source, DType]]) -> None:
        """Append tensors' bytes, in table order.

        The loop is written for the many-small-tensors case, where per-tensor overhead is the cost.
        """
        mask = self._alignment - 1
        codes, code_col, ndim_col, shape_col = self._dtype_codes, self._code, self._ndim, self._shape
        offset_col, nbytes_col, sums = self._offset, self._nbytes, self._sums
        mv, do_sum = self._mv, self._checksum
        small = SMALL_BLOB if BUFFER_SIZE - SMALL_BLOB - mask > 0 else 0
        native = "<" if _BIG_ENDIAN_HOST else "="
        for arr, dtype in items:
            code = codes.get(dtype.name)
            if code is None:
                code = codes[dtype.name] = len(codes)
            if arr.itemsize != dtype.itemsize:
                raise ValueError(f"array itemsize {arr.itemsize} does not match dtype {dtype.name}")
            nb = arr.nbytes
            if nb == 0:
                off, digest = 0, EMPTY_CHECKSUM
            elif nb < small and type(arr) is np.ndarray and arr.flags.c_contiguous and \
                    arr.dtype.byteorder in (native, "|"):
                pos = self._pos
                off = (pos + mask) & ~mask
                if self._fill + (off - pos) + nb > BUFFER_SIZE:
                    self._flush()
                fill = self._fill + (off - pos)
                try:
                    raw: Any = arr.data.cast("B")
                except (TypeError, ValueError):  # dtypes without a buffer format, e.g. ml_dtypes
                    raw = _as_bytes(arr)
                mv[fill : fill + nb] = raw
                digest = checksum(raw) if do_sum else 0
                self._fill = fill + nb
                self._pos = off + nb
            else:
                off = (self._pos + mask) & ~mask
                self._pad_to(off)
                digest = self._write_data(arr, nb)
            code_col.append(code)
            ndim_col.append(arr.ndim)
            shape_col.extend(arr.shape)
            offset_col.append(off)
            nbytes_col.append(nb)
            sums.append(digest)

    def _write_data(self, arr: Source, nbytes: int) -> int:
        if not isinstance(arr, np.ndarray):  # a device array (its chunks arrive in pinned host memory) or staged
            h = hasher()
            for chunk in arr.chunks(CHUNK_SIZE):
                self._hash_emit(chunk.data, h)
            return h.intdigest() if self._checksum else 0
        if not _needs_conversion(arr):
            raw = _as_bytes(arr)
            if nbytes < SMALL_BLOB or not self._checksum:
                digest = checksum(raw) if self._checksum else 0
                self._emit(raw.data)
                return digest
            h = hasher()
            self._hash_emit(raw.data, h)
            return h.intdigest()
        h = hasher()
        for chunk in contiguous_chunks(arr):
            if self._checksum:
                h.update(chunk.data)
            self._emit(chunk.data)
        return h.intdigest() if self._checksum else 0

    def _hash_emit(self, data: memoryview, h: Any) -> None:
        """Write ``data``, hashing it (when checksums are on) one cache-sized piece before each write."""
        n = len(data)
        if n < SMALL_BLOB:
            if self._checksum:
                h.update(data)
            self._emit(data)
            return
        do_sum = self._checksum
        for start in range(0, n, HASH_PIECE):
            piece = data[start : start + HASH_PIECE]
            if do_sum:
                h.update(piece)
            self._direct(piece)

    # -- end
    def finish(self, tree: Any, *, producer: dict[str, Any], created: str, user: dict[str, Any],
               views: ViewTable | None = None) -> int:
        """Write metadata and footer; return the file size."""
        try:
            meta_offset = align_up(self._pos, self._alignment)
            self._pad_to(meta_offset)
            meta = pack_metadata(tree, self._table(), producer, created, user, views)
            self._emit(memoryview(meta))
            self._emit(memoryview(Footer(meta_offset, len(meta), checksum(meta)).pack()))
            self._flush()
            return self._pos
        finally:
            self.close()

    def _table(self) -> TensorTable:
        """The tensor table of the rows written so far."""
        return TensorTable(
            dtype_names=list(self._dtype_codes),
            dtype_code=np.asarray(self._code, dtype=np.uint8),
            ndim=np.asarray(self._ndim, dtype=np.uint8),
            shape_flat=np.asarray(self._shape, dtype=np.uint64),
            offset=np.asarray(self._offset, dtype=np.uint64),
            nbytes=np.asarray(self._nbytes, dtype=np.uint64),
            checksum=np.asarray(self._sums, dtype=np.uint64) if self._checksum else None,
        )

    def close(self) -> None:
        """End of the call sequence; nothing is held open (the output belongs to the caller)."""
