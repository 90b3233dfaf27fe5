"""The exception tree of ckptfmt (spec/FORMAT.md §11).

Every error a user can see derives from :class:`CheckpointError` and also from the builtin a Python
user would catch for the same situation::

    CheckpointError (Exception)
    ├── CheckpointNotFoundError (FileNotFoundError)
    ├── NotACheckpointFileError (IsADirectoryError)
    ├── CorruptCheckpointError (ValueError)
    │   ├── BadMagicError
    │   ├── TruncatedCheckpointError
    │   ├── ChecksumMismatchError
    │   └── InvalidMetadataError
    │       └── MetadataLimitError
    ├── UnsupportedVersionError (ValueError)
    ├── UnsupportedDTypeError (TypeError)
    ├── UnsupportedCodecError (TypeError)
    ├── UnsupportedObjectError (TypeError)
    │   └── ObjectLimitError
    ├── InvalidKeyError (ValueError)
    ├── CheckpointKeyError (KeyError)
    ├── CheckpointClosedError (ValueError)
    ├── MissingDependencyError (ImportError)
    └── DiskFullError (OSError)
"""

from __future__ import annotations

import os

__all__ = [
    "BadMagicError",
    "CheckpointClosedError",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DiskFullError",
    "InvalidKeyError",
    "InvalidMetadataError",
    "MetadataLimitError",
    "MissingDependencyError",
    "NotACheckpointFileError",
    "ObjectLimitError",
    "TruncatedCheckpointError",
    "UnsupportedCodecError",
    "UnsupportedDTypeError",
    "UnsupportedObjectError",
    "UnsupportedVersionError",
]


class CheckpointError(Exception):
    """Root of every error ckptfmt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(2, f"checkpoint not found: {os.fspath(path)!s}", os.fspath(path))

    def __str__(self) -> str:
        return f"checkpoint not found: {self.filename}"


class NotACheckpointFileError(CheckpointError, IsADirectoryError):
    """The path names a directory (or another non-file), not a checkpoint file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptCheckpointError(CheckpointError, ValueError):
    """The file is not a valid checkpoint: its bytes break a rule of the format."""

    def __init__(self, path: str | os.PathLike[str] | None, message: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class BadMagicError(CorruptCheckpointError):
    """The file does not start with the ckptfmt magic bytes (not a ckptfmt file)."""


class TruncatedCheckpointError(CorruptCheckpointError):
    """The file ends before a structure it must contain (interrupted write or cut copy)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A stored xxh3-64 checksum does not match the bytes it covers."""

    def __init__(
        self, path: str | os.PathLike[str] | None, message: str, *, region: str = "", key: str | None = None
    ) -> None:
        self.region = region
        self.key = key
        super().__init__(path, message)


class InvalidMetadataError(CorruptCheckpointError):
    """The metadata or a fixed structure is well-checksummed but breaks a validation rule."""


class MetadataLimitError(InvalidMetadataError):
    """The metadata exceeds a cap the caller set (size, nesting depth, tensor count, rank)."""


class UnsupportedVersionError(CheckpointError, ValueError):
    """The file needs a newer reader: a higher major version or an unknown required feature bit."""

    def __init__(self, path: str | os.PathLike[str] | None, message: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UnsupportedDTypeError(CheckpointError, TypeError):
    """An array's dtype has no canonical name in the format, or a file names a dtype we do not know."""


class UnsupportedCodecError(CheckpointError, TypeError):
    """A tensor is stored with a codec this reader does not know (format 1.1 §13); other tensors still load."""


class UnsupportedObjectError(CheckpointError, TypeError):
    """A value in the object to save is not a container, an array or a plain scalar."""


class ObjectLimitError(UnsupportedObjectError):
    """The object to save exceeds a cap the reader applies (§8.1): nesting depth, metadata size, tensors.

    Saving refuses it rather than write a file that ``load`` with default :class:`~ckptfmt.Limits`
    would refuse; the message says which cap and how to raise it.
    """


class InvalidKeyError(CheckpointError, ValueError):
    """A key path is malformed (bad escape) or a dict's keys would make two equal key paths."""


class CheckpointKeyError(CheckpointError, KeyError):
    """A key path names nothing in the checkpoint."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointClosedError(CheckpointError, ValueError):
    """A read was asked of a :class:`~ckptfmt.Checkpoint` after ``close`` (as a closed file raises ValueError)."""


class MissingDependencyError(CheckpointError, ImportError):
    """An optional dependency (torch, cupy, h5py, ...) is needed and not installed; names the extra."""


class DiskFullError(CheckpointError, OSError):
    """A save ran out of space (ENOSPC, EDQUOT): its temporary is removed, the previous file untouched."""

    def __init__(self, path: str | os.PathLike[str], cause: OSError) -> None:
        super().__init__(cause.errno, f"no space left to save {os.fspath(path)!s}: {cause.strerror or cause}; "
                                      "the previous file is untouched, free space and save again", os.fspath(path))

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()
