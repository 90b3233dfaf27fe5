"""Lazy tensors for conversion: sources the writer streams chunk by chunk, never holding them whole.

The sources subclass the core :class:`ckptfmt.LazyArray` (a ``DeviceSource`` that knows its
canonical dtype), which the core's one lazy backend saves like any other leaf. :class:`FileArray`
reads a byte range of a file (safetensors, .npy, stored .npz members). :func:`prepare` counts a
tree's arrays and, when progress is asked for, wraps each so that the bytes the writer consumes
are reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backend import ArrayBackend, Source, backend_for, get_backend, register_backend
from .._dtypes import DType
from .._lazy import LazyArray
from .._writer import contiguous_chunks
from ._errors import CorruptSourceError

__all__ = ["RAW", "FileArray", "LazyArray", "Progress", "RawArray", "prepare"]


def slices(raw: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """``raw`` (flat uint8) in pieces of at most ``limit`` bytes (views, no copies)."""
    for i in range(0, raw.size, limit):
        yield raw[i : i + limit]


class FileArray(LazyArray):
    """``shape`` elements of ``dtype`` stored at ``offset`` in the file at ``path``.

    ``numpy_dtype`` is needed only when the bytes are not already C-order little-endian
    (``fortran_order`` or a big-endian dtype); they are then reordered a bounded slab at a time.
    """

    def __init__(self, path: str, offset: int, dtype: DType, shape: tuple[int, ...], *, name: str = "",
                 numpy_dtype: np.dtype | None = None, fortran_order: bool = False,
                 file_size: int | None = None) -> None:
        self.path = path
        self.offset = offset
        self.dtype = dtype
        self.shape = tuple(int(n) for n in shape)
        self.name = name
        self.numpy_dtype = numpy_dtype
        self.fortran_order = fortran_order and len(self.shape) > 1
        size = os.path.getsize(path) if file_size is None else file_size
        end = offset + self.nbytes
        if end > size:
            raise CorruptSourceError(path, f"{self._what()} needs bytes [{offset}, {end}) but the file has only "
                                           f"{size} bytes (truncated?)")

    def _what(self) -> str:
        return f"tensor {self.name!r}" if self.name else "the array"

    def _in_order(self) -> bool:
        nd = self.numpy_dtype
        swapped = nd is not None and nd.itemsize > 1 and (
            nd.byteorder == ">" or (nd.byteorder == "=" and np.little_endian is False))
        return not self.fortran_order and not swapped

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Read the range ``limit`` bytes at a time into one reused buffer."""
        total = self.nbytes
        if total == 0:
            return
        if not self._in_order():
            yield from self._reordered(limit)
            return
        buf = np.empty(min(limit, total), dtype=np.uint8)
        mv = buf.data
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < total:
                n = min(len(buf), total - done)
                got = 0
                while got < n:
                    r = f.readinto(mv[got:n])
                    if not r:
                        raise CorruptSourceError(self.path, f"{self._what()}: the file ended at byte "
                                                            f"{self.offset + done + got} (truncated while reading?)")
                    got += r
                yield buf[:n]
                done += n

    def _reordered(self, limit: int) -> Iterator[np.ndarray]:
        assert self.numpy_dtype is not None
        arr = np.memmap(self.path, dtype=self.numpy_dtype, mode="r", offset=self.offset, shape=self.shape,
                        order="F" if self.fortran_order else "C")
        try:
            yield from contiguous_chunks(arr, limit)
        finally:
            del arr


# ----------------------------------------------------------------- progress


class Progress:
    """Counts bytes handed to the writer and reports them.

    ``sink`` is a callable receiving the cumulative byte count, or a tqdm-like object receiving
    increments through ``update(n)``.
    """

    def __init__(self, sink: Any) -> None:
        self.done = 0
        self._update: Callable[[int], Any] | None = getattr(sink, "update", None)
        self._call: Callable[[int], Any] | None = None if self._update is not None else sink
        self._sink = sink

    def start(self, total: int) -> None:
        """Give a tqdm-like sink its total, if it has none yet."""
        if self._update is not None and hasattr(self._sink, "total") and not self._sink.total:
            self._sink.total = total
            refresh = getattr(self._sink, "refresh", None)
            if callable(refresh):
                refresh()

    def add(self, n: int) -> None:
        """``n`` more bytes were written."""
        if n <= 0:
            return
        self.done += n
        if self._update is not None:
            self._update(n)
        elif self._call is not None:
            self._call(self.done)

    def finish(self, total: int) -> None:
        """Bring the report up to ``total`` (bytes stored once for several tensors count as written)."""
        self.add(total - self.done)


class _ProgressSource:
    """A source that reports each chunk once the writer has taken it."""

    def __init__(self, inner: Source, progress: Progress) -> None:
        self._inner = inner
        self._progress = progress
        self.shape = tuple(inner.shape)
        self.ndim = inner.ndim
        self.itemsize = inner.itemsize
        self.nbytes = inner.nbytes

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        inner = self._inner
        it = contiguous_chunks(inner, limit) if isinstance(inner, np.ndarray) else inner.chunks(limit)
        for c in it:
            yield c
            self._progress.add(c.nbytes)


@dataclass(eq=False)
class RawArray:
    """A tensor read from a ckptfmt file: its numpy array, of any dtype spelling, and its canonical dtype.

    Carrying the dtype beside the array lets bfloat16 and float8 pass through as raw ``V2``/``V1``
    bytes where ml_dtypes is not installed.
    """

    array: np.ndarray
    dtype: DType
    scalar: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the array."""
        return int(self.array.nbytes)


class RawBackend:
    """Loads a ckptfmt file as :class:`RawArray` leaves (views stay views of their base's memory)."""

    name = "convert-raw"

    def is_array(self, obj: Any) -> bool:
        """Only :class:`RawArray`."""
        return isinstance(obj, RawArray)

    def host_view(self, obj: Any) -> tuple[Source, DType, bool]:
        """The array, its dtype, its scalar flag."""
        return obj.array, obj.dtype, obj.scalar

    def alias_key(self, obj: Any) -> Hashable | None:
        """As numpy: arrays over one mapping may share bytes."""
        return NUMPY.alias_key(obj.array)

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """As numpy."""
        return NUMPY.alias_info(obj.array)

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Source:
        """As numpy."""
        return NUMPY.storage_bytes(obj.array, address, nbytes)

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """The array as read, with its canonical dtype."""
        return RawArray(array, dtype, scalar)

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """A numpy view of ``base``'s bytes."""
        raw = base.array.reshape(-1).view(np.uint8)
        arr = np.ndarray(shape, dtype=np.dtype(f"V{dtype.itemsize}"), buffer=raw, offset=offset, strides=strides)
        return RawArray(arr, dtype, False)


RAW = RawBackend()
NUMPY = get_backend("numpy")


@dataclass(eq=False)
class _Tracked:
    """A leaf of the user's tree wrapped so that its bytes are reported as they are written."""

    inner: Any
    backend: ArrayBackend
    progress: Progress
    source: Source | None = None


def _is_swapped(src: Any) -> bool:
    return isinstance(src, np.ndarray) and src.dtype.itemsize > 1 and src.dtype.byteorder == ">"


class ConvertBackend:
    """Claims raw and progress-tracked leaves; the write side only (never used to load)."""

    name = "convert-lazy"

    def is_array(self, obj: Any) -> bool:
        """Raw arrays and tracked leaves (lazy arrays are the core lazy backend's)."""
        return isinstance(obj, (RawArray, _Tracked))

    def host_view(self, obj: Any) -> tuple[Source, DType, bool]:
        """A raw array's own bytes; a tracked leaf's source is its backend's, wrapped."""
        if isinstance(obj, RawArray):
            return RAW.host_view(obj)
        src, dtype, scalar = obj.backend.host_view(obj.inner)
        obj.source = src
        return _ProgressSource(src, obj.progress), dtype, scalar

    def alias_key(self, obj: Any) -> Hashable | None:
        """Tracked leaves share what their inner arrays share."""
        if isinstance(obj, RawArray):
            return RAW.alias_key(obj)
        return None if _is_swapped(obj.source) else obj.backend.alias_key(obj.inner)

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """The inner array's address and byte strides."""
        if isinstance(obj, RawArray):
            return RAW.alias_info(obj)
        return obj.backend.alias_info(obj.inner)

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Source:
        """The inner allocation's bytes, reported as they are written."""
        if isinstance(obj, RawArray):
            return RAW.storage_bytes(obj, address, nbytes)
        return _ProgressSource(obj.backend.storage_bytes(obj.inner, address, nbytes), obj.progress)

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """Not a loading backend."""
        raise TypeError("the convert-lazy backend only writes; load with backend='numpy' or 'torch'")

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """Not a loading backend."""
        raise TypeError("the convert-lazy backend only writes; load with backend='numpy' or 'torch'")


BACKEND = ConvertBackend()
# Leaves are found by the top-level module of their type: every class here lives under "ckptfmt".
register_backend(BACKEND, modules=("ckptfmt",))

_PLAIN = (str, int, float, bool, bytes, type(None))
#: deeper trees are left as they are: the encoder reports them (its cap is 64)
_MAX_WALK = 256


@dataclass
class Prepared:
    """A tree ready to save, with the number and bytes of its distinct arrays."""

    tree: Any
    tensors: int
    nbytes: int


def prepare(tree: Any, progress: Progress | None) -> Prepared:
    """Count the distinct arrays of ``tree``; with ``progress``, return a copy whose arrays report it.

    An array object that appears twice is counted, and wrapped, once, so that it is still stored once.
    """
    seen: dict[int, Any] = {}
    count = [0, 0]

    def leaf(obj: Any) -> Any:
        hit = seen.get(id(obj))
        if hit is not None:
            return hit[1]
        be = backend_for(obj)
        if be is None:
            return None
        count[0] += 1
        count[1] += int(getattr(obj, "nbytes", 0))
        out = obj if progress is None else _Tracked(obj, be, progress)
        seen[id(obj)] = (obj, out)  # keeps obj alive, so that its id is not reused during the walk
        return out

    def walk(obj: Any, depth: int) -> Any:
        t = type(obj)
        if t in _PLAIN or depth > _MAX_WALK:
            return obj
        if t is dict or t is list or t is tuple:
            found = None
        else:
            found = leaf(obj)
            if found is not None:
                return found
        if isinstance(obj, dict):
            items = [(k, walk(v, depth + 1)) for k, v in obj.items()]
            return obj if progress is None else dict(items)
        if isinstance(obj, list):
            seq = [walk(v, depth + 1) for v in obj]
            return obj if progress is None else seq
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            seq = [walk(v, depth + 1) for v in obj]
            return obj if progress is None else tuple(seq)
        return obj  # not something ckptfmt stores: the save names it

    out = walk(tree, 0)
    return Prepared(out, count[0], count[1])
