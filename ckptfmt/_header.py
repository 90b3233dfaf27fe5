"""The fixed 64-byte Header at offset 0 (spec §3)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._checksum import checksum
from ._versions import FORMAT_MAJOR, FORMAT_MINOR, check_version, reserved_must_be_zero
from .errors import BadMagicError, ChecksumMismatchError, InvalidMetadataError, TruncatedCheckpointError

MAGIC = b"\x89CKPT\r\n\x1a"
HEADER_SIZE = 64
BYTE_ORDER_MARK = 0x0A0B0C0D
MIN_ALIGNMENT = 64
MAX_ALIGNMENT = 1 << 30
DEFAULT_ALIGNMENT = 4096

# magic, major, minor, byte-order mark, required features, optional features, alignment, reserved
_LAYOUT = struct.Struct("<8sHHIIII28s")
assert _LAYOUT.size == 56


@dataclass(frozen=True)
class Header:
    """What the header says: version, feature bits and the blob alignment."""

    major: int = FORMAT_MAJOR
    minor: int = FORMAT_MINOR
    required_features: int = 0
    optional_features: int = 0
    alignment: int = DEFAULT_ALIGNMENT

    def pack(self) -> bytes:
        """The 64 header bytes, checksum included."""
        body = _LAYOUT.pack(
            MAGIC, self.major, self.minor, BYTE_ORDER_MARK, self.required_features,
            self.optional_features, self.alignment, bytes(28),
        )
        return body + checksum(body).to_bytes(8, "little")


def check_alignment(alignment: int, path: str | None = None) -> int:
    """Return ``alignment`` if it is a power of two in [64, 2**30]; else raise (§3.2)."""
    if not (MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT) or alignment & (alignment - 1):
        msg = f"alignment {alignment} is not a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}"
        if path is None:
            raise ValueError(msg)
        raise InvalidMetadataError(path, f"header: {msg}")
    return alignment


def parse_header(data: bytes, path: str | None = None) -> Header:
    """Parse and validate the first 64 bytes of a file, in the order §3.3 prescribes."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BadMagicError(path, f"not a ckptfmt checkpoint (first bytes {bytes(data[:8])!r}, expected {MAGIC!r})")
    if len(data) < HEADER_SIZE:
        raise TruncatedCheckpointError(path, f"file is {len(data)} bytes, shorter than the 64-byte header")
    stored = int.from_bytes(data[56:64], "little")
    if checksum(data[:56]) != stored:
        raise ChecksumMismatchError(path, "header checksum mismatch (header bytes 0..63 are corrupted)",
                                    region="header")
    _magic, major, minor, bom, required, optional, alignment, reserved = _LAYOUT.unpack(data[:56])
    check_version(path, major, minor, required)
    if bom != BYTE_ORDER_MARK:
        raise InvalidMetadataError(path, f"header: byte-order mark 0x{bom:08x}, expected 0x{BYTE_ORDER_MARK:08x}")
    if reserved_must_be_zero(minor) and any(reserved):
        raise InvalidMetadataError(path, "header: reserved bytes 28..55 are not zero")
    check_alignment(alignment, path or "")
    return Header(major, minor, required, optional, alignment)
