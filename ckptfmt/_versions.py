"""Every format version number lives here, and so does version dispatch (spec §9).

A reader accepts any 1.x file: a higher minor only adds things a 1.0 reader may ignore, and
anything it may not ignore is announced by a required feature bit.
"""

from __future__ import annotations

from .errors import UnsupportedVersionError

FORMAT_MAJOR = 1
FORMAT_MINOR = 1

#: Required feature bits (§13.1): a reader that does not know one must refuse the file.
FEATURE_COMPRESSED = 0x1  # per-row codecs, stored sizes and the piece table (§13.2)
FEATURE_PACKED = 0x2  # small blobs at the pack alignment (§14)
#: Required feature bits this reader understands.
KNOWN_REQUIRED_FEATURES = FEATURE_COMPRESSED | FEATURE_PACKED
#: Optional feature bits this reader makes use of (none in 1.0; unknown ones are ignored).
KNOWN_OPTIONAL_FEATURES = 0


def minor_for(required_features: int) -> int:
    """The minor a writer puts in the header: 1.0 unless a 1.1 feature is used (a 1.0 file stays 1.0)."""
    return 1 if required_features else 0


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
