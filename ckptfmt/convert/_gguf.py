"""GGUF files (llama.cpp), read per the GGUF specification (ggml docs/gguf.md) without the gguf package.

Layout, little-endian: magic ``GGUF``, version (uint32: 1, 2, 3), tensor count and key-value count
(uint64; uint32 in version 1), the key-value pairs (key string, value type uint32, value), the tensor
infos (name, n_dims uint32, dims uint64 each (fastest first), ggml type uint32, offset uint64 from the
data start), then the data, aligned to ``general.alignment`` (default 32). Strings are a uint64 length
and UTF-8 bytes.

The tree maps each tensor name to its data: float and integer types (F32, F16, BF16, F64, I8-I64) as
tensors of that dtype and the numpy shape (dims reversed); quantized types as their raw blocks, bit
for bit, a uint8 tensor of shape ``(*shape[:-1], row bytes)``. The user metadata key ``"gguf"`` holds
``version``, ``alignment``, ``kv`` (every key-value pair: numbers, bools, str (bytes where a string is
not UTF-8), lists), ``kv_types`` (each pair's GGUF type name, ``["ARRAY", item type]`` for arrays) and
``tensor_types`` (``{name: {"type": ggml type name, "shape": [...]}}`` for every tensor), so nothing
is lost. Every count and length is checked against the bytes left in the file before anything is
allocated.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

from .._dtypes import DTYPES
from ._errors import CorruptSourceError, UnsupportedSourceError
from ._lazy import FileArray

__all__ = ["GGML_TYPES", "MAGIC", "METADATA_KEY", "read_gguf"]

MAGIC = b"GGUF"
METADATA_KEY = "gguf"
#: ggml type id -> (name, elements per block, bytes per block, canonical dtype or None when quantized)
GGML_TYPES: dict[int, tuple[str, int, int, str | None]] = {
    0: ("F32", 1, 4, "float32"), 1: ("F16", 1, 2, "float16"), 2: ("Q4_0", 32, 18, None), 3: ("Q4_1", 32, 20, None),
    6: ("Q5_0", 32, 22, None), 7: ("Q5_1", 32, 24, None), 8: ("Q8_0", 32, 34, None), 9: ("Q8_1", 32, 40, None),
    10: ("Q2_K", 256, 84, None), 11: ("Q3_K", 256, 110, None), 12: ("Q4_K", 256, 144, None),
    13: ("Q5_K", 256, 176, None), 14: ("Q6_K", 256, 210, None), 15: ("Q8_K", 256, 292, None),
    16: ("IQ2_XXS", 256, 66, None), 17: ("IQ2_XS", 256, 74, None), 18: ("IQ3_XXS", 256, 98, None),
    19: ("IQ1_S", 256, 50, None), 20: ("IQ4_NL", 32, 18, None), 21: ("IQ3_S", 256, 110, None),
    22: ("IQ2_S", 256, 82, None), 23: ("IQ4_XS", 256, 136, None), 24: ("I8", 1, 1, "int8"),
    25: ("I16", 1, 2, "int16"), 26: ("I32", 1, 4, "int32"), 27: ("I64", 1, 8, "int64"), 28: ("F64", 1, 8, "float64"),
    29: ("IQ1_M", 256, 56, None), 30: ("BF16", 1, 2, "bfloat16"), 34: ("TQ1_0", 256, 54, None),
    35: ("TQ2_0", 256, 66, None), 39: ("MXFP4", 32, 17, None),
}
#: GGUF value type id -> (name, struct format or None for string/array)
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8
_DEFAULT_ALIGNMENT = 32


class _Cursor:
    """Reads the header of a GGUF file, refusing any length that runs past its end."""

    def __init__(self, path: str, f: Any, size: int) -> None:
        self.path = path
        self.f = f
        self.size = size
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise CorruptSourceError(self.path, f"gguf: {what} needs {n} bytes at offset {self.pos}, but the file "
                                                f"has {self.size - self.pos} left (truncated or hostile)")
        data = self.f.read(n)
        if len(data) != n:
            raise CorruptSourceError(self.path, f"gguf: the file ended while reading {what}")
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, *, small: bool = False) -> str | bytes:
        n = self.unpack("<I" if small else "<Q", f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    def value(self, vtype: int, what: str, depth: int, v1: bool) -> tuple[Any, Any]:
        """(value, type description)."""
        info = _VALUE_TYPES.get(vtype)
        if info is None:
            raise CorruptSourceError(self.path, f"gguf: {what} has unknown value type {vtype}")
        name, fmt = info
        if fmt is not None:
            return self.unpack(fmt, what), name
        if name == "STRING":
            return self.string(what, small=v1), name
        if depth >= _MAX_NESTING:
            raise CorruptSourceError(self.path, f"gguf: {what} nests arrays deeper than {_MAX_NESTING}")
        item = self.unpack("<I", f"{what} item type")
        count = self.unpack("<I" if v1 else "<Q", f"{what} count")
        item_info = _VALUE_TYPES.get(item)
        if item_info is None:
            raise CorruptSourceError(self.path, f"gguf: {what} has unknown item type {item}")
        length = 4 if v1 else 8  # a string's length field, an array's count field
        least = struct.calcsize(item_info[1]) if item_info[1] else length if item == 8 else 4 + length
        if count * least > self.size - self.pos:
            raise CorruptSourceError(self.path, f"gguf: {what} claims {count} items, more than the "
                                                f"{self.size - self.pos} bytes left can hold")
        if item_info[1] is not None:
            fmt_all = f"<{count}{item_info[1][1]}"
            values = list(struct.unpack(fmt_all, self.take(struct.calcsize(fmt_all), what)))
            return values, ["ARRAY", item_info[0]]
        out, kind = [], None
        for i in range(count):
            v, kind = self.value(item, f"{what}[{i}]", depth + 1, v1)
            out.append(v)
        return out, ["ARRAY", kind if kind is not None else item_info[0]]


def read_gguf(path: str) -> tuple[dict[str, FileArray], dict[str, Any]]:
    """(``{tensor name: lazy tensor}``, ``{"gguf": {...}}``) of a GGUF file; see the module docstring."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as f:
        cur = _Cursor(path, f, size)
        if cur.take(4, "the magic") != MAGIC:
            raise CorruptSourceError(path, "gguf: bad magic")
        version = cur.unpack("<I", "the version")
        if version not in (1, 2, 3):
            hint = " (a big-endian GGUF file?)" if version.to_bytes(4, "little")[0] == 0 else ""
            raise UnsupportedSourceError(path, f"gguf: version {version} is not one of 1, 2, 3{hint}")
        v1 = version == 1
        n_tensors = cur.unpack("<I" if v1 else "<Q", "the tensor count")
        n_kv = cur.unpack("<I" if v1 else "<Q", "the key-value count")
        # the least a pair (key length, type, a 1-byte value) and a tensor info (name length, n_dims, type,
        # offset) can take: counts that cannot fit in the file are refused before anything is read
        least_kv, least_info = (9, 20) if v1 else (13, 24)
        if n_kv * least_kv > size - cur.pos or n_tensors * least_info > size - cur.pos:
            raise CorruptSourceError(path, f"gguf: {n_tensors} tensors and {n_kv} key-value pairs cannot fit in "
                                           f"{size} bytes")
        kv: dict[str, Any] = {}
        kv_types: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"key {i}", small=v1)
            if not isinstance(key, str):
                raise CorruptSourceError(path, f"gguf: key {i} is not UTF-8")
            vtype = cur.unpack("<I", f"the type of {key!r}")
            kv[key], kv_types[key] = cur.value(vtype, f"value {key!r}", 0, v1)
        alignment = kv.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise CorruptSourceError(path, f"gguf: general.alignment {alignment!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor {i} name", small=v1)
            if not isinstance(name, str):
                raise CorruptSourceError(path, f"gguf: tensor {i}'s name is not UTF-8")
            n_dims = cur.unpack("<I", f"tensor {name!r} n_dims")
            if n_dims > _MAX_DIMS:
                raise CorruptSourceError(path, f"gguf: tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
            dims = [cur.unpack("<I" if v1 else "<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
            gtype = cur.unpack("<I", f"tensor {name!r} type")
            offset = cur.unpack("<Q", f"tensor {name!r} offset")
            infos.append((name, dims, gtype, offset))
        data_start = cur.pos + (-cur.pos % alignment)
    tensors: dict[str, FileArray] = {}
    types: dict[str, Any] = {}
    for name, dims, gtype, offset in infos:
        if name in tensors:
            raise CorruptSourceError(path, f"gguf: tensor {name!r} appears twice")
        info = GGML_TYPES.get(gtype)
        if info is None:
            raise UnsupportedSourceError(path, f"gguf: tensor {name!r} has ggml type {gtype}, which this converter "
                                               "does not know; its block size is needed to keep it")
        tname, block, block_bytes, dtype = info
        shape = tuple(reversed(dims))
        if dims and dims[0] % block:
            raise CorruptSourceError(path, f"gguf: tensor {name!r} of type {tname}: its rows of {dims[0]} elements "
                                           f"are not whole blocks of {block}")
        if offset % alignment:
            raise CorruptSourceError(path, f"gguf: tensor {name!r} offset {offset} is not aligned to {alignment}")
        if dtype is not None:
            array_shape, canonical = shape, DTYPES[dtype]
        else:
            row = (dims[0] // block) * block_bytes if dims else block_bytes
            array_shape, canonical = (*shape[:-1], row), DTYPES["uint8"]
        nbytes = math.prod(array_shape) * canonical.itemsize
        if data_start + offset + nbytes > size:
            raise CorruptSourceError(path, f"gguf: tensor {name!r} needs bytes [{data_start + offset}, "
                                           f"{data_start + offset + nbytes}) but the file has {size} (truncated?)")
        tensors[name] = FileArray(path, data_start + offset, canonical, array_shape, name=name, file_size=size)
        types[name] = {"type": tname, "shape": list(shape)}
    meta = {METADATA_KEY: {"version": version, "alignment": alignment, "kv": kv, "kv_types": kv_types,
                           "tensor_types": types}}
    return tensors, meta
