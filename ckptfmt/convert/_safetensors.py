"""safetensors sources: single files and sharded (Hugging Face style) directories, read lazily.

The format is small enough to read without the safetensors package: an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`` and
the tensors' bytes, C order, little-endian. Each tensor becomes a :class:`FileArray` over its bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any

from .._dtypes import DTYPES
from ..errors import UnsupportedDTypeError
from ._errors import CorruptSourceError, UnknownFormatError
from ._hubcache import hub_blob
from ._lazy import FileArray

__all__ = ["INDEX_SUFFIX", "find_index", "read_safetensors", "read_sharded", "sniff_header"]

#: safetensors dtype code -> canonical dtype name (codes without a ckptfmt equivalent are refused)
ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
#: the safetensors library refuses larger headers too
MAX_HEADER = 100_000_000
MAX_INDEX = 64 << 20
INDEX_SUFFIX = ".safetensors.index.json"
#: JSON nesting a header or index may have; a safetensors header needs 3 (a deeper one is an attack on the parser)
MAX_DEPTH = 64
#: a JSON string, or one bracket outside strings
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def parse_json(raw: bytes, path: str, what: str) -> Any:
    """``json.loads`` of untrusted bytes: nesting checked first (no RecursionError), duplicate keys refused."""
    depth = 0
    for m in _JSON_TOKENS.finditer(raw):
        c = raw[m.start()]
        if c in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise CorruptSourceError(path, f"{what}: JSON nested deeper than {MAX_DEPTH} at byte {m.start()}")
        elif c in b"]}":
            depth -= 1

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise CorruptSourceError(path, f"{what}: the key {k!r} appears twice in one object")
            out[k] = v
        return out

    try:
        return json.loads(raw, object_pairs_hook=pairs)
    except CorruptSourceError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptSourceError(path, f"{what}: not valid JSON ({type(e).__name__}: {e})") from None


def sniff_header(head: bytes, file_size: int) -> bool:
    """True if ``head`` (the first bytes of a file) starts like a safetensors file."""
    if len(head) < 10:
        return False
    (n,) = struct.unpack_from("<Q", head)
    return 2 <= n <= min(MAX_HEADER, file_size - 8) and head[8:9] == b"{"


def _header(path: str) -> tuple[dict[str, Any], int, int]:
    """(parsed header, start of the data, file size)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        first = f.read(8)
        if len(first) < 8:
            raise CorruptSourceError(path, f"safetensors: the file has only {size} bytes")
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER:
            raise CorruptSourceError(path, f"safetensors: header length {n} is over the cap of {MAX_HEADER}")
        if 8 + n > size:
            raise CorruptSourceError(path, f"safetensors: the header needs {n} bytes but the file ends at {size} "
                                           "(truncated?)")
        raw = f.read(n)
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CorruptSourceError(path, "safetensors: the header is not a JSON object")
    return header, 8 + n, size


def read_safetensors(path: str) -> tuple[dict[str, FileArray], dict[str, Any]]:
    """``({name: tensor}, __metadata__)`` of one file; tensors in the order of their bytes in the file.

    The header is held to the safetensors library's own rules (``Metadata::validate``): every entry's
    ``data_offsets`` span exactly the dtype size times the element count, and the entries, sorted by offset, tile the
    data region from its first byte to the end of the file with no gap and no overlap.
    """
    header, start, size = _header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptSourceError(path, "safetensors: __metadata__ must map str to str")
    entries = []
    for name, info in header.items():
        what = f"safetensors: tensor {name!r}"
        if not isinstance(info, dict):
            raise CorruptSourceError(path, f"{what}: entry is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 63 for d in shape)):
            raise CorruptSourceError(path, f"{what}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CorruptSourceError(path, f"{what}: bad data_offsets {offsets!r}")
        if not isinstance(code, str) or code not in ST_DTYPES:
            raise UnsupportedDTypeError(f"{path}: {what} has dtype {code!r}, which ckptfmt cannot store; "
                                        f"supported: {sorted(ST_DTYPES)}")
        dtype = DTYPES[ST_DTYPES[code]]
        want = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != want:
            raise CorruptSourceError(path, f"{what}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; "
                                           f"a {code} tensor of shape {shape} has {want}")
        if start + offsets[1] > size:
            raise CorruptSourceError(path, f"{what}: its bytes end at {start + offsets[1]} but the file has "
                                           f"{size} bytes (truncated?)")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    end = 0
    for first, last, name, _, _ in entries:
        if first != end:
            raise CorruptSourceError(path, f"safetensors: tensor {name!r}: data_offsets [{first}, {last}] "
                                           + (f"overlap the tensor before it (which ends at {end})" if first < end
                                              else f"leave the bytes [{end}, {first}) of the data unused"))
        end = last
    if start + end != size:
        raise CorruptSourceError(path, f"safetensors: the tensors cover {end} bytes of data, the file holds "
                                       f"{size - start} after its header; the safetensors library refuses such a file")
    tensors = {name: FileArray(path, start + off, dtype, shape, name=name, file_size=size)
               for off, _, name, dtype, shape in entries}
    return tensors, dict(meta)


def _read_index(path: str) -> dict[str, Any]:
    size = os.path.getsize(path)
    if size > MAX_INDEX:
        raise CorruptSourceError(path, f"index file of {size} bytes is over the cap of {MAX_INDEX}")
    with open(path, "rb") as f:
        index = parse_json(f.read(), path, "safetensors index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CorruptSourceError(path, "safetensors index: no \"weight_map\" object")
    return index


def is_index(path: str) -> bool:
    """True if ``path`` holds a safetensors index (a JSON object with a ``weight_map`` object)."""
    try:
        _read_index(path)
    except (CorruptSourceError, OSError):
        return False
    return True


def find_index(directory: str) -> str | None:
    """The one ``*.safetensors.index.json`` of ``directory``, None if there is none."""
    found = sorted(n for n in os.listdir(directory) if n.endswith(INDEX_SUFFIX)
                   and os.path.isfile(os.path.join(directory, n)))
    if len(found) > 1:
        raise UnknownFormatError(directory, f"several safetensors index files ({', '.join(found)}); pass the one to "
                                            "convert")
    return os.path.join(directory, found[0]) if found else None


def add_shard(state: dict[str, Any], where: dict[str, str], part: dict[str, Any], shard: str, file: str) -> None:
    """Merge one shard's tensors into ``state``; a name in two shards is a corrupt source."""
    for name, value in part.items():
        if name in state:
            raise CorruptSourceError(file, f"tensor {name!r} is also in shard {where[name]!r}")
        where[name] = shard
        state[name] = value


def check_weight_map(weight_map: dict[str, str], where: dict[str, str], cited: str) -> None:
    """Every tensor the index lists is in the shard it names (``where``: tensor -> shard actually read)."""
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            raise CorruptSourceError(cited, f"weight_map puts {name!r} in {shard!r}, but "
                                     + ("it is not there" if name not in where else f"it is in {where[name]!r}"))


def read_sharded(path: str) -> tuple[dict[str, FileArray], dict[str, Any]]:
    """Merge the shards of an index file (or a directory) into one ``{name: tensor}`` and one metadata dict.

    Order: shards by file name, then each shard's tensors in the order of their bytes. The metadata is
    the shards' ``__metadata__`` (the first shard's value wins) updated with the index's ``metadata``.
    """
    if os.path.isdir(path):
        index_path = find_index(path)
        directory = path
    else:
        index_path, directory = path, os.path.dirname(os.path.abspath(path))
    extra: dict[str, Any] = {}
    weight_map: dict[str, str] | None = None
    if index_path is not None:
        index = _read_index(index_path)
        weight_map = index["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CorruptSourceError(index_path, "safetensors index: weight_map must map str to str")
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise CorruptSourceError(index_path, "safetensors index: metadata is not an object")
        extra = meta
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not shards:
            raise UnknownFormatError(path, "no *.safetensors files and no *.safetensors.index.json")
    root = os.path.realpath(directory)
    tensors: dict[str, FileArray] = {}
    merged: dict[str, Any] = {}
    where: dict[str, str] = {}
    for shard in shards:
        file = os.path.realpath(os.path.join(directory, shard))
        if os.path.commonpath([root, file]) != root and not hub_blob(root, file):
            raise CorruptSourceError(index_path or path, f"shard {shard!r} lies outside {directory}")
        if not os.path.isfile(file):
            raise CorruptSourceError(index_path or path, f"shard {shard!r} is missing")
        part, meta = read_safetensors(file)
        for k, v in meta.items():
            merged.setdefault(k, v)
        add_shard(tensors, where, part, shard, file)
    if weight_map is not None:
        check_weight_map(weight_map, where, index_path or path)
    merged.update(extra)
    return tensors, merged
