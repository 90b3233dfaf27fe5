"""ckptfmt: a versioned, checksummed, streaming checkpoint container (spec/FORMAT.md).

    >>> import ckptfmt
    >>> ckptfmt.save("model.ckpt", {"w": array, "step": 10})
    >>> state = ckptfmt.load("model.ckpt")
"""

from __future__ import annotations

from typing import Any

from . import distributed as _distributed  # noqa: F401  (torch-free; lets load() read sharded directories)
from ._api import __version__, diff, inspect, load, load_bytes, open, save, save_bytes, verify  # noqa: A004
from ._backend import ArrayBackend, DeviceSource, get_backend, register_backend
from ._dtypes import DTYPES, DType
from ._lazy import LazyArray
from ._migrate import migrate
from ._reader import Checkpoint, TensorInfo, TensorSlice, VerifyReport
from ._staging import SaveHandle, StagingPool
from ._tables import Limits, TensorEntry
from ._versions import FORMAT_MAJOR, FORMAT_MINOR
from .errors import (
    BadMagicError,
    CheckpointClosedError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DiskFullError,
    InvalidKeyError,
    InvalidMetadataError,
    MetadataLimitError,
    MissingDependencyError,
    NotACheckpointFileError,
    ObjectLimitError,
    TruncatedCheckpointError,
    UnsupportedCodecError,
    UnsupportedDTypeError,
    UnsupportedObjectError,
    UnsupportedVersionError,
)


def __getattr__(name: str) -> Any:
    """``ckptfmt.convert`` (a callable module: ``ckptfmt.convert(src, dst)``) is imported on first use."""
    if name == "convert":
        import importlib

        return importlib.import_module(".convert", __name__)
    raise AttributeError(f"module 'ckptfmt' has no attribute {name!r}")


__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "DTYPES",
    "ArrayBackend",
    "BadMagicError",
    "Checkpoint",
    "CheckpointClosedError",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DType",
    "DeviceSource",
    "DiskFullError",
    "InvalidKeyError",
    "InvalidMetadataError",
    "LazyArray",
    "Limits",
    "MetadataLimitError",
    "MissingDependencyError",
    "NotACheckpointFileError",
    "ObjectLimitError",
    "SaveHandle",
    "StagingPool",
    "TensorEntry",
    "TensorInfo",
    "TensorSlice",
    "TruncatedCheckpointError",
    "UnsupportedCodecError",
    "UnsupportedDTypeError",
    "UnsupportedObjectError",
    "UnsupportedVersionError",
    "VerifyReport",
    "__version__",
    "convert",
    "diff",
    "get_backend",
    "inspect",
    "load",
    "load_bytes",
    "migrate",
    "open",
    "register_backend",
    "save",
    "save_bytes",
    "verify",
]
