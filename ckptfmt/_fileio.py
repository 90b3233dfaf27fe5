"""The open file under a :class:`~ckptfmt.Checkpoint`: positional reads that outlive no close, and shared maps.

Three lifetime rules (issue 9, "memory maps that outlive their welcome"):

1. A read in flight keeps the descriptor open: :class:`SharedFile` counts its readers, and ``close``
   only marks it closed; the descriptor is closed when the last reader finishes. A read that starts
   after ``close`` raises :class:`~ckptfmt.errors.CheckpointClosedError`, so a reused descriptor
   number can never hand one file's bytes to a reader of another.
2. Read-only maps are shared: every read-only load of one file (same device, inode, size and
   modification time) uses one ``ACCESS_READ`` map, so live arrays of many loads hold one descriptor,
   not one each (Python < 3.13 duplicates the descriptor for each map; 3.13+ is told not to).
3. Private copy-on-write maps (``ACCESS_COPY``, which count as committed memory on hosts with strict
   overcommit) are made only for loads that hand out writable arrays (torch).

Portability: ``os.preadv`` is used where it exists (it releases the GIL and fills the buffer in
place), else ``os.pread``, else seek and ``readinto`` under a lock (Windows has neither).
"""

from __future__ import annotations

import io
import mmap as _mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import CheckpointClosedError

__all__ = ["SharedFile", "madvise_populate", "map_file", "pread_exact"]

#: which positional read this platform has: "preadv", "pread" or "seek" (tests change it to simulate others)
READ_METHOD = "preadv" if hasattr(os, "preadv") else "pread" if hasattr(os, "pread") else "seek"


def _populate_read_advice() -> int | None:
    """``MADV_POPULATE_READ`` if this Python defines it; on Linux the kernel's fixed number (22, 5.14+)."""
    found = getattr(_mmap, "MADV_POPULATE_READ", None)
    if found is not None:
        return int(found)
    return 22 if sys.platform.startswith("linux") else None


POPULATE_READ = _populate_read_advice()


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` of ``fd`` (fewer at end of file), for a caller that owns the descriptor."""
    seek = READ_METHOD == "seek"
    if seek:
        os.lseek(fd, offset, os.SEEK_SET)
    parts: list[bytes] = []
    got = 0
    while got < n:
        more = os.read(fd, n - got) if seek else os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class SharedFile:
    """A read-only descriptor shared by every read of one checkpoint, closed after the last of them."""

    def __init__(self, fd: int, path: str) -> None:
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()
        self._seek_lock = threading.Lock()
        self._raw: io.FileIO | None = None
        self._users = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (reads in flight may still be finishing)."""
        return self._closed

    def fileno(self) -> int:
        """The descriptor, for a caller that already holds it with :meth:`held`."""
        return self._fd

    def _closed_error(self) -> CheckpointClosedError:
        return CheckpointClosedError(f"{self.path}: checkpoint is closed")

    @contextmanager
    def held(self) -> Iterator[int]:
        """The descriptor, kept open until the block ends even if :meth:`close` is called meanwhile."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._users += 1
        try:
            yield self._fd
        finally:
            with self._lock:
                self._users -= 1
                last = self._closed and not self._users
            if last:
                self._release()

    def close(self) -> None:
        """No new reads; the descriptor is closed now, or when the last read in flight ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            last = not self._users
        if last:
            self._release()

    def _release(self) -> None:
        if self._raw is not None:
            self._raw.close()  # closefd=False: only the Python object
        os.close(self._fd)

    def readinto(self, dest: memoryview, offset: int) -> int:
        """Read ``len(dest)`` bytes at ``offset`` into ``dest``; fewer only at end of file. Holds the file."""
        with self.held() as fd:
            return self.readinto_held(fd, dest, offset)

    def readinto_held(self, fd: int, dest: memoryview, offset: int) -> int:
        """:meth:`readinto` for a caller inside :meth:`held` (``fd`` is what it yielded)."""
        done, n = 0, len(dest)
        method = READ_METHOD
        if method == "seek":
            return self._seek_readinto(dest, offset)
        while done < n:
            if method == "preadv":
                got = os.preadv(fd, [dest[done:]], offset + done)
            else:
                data = os.pread(fd, n - done, offset + done)
                got = len(data)
                dest[done : done + got] = data
            if got <= 0:
                break
            done += got
        return done

    def _seek_readinto(self, dest: memoryview, offset: int) -> int:
        """Windows: no positional read, so seek and read under a lock (readers of one file take turns)."""
        with self._seek_lock:
            if self._raw is None:
                self._raw = io.FileIO(self._fd, "rb", closefd=False)
            self._raw.seek(offset)
            done = 0
            while done < len(dest):
                got = self._raw.readinto(dest[done:])
                if not got:
                    break
                done += got
            return done


_SHARED: weakref.WeakValueDictionary[tuple[Any, ...], _mmap.mmap] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _new_map(fd: int, access: int) -> _mmap.mmap:
    if sys.version_info >= (3, 13) and sys.platform != "win32":  # Unix's mmap takes trackfd (3.13+)
        return _mmap.mmap(fd, 0, access=access, trackfd=False)  # type: ignore[call-arg,unused-ignore]
    return _mmap.mmap(fd, 0, access=access)


def map_file(file: SharedFile, *, writable: bool) -> _mmap.mmap:
    """A map of the whole file: private copy-on-write if ``writable``, else the process's shared read-only map."""
    with file.held() as fd:
        if writable:
            return _new_map(fd, _mmap.ACCESS_COPY)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _SHARED_LOCK:
            mm = _SHARED.get(key)
            if mm is None or mm.closed:
                mm = _new_map(fd, _mmap.ACCESS_READ)
                _SHARED[key] = mm
            return mm


def madvise_populate(mm: _mmap.mmap, start: int, length: int) -> None:
    """Ask the kernel to read ``[start, start + length)`` of the map in now (best effort)."""
    for advice in (POPULATE_READ, getattr(_mmap, "MADV_WILLNEED", None)):
        if advice is None:
            continue
        try:
            mm.madvise(advice, start, length)
            return
        except (OSError, ValueError, AttributeError):
            continue
