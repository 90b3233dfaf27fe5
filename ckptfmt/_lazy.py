"""Arrays whose bytes are produced on demand, so that a conversion never holds a whole tensor.

A :class:`LazyArray` is saved like any array: the writer asks it for its bytes chunk by chunk
(the ``DeviceSource`` protocol), so sources such as HDF5 datasets, zip members or distributed-
checkpoint shards stream into a checkpoint with bounded memory. It is the one lazy array class:
the converters subclass it, and the one backend registered here saves every subclass.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

from ._backend import register_backend
from ._dtypes import DType

__all__ = ["LazyArray"]


class LazyArray(abc.ABC):
    """An array whose bytes are produced only while it is written (a ``DeviceSource`` with a dtype).

    Subclasses set ``dtype`` (canonical) and ``shape`` and implement :meth:`chunks`; the converters'
    sources (files, zip members, HDF5 datasets, DCP shards) are subclasses. For a plain callback,
    :meth:`from_read` makes one.
    """

    dtype: DType
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array."""
        return math.prod(self.shape) * self.dtype.itemsize

    @abc.abstractmethod
    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The elements in C order, little-endian, as uint8 arrays of at most ``limit`` bytes (each valid
        until the next is asked for)."""

    @classmethod
    def from_read(cls, shape: tuple[int, ...], dtype: DType, read: Callable[[int, int], Any]) -> LazyArray:
        """A lazy array of ``shape`` and ``dtype`` whose C-order bytes ``read(offset, nbytes)`` returns.

        ``read`` is called with consecutive ranges of at most the writer's chunk size and returns a
        bytes-like object of exactly ``nbytes`` bytes (e.g. a slice of a memory map or a file read).
        """
        return _ReadArray(shape, dtype, read)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dtype.name}{list(self.shape)}>"


class _ReadArray(LazyArray):
    """:meth:`LazyArray.from_read`'s array: bytes from a ``read(offset, nbytes)`` callback."""

    def __init__(self, shape: tuple[int, ...], dtype: DType, read: Callable[[int, int], Any]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self._read = read

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The bytes in order, as uint8 arrays of at most ``limit`` bytes."""
        step = max(limit - limit % self.itemsize, self.itemsize)
        total = self.nbytes
        for start in range(0, total, step):
            n = min(step, total - start)
            data = np.frombuffer(self._read(start, n), dtype=np.uint8)
            if data.size != n:
                raise ValueError(f"lazy array source returned {data.size} bytes, expected {n}")
            yield data


class LazyBackend:
    """Saves :class:`LazyArray` leaves; nothing is ever loaded as one."""

    name = "lazy"

    def is_array(self, obj: Any) -> bool:
        """:class:`LazyArray` and its subclasses."""
        return isinstance(obj, LazyArray)

    def host_view(self, obj: Any) -> tuple[Any, DType, bool]:
        """The lazy array is its own source."""
        return obj, obj.dtype, False

    def alias_key(self, obj: Any) -> Hashable | None:
        """Lazy arrays never share memory."""
        return None

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """Never called: :meth:`alias_key` is None."""
        raise TypeError("lazy arrays do not alias (alias_key is None)")

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Any:
        """Never called: :meth:`alias_key` is None."""
        raise TypeError("lazy arrays do not alias (alias_key is None)")

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """Loading is the numpy backend's job; lazy arrays exist only on the way in."""
        raise TypeError("nothing loads as a LazyArray; use backend='numpy' (or torch, cupy)")

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """See :meth:`from_host`."""
        raise TypeError("nothing loads as a LazyArray; use backend='numpy' (or torch, cupy)")


register_backend(LazyBackend(), modules=("ckptfmt",))
