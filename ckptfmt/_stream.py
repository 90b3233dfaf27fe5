"""Files that are not paths: binary file objects, sockets, pipes and bytes.

A save streams: the format needs no seek, so any object with ``write`` (or a socket's ``sendall``)
receives the file front to back. A load from a stream reads it once, sequentially, into anonymous
memory (``memfd`` where there is one, else an unnamed temporary file), which grows only as bytes
arrive, so it is bounded by the stream's real length; the checkpoint is then validated as any file.
A seekable regular file positioned at its start is read in place through its descriptor.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

from ._atomic import atomic_write
from ._reader import Checkpoint
from ._tables import Limits
from ._writer import Sink

_READ_CHUNK = 8 << 20


def is_path(target: Any) -> bool:
    """Whether ``target`` names a file (str, bytes or ``os.PathLike``) rather than being a stream."""
    return isinstance(target, (str, bytes, os.PathLike))


def name_of(stream: Any) -> str:
    """What messages call a stream: its file name when it has one, else ``<TypeName>``."""
    name = getattr(stream, "name", None)
    return name if isinstance(name, str) else f"<{type(stream).__name__}>"


def _writer_of(stream: Any) -> Sink:
    if hasattr(stream, "sendall"):  # a socket
        return stream.sendall
    write = getattr(stream, "write", None)
    if write is None:
        raise TypeError(f"cannot save to a {type(stream).__name__}: pass a path, a binary file object "
                        "(with write) or a socket")

    def write_all(data: memoryview) -> None:
        while len(data):
            n = write(data)
            if n is None:  # a non-blocking raw stream that would block
                raise BlockingIOError(f"{name_of(stream)}: the stream would block; pass a blocking stream")
            data = data[n:]

    return write_all


@contextlib.contextmanager
def output(target: Any, *, durable: bool) -> Iterator[Sink]:
    """Where a save writes: an atomic temporary for a path; the stream itself for a file object.

    A stream gets no atomic replace (it has no name to replace); with ``durable`` a regular file
    behind it is flushed and fsynced.
    """
    if is_path(target):
        with atomic_write(os.fsdecode(target), durable=durable) as fd:
            yield fd
        return
    yield _writer_of(target)
    flush = getattr(target, "flush", None)
    if flush is not None:
        flush()
    if durable:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fd = target.fileno()
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)


def _anonymous() -> int:
    """A descriptor on anonymous memory (or an unnamed temporary file) to collect a stream in."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        with contextlib.suppress(OSError):
            return int(memfd("ckptfmt-stream", getattr(os, "MFD_CLOEXEC", 0)))
    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


def _in_place(stream: Any) -> int:
    """A duplicate of the stream's descriptor when it is a regular file at offset 0, else -1."""
    try:
        fd = stream.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not stream.seekable() or stream.tell() != 0:
            return -1
    except (AttributeError, OSError, ValueError):
        return -1
    return os.dup(fd)


def _collect(stream: Any, fd: int) -> None:
    """Copy the rest of ``stream`` into ``fd``, a bounded chunk at a time."""
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    if hasattr(stream, "recv_into"):  # a socket
        def readinto(b: memoryview) -> int | None:
            return stream.recv_into(b)
    elif hasattr(stream, "readinto"):
        readinto = stream.readinto
    elif hasattr(stream, "read"):
        def readinto(b: memoryview) -> int | None:
            data = stream.read(len(b))
            b[: len(data)] = data
            return len(data)
    else:
        raise TypeError(f"cannot load from a {type(stream).__name__}: pass a path, bytes, a binary file object "
                        "(with read) or a socket")
    while True:
        n = readinto(view)
        if n is None:
            raise BlockingIOError(f"{name_of(stream)}: the stream would block; pass a blocking stream")
        if n == 0:
            return
        data = view[:n]
        while len(data):
            data = data[os.write(fd, data):]


def open_stream(stream: Any, *, limits: Limits | None = None, **defaults: Any) -> Checkpoint:
    """A :class:`Checkpoint` over a file object: in place if it is a regular file at 0, else read in once."""
    name = name_of(stream)
    fd = _in_place(stream)
    if fd < 0:
        fd = _anonymous()
        try:
            _collect(stream, fd)
        except BaseException:
            os.close(fd)
            raise
    return Checkpoint.from_fd(fd, name, limits=limits, **defaults)


def open_bytes(data: Any, *, limits: Limits | None = None, **defaults: Any) -> Checkpoint:
    """A :class:`Checkpoint` over a bytes-like object (copied once into anonymous memory)."""
    view = memoryview(data).cast("B")
    fd = _anonymous()
    try:
        while len(view):
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return Checkpoint.from_fd(fd, "<bytes>", limits=limits, **defaults)
