"""ckptfmt: a versioned, checksummed, streaming checkpoint container (spec/FORMAT.md).

    >>> import ckptfmt
    >>> ckptfmt.save("model.ckpt", {"w": array, "step": 10})
    >>> state = ckptfmt.load("model.ckpt")
"""

from __future__ import annotations

from ._api import __version__, diff, inspect, load, open, save, verify  # noqa: A004
from ._backend import ArrayBackend, DeviceSource, get_backend, register_backend
from ._dtypes import DTYPES, DType
from ._lazy import LazyArray
from ._manifest import Limits, TensorEntry
from ._reader import Checkpoint, TensorInfo, VerifyReport
from ._versions import FORMAT_MAJOR, FORMAT_MINOR
from .errors import (
    BadMagicError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InvalidKeyError,
    InvalidMetadataError,
    MetadataLimitError,
    MissingDependencyError,
    NotACheckpointFileError,
    TruncatedCheckpointError,
    UnsupportedDTypeError,
    UnsupportedObjectError,
    UnsupportedVersionError,
)

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "DTYPES",
    "ArrayBackend",
    "BadMagicError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DType",
    "DeviceSource",
    "InvalidKeyError",
    "InvalidMetadataError",
    "LazyArray",
    "Limits",
    "MetadataLimitError",
    "MissingDependencyError",
    "NotACheckpointFileError",
    "TensorEntry",
    "TensorInfo",
    "TruncatedCheckpointError",
    "UnsupportedDTypeError",
    "UnsupportedObjectError",
    "UnsupportedVersionError",
    "VerifyReport",
    "__version__",
    "diff",
    "get_backend",
    "inspect",
    "load",
    "open",
    "register_backend",
    "save",
    "verify",
]
