"""Lazy tensors for conversion: sources the writer streams chunk by chunk, never holding them whole.

The sources subclass the core :class:`ckptfmt.LazyArray` (a ``DeviceSource`` that knows its
canonical dtype), which the core's one lazy backend saves like any other leaf. :class:`FileArray`
reads a byte range of a file (safetensors, .npy, stored .npz members). :func:`count` counts a
tree's distinct arrays; progress comes from the writer's ``progress`` callback (``ckptfmt.save``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backend import Source, backend_for, get_backend, register_backend
from .._dtypes import DType
from .._lazy import LazyArray
from .._writer import contiguous_chunks
from ._errors import CorruptSourceError

__all__ = ["RAW", "FileArray", "LazyArray", "RawArray", "count"]


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


class ConvertBackend:
    """Claims raw arrays on the write side (loading with ``backend=RAW`` goes through :class:`RawBackend`)."""

    name = "convert-lazy"

    def is_array(self, obj: Any) -> bool:
        """Raw arrays only (lazy arrays are the core lazy backend's)."""
        return isinstance(obj, RawArray)

    def host_view(self, obj: Any) -> tuple[Source, DType, bool]:
        """A raw array's own bytes."""
        return RAW.host_view(obj)

    def alias_key(self, obj: Any) -> Hashable | None:
        """As numpy."""
        return RAW.alias_key(obj)

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """As numpy."""
        return RAW.alias_info(obj)

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Source:
        """As numpy."""
        return RAW.storage_bytes(obj, address, nbytes)

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


def count(tree: Any) -> tuple[int, int]:
    """(number, bytes) of the distinct arrays of ``tree``: an array object that appears twice counts once."""
    seen: set[int] = set()
    keep: list[Any] = []  # keeps each counted object alive, so that its id is not reused during the walk
    total = [0, 0]

    def walk(obj: Any, depth: int) -> None:
        t = type(obj)
        if t in _PLAIN or depth > _MAX_WALK:
            return
        if t is not dict and t is not list and t is not tuple and backend_for(obj) is not None:
            if id(obj) not in seen:
                seen.add(id(obj))
                keep.append(obj)
                total[0] += 1
                total[1] += int(getattr(obj, "nbytes", 0))
            return
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, list) or (isinstance(obj, tuple) and not hasattr(obj, "_fields")):
            for v in obj:
                walk(v, depth + 1)

    walk(tree, 0)
    return total[0], total[1]
