"""The metadata's maps split into their entries in place, from msgpack headers alone (spec §4.1, §4.3).

The top-level map (§4.1) and the tensor and view maps (§4.3, §4.7) are read entry by entry: where each
value starts and ends is found from the msgpack headers (format: "Overview" of the msgpack spec), so
the metadata is neither copied nor decoded to find its sections, and binary columns can be read in
place. A value of many objects (large user metadata, an unknown entry) goes to msgpack's own skip.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import InvalidMetadataError

#: msgpack first bytes (format spec, "Overview") -> total size of a fixed-size object
_FIXED_SIZE = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
               0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
#: first byte -> (bytes of the length field, bytes after it before the payload) of bin, str and ext
_VAR_SIZE = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
             0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
#: first byte -> (bytes of the count field, objects per counted element) of array16/32 and map16/32
_CONTAINER_SIZE = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
#: objects :func:`skip` steps over in Python before it hands the rest to msgpack's own skip
SKIP_STEPS = 256


class ManyObjects(Exception):
    """Raised by :func:`skip` when a value holds more objects than are worth stepping over in Python."""


def skip(data: Any, pos: int) -> int:
    """Where the msgpack object starting at ``data[pos]`` ends, read from its headers alone (no copy, no decode).

    Structure only, as msgpack's ``Unpacker.skip``: ``ValueError`` on a truncated or malformed object,
    :class:`ManyObjects` past :data:`SKIP_STEPS` objects (the caller then redoes the whole map with
    msgpack's skip, over one copy: never once per value, which would be quadratic).
    """
    size = len(data)
    pending = 1
    steps = 0
    while pending:
        if pos >= size:
            raise ValueError("truncated msgpack data")
        pending -= 1
        steps += 1
        if steps > SKIP_STEPS:
            raise ManyObjects
        b = data[pos]
        if b < 0x80 or b >= 0xE0:  # fixint
            pos += 1
        elif b < 0x90:  # fixmap
            pending += 2 * (b & 0x0F)
            pos += 1
        elif b < 0xA0:  # fixarray
            pending += b & 0x0F
            pos += 1
        elif b < 0xC0:  # fixstr
            pos += 1 + (b & 0x1F)
        elif b in _FIXED_SIZE:
            pos += _FIXED_SIZE[b]
        elif b in _VAR_SIZE:
            width, extra = _VAR_SIZE[b]
            if pos + 1 + width > size:
                raise ValueError("truncated msgpack data")
            pos += 1 + width + extra + int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        elif b in _CONTAINER_SIZE:
            width, per = _CONTAINER_SIZE[b]
            if pos + 1 + width > size:
                raise ValueError("truncated msgpack data")
            pending += per * int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        else:
            raise ValueError(f"byte 0x{b:02x} does not start a msgpack object")
    if pos > size:
        raise ValueError("truncated msgpack data")
    return pos


def bin_payload(data: Any) -> Any:
    """The payload of a msgpack bin object spanning all of ``data``, as a view (no copy); None if not a bin."""
    b = data[0]
    if b in (0xC4, 0xC5, 0xC6):
        return data[1 + _VAR_SIZE[b][0]:]
    return None


def map_header(data: Any) -> tuple[int, int] | None:
    """(entry count, header length) of a msgpack map starting at ``data[0]``; None if it is not a map."""
    b = data[0] if len(data) else -1
    if 0x80 <= b < 0x90:
        return b & 0x0F, 1
    if b in (0xDE, 0xDF):
        width = _CONTAINER_SIZE[b][0]
        if len(data) < 1 + width:
            raise ValueError("truncated msgpack data")
        return int.from_bytes(data[1 : 1 + width], "big"), 1 + width
    return None


def sections(data: Any, path: str | None) -> dict[str, tuple[int, int]]:
    """Byte ranges of the top-level map's values, by key; refuses duplicate keys and trailing bytes.

    Found from the msgpack headers in place (:func:`skip`): the metadata is neither copied nor decoded
    here, unless a value holds many objects (large user metadata): then msgpack skips over one copy.
    """
    try:
        return _sections_in_place(data, path)
    except ManyObjects:
        return _sections_copied(data, path)


def _sections_in_place(data: Any, path: str | None) -> dict[str, tuple[int, int]]:
    head = map_header(data)
    if head is None:
        raise InvalidMetadataError(path, "metadata is not a msgpack map")
    count, pos = head
    out: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        end = skip(data, pos)
        key = msgpack.unpackb(data[pos:end], raw=False)
        if not isinstance(key, str):
            raise InvalidMetadataError(path, f"metadata key {key!r} is not a str")
        if key in out:
            raise InvalidMetadataError(path, f"metadata has two {key!r} entries")
        pos, end = end, skip(data, end)
        out[key] = (pos, end)
        pos = end
    if pos != len(data):
        raise InvalidMetadataError(path, f"{len(data) - pos} bytes follow the metadata map")
    return out


def _sections_copied(data: Any, path: str | None) -> dict[str, tuple[int, int]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        count = unpacker.read_map_header()
    except Exception:
        raise InvalidMetadataError(path, "metadata is not a msgpack map") from None
    out: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        key = unpacker.unpack()
        if not isinstance(key, str):
            raise InvalidMetadataError(path, f"metadata key {key!r} is not a str")
        if key in out:
            raise InvalidMetadataError(path, f"metadata has two {key!r} entries")
        start = unpacker.tell()
        unpacker.skip()
        out[key] = (start, unpacker.tell())
    if unpacker.tell() != len(data):
        raise InvalidMetadataError(path, f"{len(data) - unpacker.tell()} bytes follow the metadata map")
    return out
