"""The contract's hooks spelled for torch and cupy, and conversions the framework tests share.

Mixins for :class:`contract.BackendContract`; torch and cupy are imported only when a hook runs, so
that importing this module never needs either (test modules skip first when theirs is missing).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from contract import ML_DTYPES, NATIVE_DTYPES, ml_dtypes, np_dtype

#: canonical dtypes the contract can hand torch: all of them where numpy can spell them (ml_dtypes)
TORCH_CONTRACT_DTYPES = NATIVE_DTYPES + (ML_DTYPES if ml_dtypes is not None else ())


def torch_dtypes() -> dict[str, Any]:
    """canonical name -> torch dtype, as the torch adapter maps them."""
    from ckptfmt.backends.torch import TORCH_DTYPES

    return TORCH_DTYPES


def canonical_name(dtype: np.dtype) -> str:
    """The canonical name of a numpy dtype the contract made (see ``contract.np_dtype``)."""
    if dtype.name in NATIVE_DTYPES:
        return dtype.name
    for name in ML_DTYPES:
        if dtype == np_dtype(name):
            return name
    raise AssertionError(f"no canonical dtype for {dtype}")


def to_torch(a: np.ndarray, name: str, device: str = "cpu") -> Any:
    """A contiguous tensor on ``device`` holding ``a``'s bytes as dtype ``name``, in memory of its own."""
    import torch

    tdt = torch_dtypes()[name]
    if a.size == 0:
        return torch.empty(a.shape, dtype=tdt, device=device)
    raw = torch.from_numpy(np.array(a).reshape(-1).view(np.uint8).copy())
    return raw.view(tdt).reshape(a.shape).to(device)


def torch_to_numpy(x: Any) -> np.ndarray:
    """A host copy of tensor ``x`` as the numpy dtype of its canonical dtype (raw bytes: bf16/fp8 too)."""
    import torch

    name = {t: n for n, t in torch_dtypes().items()}[x.dtype]
    t = x.detach().cpu().contiguous()
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=np_dtype(name))
    raw = t.reshape(-1).view(torch.uint8).numpy().copy()
    return raw.view(np_dtype(name)).reshape(tuple(t.shape))


def torch_bytes(x: Any) -> bytes:
    """C-order bytes of a tensor of any dtype and device, 0-d included."""
    import torch

    t = x.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class TorchHooks:
    """torch tensors on ``device``; arrays share memory when they share a storage."""

    backend = "torch"
    device: ClassVar[str | None] = "cpu"
    #: where :meth:`make` puts the tensors that are saved (default: ``device``)
    source_device: ClassVar[str | None] = None
    dtypes: ClassVar[tuple[str, ...]] = TORCH_CONTRACT_DTYPES

    def make(self, a: np.ndarray) -> Any:
        return to_torch(a, canonical_name(a.dtype), self.source_device or self.device or "cpu")

    def to_numpy(self, x: Any) -> np.ndarray:
        return torch_to_numpy(x)

    def shares_memory(self, a: Any, b: Any) -> bool:
        return bool(a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())

    def is_native(self, x: Any) -> bool:
        import torch

        return type(x) is torch.Tensor and x.device == torch.device(self.device or "cpu")

    def bitcast(self, x: Any, name: str) -> Any:
        return x.view(torch_dtypes()[name])


class CupyHooks:
    """cupy arrays on CUDA device 0; arrays share memory when they share an allocation."""

    backend = "cupy"
    device: ClassVar[str | None] = "cuda:0"
    source_device: ClassVar[str | None] = None  # always GPU 0
    #: cupy has no bfloat16 or float8 (its loads give their bits as uint16/uint8: see test_gpu.py)
    dtypes: ClassVar[tuple[str, ...]] = NATIVE_DTYPES
    #: device loads read through pinned host buffers whatever ``mmap`` says
    mmap_modes: ClassVar[tuple[bool, ...]] = (False,)

    def make(self, a: np.ndarray) -> Any:
        import cupy

        with cupy.cuda.Device(0):
            return cupy.array(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        import cupy

        return cupy.asnumpy(x)

    def shares_memory(self, a: Any, b: Any) -> bool:
        return bool(a.device.id == b.device.id and a.data.mem.ptr == b.data.mem.ptr)

    def is_native(self, x: Any) -> bool:
        import cupy

        return isinstance(x, cupy.ndarray) and x.device.id == 0

    def bitcast(self, x: Any, name: str) -> Any:
        return x.view(np_dtype(name))
