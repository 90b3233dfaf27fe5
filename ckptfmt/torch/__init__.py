"""ckptfmt for torch users: save and load nested state with torch tensors, on the device you choose.

    >>> import ckptfmt.torch
    >>> ckptfmt.torch.save("model.ckpt", model.state_dict())
    >>> state = ckptfmt.torch.load("model.ckpt", device="cuda:0")

Loads to the CPU are zero-copy: tensors live in a private (copy-on-write) mapping of the file, so
they are writable, and a write changes only the process's own copy of the touched pages, never the
file. Tensors that shared storage when saved (tied weights, slices) share it again when loaded.
Loads to CUDA read blobs in chunks into pinned buffers and copy them to the GPU asynchronously
(through cuFile when kvikio is installed and ``verify=False``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from .. import _api
from .._codec import CHUNK_BYTES
from .._reader import Checkpoint
from .._staging import SaveHandle, StagingPool
from .._tables import Limits
from ._training import (
    StateDictMismatchError,
    TrainingCheckpoint,
    capture_rng_state,
    load_checkpoint,
    restore_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import ResumableSampler
from .manager import CheckpointManager

__all__ = [
    "CheckpointManager",
    "ResumableSampler",
    "StateDictMismatchError",
    "TrainingCheckpoint",
    "capture_rng_state",
    "load",
    "load_bytes",
    "load_checkpoint",
    "open",
    "restore_checkpoint",
    "restore_rng_state",
    "save",
    "save_bytes",
    "save_checkpoint",
]


def save(path: Any, obj: Any, *, metadata: dict[str, Any] | None = None, alignment: int | None = None,
         checksum: bool = True, durable: bool = True, background: bool = False,
         staging: StagingPool | None = None, progress: Callable[[int], object] | None = None,
         compression: str = "none", pack: bool = False, chunk_bytes: int = CHUNK_BYTES) -> SaveHandle | None:
    """Save ``obj`` (e.g. a ``state_dict``; tensors on any device, ``nn.Parameter`` saved as data).

    ``path`` may be a binary file object; ``background=True`` returns a :class:`ckptfmt.SaveHandle`
    once the tensors are copied; ``progress`` is told each increment of tensor bytes written;
    ``compression``, ``pack`` and ``chunk_bytes`` write format 1.1 (all as :func:`ckptfmt.save`).
    """
    return _api.save(path, obj, metadata=metadata, alignment=alignment, checksum=checksum, durable=durable,
                     background=background, staging=staging, progress=progress, compression=compression,
                     pack=pack, chunk_bytes=chunk_bytes)


def save_bytes(obj: Any, *, metadata: dict[str, Any] | None = None, alignment: int | None = None,
               checksum: bool = True) -> bytes:
    """The checkpoint of ``obj`` as bytes (as ``safetensors.torch.save``)."""
    return _api.save_bytes(obj, metadata=metadata, alignment=alignment, checksum=checksum)


def load_bytes(data: Any, *, device: str = "cpu", keys: Iterable[str] | str | None = None,
               verify: bool = True) -> Any:
    """Torch tensors on ``device`` from checkpoint bytes (as ``safetensors.torch.load``); CPU ones own their memory."""
    return _api.load_bytes(data, keys=keys, verify=verify, backend="torch", device=device)


def load(path: str | os.PathLike[str], *, device: str = "cpu", keys: Iterable[str] | str | None = None,
         verify: bool = True, mmap: bool = True) -> Any:
    """Load as torch tensors on ``device`` ("cpu", "cuda", "cuda:N"); ``keys`` selects key paths.

    ``mmap=False`` reads into fresh memory instead of mapping the file (better on network filesystems).
    """
    return _api.load(path, keys=keys, verify=verify, mmap=mmap, backend="torch", device=device)


def open(path: str | os.PathLike[str], *, device: str = "cpu", limits: Limits | None = None  # noqa: A001
         ) -> Checkpoint:
    """Open lazily; ``get``, ``load`` and ``get_slice`` return torch tensors on ``device``.

    CUDA devices are filled through pinned host buffers (see ``ckptfmt.torch.load``).
    """
    return _api.open(path, limits=limits, backend="torch", device=device)
