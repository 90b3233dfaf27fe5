"""Verified byte-range reads of a distributed checkpoint, torch-free (spec/DISTRIBUTED.md §6).

A load names the bytes it needs inside an extent; the read covers the whole blocks around them,
checks each block's xxh3 and hands back just the bytes asked for.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from .._checksum import checksum
from .._dtypes import DTYPES, numpy_dtype
from ..errors import ChecksumMismatchError, CorruptCheckpointError, TruncatedCheckpointError
from ._index import INDEX_NAME, MAX_INDEX_BYTES, Extent, Index, TensorRecord, parse_index
from ._store import Location


def open_index(loc: Location, *, max_bytes: int = MAX_INDEX_BYTES) -> Index:
    """Read and parse the committed index of ``loc``; the files it lists must have the sizes it says."""
    data = loc.read_index(max_bytes)
    return parse_index(data, path=loc.join(loc.root, INDEX_NAME), max_bytes=max_bytes)


def check_files(loc: Location, idx: Index) -> None:
    """Every container file is present with the size the index records."""
    for f in idx.files:
        size = loc.file_size(f.name)
        if size != f.size:
            raise TruncatedCheckpointError(loc.join(loc.root, f.name),
                                           f"{size} bytes, the index records {f.size}")


def read_range(loc: Location, idx: Index, ext: Extent, start: int, stop: int, *, key: str = "") -> np.ndarray:
    """Bytes ``[start, stop)`` of ``ext`` as a uint8 array, after checking every block they touch."""
    if not 0 <= start <= stop <= ext.length:
        raise ValueError(f"range [{start}, {stop}) outside an extent of {ext.length} bytes")
    if stop == start:
        return np.empty(0, np.uint8)
    bs = idx.block_size
    b0, b1 = start // bs, (stop + bs - 1) // bs
    lo, hi = b0 * bs, min(b1 * bs, ext.length)
    buf = np.empty(hi - lo, np.uint8)
    name = idx.files[ext.file].name
    try:
        loc.read_into(name, ext.offset + lo, buf.data)
    except EOFError as err:
        raise TruncatedCheckpointError(loc.join(loc.root, name), str(err)) from None
    mv = buf.data
    for i in range(b0, b1):
        s = i * bs - lo
        e = min(s + bs, hi - lo)
        (want,) = struct.unpack_from("<Q", ext.checksums, 8 * i)
        if checksum(mv[s:e]) != want:
            raise ChecksumMismatchError(loc.join(loc.root, name),
                                        f"block {i} of {key or 'an extent'} (bytes {ext.offset + i * bs}.."
                                        f"{ext.offset + i * bs + e - s}) does not match its checksum",
                                        region=f"block {i}", key=key or None)
    return buf[start - lo:stop - lo]


def covered_exactly_once(rec: TensorRecord) -> str | None:
    """None when the chunks tile the tensor (disjoint, volumes add up), else what is wrong."""
    total = 1
    for d in rec.shape:
        total *= d
    vol = 0
    boxes = []
    for c in rec.chunks:
        v = 1
        for s in c.sizes:
            v *= s
        vol += v
        if v:
            boxes.append(c)
    boxes.sort(key=lambda c: c.offsets)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if rec.shape and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            pairs = zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=False)
            if all(bo < ao + asz and ao < bo + bsz for ao, asz, bo, bsz in pairs):
                return f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
    if vol != total:
        return f"chunks hold {vol} elements of {total}"
    return None


def read_tensor(loc: Location, idx: Index, rec: TensorRecord) -> np.ndarray:
    """The whole tensor ``rec`` as a numpy array (its dtype; raw ``V<n>`` where numpy lacks it)."""
    problem = covered_exactly_once(rec)
    if problem is not None:
        raise CorruptCheckpointError(loc.url, f"{rec.key}: {problem}")
    dt = numpy_dtype(DTYPES[rec.dtype])  # little-endian, as stored
    out = np.empty(rec.shape, dt)
    for c in rec.chunks:
        raw = read_range(loc, idx, c.extent, 0, c.extent.length, key=rec.key)
        box = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=False))
        out[box] = raw.view(dt).reshape(c.sizes)
    return out


def nest(flat: dict[str, Any], planner_data: dict[str, tuple[str | int, ...]]) -> dict[str, Any]:
    """The nested state DCP flattened (its planner data maps each key to its path), else the flat one."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        path = planner_data.get(key) or (key,)
        node: Any = root
        for i, el in enumerate(path):
            last = i == len(path) - 1
            nxt: Any = value if last else ([] if type(path[i + 1]) is int else {})
            if type(node) is list:
                if type(el) is not int or el > 1 << 20:
                    raise CorruptCheckpointError(None, f"planner data of {key!r}: bad list index {el!r}")
                while len(node) <= el:
                    node.append(None)
                if last or node[el] is None:
                    node[el] = nxt
                node = node[el]
            else:
                if last or el not in node:
                    node[el] = nxt
                node = node[el]
    return root


def is_sharded_dir(path: str | os.PathLike[str]) -> bool:
    """True for a local directory holding a committed distributed checkpoint."""
    return os.path.isfile(os.path.join(os.fspath(path), INDEX_NAME))
