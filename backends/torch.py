"""The torch adapter: CPU tensors as zero-copy views, CUDA tensors through pinned host buffers.

Imported only when a torch tensor is saved or ``backend="torch"`` is asked for, so that importing
ckptfmt never imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from ckptfmt._backend import Source, is_host, register_backend
from ckptfmt._dtypes import DTYPES, DType
from ckptfmt.errors import UnsupportedDTypeError, UnsupportedObjectError

from . import _cuda

#: canonical dtype name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "complex64": torch.complex64, "complex128": torch.complex128,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}
_CANONICAL: dict[torch.dtype, DType] = {t: DTYPES[name] for name, t in TORCH_DTYPES.items()}
#: torch dtypes numpy lacks, exposed to numpy as same-width integers holding the same bits
_RAW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def native_bytes(array: np.ndarray, dtype: DType, byteorder: str = sys.byteorder) -> np.ndarray:
    """``array``'s elements as flat uint8 bytes in the host's byte order, which torch reads them in.

    Files are little-endian; on a big-endian host each element (each half of a complex) is
    byte-swapped into a copy. On little-endian hosts: the array's own bytes, no copy.
    """
    raw = array.reshape(-1).view(np.uint8)
    unit = dtype.itemsize // 2 if dtype.name.startswith("complex") else dtype.itemsize
    if byteorder == "little" or unit == 1:
        return raw
    return np.ascontiguousarray(raw.reshape(-1, unit)[:, ::-1]).reshape(-1)


def _plain_tensor(obj: Any) -> torch.Tensor:
    """``obj`` as a dense strided tensor without autograd history (an ``nn.Parameter`` is saved as its data)."""
    t = obj.detach()
    if t.layout != torch.strided or t.is_quantized:
        raise UnsupportedObjectError(f"cannot save a {t.layout} {'quantized ' if t.is_quantized else ''}tensor; "
                                     "convert it to a dense tensor first (e.g. .to_dense())")
    if t.device.type == "meta":
        raise UnsupportedObjectError("cannot save a tensor on the meta device: it has no data")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def _canonical(t: torch.Tensor) -> DType:
    try:
        return _CANONICAL[t.dtype]
    except KeyError:
        raise UnsupportedDTypeError(f"torch dtype {t.dtype} has no ckptfmt equivalent; supported: "
                                    f"{sorted(TORCH_DTYPES)}") from None


class TorchBackend:
    """torch tensors on any device; loads are zero-copy over the file on the CPU."""

    name = "torch"
    #: arrays over a mapped file are handed over writable, with private copy-on-write pages
    copy_on_write = True

    def is_array(self, obj: Any) -> bool:
        """Any ``torch.Tensor``, ``nn.Parameter`` included."""
        return isinstance(obj, torch.Tensor)

    def host_view(self, obj: Any) -> tuple[Source, DType, bool]:
        """A numpy view of a CPU tensor's memory (any strides), or a device source for a CUDA tensor."""
        t = _plain_tensor(obj)
        dtype = _canonical(t)
        if t.device.type == "cpu":
            raw = _RAW.get(t.dtype)
            try:
                return (t.view(raw) if raw is not None else t).numpy(), dtype, False
            except ValueError as e:  # numpy refuses e.g. an empty (0, 2**62) float32 tensor (spec §4.3)
                raise UnsupportedObjectError(f"a tensor of shape {tuple(t.shape)} cannot be saved: {e}") from None
        return _cuda.TorchDeviceSource(t), dtype, False

    def alias_key(self, obj: Any) -> Hashable | None:
        """Tensors of one storage share bytes (not conj/neg views: their bits are resolved into new memory)."""
        t = obj.detach()
        if t.layout != torch.strided or t.device.type == "meta" or t.is_conj() or t.is_neg():
            return None
        storage = t.untyped_storage()
        return ("torch", str(t.device), storage.data_ptr(), storage.nbytes())

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """Address of the first element and byte strides."""
        t = obj.detach()
        return t.data_ptr(), tuple(s * t.element_size() for s in t.stride())

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Source:
        """Raw bytes of the tensor's storage, as a host view or a device source."""
        storage = obj.detach().untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8, device=obj.device)
        raw.set_(storage, 0, (storage.nbytes(),), (1,))
        start = address - storage.data_ptr()
        part = raw[start : start + nbytes]
        if part.device.type == "cpu":
            return part.numpy()
        return _cuda.TorchDeviceSource(part)

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """A tensor sharing ``array``'s memory (moved to ``device`` if one is given)."""
        tdt = TORCH_DTYPES[dtype.name]
        if array.size == 0:
            t = torch.empty(array.shape, dtype=tdt)
        else:
            t = torch.from_numpy(native_bytes(array, dtype)).view(tdt).reshape(array.shape)
        if not is_host(device):
            t = t.to(device)
        return t

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """A tensor over ``base``'s storage; a view torch cannot hold (negative or unaligned strides) is a copy."""
        size = dtype.itemsize
        start = base.storage_offset() * base.element_size() + offset
        if start % size or any(s % size or s < 0 for s in strides):
            return _materialise(base, dtype, shape, strides, start)
        out = torch.empty(0, dtype=TORCH_DTYPES[dtype.name], device=base.device)
        out.set_(base.untyped_storage(), start // size, shape, tuple(s // size for s in strides))
        return out

    def read_to_device(self, ckpt: Any, rows: list[int], device: str, *, verify: bool) -> dict[int, Any]:
        """Blobs straight into CUDA tensors through pinned buffers (or cuFile); see ``_cuda.read_rows``."""
        dev = torch.device(device)
        out = {}
        for row, flat in _cuda.read_rows("torch", ckpt, rows, dev, verify=verify).items():
            tdt = TORCH_DTYPES[ckpt.row_dtype(row).name]
            shape = ckpt.entry(row).shape
            out[row] = torch.empty(shape, dtype=tdt, device=dev) if flat.numel() == 0 \
                else flat.view(tdt).reshape(shape)
        return out

    def pinned_empty(self, nbytes: int, device: str | None) -> np.ndarray | None:
        """A host buffer to stage ``nbytes`` for ``device``: page-locked for CUDA (fast copies), else None."""
        if device is None or is_host(device) or torch.device(device).type != "cuda":
            return None
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()


def _materialise(base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], start: int) -> Any:
    """A fresh tensor holding the elements of a view torch cannot represent (spec §4.7; shares no memory)."""
    raw = torch.empty(0, dtype=torch.uint8, device=base.device)
    raw.set_(base.untyped_storage())
    host = raw.cpu().numpy()
    elements = np.lib.stride_tricks.as_strided(host[start:], shape=(*shape, dtype.itemsize), strides=(*strides, 1))
    out = torch.from_numpy(np.ascontiguousarray(elements)).view(TORCH_DTYPES[dtype.name]).reshape(shape)
    return out if base.device.type == "cpu" else out.to(base.device)


BACKEND = TorchBackend()
register_backend(BACKEND, modules=("torch",))
