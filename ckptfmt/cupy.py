"""ckptfmt for cupy users: arrays go between the file and GPU memory through pinned host buffers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from . import _api
from ._reader import Checkpoint
from ._tables import Limits

__all__ = ["load", "open", "save"]


def save(path: str | os.PathLike[str], obj: Any, *, metadata: dict[str, Any] | None = None,
         alignment: int | None = None, checksum: bool = True, durable: bool = True) -> None:
    """Save ``obj`` with cupy arrays (copied to the host a chunk at a time; host memory stays bounded)."""
    _api.save(path, obj, metadata=metadata, alignment=alignment, checksum=checksum, durable=durable)


def load(path: str | os.PathLike[str], *, device: str = "cuda", keys: Iterable[str] | str | None = None,
         verify: bool = True) -> Any:
    """Load as cupy arrays on ``device`` ("cuda" or "cuda:N"); checksums are verified on host chunks."""
    return _api.load(path, keys=keys, verify=verify, mmap=False, backend="cupy", device=device)


def open(path: str | os.PathLike[str], *, device: str = "cuda", limits: Limits | None = None  # noqa: A001
         ) -> Checkpoint:
    """Open lazily; ``get``, ``load`` and ``get_slice`` return cupy arrays on ``device``."""
    return _api.open(path, limits=limits, backend="cupy", device=device)
