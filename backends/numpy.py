"""The numpy adapter: numpy arrays and scalars (ml_dtypes' bfloat16/float8 included)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptfmt._backend import register_backend
from ckptfmt._dtypes import DType, from_numpy, numpy_dtype


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

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """The array, viewed as ``dtype``'s numpy type; a scalar comes back as a numpy scalar."""
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend holds arrays on the host only, not on {device!r}")
        if array.dtype != numpy_dtype(dtype):
            array = array.view(numpy_dtype(dtype))
        return array[()] if scalar else array


BACKEND = NumpyBackend()
register_backend(BACKEND, modules=("numpy", "ml_dtypes"))
