"""ckptfmt for numpy users: the same four-call surface as the framework modules.

Loads return read-only zero-copy views over a memory map (``mmap=True``) or writable arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from . import _api
from ._reader import Checkpoint
from ._tables import Limits

__all__ = ["load", "load_bytes", "open", "save", "save_bytes"]


def save(path: str | os.PathLike[str], obj: Any, *, metadata: dict[str, Any] | None = None,
         alignment: int | None = None, checksum: bool = True, durable: bool = True) -> None:
    """Save ``obj`` (nested dicts/lists/tuples of numpy arrays and plain values)."""
    _api.save(path, obj, metadata=metadata, alignment=alignment, checksum=checksum, durable=durable)


def load(path: str | os.PathLike[str], *, keys: Iterable[str] | str | None = None, verify: bool = True,
         mmap: bool = True) -> Any:
    """Load with numpy arrays; ``keys`` selects key paths."""
    return _api.load(path, keys=keys, verify=verify, mmap=mmap, backend="numpy")


def open(path: str | os.PathLike[str], *, limits: Limits | None = None) -> Checkpoint:  # noqa: A001
    """Open lazily; ``get``, ``load`` and ``get_slice`` return numpy arrays (host memory)."""
    return _api.open(path, limits=limits, backend="numpy")
def save_bytes(obj: Any, *, metadata: dict[str, Any] | None = None, alignment: int | None = None,
               checksum: bool = True) -> bytes:
    """The checkpoint of ``obj`` as bytes (as ``safetensors.numpy.save``)."""
    return _api.save_bytes(obj, metadata=metadata, alignment=alignment, checksum=checksum)


def load_bytes(data: Any, *, keys: Iterable[str] | str | None = None, verify: bool = True) -> Any:
    """numpy arrays from checkpoint bytes (as ``safetensors.numpy.load``)."""
    return _api.load_bytes(data, keys=keys, verify=verify, backend="numpy")
