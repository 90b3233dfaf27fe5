"""Background saves: tensors are copied into a bounded pool of host buffers, then written by a thread.

The caller's thread stages (copies) every tensor's bytes into slabs of a :class:`StagingPool` and
returns once the last byte is copied, so later changes to the tensors cannot reach the checkpoint;
a writer thread streams the staged bytes to the file meanwhile, handing each slab back to the pool
as soon as it is written. When the pool is smaller than the state, staging waits for slabs the
writer frees: memory stays bounded by the pool, and the call returns when the tail is staged.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ._backend import Source
from ._dtypes import DType
from ._writer import _as_bytes, _needs_conversion, contiguous_chunks

#: Default pool: enough to stage a typical checkpoint whole, so a save costs one memory copy.
DEFAULT_POOL_BYTES = 1 << 30
DEFAULT_SLAB_BYTES = 16 << 20
#: Pieces this large are copied on the pool's copy threads (numpy releases the GIL while copying).
PARALLEL_COPY = 1 << 20
_COPIERS = max(1, min(4, os.cpu_count() or 1))

_END, _ABORT = object(), object()


class StagingPool:
    """A bounded, reusable set of host buffers (slabs) for background saves.

    ``capacity``: most bytes the pool ever holds; ``slab``: size of one buffer. Slabs are allocated
    on first use and kept for the next save; with ``pin`` (set automatically when a CUDA tensor is
    staged) they are page-locked through torch, for fast device-to-host copies. One save at a time
    uses a pool: a second waits for the first (and re-raises its error if nobody has seen it).
    """

    def __init__(self, capacity: int = DEFAULT_POOL_BYTES, *, slab: int = DEFAULT_SLAB_BYTES,
                 pin: bool = False) -> None:
        if slab <= 0 or capacity < slab:
            raise ValueError(f"a staging pool needs slab > 0 and capacity >= slab (got {capacity}, {slab})")
        self.capacity = capacity
        self.slab = slab
        self.pin = pin
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()
        self._copiers: ThreadPoolExecutor | None = None
        self.inflight: SaveHandle | None = None
        #: Held by the save that is staging: saves from several threads through one pool take turns.
        self.turn = threading.Lock()

    def copier(self) -> ThreadPoolExecutor | None:
        """The threads that copy large pieces (None on a single core: the caller copies)."""
        if _COPIERS < 2:
            return None
        with self._lock:
            if self._copiers is None:
                self._copiers = ThreadPoolExecutor(_COPIERS, thread_name_prefix="ckptfmt-stage")
            return self._copiers

    @property
    def allocated(self) -> int:
        """Bytes of host memory the pool holds now."""
        return self._made * self.slab

    def _new_slab(self) -> np.ndarray:
        if self.pin:
            try:
                import torch

                if torch.cuda.is_available():
                    return torch.empty(self.slab, dtype=torch.uint8, pin_memory=True).numpy()
            except ImportError:
                pass
        return np.empty(self.slab, dtype=np.uint8)

    def take(self, cancelled: Callable[[], bool], starved: Callable[[], None]) -> np.ndarray:
        """A free slab: a kept one, a new one while under capacity, or the next one the writer frees.

        ``starved()`` is called before waiting for the writer (which may be holding off until then).
        """
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if (self._made + 1) * self.slab <= self.capacity:
                self._made += 1
                return self._new_slab()
        starved()
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if cancelled():
                    raise _Cancelled from None

    def give(self, slab: np.ndarray) -> None:
        """Hand a written slab back."""
        self._free.put(slab)


class _Cancelled(Exception):
    """The writer failed while staging waited for a slab; its error is the one reported."""


class SaveHandle:
    """A background save in flight: :meth:`wait` for it, ask :meth:`done`, or read :meth:`exception`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.seen = False  # whether the error (if any) has been handed to the user

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    def join(self) -> None:
        """Block until the save ends, raising nothing."""
        self._done.wait()

    @property
    def unseen_error(self) -> BaseException | None:
        """The save's error if it failed and no call has handed it to the user yet."""
        return None if self.seen else self._error

    def done(self) -> bool:
        """True once the file is complete (renamed into place) or the save has failed."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the save ends; re-raise its error. ``TimeoutError`` if ``timeout`` runs out first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.path}: background save still running after {timeout} s")
        if self._error is not None:
            self.seen = True
            raise self._error

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error, or None when it succeeded (waits for the end, as :meth:`wait`)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.path}: background save still running after {timeout} s")
        self.seen = True
        return self._error

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error is not None else "done")
        return f"<SaveHandle {self.path!r} {state}>"


class StagedSource:
    """One tensor's bytes as staged pieces, for the writer (a ``DeviceSource``): yields them as they come."""

    def __init__(self, shape: tuple[int, ...], itemsize: int, nbytes: int, feed: _Feed) -> None:
        self.shape = shape
        self.ndim = len(shape)
        self.itemsize = itemsize
        self.nbytes = nbytes
        self._feed = feed

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The staged pieces, in order; each stays valid until the next is asked for."""
        left = self.nbytes
        while left:
            piece = self._feed.next_piece()
            left -= piece.nbytes
            yield piece


class _Feed:
    """The FIFO between staging and writing: pieces of tensors, and slabs to hand back once written."""

    def __init__(self, pool: StagingPool) -> None:
        self._pool = pool
        self._q: queue.Queue[Any] = queue.Queue()

    def put_piece(self, piece: np.ndarray, copied: Future[Any] | None = None) -> None:
        self._q.put(piece if copied is None else (copied, piece))

    def put_release(self, slab: np.ndarray) -> None:
        self._q.put(_Release(slab))

    def put_end(self, aborted: bool) -> None:
        self._q.put(_ABORT if aborted else _END)

    def next_piece(self) -> np.ndarray:
        while True:
            item = self._q.get()
            if type(item) is _Release:
                self._pool.give(item.slab)
            elif type(item) is tuple:  # a piece still being copied on a copy thread
                item[0].result()
                return item[1]
            elif item is _ABORT:
                raise _Cancelled("staging failed")
            elif item is _END:
                raise RuntimeError("staging ended before every tensor's bytes arrived")  # a bug, not an input
            else:
                return item

    def drain(self) -> None:
        """Consume everything up to the end marker, handing slabs back (after success or failure)."""
        while True:
            item = self._q.get()
            if type(item) is _Release:
                self._pool.give(item.slab)
            elif item is _END or item is _ABORT:
                return


class _Release:
    """A feed item: the slab before it is fully written, hand it back to the pool."""

    __slots__ = ("slab",)

    def __init__(self, slab: np.ndarray) -> None:
        self.slab = slab


def staged_rows(rows: list[tuple[Source, DType]], feed: _Feed) -> list[tuple[Source, DType]]:
    """The rows as the writer will read them: the same shapes and sizes, bytes from the feed."""
    return [(StagedSource(tuple(int(d) for d in src.shape), src.itemsize, src.nbytes, feed), dtype)
            for src, dtype in rows]


class Stager:
    """Copies rows into the pool's slabs, in table order, and feeds the pieces to the writer."""

    def __init__(self, pool: StagingPool, feed: _Feed, cancelled: Callable[[], bool]) -> None:
        self._pool, self._feed, self._cancelled = pool, feed, cancelled
        #: Set when the writer may start: staging is done, or it needs the slabs the writer frees.
        #: Until then the two do not compete for the memory bus, and the caller's stall is one copy.
        self.go = threading.Event()
        self._slab: np.ndarray | None = None
        self._used = 0
        self._copier = pool.copier()
        self._pending: list[Future[Any]] = []

    def _room(self) -> np.ndarray:
        if self._slab is None or self._used == self._pool.slab:
            if self._slab is not None:
                self._feed.put_release(self._slab)
            self._slab = self._pool.take(self._cancelled, self.go.set)
            self._used = 0
        return self._slab

    def _copy(self, raw: np.ndarray) -> None:
        done, n = 0, raw.nbytes
        while done < n:
            slab = self._room()
            k = min(n - done, self._pool.slab - self._used)
            dest = slab[self._used : self._used + k]
            if self._copier is not None and k >= PARALLEL_COPY:
                copied = self._copier.submit(np.copyto, dest, raw[done : done + k])
                self._pending.append(copied)
                self._feed.put_piece(dest, copied)
            else:
                np.copyto(dest, raw[done : done + k])
                self._feed.put_piece(dest)
            self._used += k
            done += k

    def stage(self, rows: list[tuple[Source, DType]]) -> None:
        """Copy each row's bytes into slabs, in table order (the order the writer asks for them)."""
        for src, _ in rows:
            if not src.nbytes:
                continue
            if self._cancelled():
                raise _Cancelled
            if isinstance(src, np.ndarray):
                if _needs_conversion(src):
                    for chunk in contiguous_chunks(src):
                        self._copy(chunk)
                else:
                    self._copy(_as_bytes(src))
            else:
                self._pool.pin = True  # a device array: page-locked slabs from now on
                for chunk in src.chunks(self._pool.slab):
                    self._copy(np.asarray(chunk).reshape(-1).view(np.uint8))
                    self.settle()  # a device chunk is valid only until the next one
        self.settle()

    def settle(self) -> None:
        """Wait for every copy in flight (after this, the caller's arrays may change); raise the first error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def finish(self) -> None:
        """Hand the last slab back after its pieces, and mark the end."""
        if self._slab is not None:
            self._feed.put_release(self._slab)
            self._slab = None
        self._feed.put_end(False)
        self.go.set()
