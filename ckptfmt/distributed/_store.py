"""Where a distributed checkpoint's bytes go: a local directory, or any fsspec URL (spec/DISTRIBUTED.md §4).

A local checkpoint is written into a hidden staging directory beside its final path and committed
by renaming it there. Object stores have no atomic rename: files go straight under the final
prefix and the index, written last in one PUT, is the commit marker. Transient errors are retried
with exponential backoff.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .._atomic import atomic_write
from ..errors import CheckpointNotFoundError, MissingDependencyError
from ._directory import hold_staging, is_held, old_path, release, remove_dead_attempt, staging_path
from ._index import INDEX_NAME

T = TypeVar("T")

_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.EBUSY, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE}
_TRANSIENT_WORDS = ("SlowDown", "Throttl", "ServiceUnavailable", "RequestTimeout", "InternalError", "503", "500")


def is_transient(e: BaseException) -> bool:
    """A storage error worth retrying: timeouts, lost connections, throttling."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError, InterruptedError, BlockingIOError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
        return True
    return isinstance(e, OSError) and any(w in str(e) for w in _TRANSIENT_WORDS)


def retry(op: Callable[[], T], *, attempts: int = 4, backoff: float = 0.05) -> T:
    """``op()``, retried after ``backoff * 2**i`` s on a transient error, at most ``attempts`` times."""
    for i in range(attempts):
        try:
            return op()
        except Exception as e:
            if i == attempts - 1 or not is_transient(e):
                raise
            time.sleep(backoff * (2 ** i))
    raise AssertionError("unreachable")


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Location:
    """One checkpoint's place: its final path or URL, where its files are staged, and byte I/O on both."""

    def __init__(self, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                 attempts: int = 4) -> None:
        p = os.fspath(path)
        if p.startswith("file://"):
            p = p[len("file://"):]
        self.url = p.rstrip("/") or p
        self.attempts = attempts
        self.remote = _is_url(self.url)
        self.fs: Any = None
        if self.remote:
            try:
                import fsspec
            except ImportError:
                raise MissingDependencyError(
                    "a checkpoint URL needs fsspec: pip install 'ckptfmt[distributed]'") from None
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
            self.staging = self.root
        else:
            self.root = os.path.abspath(self.url)
            self.staging = staging_path(self.root)
            self.old = old_path(self.root)
        self._held: int | None = None  # the coordinator's lock on its staging directory (liveness)
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _retry(self, op: Callable[[], T]) -> T:
        return retry(op, attempts=self.attempts)

    def join(self, base: str, name: str) -> str:
        return f"{base}/{name}" if self.remote else os.path.join(base, name)

    # -- saving
    def prepare_staging(self, *, overwrite: bool) -> None:
        """Coordinator, before any rank writes: an empty staging place; leftovers of a failed attempt go."""
        if self.remote:
            fs = self.fs
            idx = self.join(self.root, INDEX_NAME)
            if self._retry(lambda: fs.exists(idx)):
                if not overwrite:
                    raise FileExistsError(f"{self.url}: a committed checkpoint exists (overwrite=False)")
                self._retry(lambda: fs.rm(idx))  # un-commit first: the old files are no longer a checkpoint
            if self._retry(lambda: fs.exists(self.root)):
                self._retry(lambda: fs.rm(self.root, recursive=True))
            return
        if not overwrite and os.path.exists(os.path.join(self.root, INDEX_NAME)):
            raise FileExistsError(f"{self.url}: a committed checkpoint exists (overwrite=False)")
        release(self._held)  # this writer's own earlier attempt, if any, is dead from here on
        self._held = None
        if not self._remove_unless_live():  # another save of this checkpoint is running: its files are not ours
            raise FileExistsError(f"{self.url}: another save of this checkpoint is in progress (its staging "
                                  f"directory {self.staging} is locked by a live writer)")
        self._held = hold_staging(self.staging)  # held until the commit or abort is complete

    def _remove_unless_live(self) -> bool:
        """Remove the local staging directory unless another live writer holds it; False when one does."""
        if not os.path.lexists(self.staging) or remove_dead_attempt(self.staging):
            return True
        if is_held(self.staging):
            return False
        shutil.rmtree(self.staging, ignore_errors=True)  # where directories cannot be locked
        return True

    def put_container(self, name: str, write: Callable[[str], None]) -> None:
        """Let ``write(local_path)`` write container ``name``, then move it into the staging place."""
        if not self.remote:
            os.makedirs(self.staging, exist_ok=True)
            write(os.path.join(self.staging, name))
            return
        fd, tmp = tempfile.mkstemp(prefix=".ckptfmt-upload-", suffix=".ckpt")
        os.close(fd)
        try:
            write(tmp)
            self._retry(lambda: self.fs.put_file(tmp, self.join(self.staging, name)))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def remove_staged(self, name: str) -> None:
        """Best-effort removal of one staged file (a failed rank cleans up its own)."""
        with contextlib.suppress(Exception):
            if self.remote:
                self.fs.rm(self.join(self.staging, name))
            else:
                os.unlink(os.path.join(self.staging, name))

    def staged_size(self, name: str) -> int:
        if self.remote:
            return int(self._retry(lambda: self.fs.size(self.join(self.staging, name))))
        return os.path.getsize(os.path.join(self.staging, name))

    def commit(self, index: bytes, keep: set[str], *, durable: bool = True) -> None:
        """Write the index (the commit record) and publish the staging place as the checkpoint."""
        if self.remote:
            for p in self._retry(lambda: self.fs.ls(self.staging, detail=False)):
                if p.rstrip("/").rsplit("/", 1)[-1] not in keep:
                    self._retry(functools.partial(self.fs.rm, p, recursive=True))
            self._retry(lambda: self.fs.pipe_file(self.join(self.staging, INDEX_NAME), index))
            return
        for n in os.listdir(self.staging):
            if n not in keep:
                p = os.path.join(self.staging, n)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        with atomic_write(os.path.join(self.staging, INDEX_NAME), durable=durable) as fd:
            view = memoryview(index)
            while view:
                view = view[os.write(fd, view):]
        shutil.rmtree(self.old, ignore_errors=True)
        if os.path.lexists(self.root):
            os.rename(self.root, self.old)  # a directory cannot be renamed over a non-empty one
        os.rename(self.staging, self.root)
        if durable:
            _fsync_dir(os.path.dirname(self.root))
        shutil.rmtree(self.old, ignore_errors=True)
        release(self._held)
        self._held = None

    def abort(self) -> None:
        """Remove a failed attempt: the staging directory (local) or the uncommitted prefix (remote).

        Locally only an attempt this location holds, or one whose writer is provably gone: a staging
        directory another live save holds (one that refused this save) is left to that save.
        """
        with contextlib.suppress(Exception):
            if self.remote:
                if not self.fs.exists(self.join(self.root, INDEX_NAME)) and self.fs.exists(self.root):
                    self.fs.rm(self.root, recursive=True)
            elif self._held is not None:
                shutil.rmtree(self.staging, ignore_errors=True)  # ours: we hold its lock
            else:
                self._remove_unless_live()
        release(self._held)
        self._held = None

    # -- loading
    def read_index(self, max_bytes: int) -> bytes:
        """The index bytes; :class:`CheckpointNotFoundError` when there is no committed checkpoint."""
        p = self.join(self.root, INDEX_NAME)
        if self.remote:
            if not self._retry(lambda: self.fs.exists(p)):
                raise CheckpointNotFoundError(p)
            size = int(self._retry(lambda: self.fs.size(p)))
            if size > max_bytes:
                return b"\0" * (max_bytes + 1)  # the parser reports the cap
            return bytes(self._retry(lambda: self.fs.cat_file(p)))
        if not os.path.isfile(p):
            raise CheckpointNotFoundError(p)
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
        return data

    def file_size(self, name: str) -> int:
        p = self.join(self.root, name)
        if self.remote:
            return int(self._retry(lambda: self.fs.size(p)))
        return os.path.getsize(p)

    def local_path(self, name: str) -> str | None:
        return None if self.remote else os.path.join(self.root, name)

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of file ``name`` at ``offset`` (a short file raises)."""
        n = len(out)
        if n == 0:
            return
        if self.remote:
            p = self.join(self.root, name)
            data = self._retry(lambda: self.fs.cat_file(p, start=offset, end=offset + n))
            if len(data) != n:
                raise EOFError(f"{p}: {len(data)} bytes at {offset}, expected {n}")
            out[:] = data
        else:
            fd = self._fd(name)
            done = 0
            while done < n:
                k = self._retry(functools.partial(os.preadv, fd, [out[done:]], offset + done))
                if k <= 0:
                    raise EOFError(f"{self.join(self.root, name)}: ends before byte {offset + n}")
                done += k
        with self._lock:
            self.bytes_read += n

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                p = os.path.join(self.root, name)
                try:
                    fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    raise CheckpointNotFoundError(p) from None
                self._fds[name] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        release(getattr(self, "_held", None))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        state["_lock"] = None
        state["_held"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
