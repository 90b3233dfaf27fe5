"""Verified byte-range reads of a distributed checkpoint, torch-free (spec/DISTRIBUTED.md §6).

A load names the bytes it needs inside an extent; the read covers the whole blocks around them,
checks each block's xxh3 and hands back just the bytes asked for.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._checksum import checksum
from .._codec import StoredRow, decode_into
from .._dtypes import DTYPES, numpy_dtype
from ..errors import ChecksumMismatchError, CorruptCheckpointError, TruncatedCheckpointError
from ._index import INDEX_NAME, MAX_INDEX_BYTES, Coding, Extent, Index, TensorRecord, parse_index
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
    """Bytes ``[start, stop)`` of ``ext``'s data as a uint8 array, after checking every block they touch.

    A compressed extent reads the stored bytes of just the chunks the range overlaps, checks each
    chunk's checksum, then decodes them (§6).
    """
    out = np.empty(max(stop - start, 0), np.uint8)
    read_range_into(loc, idx, ext, start, stop, out, key=key)
    return out


def read_range_into(loc: Location, idx: Index, ext: Extent, start: int, stop: int, out: np.ndarray, *,
                    key: str = "") -> None:
    """:func:`read_range` into ``out`` (uint8, ``stop - start`` bytes, e.g. the target tensor's own memory).

    Whole blocks inside the range are read straight into ``out`` and checked there; only the partial
    blocks at its two ends go through a scratch buffer of one block each.
    """
    if not 0 <= start <= stop <= ext.length:
        raise ValueError(f"range [{start}, {stop}) outside an extent of {ext.length} bytes")
    if len(out) != stop - start:
        raise ValueError(f"{len(out)}-byte buffer for a range of {stop - start} bytes")
    if stop == start:
        return
    if ext.coding is not None:
        _read_coded(loc, idx, ext, ext.coding, start, stop, out, key)
        return
    bs, n = idx.block_size, ext.length
    inner_lo = -(-start // bs) * bs
    inner_hi = n if stop == n else stop // bs * bs
    if inner_lo >= inner_hi:  # within at most two blocks: through one scratch buffer
        b0, b1 = start // bs, -(-stop // bs)
        lo, hi = b0 * bs, min(b1 * bs, n)
        buf = _read(loc, idx, ext, lo, hi - lo)
        _verify_blocks(loc, idx, ext, buf, b0, key)
        out[:] = buf[start - lo:stop - lo]
        return
    if start < inner_lo:  # head: the block holding ``start``
        b = start // bs
        buf = _read(loc, idx, ext, b * bs, bs)
        _verify_blocks(loc, idx, ext, buf, b, key)
        out[:inner_lo - start] = buf[start - b * bs:]
    mid = out[inner_lo - start:inner_hi - start]
    _read(loc, idx, ext, inner_lo, inner_hi - inner_lo, mid)
    _verify_blocks(loc, idx, ext, mid, inner_lo // bs, key)
    if inner_hi < stop:  # tail: the block holding ``stop - 1``
        e = min(inner_hi + bs, n)
        buf = _read(loc, idx, ext, inner_hi, e - inner_hi)
        _verify_blocks(loc, idx, ext, buf, inner_hi // bs, key)
        out[inner_hi - start:] = buf[:stop - inner_hi]


def _read(loc: Location, idx: Index, ext: Extent, at: int, n: int, buf: np.ndarray | None = None) -> np.ndarray:
    """``n`` stored bytes of ``ext`` from ``at`` (relative to its offset), into ``buf`` or a new array."""
    if buf is None:
        buf = np.empty(n, np.uint8)
    name = idx.files[ext.file].name
    try:
        loc.read_into(name, ext.offset + at, buf.data)
    except EOFError as err:
        raise TruncatedCheckpointError(loc.join(loc.root, name), str(err)) from None
    return buf


def _verify_blocks(loc: Location, idx: Index, ext: Extent, buf: np.ndarray, b0: int, key: str) -> None:
    """Check the blocks of a raw extent that ``buf`` holds: it starts at block ``b0``, whole blocks
    (the extent's last one may be short)."""
    bs, mv = idx.block_size, buf.data
    got = [checksum(mv[i:i + bs]) for i in range(0, len(mv), bs)]
    want = np.frombuffer(ext.checksums, "<u8", len(got), 8 * b0).tolist()
    if got != want:
        _mismatch(loc, idx, ext, got, want, b0, key, "block")


def _mismatch(loc: Location, idx: Index, ext: Extent, got: list[int], want: list[int], b0: int, key: str,
              unit: str) -> None:
    i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
    name = idx.files[ext.file].name
    raise ChecksumMismatchError(loc.join(loc.root, name),
                                f"{unit} {b0 + i} of {key or 'an extent'} does not match its checksum",
                                region=f"{unit} {b0 + i}", key=key or None)


def _verify(loc: Location, idx: Index, ext: Extent, buf: np.ndarray, b0: int, b1: int, bounds: list[int],
            key: str, unit: str) -> None:
    """Check units ``b0 .. b1 - 1`` of ``buf`` (unit ``i`` at ``buf[bounds[i - b0]:bounds[i - b0 + 1]]``)."""
    mv = buf.data
    want = np.frombuffer(ext.checksums, "<u8", b1 - b0, 8 * b0).tolist()
    got = [checksum(mv[bounds[i]:bounds[i + 1]]) for i in range(len(want))]
    if got != want:
        _mismatch(loc, idx, ext, got, want, b0, key, unit)


def _read_coded(loc: Location, idx: Index, ext: Extent, c: Coding, start: int, stop: int, out: np.ndarray,
                key: str) -> None:
    """Decoded bytes ``[start, stop)`` of a compressed extent: only the chunks they overlap are read."""
    cb, k = c.chunk_bytes, c.planes
    first, last = start // cb, (stop - 1) // cb
    sizes = c.piece_sizes()
    # stored offset of each chunk from `first` to `last + 1`: prefix sums of just the pieces before them
    base = int(sizes[: first * k].sum(dtype=np.uint64))
    ends = np.cumsum(sizes[first * k : (last + 1) * k].reshape(-1, k).sum(axis=1, dtype=np.uint64), dtype=np.uint64)
    bounds = [0, *ends.tolist()]
    buf = _read(loc, idx, ext, base, bounds[-1])
    _verify(loc, idx, ext, buf, first, last + 1, bounds, key, "chunk")
    row = StoredRow(c.codec, k, ext.length, 0, tuple(sizes.tolist()), cb)
    name = idx.files[ext.file].name

    def read(at: int, n: int) -> np.ndarray:  # ``at``: from the extent's first stored byte; all read above
        return buf[at - base : at - base + n]

    where = f"{loc.join(loc.root, name)}: {key or 'an extent'}"
    try:
        decode_into(row, read, out, lambda: where, start=start, stop=stop)
    except ChecksumMismatchError as e:
        raise ChecksumMismatchError(loc.join(loc.root, name), str(e), region="chunk", key=key or None) from None


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
        raw = read_range(loc, idx, c.extent, 0, c.extent.length, key=rec.key)  # length: decoded bytes
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
