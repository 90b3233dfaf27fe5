"""Rewrite a checkpoint in another version of the format (spec §15): ``ckptfmt.migrate``.

Only the blob encoding and the header change: the tree, the view table, the user metadata, the
producer and the creation time are carried over verbatim, so every value loads bit for bit as
before. Blobs stream through a writer chunk by chunk (``Checkpoint.lazy``: raw ones read, compressed ones
decoded one chunk at a time), so memory stays bounded whatever the file's size, and the new file
replaces ``dst`` atomically.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import msgpack

from ._atomic import atomic_write
from ._codec import check_level
from ._dtypes import DType
from ._reader import Checkpoint
from ._tables import KNOWN_SECTIONS
from ._writer11 import Writer11
from .errors import ChecksumMismatchError, UnsupportedVersionError

#: the versions :func:`migrate` writes
TARGETS = ("1.0", "1.1")


def _tree_bytes(ckpt: Checkpoint) -> Any:
    """The encoded tree as stored (ext types untouched), to write back verbatim."""
    return msgpack.unpackb(ckpt.metadata_bytes(), raw=False, strict_map_key=False)["tree"]


def migrate(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str = "1.1",
            compression: str | None = None, pack: bool | None = None,
            progress: bool | Callable[[int], object] = False,
            durable: bool = True) -> None:
    """Rewrite ``src`` as format ``to`` at ``dst`` (which may be ``src``), losslessly and atomically.

    ``to="1.0"`` decodes every blob (a 1.0 reader can then read the file); ``to="1.1"`` compresses
    at ``compression`` (default ``fast``) and packs small blobs (``pack``, default on). Every blob is
    verified against its checksum as it is read.

    ``progress``: ``True`` draws a tqdm bar on stderr; a callable is the writer's callback, called with
    each increment of tensor bytes written (they add up to the file's decoded tensor bytes).
    """
    if to not in TARGETS:
        raise ValueError(f"cannot migrate to format {to!r}; choose one of {', '.join(TARGETS)}")
    if to == "1.0":
        if compression not in (None, "none") or pack:
            raise ValueError("format 1.0 has no compression or packing; drop --compression / pack")
        level, packed = "none", False
    else:
        level = check_level("fast" if compression is None else compression)
        packed = True if pack is None else pack
    bar = None
    with Checkpoint(src) as ckpt:
        extra = sorted(set(ckpt.manifest.unknown) - KNOWN_SECTIONS)
        if extra:
            raise UnsupportedVersionError(ckpt.path, f"metadata sections {extra} are unknown to this ckptfmt, so "
                                                     "migrating would drop them; upgrade ckptfmt")
        report = ckpt.verify()  # damage is refused up front, before dst is touched
        if not report.ok:
            raise ChecksumMismatchError(ckpt.path, f"cannot migrate a damaged file: {report.errors[0]}",
                                        region="blob")
        tt = ckpt.manifest.tensors
        callback = progress if callable(progress) else None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=int(tt.nbytes.sum()) if len(tt) else 0, unit="B", unit_scale=True, desc="migrate",
                       file=sys.stderr)
        try:
            # each blob streamed through the public block-I/O door: raw ones read, compressed ones decoded
            # a chunk at a time, every one checked against its checksum before its last chunk is handed over
            rows: list[tuple[Any, DType]] = [(ckpt.lazy(i), ckpt.row_dtype(i)) for i in range(len(tt))]
            views = ckpt.manifest.views
            with atomic_write(os.fspath(dst), durable=durable) as fd:
                writer = Writer11(fd, alignment=ckpt.header.alignment, checksum=tt.checksum is not None,
                                  compression=level, pack=packed,
                                  progress=callback if bar is None else bar.update)
                try:
                    writer.write_blobs(rows)
                except BaseException:
                    writer.close()
                    raise
                writer.finish(_tree_bytes(ckpt), producer=ckpt.producer, created=ckpt.created, user=ckpt.metadata,
                              views=views if len(views) else None)
        finally:
            if bar is not None:
                bar.close()
