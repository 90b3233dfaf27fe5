"""The fixed 64-byte Footer at the end of the file, pointing at the metadata (spec §5)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._checksum import checksum
from ._versions import reserved_must_be_zero
from .errors import ChecksumMismatchError, InvalidMetadataError, TruncatedCheckpointError

FOOTER_MAGIC = b"CKPTFOOT"
FOOTER_SIZE = 64

# metadata offset, metadata length, metadata checksum, reserved, magic
_LAYOUT = struct.Struct("<QQQ24s8s")
assert _LAYOUT.size == 56


@dataclass(frozen=True)
class Footer:
    """Where the metadata is and its checksum."""

    metadata_offset: int
    metadata_length: int
    metadata_checksum: int

    def pack(self) -> bytes:
        """The 64 footer bytes, checksum included."""
        body = _LAYOUT.pack(self.metadata_offset, self.metadata_length, self.metadata_checksum, bytes(24),
                            FOOTER_MAGIC)
        return body + checksum(body).to_bytes(8, "little")


def parse_footer(data: bytes, file_size: int, minor: int, path: str | None = None) -> Footer:
    """Parse and validate the last 64 bytes of a file of ``file_size`` bytes (§5.2)."""
    if len(data) != FOOTER_SIZE or data[48:56] != FOOTER_MAGIC:
        raise TruncatedCheckpointError(
            path, "no footer at the end of the file: the file is truncated or was never completely written")
    if checksum(data[:56]) != int.from_bytes(data[56:64], "little"):
        raise ChecksumMismatchError(path, "footer checksum mismatch (the last 64 bytes are corrupted)",
                                    region="footer")
    offset, length, meta_sum, reserved, _ = _LAYOUT.unpack(data[:56])
    if reserved_must_be_zero(minor) and any(reserved):
        raise InvalidMetadataError(path, "footer: reserved bytes 24..47 are not zero")
    if offset + length != file_size - FOOTER_SIZE:
        raise InvalidMetadataError(
            path, f"footer: metadata [{offset}, {offset + length}) does not end where the footer starts "
                  f"({file_size - FOOTER_SIZE})")
    return Footer(offset, length, meta_sum)
