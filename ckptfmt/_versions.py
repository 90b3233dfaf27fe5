"""Every format version number lives here, and so does version dispatch (spec §9).

A reader accepts any 1.x file: a higher minor only adds things a 1.0 reader may ignore, and
anything it may not ignore is announced by a required feature bit.
"""

from __future__ import annotations

from .errors import UnsupportedVersionError

FORMAT_MAJOR = 1
FORMAT_MINOR = 0

#: Required feature bits this reader understands (none are defined in 1.0).
KNOWN_REQUIRED_FEATURES = 0
#: Optional feature bits this reader makes use of (none in 1.0; unknown ones are ignored).
KNOWN_OPTIONAL_FEATURES = 0


def check_version(path: str | None, major: int, minor: int, required_features: int) -> None:
    """Refuse a file this reader cannot read correctly (§9.2)."""
    if major != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            path,
            f"format version {major}.{minor} is not supported by this reader (it reads "
            f"{FORMAT_MAJOR}.x); upgrade ckptfmt to read it",
        )
    unknown = required_features & ~KNOWN_REQUIRED_FEATURES
    if unknown:
        raise UnsupportedVersionError(
            path,
            f"file requires feature bits 0x{unknown:08x} that this reader (format "
            f"{FORMAT_MAJOR}.{FORMAT_MINOR}) does not know; upgrade ckptfmt to read it",
        )


def reserved_must_be_zero(minor: int) -> bool:
    """Reserved bytes are checked only in files of a minor this reader knows (§9.3)."""
    return minor <= FORMAT_MINOR
