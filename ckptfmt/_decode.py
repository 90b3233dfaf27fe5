"""Reading compressed rows (format 1.1, spec §13.4): check the stored bytes, then decode chunk by chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._checksum import checksum
from ._codec import _WORKERS, KNOWN_CODECS, StoredRow, decode_chunk, ordered, planes, zstd
from ._dtypes import numpy_dtype
from .errors import UnsupportedCodecError

if TYPE_CHECKING:
    from ._reader import Checkpoint


def stored_row(ckpt: Checkpoint, row: int) -> StoredRow:
    """Row ``row`` of the tensor table as :func:`decode_into` wants it."""
    tt = ckpt.manifest.tensors
    assert tt.piece_bytes is not None and tt.piece_start is not None and tt.piece_count is not None
    start, count = int(tt.piece_start[row]), int(tt.piece_count[row])
    return StoredRow(tt.codec_of(row), ckpt._dtype(row).itemsize, int(tt.nbytes[row]), int(tt.offset[row]),
                     tuple(tt.piece_bytes[start : start + count].tolist()), tt.chunk_bytes)


def read_compressed(ckpt: Checkpoint, rows: list[int], *, verify: bool = True, workers: int = _WORKERS
                    ) -> dict[int, np.ndarray]:
    """Decode compressed ``rows`` into fresh writable arrays, all their chunks on ``workers`` threads.

    With ``verify``, each row's stored bytes are checked against its checksum before any is decoded.
    """
    tt = ckpt.manifest.tensors
    mm = ckpt._map()
    view = memoryview(mm)
    out: dict[int, np.ndarray] = {}
    jobs: list[tuple[StoredRow, int, int, np.ndarray, int]] = []
    try:
        for i in rows:
            info = stored_row(ckpt, i)
            if info.codec not in KNOWN_CODECS:
                raise UnsupportedCodecError(f"{ckpt.path}: tensor {ckpt._key_of(i)!r} uses codec {info.codec!r}, "
                                            "unknown to this reader; upgrade ckptfmt")
            zstd()  # MissingDependencyError before any work, naming the extra
            stored = int(tt.stored_sizes()[i])
            if verify and tt.checksum is not None and \
                    checksum(view[info.offset : info.offset + stored]) != int(tt.checksum[i]):
                raise ckpt._mismatch(i)
            arr = np.empty(tt.shape(i), dtype=numpy_dtype(ckpt._dtype(i)))
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
                         lambda: f"{ckpt.path}: tensor {ckpt._key_of(i)!r}, chunk {c}")

        tasks: Any = ((None, (lambda j=j: job(j)), None) for j in jobs)
        for _ in ordered(tasks, min(workers, max(1, len(jobs)))):
            pass
    finally:
        jobs.clear()
        view.release()
    return out
