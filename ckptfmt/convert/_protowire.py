"""A small, strictly bounded protobuf wire-format reader for the few messages the converters decode.

No protobuf package and no generated code: a message is walked field by field with :func:`fields`,
which yields ``(number, wire type, value)``; varints are at most 10 bytes and below 2**64, every
length is checked against the bytes of the enclosing message, unknown fields are skipped by their wire
type, and groups (deprecated, never written by proto3) are refused. Callers decode nested messages by
calling :func:`fields` again on the ``(start, end)`` range they got, so the nesting depth is that of
the schema they follow, never the input's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = ["LEN", "VARINT", "WireError", "fields", "signed64", "varint"]

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_MAX_VARINT = 10


class WireError(ValueError):
    """The bytes break the protobuf wire format; the caller adds the file and the message's place."""


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``, which must end before ``end``."""
    value = 0
    shift = 0
    for i in range(_MAX_VARINT):
        if pos + i >= end:
            raise WireError(f"a varint at byte {pos} runs past the end of its message")
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if value >> 64:
                raise WireError(f"the varint at byte {pos} is larger than 64 bits")
            return value, pos + i + 1
        shift += 7
    raise WireError(f"the varint at byte {pos} is longer than {_MAX_VARINT} bytes")


def signed64(value: int) -> int:
    """A varint read as a two's complement int64 (proto ``int64``/``int32``)."""
    return value - (1 << 64) if value >> 63 else value


def fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """The fields of the message in ``buf[start:end]``: ``(number, wire type, value)``.

    ``value`` is the integer of a varint or fixed field, or the ``(start, end)`` range of a
    length-delimited one (bytes, strings, nested messages, packed repeated fields).
    """
    end = len(buf) if end is None else end
    if not 0 <= start <= end <= len(buf):
        raise WireError(f"message range [{start}, {end}) lies outside the {len(buf)} bytes")
    pos = start
    while pos < end:
        tag, pos = varint(buf, pos, end)
        number, wtype = tag >> 3, tag & 7
        if number == 0 or number >= 1 << 29:
            raise WireError(f"field number {number} is not valid (tag {tag} before byte {pos})")
        if wtype == VARINT:
            value, pos = varint(buf, pos, end)
            yield number, wtype, value
        elif wtype == LEN:
            n, pos = varint(buf, pos, end)
            if n > end - pos:
                raise WireError(f"field {number} claims {n} bytes at byte {pos}, but only {end - pos} are left")
            yield number, wtype, (pos, pos + n)
            pos += n
        elif wtype in (I64, I32):
            size = 8 if wtype == I64 else 4
            if size > end - pos:
                raise WireError(f"field {number} needs {size} bytes at byte {pos}, but only {end - pos} are left")
            (value,) = struct.unpack_from("<Q" if size == 8 else "<I", buf, pos)
            yield number, wtype, value
            pos += size
        else:
            raise WireError(f"field {number} has wire type {wtype} (groups and unknown types are not read)")
