"""Errors of the conversion side; each derives from a class of :mod:`ckptfmt.errors` and a builtin.

    CheckpointError
    └── ConversionError
        ├── UnknownFormatError (ValueError)        the content matches no format convert() reads
        ├── CorruptSourceError (CorruptCheckpointError, ValueError)
        │                                          a known format whose bytes are broken or truncated
        ├── UnsupportedSourceError (ValueError)    a known format using a feature convert() cannot read
        ├── SameFileError (ValueError)             the destination is the source
        ├── DiskFullError (OSError, errno ENOSPC)  the target's file system ran out of space
        └── UnsafePickleError (pickle.UnpicklingError)
                                                   the source needs code from outside the allowlist
"""

from __future__ import annotations

import errno
import os
import pickle

from ..errors import CheckpointError, CorruptCheckpointError
from ..errors import DiskFullError as _CoreDiskFullError

__all__ = [
    "ConversionError",
    "CorruptSourceError",
    "DiskFullError",
    "SameFileError",
    "UnknownFormatError",
    "UnsafePickleError",
    "UnsupportedSourceError",
]


class ConversionError(CheckpointError):
    """Root of the errors raised only by ``ckptfmt.convert``."""


class UnknownFormatError(ConversionError, ValueError):
    """The source's content is not one of the formats :func:`ckptfmt.convert.detect` knows."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


class UnsupportedSourceError(ConversionError, ValueError):
    """The source is of a known format but uses a feature convert() does not read (TorchScript, ...)."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


class SameFileError(ConversionError, ValueError):
    """The destination names the source file: converting in place would replace what is being read."""


class CorruptSourceError(ConversionError, CorruptCheckpointError):
    """The source is of a known format, but its bytes break that format (truncated, bad header, ...)."""


class UnsafePickleError(ConversionError, pickle.UnpicklingError):
    """Loading the source would run code it names (pickle globals outside the safe allowlist).

    ``globals`` lists the offending ``module.name`` strings, as far as they could be found.
    """

    def __init__(self, path: str | os.PathLike[str], message: str, *, globals: list[str] | None = None) -> None:  # noqa: A002
        self.path = os.fspath(path)
        self.globals = list(globals or [])
        super().__init__(f"{self.path}: {message}")


class DiskFullError(ConversionError, _CoreDiskFullError):
    """Writing ``filename`` failed for lack of space (``errno`` is ``ENOSPC``); the previous file there is intact.

    Also a :class:`ckptfmt.DiskFullError`, so one ``except`` catches a full disk in saves and exports alike.
    """

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        OSError.__init__(self, errno.ENOSPC, f"{os.fspath(path)}: {message}", os.fspath(path))

    def __str__(self) -> str:
        return str(self.strerror)
