"""Activation checkpointing: keep the activations a backward pass needs, within a memory budget.

    >>> from ckptfmt.torch.activations import ActivationCheckpointManager, offload_saved_tensors
    >>> with ActivationCheckpointManager(memory_budget=2 << 30) as acts:
    ...     with offload_saved_tensors(acts):
    ...         loss = model(x).sum()
    ...     loss.backward()          # saved tensors come back from pinned memory or disk as needed

:class:`ActivationCheckpointManager` is a thread-safe store of named tensors ("layer ids"):
:meth:`~ActivationCheckpointManager.register`, :meth:`~ActivationCheckpointManager.retrieve_or_recompute`
(a miss runs the recompute function and stores its result), statistics (:class:`MemoryStats`).
Sizes are ``numel * element_size`` (bfloat16 is 2 bytes), whatever the tensor's strides.

**Memory budget and spilling.** With ``memory_budget=`` (bytes, for each device separately: one int
for all, or a mapping such as ``{"cuda": 8 << 30, "cpu": 32 << 30}``), registering a tensor that would
take a device over its budget first moves that device's least recently used entries one tier down:
a CUDA tensor to pinned host memory (which counts against the ``"cpu"`` budget), a host tensor to a
ckptfmt file in the spill directory (``spill_dir=``, by default a fresh temporary directory removed
by :meth:`~ActivationCheckpointManager.close`). A spill file holds the tensor's bytes as one uint8
blob (so every torch dtype spills), with its dtype and shape in the file's metadata; it is written by
``ckptfmt.torch.save`` with checksums and without fsync (scratch data), and verified when read back.
Retrieving a spilled entry brings it back to its own device (spilling others if it has to) and
returns a new tensor with the same values, dtype, shape and, when the original was dense, the same
strides, but no autograd history. A tensor larger than the whole budget of its device is spilled as
soon as it is registered and never made resident again: each retrieve returns a fresh copy read back
from the next tier. Only the manager's own reference is dropped on a spill: the memory comes back
only when nothing else holds the tensor. Tensors that cannot be written out (sparse, quantized,
tensor subclasses, devices other than CPU and CUDA) count against the budget but are never spilled.
Spills and restores are synchronous (a CUDA-to-pinned copy is queued on the current stream) and run
under the manager's write lock; nothing is prefetched ahead of backward.

**Offload or recompute?** :func:`offload_saved_tensors` routes every tensor autograd saves for backward
through a manager, so saved activations obey the budget: it trades I/O (PCIe copies, disk writes and
reads) and host memory or disk space for device memory, backward sees bitwise the same values, and
the gradients are bitwise those of a run without it. ``torch.utils.checkpoint`` instead drops what a
segment saves and runs the segment's forward again in backward: it trades compute (about one more
forward of the segment) for memory, needs no I/O and no host memory, and relies on the segment
recomputing the same values (it restores the RNG state; non-deterministic kernels can still differ).
Prefer recompute for activations that are large but cheap to recompute (elementwise ops, norms,
activation functions, small MLPs), and when the host link or the disk is slower than recomputing.
Prefer offload for activations that are expensive to recompute (attention, long matmul chains),
when host memory or fast local disk is plentiful, or when the recomputed values must not differ.
The two compose: inside a checkpointed segment ``torch.utils.checkpoint``'s own hooks take precedence
(nothing is stored), while the segment's inputs, which checkpoint keeps, and everything outside it
go through the manager (use ``use_reentrant=False``). ``benchmarks/bench_activations.py`` measures
the three on a model with large activations.

Thread safety: lookups (``retrieve_or_recompute`` hits, ``has``, ``len``, ``memory_stats``) take a
shared read lock and run concurrently, also on the same id; ``register``, ``clear``, ``close``, and
the restore of a spilled entry take the exclusive write lock.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import itertools
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._api import open as _ckpt_open
from ..errors import CheckpointError
from . import save as _ckpt_save

__all__ = [
    "ActivationCheckpointManager",
    "ActivationNotFoundError",
    "DuplicateActivationError",
    "ManagerClosedError",
    "MemoryStats",
    "SavedTensorModifiedError",
    "offload_saved_tensors",
]

Location = Literal["device", "host", "disk"]

# ---------------------------------------------------------------- errors


class DuplicateActivationError(CheckpointError, ValueError):
    """An activation is already registered under this layer id."""


class ActivationNotFoundError(CheckpointError, KeyError):
    """No activation is registered under this layer id, and no recompute function was given."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SavedTensorModifiedError(CheckpointError, RuntimeError):
    """Backward needs a tensor that was changed in place after autograd saved it (as autograd itself raises)."""


class ManagerClosedError(CheckpointError, RuntimeError):
    """The manager was closed; it holds nothing and accepts no more calls."""


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class MemoryStats:
    """A snapshot of a manager's memory (bytes are ``numel * element_size`` of the tensors).

    ``spilled_bytes``, ``spill_count``, ``restore_count``, ``spill_seconds``, ``restore_seconds`` and
    ``recompute_count`` add up since the manager was made, like the peak; :meth:`clear` keeps them.
    A CUDA tensor that goes to pinned memory and then to disk counts as two spills.
    """

    #: bytes of the registered activations held in memory (on their device or in pinned host memory)
    current_memory_used: int
    #: the highest ``current_memory_used`` since the manager was made (kept by ``clear``)
    peak_memory_used: int
    #: number of registered activations, wherever they are
    checkpoint_count: int
    #: ``total_bytes // checkpoint_count`` (0 when empty)
    average_memory_per_checkpoint: int
    #: bytes of registered activations not on their own device now (moved to pinned memory or disk)
    memory_savings: int
    #: up to ``top`` ids, most retrieved first (ties: the earlier registered first)
    most_accessed: tuple[str, ...]
    #: up to ``top`` ids, least retrieved first (ties: the earlier registered first)
    least_accessed: tuple[str, ...]
    #: bytes of all registered activations, wherever they are
    total_bytes: int
    #: bytes of registered activations in spill files now
    disk_bytes: int
    #: bytes moved down a tier (device to pinned host, host to disk) so far
    spilled_bytes: int
    spill_count: int
    #: retrievals served from pinned memory or disk so far
    restore_count: int
    spill_seconds: float
    restore_seconds: float
    #: misses answered by a recompute function so far
    recompute_count: int


# ---------------------------------------------------------------- a readers-writer lock


class _RWLock:
    """Many readers or one writer. A waiting writer holds back new readers, so writers never starve.

    Not reentrant: :meth:`held` tells whether the calling thread is inside (then it must not wait).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()

    def held(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def release_read(self) -> None:
        self._local.depth -= 1
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def release_write(self) -> None:
        self._local.depth -= 1
        with self._cond:
            self._writer = False
            self._cond.notify_all()


# ---------------------------------------------------------------- entries


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _spillable(t: torch.Tensor) -> bool:
    return (type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)) and t.layout == torch.strided \
        and not t.is_quantized and t.device.type in ("cpu", "cuda")


def _storage_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation that makes a dense, non-overlapping, non-contiguous ``t`` contiguous (None otherwise)."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    strides = t.stride()
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], d)))
    return perm if t.permute(perm).is_contiguous() else None


class _Entry:
    __slots__ = ("access_count", "counter_lock", "created_at", "device", "dtype", "event", "host", "key", "modified",
                 "nbytes", "path", "perm", "pool", "seq", "spillable", "stored_shape", "tensor", "version", "where")

    def __init__(self, key: str, tensor: torch.Tensor, seq: int) -> None:
        self.key = key
        self.seq = seq
        self.tensor: torch.Tensor | None = tensor  # the tensor on its device while where == "device"
        self.host: torch.Tensor | None = None  # pinned copy (storage order) while where == "host"
        self.event: Any = None  # CUDA event that completes the copy into ``host``
        self.path: str | None = None  # spill file while where == "disk"
        self.where: Location = "device"
        self.pool: str | None = None  # the pool whose bytes count it (None: not counted, or on disk)
        self.nbytes = _nbytes(tensor)
        self.device = tensor.device
        self.dtype = tensor.dtype
        self.perm = _storage_order(tensor)
        shape = tuple(tensor.shape)
        self.stored_shape = tuple(shape[d] for d in self.perm) if self.perm is not None else shape
        self.spillable = _spillable(tensor)
        self.created_at = time.time()
        self.access_count = 0
        self.counter_lock = threading.Lock()
        #: for autograd's saved tensors: the version it saved, and whether it was changed in place before a spill
        self.version: int | None = None
        self.modified = False

    def check_version(self) -> None:
        """Note (before its data leaves the device) whether a saved tensor was changed in place since it was saved."""
        if self.version is not None and self.tensor is not None and self.tensor._version != self.version:
            self.modified = True

    def changed(self, tensor: torch.Tensor) -> str | None:
        """Why ``tensor``, retrieved for backward, is not what autograd saved (None when it is)."""
        if self.version is None:
            return None
        if self.modified:
            return f"it was modified in place before it was offloaded; expected version {self.version}"
        if self.tensor is tensor and tensor._version != self.version:
            return f"is at version {tensor._version}; expected version {self.version} instead"
        return None

    def stored(self, t: torch.Tensor, *, contiguous: bool) -> torch.Tensor:
        """``t`` (this entry's tensor) in storage order, without a copy when it is dense."""
        t = t.detach()
        if self.perm is not None:
            return t.permute(self.perm)
        return t.contiguous() if contiguous else t

    def unstored(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`stored`: the original dims (and strides, when it was dense)."""
        if self.perm is None:
            return t
        inverse = [0] * len(self.perm)
        for i, d in enumerate(self.perm):
            inverse[d] = i
        return t.permute(inverse)


def _pool(device: torch.device) -> str:
    """The budget pool of a device: ``"cpu"``, ``"cuda:0"``, ..."""
    return str(device)


# ---------------------------------------------------------------- the manager


class ActivationCheckpointManager:
    """A thread-safe store of activations by layer id, with an optional per-device memory budget.

    ``memory_budget``: None (no limit), bytes for each device, or a mapping from ``"cpu"``, ``"cuda"``
    or ``"cuda:N"`` to bytes (devices not named have no limit). ``spill_dir``: where host entries are
    spilled as ckptfmt files; by default a temporary directory made on the first spill and removed by
    :meth:`close` (a given directory is kept, only the manager's files are removed).
    """

    def __init__(self, *, memory_budget: int | Mapping[str, int] | None = None,
                 spill_dir: str | os.PathLike[str] | None = None) -> None:
        self._budgets: dict[str, int] | None
        self._budget_all: int | None = None
        if memory_budget is None:
            self._budgets = None
        elif isinstance(memory_budget, Mapping):
            self._budgets = {str(k): _check_budget(v) for k, v in memory_budget.items()}
        else:
            self._budgets = None
            self._budget_all = _check_budget(memory_budget)
        self._given_dir = os.fspath(spill_dir) if spill_dir is not None else None
        self._dir: str | None = None
        self._dir_finalizer: weakref.finalize | None = None
        self._lock = _RWLock()
        self._entries: dict[str, _Entry] = {}
        #: resident spillable entries of each pool ("cpu", "cuda:0", ...), least recently used first
        self._lru: dict[str, collections.OrderedDict[str, _Entry]] = {}
        #: bytes held in each pool
        self._used: dict[str, int] = {}
        #: entries retrieved under the read lock, moved to the LRU end by the next writer
        self._touched: collections.deque[_Entry] = collections.deque(maxlen=1 << 16)
        #: ids whose removal was asked for by a thread inside the lock (applied by the next writer)
        self._pending: collections.deque[str] = collections.deque()
        self._seq = itertools.count()
        self._current = 0
        self._peak = 0
        self._total = 0
        self._spilled_bytes = 0
        self._spill_count = 0
        self._restore_count = 0
        self._spill_seconds = 0.0
        self._restore_seconds = 0.0
        self._recompute_count = 0
        self._closed = False
        #: whether accesses reorder the LRU lists (only a budget ever consults them)
        self._tracks_use = memory_budget is not None
        self._saved = _SavedTensors()

    # -- context manager
    def __enter__(self) -> ActivationCheckpointManager:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def spill_dir(self) -> str | None:
        """The spill directory in use (None until the first spill to disk when none was given)."""
        return self._dir if self._dir is not None else self._given_dir

    # -- public operations
    def register(self, layer_id: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (the tensor itself, not a copy) under ``layer_id``.

        Raises :class:`DuplicateActivationError` if the id is taken, ``ValueError`` for an empty id,
        ``TypeError`` for a non-str id or a non-tensor, :class:`ManagerClosedError` after close.
        """
        _check_id(layer_id)
        _check_tensor(tensor, "tensor")
        self._lock.acquire_write()
        try:
            self._write_prologue()
            if layer_id in self._entries:
                raise DuplicateActivationError(f"an activation is already registered as {layer_id!r}")
            self._insert(layer_id, tensor)
        finally:
            self._lock.release_write()

    def retrieve_or_recompute(self, layer_id: str,
                              recompute: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """The activation stored as ``layer_id`` (counted as an access), restored first if it was spilled.

        On a miss, ``recompute()`` is called (outside the lock), its result registered and returned
        (a miss is not an access; should another thread register the id meanwhile, its tensor wins);
        without ``recompute`` a miss raises :class:`ActivationNotFoundError`.
        """
        _check_id(layer_id)
        self._lock.acquire_read()
        try:
            self._check_open()
            entry = self._entries.get(layer_id)
            if entry is not None and entry.where == "device":
                tensor = entry.tensor
                self._hit(entry)
                assert tensor is not None
                return tensor
        finally:
            self._lock.release_read()
        if entry is not None:  # spilled: restoring it changes the state
            found = self._retrieve_exclusive(layer_id)
            if found is not None:
                return found
        if recompute is None:
            raise ActivationNotFoundError(f"no activation registered as {layer_id!r} and no recompute function")
        tensor = recompute()
        _check_tensor(tensor, "recompute() result")
        self._lock.acquire_write()
        try:
            self._write_prologue()
            entry = self._entries.get(layer_id)
            if entry is not None:  # another thread got there first
                return self._retrieve_locked(entry)
            self._insert(layer_id, tensor)
            self._recompute_count += 1
            return tensor
        finally:
            self._lock.release_write()

    def _register_saved(self, layer_id: str, tensor: torch.Tensor, version: int) -> None:
        """:meth:`register` for autograd: remembers ``version`` so that backward can tell an in-place change."""
        self._lock.acquire_write()
        try:
            self._write_prologue()
            if layer_id in self._entries:
                raise DuplicateActivationError(f"an activation is already registered as {layer_id!r}")
            self._insert(layer_id, tensor, version)
        finally:
            self._lock.release_write()

    def _retrieve_saved(self, layer_id: str) -> torch.Tensor:
        """For backward: the saved tensor, or :class:`SavedTensorModifiedError` as autograd raises it."""
        tensor = self.retrieve_or_recompute(layer_id)
        self._lock.acquire_read()
        try:
            entry = self._entries.get(layer_id)
            why = entry.changed(tensor) if entry is not None else None
        finally:
            self._lock.release_read()
        if why is not None:
            raise SavedTensorModifiedError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{tensor.dtype} {list(tensor.shape)}] saved under offload_saved_tensors {why}. Hint: do not "
                "modify in place a tensor autograd saved (clone it first)")
        return tensor

    def has(self, layer_id: str) -> bool:
        """Whether an activation is registered as ``layer_id`` (wherever it is now)."""
        _check_id(layer_id, allow_empty=True)
        self._lock.acquire_read()
        try:
            self._check_open()
            return layer_id in self._entries
        finally:
            self._lock.release_read()

    __contains__ = has

    def access_count(self, layer_id: str) -> int:
        """How many times ``layer_id`` was retrieved (0 right after register or recompute)."""
        entry = self._lookup(layer_id)
        return entry.access_count

    def location(self, layer_id: str) -> Location:
        """Where ``layer_id`` is now: ``"device"`` (its own), ``"host"`` (pinned memory) or ``"disk"``."""
        return self._lookup(layer_id).where

    def clear(self) -> None:
        """Drop every activation (and delete its spill file); keeps the peak and cumulative counters."""
        self._lock.acquire_write()
        try:
            self._write_prologue()
            self._clear_locked()
        finally:
            self._lock.release_write()

    def memory_stats(self, top: int = 5) -> MemoryStats:
        """A :class:`MemoryStats` snapshot; ``top`` bounds the most/least accessed id lists."""
        self._lock.acquire_read()
        try:
            self._check_open()
            entries = list(self._entries.values())
            count = len(entries)
            total = self._total
            off_device = sum(e.nbytes for e in entries if e.where != "device")
            on_disk = sum(e.nbytes for e in entries if e.where == "disk")
            most = heapq.nsmallest(top, entries, key=lambda e: (-e.access_count, e.seq))
            least = heapq.nsmallest(top, entries, key=lambda e: (e.access_count, e.seq))
            return MemoryStats(
                current_memory_used=self._current, peak_memory_used=self._peak, checkpoint_count=count,
                average_memory_per_checkpoint=total // count if count else 0, memory_savings=off_device,
                most_accessed=tuple(e.key for e in most), least_accessed=tuple(e.key for e in least),
                total_bytes=total, disk_bytes=on_disk, spilled_bytes=self._spilled_bytes,
                spill_count=self._spill_count, restore_count=self._restore_count,
                spill_seconds=self._spill_seconds, restore_seconds=self._restore_seconds,
                recompute_count=self._recompute_count)
        finally:
            self._lock.release_read()

    def __len__(self) -> int:
        self._lock.acquire_read()
        try:
            self._check_open()
            return len(self._entries)
        finally:
            self._lock.release_read()

    def close(self) -> None:
        """Drop everything and remove the temporary spill directory; later calls raise. Idempotent."""
        self._lock.acquire_write()
        try:
            if self._closed:
                return
            self._pending.clear()
            self._clear_locked()
            self._closed = True
        finally:
            self._lock.release_write()
        if self._dir_finalizer is not None:
            self._dir_finalizer()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._entries)} activations, {self._current} bytes in memory"
        return f"<ActivationCheckpointManager {state}>"

    # -- internals (the caller holds the lock as noted)
    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("the ActivationCheckpointManager is closed")

    def _write_prologue(self) -> None:
        """Write lock held: fail if closed, then apply removals deferred by :meth:`_discard`."""
        self._check_open()
        while self._pending:
            entry = self._entries.pop(self._pending.popleft(), None)
            if entry is not None:
                self._drop(entry)

    def _lookup(self, layer_id: str) -> _Entry:
        _check_id(layer_id)
        self._lock.acquire_read()
        try:
            self._check_open()
            entry = self._entries.get(layer_id)
        finally:
            self._lock.release_read()
        if entry is None:
            raise ActivationNotFoundError(f"no activation registered as {layer_id!r}")
        return entry

    def _hit(self, entry: _Entry) -> None:
        """Count an access (read or write lock held): the only state a reader changes."""
        with entry.counter_lock:
            entry.access_count += 1
        if self._tracks_use:
            self._touched.append(entry)

    def _retrieve_exclusive(self, layer_id: str) -> torch.Tensor | None:
        self._lock.acquire_write()
        try:
            self._write_prologue()
            entry = self._entries.get(layer_id)
            return None if entry is None else self._retrieve_locked(entry)
        finally:
            self._lock.release_write()

    def _retrieve_locked(self, entry: _Entry) -> torch.Tensor:
        tensor = entry.tensor if entry.where == "device" else self._restore(entry)
        self._hit(entry)
        assert tensor is not None
        return tensor

    def _budget(self, pool: str) -> int | None:
        if self._budgets is None:
            return self._budget_all
        if pool in self._budgets:
            return self._budgets[pool]
        return self._budgets.get(pool.split(":", 1)[0])

    def _insert(self, key: str, tensor: torch.Tensor, version: int | None = None) -> None:
        entry = _Entry(key, tensor, next(self._seq))
        entry.version = version
        self._entries[key] = entry
        self._total += entry.nbytes
        try:
            self._admit(entry)
        except BaseException:  # e.g. the spill directory is full: the tensor is not registered
            del self._entries[key]
            self._drop(entry)
            raise

    def _account(self, pool: str, delta: int) -> None:
        self._used[pool] = self._used.get(pool, 0) + delta
        self._current += delta
        if self._current > self._peak:
            self._peak = self._current

    @staticmethod
    def _pool_now(entry: _Entry) -> str:
        return "cpu" if entry.where == "host" else _pool(entry.device)

    def _place(self, entry: _Entry) -> None:
        """Count ``entry`` in the pool of its data, as the most recently used."""
        pool = self._pool_now(entry)
        entry.pool = pool
        self._account(pool, entry.nbytes)
        if entry.spillable:
            self._lru.setdefault(pool, collections.OrderedDict())[entry.key] = entry

    def _unplace(self, entry: _Entry) -> None:
        pool, entry.pool = entry.pool, None
        if pool is not None:
            lru = self._lru.get(pool)
            if lru is not None:
                lru.pop(entry.key, None)
            self._account(pool, -entry.nbytes)

    def _place_back(self, entry: _Entry) -> None:
        """After a failed spill: count ``entry`` where its data still is (unless it is already)."""
        if entry.pool is None and entry.where != "disk":
            self._place(entry)

    def _admit(self, entry: _Entry) -> None:
        """Count ``entry`` (holding its data, not counted), spilling LRU entries to keep the budget."""
        budget = self._budget(self._pool_now(entry))
        if entry.spillable and budget is not None:
            try:
                if entry.nbytes > budget:  # would never fit: straight to the next tier
                    self._spill(entry)
                    return
                self._make_room(self._pool_now(entry), entry.nbytes)
            except BaseException:
                self._place_back(entry)
                raise
        self._place(entry)

    def _apply_touches(self) -> None:
        touched = self._touched
        while touched:
            entry = touched.popleft()
            lru = self._lru.get(entry.pool) if entry.pool is not None else None
            if lru is not None and lru.get(entry.key) is entry:
                lru.move_to_end(entry.key)

    def _make_room(self, pool: str, incoming: int) -> None:
        budget = self._budget(pool)
        if budget is None:
            return
        self._apply_touches()
        lru = self._lru.get(pool)
        while lru and self._used.get(pool, 0) + incoming > budget:
            victim = next(iter(lru.values()))
            self._unplace(victim)
            try:
                self._spill(victim)
            except BaseException:
                self._place_back(victim)
                raise

    def _spill(self, entry: _Entry) -> None:
        """Move ``entry`` (not counted) one tier down: CUDA to pinned host memory, host to disk."""
        t0 = time.perf_counter()
        entry.check_version()
        if entry.where == "device" and entry.device.type == "cuda":
            assert entry.tensor is not None
            src = entry.stored(entry.tensor, contiguous=True)
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            stream = torch.cuda.current_stream(entry.device)
            with torch.cuda.stream(stream):
                host.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            entry.host, entry.event, entry.tensor, entry.where = host, event, None, "host"
            self._spill_done(entry, t0)
            self._admit(entry)  # into the host pool, which may send it on to disk
            return
        if entry.where == "host":
            assert entry.host is not None
            entry.event.synchronize()
            data = entry.host
        else:
            assert entry.tensor is not None
            data = entry.stored(entry.tensor, contiguous=True)
        # raw bytes: any dtype (the file's metadata names it), and a plain uint8 read back (see _read_back)
        raw = data.resolve_conj().resolve_neg().reshape(-1).view(torch.uint8)
        path = os.path.join(self._spill_directory(), f"act-{entry.seq:010d}.ckpt")
        meta = {"layer_id": entry.key, "dtype": str(entry.dtype).removeprefix("torch."),
                "shape": list(entry.stored_shape), "permutation": list(entry.perm or ())}
        _ckpt_save(path, {"t": raw}, metadata=meta, durable=False)
        entry.path, entry.tensor, entry.host, entry.event, entry.where = path, None, None, None, "disk"
        self._spill_done(entry, t0)

    def _spill_done(self, entry: _Entry, t0: float) -> None:
        self._spill_seconds += time.perf_counter() - t0
        self._spill_count += 1
        self._spilled_bytes += entry.nbytes

    def _spill_directory(self) -> str:
        if self._given_dir is not None:
            os.makedirs(self._given_dir, exist_ok=True)
            return self._given_dir
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="ckptfmt-activations-")
            self._dir_finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def _read_back(self, entry: _Entry) -> torch.Tensor:
        """A new tensor on the entry's device with its values, from pinned memory or its spill file."""
        if entry.where == "host":
            assert entry.host is not None
            with torch.cuda.device(entry.device):
                torch.cuda.current_stream(entry.device).wait_event(entry.event)
                data = entry.host.to(entry.device, non_blocking=True)
        else:
            assert entry.path is not None
            cuda = entry.device.type == "cuda"
            data = _read_spill_file(entry.path, pin=cuda)
            if cuda:
                data = data.to(entry.device, non_blocking=True)
            data = data.view(entry.dtype).reshape(entry.stored_shape)
        return entry.unstored(data)

    def _restore(self, entry: _Entry) -> torch.Tensor:
        """Write lock held: the values of a spilled entry, made resident again when it fits the budget."""
        t0 = time.perf_counter()
        pool = _pool(entry.device)
        budget = self._budget(pool)
        if budget is not None and entry.nbytes > budget:  # never resident: a fresh copy each time
            tensor = self._read_back(entry)
        else:
            self._unplace(entry)  # leave the host pool first, so that making room cannot pick it
            try:
                self._make_room(pool, entry.nbytes)
                tensor = self._read_back(entry)
            except BaseException:
                self._place_back(entry)
                raise
            path = entry.path
            entry.tensor, entry.host, entry.event, entry.path, entry.where = tensor, None, None, None, "device"
            if entry.version is not None:
                entry.version = tensor._version  # a fresh, unaliased copy: changes from here on are checked
            if path is not None:
                _unlink(path)
            self._place(entry)
        self._restore_count += 1
        self._restore_seconds += time.perf_counter() - t0
        return tensor

    def _drop(self, entry: _Entry) -> None:
        """Forget a removed entry's data: uncount it, delete its spill file."""
        self._total -= entry.nbytes
        self._unplace(entry)
        if entry.path is not None:
            _unlink(entry.path)
        entry.tensor = entry.host = entry.event = entry.path = None

    def _clear_locked(self) -> None:
        entries, self._entries = self._entries, {}
        for entry in entries.values():
            if entry.path is not None:
                _unlink(entry.path)
            entry.tensor = entry.host = entry.event = entry.path = entry.pool = None
        self._lru.clear()
        self._used.clear()
        self._touched.clear()
        self._current = 0
        self._total = 0

    def _discard(self, layer_id: str) -> None:
        """Remove ``layer_id`` if present; safe from finalizers (never raises, never deadlocks)."""
        if self._closed:
            return
        if self._lock.held():  # e.g. a finalizer run by the garbage collector inside our own lock
            self._pending.append(layer_id)
            return
        self._lock.acquire_write()
        try:
            if self._closed:
                return
            self._write_prologue()
            entry = self._entries.pop(layer_id, None)
            if entry is not None:
                self._drop(entry)
        finally:
            self._lock.release_write()


def _read_spill_file(path: str, *, pin: bool) -> torch.Tensor:
    """The uint8 blob of a spill file, read into memory torch allocated, its checksum verified.

    Not ``ckptfmt.torch.load``: its arrays come from numpy's allocator, 16-byte aligned where torch
    aligns to 64 (BLAS libraries such as MKL only promise reproducible rounding for equally aligned
    operands), and they stay reachable from a reference cycle in the reader until the garbage
    collector runs, which would keep every restored activation alive through backward.
    """
    with _ckpt_open(path) as ckpt:
        out = torch.empty(ckpt.info("t").nbytes, dtype=torch.uint8, pin_memory=pin)
        ckpt.read_into("t", out)  # verified against the blob's checksum
    return out


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _check_budget(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a memory budget is a number of bytes (int), not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"a memory budget cannot be negative ({value})")
    return value


def _check_id(layer_id: Any, *, allow_empty: bool = False) -> None:
    if not isinstance(layer_id, str):
        raise TypeError(f"layer_id must be a str, not {type(layer_id).__name__}")
    if not layer_id and not allow_empty:
        raise ValueError("layer_id must be a non-empty string")


def _check_tensor(tensor: Any, what: str) -> None:
    if tensor is None:
        raise TypeError(f"{what} must be a torch.Tensor, not None")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, not {type(tensor).__name__}")


# ---------------------------------------------------------------- autograd saved tensors


class _SavedActivation:
    """What autograd keeps for a saved tensor: the id of its entry, removed when autograd lets go of it."""

    __slots__ = ("__weakref__", "key", "manager")

    def __init__(self, manager: ActivationCheckpointManager, key: str) -> None:
        self.manager = manager
        self.key = key

    def __del__(self) -> None:
        self.manager._discard(self.key)


class _SavedTensors:
    """A manager's saved-tensor bookkeeping: fresh ids, and which live tensor is stored under which handle."""

    def __init__(self) -> None:
        self.prefix = f"\x00saved-tensor/{os.getpid()}.{id(self):x}/"
        self.ids = itertools.count()
        self.lock = threading.Lock()
        #: id(tensor) -> (the tensor, its version when saved, the handle), all weak: one entry per tensor
        self.live: dict[int, tuple[weakref.ref[torch.Tensor], int, weakref.ref[_SavedActivation]]] = {}

    def pack(self, manager: ActivationCheckpointManager, min_bytes: int, tensor: torch.Tensor) -> Any:
        base = tensor._base if tensor._is_view() and tensor._base is not None else tensor
        if (base.is_leaf and base.requires_grad) or isinstance(base, torch.nn.Parameter) \
                or not _spillable(tensor) or _nbytes(tensor) < min_bytes:
            return tensor  # parameters (and views of them, like Linear's weight.t()) live anyway
        key = id(tensor)
        with self.lock:
            seen = self.live.get(key)
        if seen is not None:
            tensor_ref, version, handle_ref = seen
            handle = handle_ref()
            if handle is not None and tensor_ref() is tensor and version == tensor._version \
                    and manager.has(handle.key):
                return handle  # saved again (say as one op's output and the next op's input)
        layer_id = f"{self.prefix}{next(self.ids)}"
        manager._register_saved(layer_id, tensor.detach(), tensor._version)
        handle = _SavedActivation(manager, layer_id)
        handle_ref = weakref.ref(handle, functools.partial(self._forget, key))
        with self.lock:
            self.live[key] = (weakref.ref(tensor), tensor._version, handle_ref)
        return handle

    def _forget(self, key: int, handle_ref: weakref.ref[_SavedActivation]) -> None:
        with self.lock:
            seen = self.live.get(key)
            if seen is not None and seen[2] is handle_ref:
                del self.live[key]

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _SavedActivation):
            return packed.manager._retrieve_saved(packed.key)
        return packed


@contextlib.contextmanager
def offload_saved_tensors(manager: ActivationCheckpointManager, *,
                          min_bytes: int = 0) -> Iterator[ActivationCheckpointManager]:
    """Route the tensors autograd saves for backward (in this thread) through ``manager``.

    Each saved tensor is registered under a fresh id (a tensor saved by several ops, or again in a
    later block with the same manager, is stored once while unchanged) and autograd keeps only a
    handle; backward retrieves it, restoring it from pinned memory or disk if the budget spilled it,
    and the entry is removed as soon as autograd drops the handle (after the backward of the ops
    that saved it, or with the graph). Parameters, other leaves that require grad, views of them, tensors smaller
    than ``min_bytes`` and tensors that cannot be spilled are kept by autograd as usual. Gradients
    are bitwise those of a run without it. Backward may run outside the block; clearing or closing
    the manager before it makes backward fail (:class:`ActivationNotFoundError`, :class:`ManagerClosedError`).
    """
    if not isinstance(manager, ActivationCheckpointManager):
        raise TypeError(f"offload_saved_tensors needs an ActivationCheckpointManager, not {type(manager).__name__}")
    manager._check_open()
    saved = manager._saved
    with torch.autograd.graph.saved_tensors_hooks(functools.partial(saved.pack, manager, int(min_bytes)),
                                                  saved.unpack):
        yield manager
