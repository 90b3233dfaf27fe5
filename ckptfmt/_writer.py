"""The streaming Writer: header, then blobs as they come, then metadata and footer (spec §2).

Memory stays bounded: small contiguous blobs are hashed and queued in place with their padding
(views of one zero buffer), and a batch of them (at most ``BUFFER_SIZE`` bytes) goes out in one
``writev``, without a copy; large contiguous blobs are written straight from the caller's memory, a
cache-sized piece at a time. Each such piece is hashed while it is still in cache: just before it is
written, or, once a save is large enough and a second core is free, just after, on a trailing hasher
thread that the write never waits for. Other small pieces (header, converted bytes) go through one
small reusable buffer, and non-contiguous or byte-swapped arrays are converted a bounded chunk at a
time. The output is a file descriptor or any callable that writes all of a buffer (a file object, a
pipe, a socket): the format needs no seek.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import chain
from typing import Any, Union

import numpy as np
import xxhash

from ._backend import Source
from ._checksum import EMPTY_CHECKSUM, checksum, hasher
from ._dtypes import DType
from ._encode import pack_metadata
from ._footer import Footer
from ._header import Header
from ._tables import TensorTable, ViewTable, align_up, blob_region_start
from ._versions import minor_for

#: Blobs below this are batched (queued in place when contiguous, else copied into the buffer); larger
#: ones are written in place, a piece at a time, each gathered with what is pending into one ``writev``.
SMALL_BLOB = 64 << 10
BUFFER_SIZE = 4 << 20
#: The reusable buffer that small copied pieces and padding go through (small: a save allocates it afresh).
COPY_BUFFER = 256 << 10
#: Largest temporary made when converting a non-contiguous or byte-swapped array.
CHUNK_SIZE = 8 << 20
#: Large blobs are hashed and written this much at a time: small enough to stay in cache between the two.
HASH_PIECE = 1 << 20
#: Once a save has hashed this many bytes of large blobs itself, it hands the rest to a trailing hasher
#: thread (on a machine with a second core): tiny saves never start a thread.
TRAIL_AFTER = 8 << 20
#: How long the trailing hasher sleeps when it has caught up with the writer (about 1 MB of writing).
_TRAIL_POLL = 2e-4
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_MAX_WRITE = 1 << 30
#: Most buffers one ``writev`` takes (POSIX IOV_MAX; 1024 on Linux).
_IOV_MAX = 1024
#: Largest alignment whose padding small blobs get from a shared zero buffer (larger ones go through the buffer).
_ZERO_PAD = 1 << 16
_BIG_ENDIAN_HOST = sys.byteorder == "big"

#: Where the bytes go: a file descriptor, or a callable that writes all of a buffer.
Sink = Union[int, Callable[[memoryview], object]]  # noqa: UP007 (a runtime alias: Python 3.10 has no `type`)
#: Told how many more tensor bytes (decoded, as the rows' ``nbytes``) were written; see :class:`Writer`.
ProgressCallback = Callable[[int], object]


def write_all(fd: Sink, data: Any) -> None:
    """``os.write`` until every byte of ``data`` (one buffer, or a list written with ``writev``) is written.

    A list may hold memoryviews and C-contiguous numpy arrays (written in place, without a copy);
    a callable sink is handed all but the last joined into one buffer, then the last.
    """
    if isinstance(data, list):
        if not data:
            return
        if not isinstance(fd, int):  # the small buffers joined in one call; the last (maybe large) one apart
            if len(data) > 2:
                fd(memoryview(b"".join(data[:-1])))
            elif len(data) == 2:
                fd(_byte_view(data[0]))
            fd(_byte_view(data[-1]))
            return
        if not hasattr(os, "writev"):
            for part in data:
                write_all(fd, _byte_view(part))
            return
        for i in range(0, len(data), _IOV_MAX):
            batch = data[i : i + _IOV_MAX] if len(data) > _IOV_MAX else data
            done = os.writev(fd, batch)
            if done == sum(map(_NBYTES, batch)):
                continue
            for part in batch:  # the rest of a short writev, buffer by buffer
                view = _byte_view(part)
                if done >= len(view):
                    done -= len(view)
                    continue
                write_all(fd, view[done:])
                done = 0
        return
    if not isinstance(fd, int):
        fd(data)
        return
    while len(data):
        n = os.write(fd, data[:_MAX_WRITE])
        data = data[n:]


class _TrailingHasher:
    """Hashes large blobs on a second core right after each piece is written, while it is still in cache.

    The writing thread never waits for it and never wakes it: waking a sleeping thread costs more
    than hashing a piece, so the hasher polls a deque (every ``_TRAIL_POLL`` seconds when idle) that
    the writer appends ``(row, piece, last)`` to after each write. The digests are collected at the
    end. Only the caller's own arrays are queued, which stay alive and unchanged for the whole save.
    """

    def __init__(self) -> None:
        self._q: deque[tuple[int, Any, bool] | None] = deque()
        self._sums: dict[int, int] = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name="ckptfmt-hash", daemon=True)
        self._thread.start()

    def add(self, row: int, piece: Any, last: bool) -> None:
        self._q.append((row, piece, last))

    def _run(self) -> None:
        h, q, sleep = hasher(), self._q, time.sleep
        while True:
            try:
                item = q.popleft()
            except IndexError:
                sleep(_TRAIL_POLL)
                continue
            if item is None:
                return
            if self._error is not None:
                continue
            row, piece, last = item
            try:
                h.update(piece)
                if last:
                    self._sums[row] = h.intdigest()
                    h.reset()
            except BaseException as e:  # reported by digests(), on the writing thread
                self._error = e

    def stop(self) -> None:
        """Wait for the pieces queued so far to be hashed, and end the thread (idempotent)."""
        if self._thread is not None:
            self._q.append(None)
            self._thread.join()
            self._thread = None

    def digests(self) -> dict[int, int]:
        """Each queued row's digest, by row number, once every piece is hashed."""
        self.stop()
        if self._error is not None:
            raise self._error
        return self._sums


_NBYTES = operator.attrgetter("nbytes")  # of a memoryview or a numpy array
_DTYPE, _NDIM, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("ndim"), operator.attrgetter("shape")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_NDARRAY_ONLY = {np.ndarray}
_xxh3 = xxhash.xxh3_64_intdigest  # checksum(), without a Python call per small blob
#: Rows written by one vectorised run at most (two buffers each: one ``writev``), and at first.
_RUN = _IOV_MAX // 2
_MIN_RUN = 16


def _prefix(ok: np.ndarray) -> int:
    """How many leading entries of a boolean array are true."""
    return int(ok.argmin()) if not ok.all() else len(ok)


def _contiguous_prefix(arrs: list[np.ndarray]) -> int:
    for j, a in enumerate(arrs):
        if not a.flags.c_contiguous:
            return j
    return len(arrs)


def _may_run(arr: Any) -> bool:
    """Whether a row may start a vectorised run: a small, non-empty plain numpy array."""
    return type(arr) is np.ndarray and 0 < arr.nbytes < SMALL_BLOB


def _byte_view(part: Any) -> memoryview:
    """A flat byte view of a C-contiguous buffer (a numpy array of a dtype without a buffer format included)."""
    if isinstance(part, np.ndarray):
        return part.reshape(-1).view(np.uint8).data
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


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

    ``progress``, when given, is called with each increment of tensor bytes written (a row's
    ``nbytes`` in all, in pieces as a large row is written); the increments add up to the bytes of
    the rows written, each stored blob counted once.
    """

    #: required feature bits the header announces (format 1.1 writers set them before __init__)
    required_features = 0

    def __init__(self, fd: Sink, *, alignment: int, checksum: bool = True,
                 progress: ProgressCallback | None = None) -> None:
        self._fd = fd
        self._progress = progress
        self._in_row = 0  # bytes of the current row already reported
        self._alignment = alignment
        self._checksum = checksum
        self._buf = bytearray(COPY_BUFFER)  # zero except [0, _fill): padding is skipped over, not written
        self._mv = memoryview(self._buf)
        self._as_array = np.frombuffer(self._buf, dtype=np.uint8)
        self._fill = 0
        #: Buffers to write before the buffer's bytes: small blobs in place, and their padding
        self._iov: list[Any] = []
        self._iov_bytes = 0
        self._zero = memoryview(bytes(min(alignment, _ZERO_PAD)))
        self._zero_views: dict[int, memoryview] = {}
        self._pos = 0
        #: Hashes large blobs just behind the write, on another core (started once a save is big enough)
        self._trail: _TrailingHasher | None = None
        self._hashed_here = 0
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

    # -- byte output: pending in-place buffers (self._iov), then the batch buffer's [0, _fill)
    def _flush(self, last: memoryview | None = None) -> None:
        """Write what is pending (then ``last``, if given) in one gathered write."""
        parts = self._iov
        fill = self._fill
        if fill:
            parts.append(self._mv[:fill])
        if last is not None:
            parts.append(last)
        if parts:
            write_all(self._fd, parts)
            parts.clear()
            self._iov_bytes = 0
        if fill:
            self._as_array[:fill] = 0
            self._fill = 0

    def _direct(self, data: memoryview) -> None:
        """Write ``data`` in place, after what is pending (one gathered write)."""
        if (self._fill or self._iov) and len(data) <= _MAX_WRITE:
            self._flush(data)
        else:
            self._flush()
            write_all(self._fd, data)
        self._pos += len(data)

    def _emit(self, data: memoryview) -> None:
        n = len(data)
        if n >= SMALL_BLOB:
            self._direct(data)
            return
        if n > COPY_BUFFER - self._fill:
            self._flush()
        self._mv[self._fill : self._fill + n] = data
        self._fill += n
        self._pos += n

    def _pad_to(self, offset: int) -> None:
        pad = offset - self._pos
        while pad > 0:
            if self._fill == COPY_BUFFER:
                self._flush()
            n = min(pad, COPY_BUFFER - self._fill)
            self._fill += n
            self._pos += n
            pad -= n

    # -- blobs
    def _kind(self, arr: Source, dtype: DType) -> tuple[int, bool]:
        """The dtype code of a row, and whether its array's bytes are stored as they are in memory."""
        if arr.itemsize != dtype.itemsize:
            raise ValueError(f"array itemsize {arr.itemsize} does not match dtype {dtype.name}")
        code = self._dtype_codes.setdefault(dtype.name, len(self._dtype_codes))
        if type(arr) is not np.ndarray:
            return code, False
        order = arr.dtype.byteorder
        return code, order == "|" or order == "<" or (order == "=" and not _BIG_ENDIAN_HOST)

    def write_blobs(self, items: list[tuple[Source, DType]]) -> None:
        """Append tensors' bytes, in table order.

        Written for the many-small-tensors case, where per-tensor overhead is the cost: runs of
        small C-contiguous arrays are laid out, hashed and queued in place (no copy) with their
        padding by whole-list operations, each run going out in one ``writev``; other rows go
        through :meth:`_write_rows`, one at a time.
        """
        n = len(items)
        if self._alignment > _ZERO_PAD or n < _MIN_RUN:
            self._write_rows(items)
            return
        kinds: dict[tuple[int, int], int] = {}
        i, window = 0, _MIN_RUN
        while i < n:
            m, end = i, min(n, i + _MIN_RUN)
            while m < end and _may_run(items[m][0]):
                m += 1
            if m < end:  # a short run before a large row (small and large tensors alternate): one at a time
                j = m + 1
                while j < n and not _may_run(items[j][0]):
                    j += 1
                self._write_rows(items[i:j])
                i, window = j, _MIN_RUN
                continue
            k = self._write_run(items, i, window, kinds)
            if k:
                i += k
                window = min(2 * window, _RUN)
                continue
            window = _MIN_RUN  # a row that does not fit: on one at a time until the next that may
            j = i + 1
            while j < n and not _may_run(items[j][0]):
                j += 1
            self._write_rows(items[i:j])
            i = j

    def _write_run(self, items: list[tuple[Source, DType]], start: int, window: int,
                   kinds: dict[tuple[int, int], int]) -> int:
        """Write the rows from ``start`` on (at most ``window``) while they are small arrays stored as they are.

        Returns how many rows were written (0: the first does not fit). ``kinds`` caches each
        (numpy dtype, dtype) pair's code, or -1 for pairs whose bytes need converting; it is
        keyed by ids, valid while ``items`` holds the objects.
        """
        rows = items[start : start + window]
        arrs = list(map(_FIRST, rows))
        n = len(arrs)
        if set(map(type, arrs)) != _NDARRAY_ONLY:
            n = next(j for j, a in enumerate(arrs) if type(a) is not np.ndarray)
            if not n:
                return 0
            arrs, rows = arrs[:n], rows[:n]
        adts, dts = list(map(_DTYPE, arrs)), list(map(_SECOND, rows))
        if adts.count(adts[0]) == n and dts.count(dts[0]) == n:  # one dtype: the common case
            key = (id(adts[0]), id(dts[0]))
            if key not in kinds:
                code, plain = self._kind(arrs[0], dts[0])  # raises on an itemsize mismatch
                kinds[key] = code if plain else -1
            codes = [kinds[key]] * n
        else:
            codes = []
            for a, adt, dt in zip(arrs, adts, dts, strict=True):
                key = (id(adt), id(dt))
                if key not in kinds:
                    code, plain = self._kind(a, dt)
                    kinds[key] = code if plain else -1
                codes.append(kinds[key])
        sizes = list(map(_NBYTES, arrs))
        if min(codes) < 0 or min(sizes) == 0 or max(sizes) >= SMALL_BLOB:
            n = next(j for j in range(n) if codes[j] < 0 or not 0 < sizes[j] < SMALL_BLOB)
            if not n:
                return 0
        nb = np.array(sizes[:n], np.int64)
        mask = self._alignment - 1
        padded = (nb + mask) & ~mask
        ends = np.cumsum(padded)
        if ends[-1] > BUFFER_SIZE:  # hashed bytes stay in cache until written
            n = max(1, int(np.searchsorted(ends, BUFFER_SIZE, "right")))
        arrs = arrs[:n]
        try:
            sums = list(map(_xxh3, arrs)) if self._checksum else None  # refuses a non-contiguous array
        except (ValueError, BufferError, TypeError):
            sums = None
        if sums is None:
            n = _contiguous_prefix(arrs)
            if not n:
                return 0
            arrs = arrs[:n]
            sums = list(map(_xxh3, arrs)) if self._checksum else [0] * n
        if self._fill:
            self._flush()  # the buffer's bytes come first
        pos = self._pos
        base = (pos + mask) & ~mask
        del sizes[n:]
        offsets = (ends[:n] - padded[:n] + base).tolist()
        pads = [base - pos, *(padded[: n - 1] - nb[: n - 1]).tolist()]  # each shorter than the alignment
        parts: list[Any] = [None] * (2 * n)
        parts[0::2] = self._zeros(pads)
        parts[1::2] = arrs
        self._iov += parts
        self._flush()
        self._pos = offsets[-1] + sizes[-1]
        del codes[n:]
        self._code += codes
        ndims = list(map(_NDIM, arrs))
        self._ndim += ndims
        if ndims.count(1) == n and codes.count(codes[0]) == n:  # 1-D arrays of one dtype: shape from size
            self._shape += (nb[:n] // arrs[0].itemsize).tolist()
        else:
            self._shape += chain.from_iterable(map(_SHAPE, arrs))
        self._offset += offsets
        self._nbytes += sizes
        self._sums += sums
        if self._progress is not None:  # the run went out whole: report it as one increment
            self._progress(sum(sizes))
        return n

    def _zeros(self, lengths: list[int]) -> list[memoryview]:
        """Views of ``lengths`` zero bytes each (padding), kept for reuse."""
        views = self._zero_views
        try:
            return list(map(views.__getitem__, lengths))
        except KeyError:
            if len(views) > 4096:
                views.clear()
            for k in set(lengths) - views.keys():
                views[k] = self._zero[:k]
            return list(map(views.__getitem__, lengths))

    def _write_rows(self, items: list[tuple[Source, DType]]) -> None:
        """Append rows one at a time (small contiguous arrays still go out in place, gathered)."""
        mask = self._alignment - 1
        code_col, ndim_col, shape_col = self._code, self._ndim, self._shape
        offset_col, nbytes_col, sums = self._offset, self._nbytes, self._sums
        do_sum, progress = self._checksum, self._progress
        small = SMALL_BLOB if self._alignment <= _ZERO_PAD else 0
        iov, zero = self._iov, self._zero
        ndarray, xxh = np.ndarray, checksum
        last_adt: Any = None
        last_dtype: Any = None
        code, plain = 0, False
        for arr, dtype in items:
            if type(arr) is ndarray:
                adt = arr.dtype
                if adt is not last_adt or dtype is not last_dtype:
                    code, plain = self._kind(arr, dtype)
                    last_adt, last_dtype = adt, dtype
            else:
                code, plain = self._kind(arr, dtype)
                last_adt = None
            nb = arr.nbytes
            if nb == 0:
                off, digest = 0, EMPTY_CHECKSUM
            elif plain and nb < small and arr.flags.c_contiguous:  # type: ignore[union-attr]  # plain: an ndarray
                if self._fill:
                    self._flush()  # the buffer's bytes come first
                pos = self._pos
                off = (pos + mask) & ~mask
                if off != pos:
                    iov.append(zero[: off - pos])  # shorter than the alignment, which is at most _ZERO_PAD
                iov.append(arr)
                digest = xxh(arr) if do_sum else 0
                self._pos = off + nb
                self._iov_bytes += off - pos + nb
                if len(iov) >= _IOV_MAX - 2 or self._iov_bytes >= BUFFER_SIZE:
                    self._flush()
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
            if progress is not None:
                self._row_done(nb)

    def _write_data(self, arr: Source, nbytes: int) -> int:
        if not isinstance(arr, np.ndarray):  # a device array (its chunks arrive in pinned host memory) or staged
            h = hasher()
            for chunk in arr.chunks(CHUNK_SIZE):
                self._hash_emit(chunk.data, h)
            return h.intdigest() if self._checksum else 0
        if not _needs_conversion(arr):
            raw = _as_bytes(arr)
            if nbytes < SMALL_BLOB or not (self._checksum or self._progress):  # in pieces to report them
                digest = checksum(raw) if self._checksum else 0
                self._emit(raw.data)
                return digest
            trail = self._trailing(nbytes)
            if trail is not None:
                self._hash_emit(raw.data, None, trail)
                return 0  # filled in from the trailing hasher before the table is written
            h = hasher()
            self._hash_emit(raw.data, h)
            return h.intdigest()
        h = hasher()
        for chunk in contiguous_chunks(arr):
            if self._checksum:
                h.update(chunk.data)
            self._emit(chunk.data)
        return h.intdigest() if self._checksum else 0

    def _hash_emit(self, data: memoryview, h: Any, trail: _TrailingHasher | None = None) -> None:
        """Write ``data``, hashing it (when checksums are on) one cache-sized piece before each write, or,
        with ``trail``, queueing each piece for the trailing hasher once it is written."""
        n = len(data)
        if n < SMALL_BLOB and trail is None:
            if self._checksum:
                h.update(data)
            self._emit(data)
            return
        do_sum, row = self._checksum and trail is None, len(self._sums)
        for start in range(0, n, HASH_PIECE):
            piece = data[start : start + HASH_PIECE]
            if do_sum:
                h.update(piece)
            self._direct(piece)
            if trail is not None:
                trail.add(row, piece, start + HASH_PIECE >= n)
            if self._progress is not None:
                self._advance(len(piece))

    def _trailing(self, nbytes: int) -> _TrailingHasher | None:
        """The trailing hasher for a large blob of the caller's, started once the save is big enough."""
        if self._trail is None:
            if not self._checksum or _CORES < 2 or self._hashed_here < TRAIL_AFTER:
                self._hashed_here += nbytes
                return None
            self._trail = _TrailingHasher()
        return self._trail

    def _settle_sums(self) -> None:
        """Put the trailing hasher's digests into the checksum column."""
        if self._trail is not None:
            for row, digest in self._trail.digests().items():
                self._sums[row] = digest

    # -- progress
    def _advance(self, n: int) -> None:
        """Report ``n`` more bytes of the current row."""
        if n > 0 and self._progress is not None:
            self._in_row += n
            self._progress(n)

    def _row_done(self, nbytes: int) -> None:
        """Report the rest of a row of ``nbytes`` bytes."""
        rest, self._in_row = nbytes - self._in_row, 0
        if rest > 0 and self._progress is not None:
            self._progress(rest)

    # -- end
    def finish(self, tree: Any, *, producer: dict[str, Any], created: str, user: dict[str, Any],
               views: ViewTable | None = None) -> int:
        """Write metadata and footer; return the file size."""
        try:
            self._settle_sums()
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
        """End of the call sequence: the hashing thread, if any, is stopped (the output belongs to the caller)."""
        if self._trail is not None:
            self._trail.stop()
