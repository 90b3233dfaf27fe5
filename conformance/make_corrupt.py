"""Generator of ``conformance/corrupt/``: one small crafted file per rule of spec §3.3, §5.2, §8 and §11.

Every file is assembled from the format primitives of ckptfmt (``Header.pack``, ``Footer.pack``,
``checksum``) and msgpack, with every checksum recomputed, so that the only thing wrong with a file is
the rule it names and a reader reaches that rule's check. ``python conformance/make_corrupt.py``
rewrites the files and ``corrupt/manifest.json`` (file -> expected exception class, spec rule, the
stage that must raise it, and how the file was made). The files are small (the largest is a few KiB;
"claims" of huge sizes are made by fields, never by content).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ckptfmt._checksum import EMPTY_CHECKSUM, checksum
from ckptfmt._footer import Footer
from ckptfmt._header import MAGIC, Header

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corrupt")


# ---------------------------------------------------------------- tree encodings (spec §4.2)


def t_map(keys: list[Any], values: list[Any]) -> msgpack.ExtType:
    """A tree dict (ext 5) from its keys and encoded values; keys may repeat (for crafted files)."""
    return msgpack.ExtType(5, msgpack.packb([keys, values], use_bin_type=True))


def t_tuple(items: list[Any]) -> msgpack.ExtType:
    """A tree tuple (ext 2)."""
    return msgpack.ExtType(2, msgpack.packb(items, use_bin_type=True))


def t_int(value: int) -> msgpack.ExtType:
    """A plain integer (ext 4)."""
    return msgpack.ExtType(4, msgpack.packb(value))


def t_scalar(row: int) -> msgpack.ExtType:
    """An array scalar (ext 3): a fixext 4 holding the row as a little-endian u32."""
    return msgpack.ExtType(3, struct.pack("<I", row))


def t_view(row: int) -> msgpack.ExtType:
    """A view reference (ext 6)."""
    return msgpack.ExtType(6, struct.pack("<I", row))


# ---------------------------------------------------------------- the file


def _u8(xs: list[int]) -> bytes:
    return bytes(xs)


def _u64(xs: list[int]) -> bytes:
    return b"".join(struct.pack("<Q", x) for x in xs)


def _i64(xs: list[int]) -> bytes:
    return b"".join(struct.pack("<q", x) for x in xs)


@dataclass
class Blob:
    """A tensor to lay out: dtype name, shape, little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def tensor_table(blobs: list[Blob], alignment: int, *, checksums: bool = True) -> tuple[dict[str, Any], bytes]:
    """The ``tensors`` map (§4.3) and the blob region (§4.5) for ``blobs``."""
    start = -(-64 // alignment) * alignment
    body = bytearray()
    offsets = []
    for b in blobs:
        if not b.data:
            offsets.append(0)
            continue
        body += bytes(-len(body) % alignment)
        offsets.append(start + len(body))
        body += b.data
    body += bytes(-len(body) % alignment)
    names: list[str] = []
    for b in blobs:
        if b.dtype not in names:
            names.append(b.dtype)
    table: dict[str, Any] = {
        "count": len(blobs), "dtypes": names, "dtype": _u8([names.index(b.dtype) for b in blobs]),
        "ndim": _u8([len(b.shape) for b in blobs]), "shape": _u64([d for b in blobs for d in b.shape]),
        "offset": _u64(offsets), "nbytes": _u64([len(b.data) for b in blobs]),
    }
    if checksums:
        table["checksum"] = _u64([checksum(b.data) if b.data else EMPTY_CHECKSUM for b in blobs])
    return table, bytes(body)


def view_table(views: list[tuple[str, tuple[int, ...], tuple[int, ...], int, int]]) -> dict[str, Any]:
    """The ``views`` map (§4.7) from (dtype, shape, strides, base row, byte offset) rows."""
    names: list[str] = []
    for v in views:
        if v[0] not in names:
            names.append(v[0])
    return {"count": len(views), "dtypes": names, "dtype": _u8([names.index(v[0]) for v in views]),
            "ndim": _u8([len(v[1]) for v in views]), "shape": _u64([d for v in views for d in v[1]]),
            "strides": _i64([s for v in views for s in v[2]]), "base": _u64([v[3] for v in views]),
            "offset": _u64([v[4] for v in views])}


def pack_map(pairs: list[tuple[Any, Any]], raw: dict[str, bytes] | None = None) -> bytes:
    """A msgpack map from (key, value) pairs (keys may repeat); values in ``raw`` are msgpack bytes as is."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    out = bytearray(head)
    for k, v in pairs:
        out += msgpack.packb(k, use_bin_type=True)
        out += raw[k] if raw and k in raw and v is None else msgpack.packb(v, use_bin_type=True)
    return bytes(out)


def build_file(*, blobs: list[Blob] | None = None, tree: Any = None, tree_raw: bytes | None = None,
               alignment: int = 64, header: dict[str, Any] | None = None, checksums: bool = True,
               edit_table: Callable[[dict[str, Any]], None] | None = None,
               meta_pairs: Callable[[list[tuple[Any, Any]]], list[tuple[Any, Any]]] | None = None,
               meta_raw: bytes | None = None, footer: dict[str, Any] | None = None,
               views: dict[str, Any] | None = None, header_raw: bytes | None = None) -> bytes:
    """A whole file, every checksum right unless a field is overridden.

    ``tree`` is a msgpack-ready value (use the ``t_*`` helpers); ``tree_raw`` is the tree as msgpack
    bytes. ``edit_table`` may change the tensor map, ``meta_pairs`` the list of top-level pairs,
    ``meta_raw`` replaces the metadata bytes, ``footer`` overrides Footer fields.
    """
    blobs = blobs or []
    table, body = tensor_table(blobs, alignment, checksums=checksums)
    if edit_table is not None:
        edit_table(table)
    if tree is None and tree_raw is None:
        tree = t_map([f"t{i}" for i in range(len(blobs))], list(range(len(blobs))))
    pairs: list[tuple[Any, Any]] = [("tree", None if tree_raw is not None else tree), ("tensors", table),
                                    ("producer", {"name": "make_corrupt", "version": "0"}),
                                    ("created", "2026-01-01T00:00:00Z"), ("user", {})]
    if views is not None:
        pairs.append(("views", views))
    if meta_pairs is not None:
        pairs = meta_pairs(pairs)
    meta = meta_raw if meta_raw is not None else pack_map(pairs, {"tree": tree_raw} if tree_raw is not None else None)
    head = header_raw if header_raw is not None else Header(alignment=alignment, **(header or {})).pack()
    pad = bytes(-(-64 // alignment) * alignment - 64)
    offset = 64 + len(pad) + len(body)
    fields = {"metadata_offset": offset, "metadata_length": len(meta), "metadata_checksum": checksum(meta)}
    fields.update(footer or {})
    return head + pad + body + meta + Footer(**fields).pack()
