"""The cupy adapter: cupy arrays on the GPU, saved and loaded through pinned host buffers.

cupy has no bfloat16 or float8 types: such tensors load as same-width unsigned integers
(uint16, uint8) holding the exact bits, and are saved from them only through another backend.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import cupy
import numpy as np

from ckptfmt._backend import Source, register_backend
from ckptfmt._dtypes import DType, from_numpy, numpy_dtype

from . import _cuda

_NO_CUPY_TYPE: dict[str, np.dtype] = {
    "bfloat16": np.dtype("<u2"), "float8_e4m3fn": np.dtype("u1"), "float8_e5m2": np.dtype("u1"),
}


def cupy_dtype(dtype: DType) -> np.dtype:
    found = _NO_CUPY_TYPE.get(dtype.name)
    return found if found is not None else numpy_dtype(dtype)


def _device_index(device: str | None) -> int | None:
    if device is None:
        return None
    kind, _, index = device.partition(":")
    if kind not in ("cuda", "gpu"):  # "cpu" too: cupy arrays cannot live on the host
        raise ValueError(f"cupy arrays live on a CUDA device ('cuda' or 'cuda:N'), not {device!r}")
    return int(index) if index else None  # "cuda": the current device


class CupyBackend:
    """cupy arrays on any CUDA device."""

    name = "cupy"

    def is_array(self, obj: Any) -> bool:
        """``cupy.ndarray``."""
        return isinstance(obj, cupy.ndarray)

    def host_view(self, obj: Any) -> tuple[Source, DType, bool]:
        """A device source: the writer receives the bytes chunk by chunk in pinned memory."""
        return _cuda.CupyDeviceSource(obj), from_numpy(obj.dtype), False

    def alias_key(self, obj: Any) -> Hashable | None:
        """Arrays of one memory allocation share bytes."""
        return ("cupy", obj.device.id, obj.data.mem.ptr)

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """Address of the first element and byte strides."""
        return obj.data.ptr, tuple(obj.strides)

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Source:
        """Raw bytes of the allocation as a device source."""
        mem = obj.data.mem
        raw = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, address - mem.ptr))
        return _cuda.CupyDeviceSource(raw)

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """A device copy of ``array`` (on ``device``, default the current one)."""
        index = _device_index(device)
        host = array.view(cupy_dtype(dtype)) if array.size else np.empty(array.shape, cupy_dtype(dtype))
        if index is None:
            return cupy.asarray(host)
        with cupy.cuda.Device(index):
            return cupy.asarray(host)

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """An array over ``base``'s device memory."""
        return cupy.ndarray(shape, dtype=cupy_dtype(dtype), memptr=base.data + offset, strides=strides)

    def read_to_device(self, ckpt: Any, rows: list[int], device: str, *, verify: bool) -> dict[int, Any]:
        """Blobs straight into device arrays through pinned buffers (or cuFile); see ``_cuda.read_rows``."""
        index = _device_index(device)
        with cupy.cuda.Device(index if index is not None else cupy.cuda.Device().id):
            out = {}
            for row, flat in _cuda.read_rows("cupy", ckpt, rows, index, verify=verify).items():
                dt = cupy_dtype(ckpt.row_dtype(row))
                shape = ckpt.entry(row).shape
                out[row] = cupy.empty(shape, dtype=dt) if flat.size == 0 else flat.view(dt).reshape(shape)
        return out


BACKEND = CupyBackend()
register_backend(BACKEND, modules=("cupy",))
