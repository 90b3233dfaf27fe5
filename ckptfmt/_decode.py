"""Reading compressed rows (format 1.1, spec §13.4): check the stored bytes, then decode chunk by chunk.

The reader hands these functions the file's memory map (``mm``); everything else comes through
:class:`Checkpoint`'s public methods. Whole reads check the stored bytes against the row's checksum
first; partial reads (:func:`decode_runs`) decode only the chunks they overlap, each zstd frame
checked by its own content checksum (§13.4), the row's checksum not (it covers the whole blob).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checksum import checksum
from ._codec import _WORKERS, KNOWN_CODECS, StoredRow, decode_chunk, decode_into, ordered, planes, zstd
from ._dtypes import numpy_dtype
from .errors import ChecksumMismatchError, UnsupportedCodecError

if TYPE_CHECKING:
    from ._reader import Checkpoint


def stored_row(ckpt: Checkpoint, row: int) -> StoredRow:
    """Row ``row`` of the tensor table as :func:`decode_into` wants it."""
    tt = ckpt.manifest.tensors
    assert tt.piece_bytes is not None and tt.piece_start is not None and tt.piece_count is not None
    start, count = int(tt.piece_start[row]), int(tt.piece_count[row])
    return StoredRow(tt.codec_of(row), ckpt.row_dtype(row).itemsize, int(tt.nbytes[row]), int(tt.offset[row]),
                     tuple(tt.piece_bytes[start : start + count].tolist()), tt.chunk_bytes)


def _usable(ckpt: Checkpoint, row: int) -> StoredRow:
    """Row ``row``'s pieces, once its codec is known to be one this reader decodes (and zstandard is there)."""
    info = stored_row(ckpt, row)
    if info.codec not in KNOWN_CODECS:
        raise UnsupportedCodecError(f"{ckpt.path}: tensor {ckpt.row_key(row)!r} uses codec {info.codec!r}, "
                                    "unknown to this reader; upgrade ckptfmt")
    zstd()  # MissingDependencyError before any work, naming the extra
    return info


def _check(ckpt: Checkpoint, view: memoryview, row: int, info: StoredRow) -> None:
    """Raise :class:`ChecksumMismatchError` unless row ``row``'s stored bytes match its checksum."""
    tt = ckpt.manifest.tensors
    stored = int(tt.stored_sizes()[row])
    if tt.checksum is not None and checksum(view[info.offset : info.offset + stored]) != int(tt.checksum[row]):
        key = ckpt.row_key(row)
        raise ChecksumMismatchError(ckpt.path, f"tensor {key!r}: checksum mismatch (its bytes are corrupted)",
                                    region="blob", key=key)


def read_compressed(ckpt: Checkpoint, mm: Any, rows: list[int], *, verify: bool = True, workers: int = _WORKERS
                    ) -> dict[int, np.ndarray]:
    """Decode compressed ``rows`` into fresh writable arrays, all their chunks on ``workers`` threads.

    With ``verify``, each row's stored bytes are checked against its checksum before any is decoded.
    """
    tt = ckpt.manifest.tensors
    view = memoryview(mm)
    out: dict[int, np.ndarray] = {}
    jobs: list[tuple[StoredRow, int, int, np.ndarray, int]] = []
    try:
        for i in rows:
            info = _usable(ckpt, i)
            if verify:
                _check(ckpt, view, i, info)
            arr = np.empty(tt.shape(i), dtype=numpy_dtype(ckpt.row_dtype(i)))
            out[i] = arr
            dest = arr.reshape(-1).view(np.uint8)
            k = planes(info.codec, info.itemsize)
            pos = info.offset
            for c in range(info.chunk_count()):
                n = sum(info.pieces[c * k : (c + 1) * k])
                jobs.append((info, c, pos, dest, i))
                pos += n

        def job(item: tuple[StoredRow, int, int, np.ndarray, int]) -> None:
            info, c, pos, dest, i = item
            k = planes(info.codec, info.itemsize)
            n = sum(info.pieces[c * k : (c + 1) * k])
            lo = c * info.chunk_bytes
            decode_chunk(info, c, view[pos : pos + n], c * k, dest[lo : lo + info.chunk_bytes],
                         lambda: f"{ckpt.path}: tensor {ckpt.row_key(i)!r}, chunk {c}")

        tasks: Any = ((None, (lambda j=j: job(j)), None) for j in jobs)
        for _ in ordered(tasks, min(workers, max(1, len(jobs)))):
            pass
    finally:
        jobs.clear()
        view.release()
    return out


def iter_decoded(ckpt: Checkpoint, mm: Any, row: int, size: int, slots: list[memoryview] | None, *,
                 verify: bool) -> Iterator[memoryview]:
    """Row ``row``'s decoded bytes in pieces of ``size`` (into ``slots`` in turn, else fresh buffers).

    With ``verify`` the stored bytes are checked first (one pass over the compressed bytes); memory
    stays bounded by ``size`` plus the chunks in flight, whatever the row's size.
    """
    info = _usable(ckpt, row)
    view = memoryview(mm)
    try:
        if verify:
            _check(ckpt, view, row, info)
        where = partial(_where, ckpt, row)
        for k, a in enumerate(range(0, info.nbytes, size)):
            n = min(size, info.nbytes - a)
            dest = slots[k % len(slots)][:n] if slots is not None else memoryview(bytearray(n))
            decode_into(info, lambda o, m: view[o : o + m], np.frombuffer(dest, np.uint8), where,
                        start=a, stop=a + n)
            yield dest
    finally:
        view.release()


def _where(ckpt: Checkpoint, row: int) -> str:
    return f"{ckpt.path}: tensor {ckpt.row_key(row)!r}"


def decode_runs(ckpt: Checkpoint, mm: Any, row: int, starts: Sequence[int], run_bytes: int, dest: np.ndarray, *,
                workers: int = _WORKERS) -> int:
    """Decode bytes ``[s, s + run_bytes)`` of row ``row`` for each ``s`` in ``starts`` into ``dest`` (uint8), back
    to back, decoding only the chunks the runs overlap, each once; returns how many chunks were decoded.

    The runs must not overlap (a slice plan's do not). Chunks are decoded on ``workers`` threads, a
    few in flight, and scattered as they finish, so memory stays bounded by a few chunks.
    """
    info = _usable(ckpt, row)
    cb = info.chunk_bytes
    runs = sorted((s, k * run_bytes) for k, s in enumerate(starts))  # (start in the row, at in dest)
    firsts = [s for s, _ in runs]
    needed = sorted({c for s, _ in runs for c in range(s // cb, (s + run_bytes - 1) // cb + 1)})
    k = planes(info.codec, info.itemsize)
    bounds = info.starts
    view = memoryview(mm)

    def job(c: int) -> np.ndarray:
        lo, hi = c * cb, min(info.nbytes, (c + 1) * cb)
        tmp = np.empty(hi - lo, np.uint8)
        a, b = bounds[c * k], bounds[(c + 1) * k]
        decode_chunk(info, c, view[info.offset + a : info.offset + b], c * k, tmp,
                     lambda: f"{_where(ckpt, row)}, chunk {c}")
        return tmp

    try:
        tasks = ((c, partial(job, c), None) for c in needed)
        for c, tmp in ordered(tasks, min(workers, max(1, len(needed)))):
            lo = c * cb
            hi = lo + len(tmp)
            i = max(0, bisect.bisect_right(firsts, lo) - 1)  # the run that holds lo, or the first after it
            while i < len(runs) and runs[i][0] < hi:
                s, at = runs[i]
                a, b = max(s, lo), min(s + run_bytes, hi)
                if a < b:
                    dest[at + a - s : at + b - s] = tmp[a - lo : b - lo]
                i += 1
    finally:
        view.release()
    return len(needed)
