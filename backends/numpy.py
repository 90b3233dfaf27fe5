"""The numpy adapter: numpy arrays and scalars (ml_dtypes' bfloat16/float8 included)."""

from __future__ import annotations

import ctypes
from collections.abc import Hashable
from typing import Any

import numpy as np

from ckptfmt._backend import is_host, register_backend
from ckptfmt._dtypes import DType, from_numpy, numpy_dtype


def _owner(arr: np.ndarray) -> Any:
    """The object that owns ``arr``'s memory: the end of its ``.base`` chain."""
    while arr.base is not None:
        if not isinstance(arr.base, np.ndarray):
            return arr.base
        arr = arr.base
    return arr


class NumpyBackend:
    """Arrays are their own host view; loads are returned as they come off the file."""

    name = "numpy"

    def is_array(self, obj: Any) -> bool:
        """numpy arrays and numeric numpy scalars.

        Not ``np.str_``/``np.bytes_`` (saved as str/bytes), not masked arrays (saving one would drop its mask).
        """
        return isinstance(obj, (np.ndarray, np.generic)) and not isinstance(
            obj, (np.object_, np.str_, np.bytes_, np.ma.MaskedArray))

    def host_view(self, obj: Any) -> tuple[np.ndarray, DType, bool]:
        """The array as a plain ndarray view; a scalar becomes a 0-d array flagged as scalar."""
        if isinstance(obj, np.generic):
            arr = np.asarray(obj)
            return arr, from_numpy(arr.dtype), True
        if type(obj) is not np.ndarray:  # subclasses (memmap, matrix, ...): their data, as a plain array
            obj = obj.view(np.ndarray)
        return obj, from_numpy(obj.dtype), False

    def alias_key(self, obj: Any) -> Hashable | None:
        """Arrays whose ``.base`` chains end at the same object may share bytes."""
        return ("numpy", id(_owner(obj)))

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """Address of the first element and byte strides."""
        return obj.__array_interface__["data"][0], tuple(obj.strides)

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> np.ndarray:
        """The raw bytes at [address, address + nbytes) of ``obj``'s allocation (valid while ``obj`` lives)."""
        return np.frombuffer(memoryview((ctypes.c_uint8 * nbytes).from_address(address)), dtype=np.uint8)

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """The array, viewed as ``dtype``'s numpy type; a scalar comes back as a numpy scalar."""
        if not is_host(device):
            raise ValueError(f"the numpy backend holds arrays on the host only, not on {device!r}")
        if array.dtype != numpy_dtype(dtype):
            array = array.view(numpy_dtype(dtype))
        return array[()] if scalar else array

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """An ndarray over ``base``'s memory (read-only if ``base`` is)."""
        raw = base.reshape(-1).view(np.uint8)
        return np.ndarray(shape, dtype=numpy_dtype(dtype), buffer=raw, offset=offset, strides=strides)


BACKEND = NumpyBackend()
register_backend(BACKEND, modules=("numpy", "ml_dtypes"))
