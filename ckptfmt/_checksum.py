"""The one checksum of the format: XXH3-64 with seed 0 (spec §7)."""

from __future__ import annotations

from typing import Any

import xxhash

#: Name recorded nowhere in the file: 1.0 has exactly one algorithm.
ALGORITHM = "xxh3_64"


def checksum(data: Any) -> int:
    """XXH3-64 (seed 0) of a bytes-like object, as an unsigned 64-bit integer."""
    return xxhash.xxh3_64_intdigest(data)


def hasher() -> xxhash.xxh3_64:
    """A streaming XXH3-64 hasher whose digest equals :func:`checksum` of the concatenated input."""
    return xxhash.xxh3_64()


EMPTY_CHECKSUM = checksum(b"")
