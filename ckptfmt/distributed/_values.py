"""Plain values of a distributed checkpoint as msgpack (spec/DISTRIBUTED.md §5): no pickle anywhere.

DCP stores a non-tensor leaf (an optimizer's ``lr``, a step counter, an RNG tuple) as a "bytes item";
its default planner pickles it with ``torch.save``. Here it is msgpack, with one extension type for
tuples so that ``(0.9, 0.999)`` comes back as a tuple.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..errors import InvalidMetadataError, UnsupportedObjectError

#: msgpack extension type code of a tuple (its payload: the msgpack array of its items)
EXT_TUPLE = 1
#: deepest nesting a stored value may have
MAX_DEPTH = 64


def _default(obj: Any) -> Any:
    raise UnsupportedObjectError(
        f"cannot store a {type(obj).__name__} as a plain value in a distributed checkpoint: only None, bool, "
        "int (64-bit), float, str, bytes and lists, tuples and dicts (str keys) of them; tensors are saved as tensors")


def _tuples(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every tuple replaced by an extension value (msgpack would make it a list)."""
    if depth > MAX_DEPTH:
        raise UnsupportedObjectError(f"a plain value nests deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if t is tuple:
        return msgpack.ExtType(EXT_TUPLE, msgpack.packb([_tuples(v, depth + 1) for v in obj], default=_default,
                                                        strict_types=True))
    if t is list:
        return [_tuples(v, depth + 1) for v in obj]
    if t is dict:
        for k in obj:
            if type(k) is not str:
                raise UnsupportedObjectError(f"a dict key of a plain value must be a str, not {type(k).__name__}")
        return {k: _tuples(v, depth + 1) for k, v in obj.items()}
    if obj is None or t in (bool, int, float, str, bytes):
        return obj
    return _default(obj)


def encode_value(obj: Any) -> bytes:
    """The msgpack bytes of a plain value; :class:`UnsupportedObjectError` for anything else."""
    try:
        return msgpack.packb(_tuples(obj), strict_types=True, default=_default)
    except OverflowError as e:
        raise UnsupportedObjectError(f"an int of a plain value does not fit 64 bits: {e}") from None


def _ext_hook(depth: list[int]) -> Any:
    def hook(code: int, data: bytes) -> Any:
        if code != EXT_TUPLE:
            raise InvalidMetadataError(None, f"unknown msgpack extension type {code} in a stored value")
        depth[0] += 1
        if depth[0] > MAX_DEPTH:
            raise InvalidMetadataError(None, f"a stored value nests deeper than {MAX_DEPTH} levels")
        try:
            items = _unpack(data, depth)
        finally:
            depth[0] -= 1
        if type(items) is not list:
            raise InvalidMetadataError(None, "a stored tuple's payload is not an array")
        return tuple(items)
    return hook


def _unpack(data: bytes, depth: list[int]) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_ext_hook(depth), use_list=True)


def decode_value(data: bytes | bytearray | memoryview, *, where: str = "") -> Any:
    """The plain value of :func:`encode_value`'s bytes; malformed bytes raise :class:`InvalidMetadataError`."""
    try:
        return _unpack(bytes(data), [0])
    except InvalidMetadataError as e:
        raise InvalidMetadataError(None, f"{where}: {e.reason}" if where else e.reason) from None
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.StackError) as e:
        raise InvalidMetadataError(None, f"{where}: malformed stored value ({e})" if where else
                                   f"malformed stored value ({e})") from None
