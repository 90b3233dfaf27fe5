# ruff: noqa: E501  (the table of cases keeps one case per line)
"""Generator of ``conformance/corrupt/``: one small crafted file per rule of spec §3.3, §5.2, §8, §11 and §13.

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
from ckptfmt._versions import FEATURE_COMPRESSED

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
        out += raw[k] if raw and k in raw and v is None else _packed(v)
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
    head = header_raw if header_raw is not None else Header(alignment=alignment, **{"minor": 0, **(header or {})}).pack()
    pad = bytes(-(-64 // alignment) * alignment - 64)
    offset = 64 + len(pad) + len(body)
    fields = {"metadata_offset": offset, "metadata_length": len(meta), "metadata_checksum": checksum(meta)}
    fields.update(footer or {})
    return head + pad + body + meta + Footer(**fields).pack()


# ---------------------------------------------------------------- the cases

A = Blob("float32", (3,), struct.pack("<3f", 0.0, 1.0, 2.0))
B = Blob("int64", (2, 2), struct.pack("<4q", 0, 1, 2, 3))


def base(**kw: Any) -> bytes:
    """The valid baseline: {"a": float32[3], "b": [int64[2, 2], 7]} at alignment 64 (blobs at 64 and 128)."""
    kw.setdefault("blobs", [A, B])
    kw.setdefault("tree", t_map(["a", "b"], [0, [1, t_int(7)]]))
    return build_file(**kw)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    """``data`` with one bit flipped at ``offset`` (negative: from the end); no checksum recomputed."""
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def metadata_range(data: bytes) -> tuple[int, int]:
    """(offset, length) of the metadata, from the footer."""
    m, length = struct.unpack_from("<QQ", data, len(data) - 64)
    return m, length


def table_edit(**columns: Any) -> Callable[[dict[str, Any]], None]:
    """An ``edit_table`` that sets (or, with None, deletes) tensor-table entries."""
    def edit(table: dict[str, Any]) -> None:
        for k, v in columns.items():
            if v is None:
                table.pop(k, None)
            else:
                table[k] = v
    return edit


def replace_pair(key: str, value: Any) -> Callable[[list[tuple[Any, Any]]], list[tuple[Any, Any]]]:
    """A ``meta_pairs`` that replaces (or, with ..., removes) one top-level entry."""
    def edit(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        if value is ...:
            return [(k, v) for k, v in pairs if k != key]
        return [(k, value if k == key else v) for k, v in pairs]
    return edit


def with_pairs(*extra: tuple[Any, Any]) -> Callable[[list[tuple[Any, Any]]], list[tuple[Any, Any]]]:
    return lambda pairs: pairs + list(extra)


def nested_tuples(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = t_tuple([node])
    return node


def u8_base(n: int) -> Blob:
    return Blob("uint8", (n,), bytes(range(n)))


def one_view(view: tuple[str, tuple[int, ...], tuple[int, ...], int, int], base_blob: Blob | None = None) -> bytes:
    """A file whose tree is {"base": row 0, "v": view 0}."""
    return build_file(blobs=[base_blob or u8_base(16)], tree=t_map(["base", "v"], [0, t_view(0)]),
                      views=view_table([view]))


@dataclass
class Case:
    """One corrupt (or, for the §1 corrections, valid) file and what a reader must do with it."""

    make: Callable[[], bytes]
    rule: str
    open: str | None = None  # exception class name expected from ckptfmt.open, None: opens
    load: str | None = None  # from ckptfmt.load (full, or of ``keys``); None: loads
    verify: bool | str = False  # report.ok, or the exception class verify raises
    how: str = ""
    limits: dict[str, int] = field(default_factory=dict)
    keys: list[str] | None = None


def fails(error: str, rule: str, make: Callable[[], bytes], how: str, **kw: Any) -> Case:
    """A file that open, load and verify all refuse with ``error``."""
    return Case(make, rule, error, error, False, how, **kw)


def _big_ndim() -> bytes:
    return build_file(blobs=[Blob("uint8", (1,) * 65, b"\x01")])


CASES: dict[str, Case] = {
    # §3.3 reading the header
    "empty": fails("TruncatedCheckpointError", "§3.3 step 1", lambda: b"", "a file of 0 bytes"),
    "magic_prefix": fails("TruncatedCheckpointError", "§3.3 step 1", lambda: MAGIC[:5],
                          "the first 5 bytes of the magic, nothing else"),
    "short_not_magic": fails("BadMagicError", "§3.3 steps 1-2", lambda: b"PK\x03\x04",
                             "4 bytes that are not a prefix of the magic (a zip header)"),
    "header_cut_at_40": fails("TruncatedCheckpointError", "§3.3 step 1", lambda: base()[:40],
                              "the first 40 bytes of a valid file"),
    "bad_magic": fails("BadMagicError", "§3.3 step 2", lambda: base(header_raw=_header_with(magic=b"\x89CKPX\r\n\x1a")),
                       "magic byte 4 changed, header checksum recomputed"),
    "header_checksum": fails("ChecksumMismatchError", "§3.3 step 3", lambda: flip(base(), 24, 0x80),
                             "a flipped bit in the alignment field; the checksum not recomputed"),
    "major_2": fails("UnsupportedVersionError", "§3.3 step 4, §9.2", lambda: base(header={"major": 2}),
                     "major version 2 (a file from the future), checksum right"),
    "major_0": fails("UnsupportedVersionError", "§3.3 step 4", lambda: base(header={"major": 0}), "major version 0"),
    "required_feature_bit": fails("UnsupportedVersionError", "§3.3 step 4, §9.2",
                                  lambda: base(header={"minor": 1, "required_features": 1 << 31}),
                                  "a 1.1 file setting required feature bit 31, unknown to a 1.0 reader"),
    "byte_order_mark": fails("InvalidMetadataError", "§3.3 step 5", lambda: base(header_raw=_header_with(bom=0x0D0C0B0A)),
                             "the byte-order mark stored big-endian"),
    "reserved_header": fails("InvalidMetadataError", "§3.3 step 6",
                             lambda: base(header_raw=_header_with(reserved=b"\x01" + bytes(27))),
                             "reserved header byte 28 set in a 1.0 file"),
    "alignment_not_power_of_two": fails("InvalidMetadataError", "§3.3 step 7",
                                        lambda: base(header_raw=_header_with(alignment=96)), "alignment 96"),
    "alignment_2_31": fails("InvalidMetadataError", "§3.3 step 7",
                            lambda: base(header_raw=_header_with(alignment=1 << 31)), "alignment 2**31"),
    "alignment_2_30_small_file": fails("InvalidMetadataError", "§5.2 step 4",
                                       lambda: base(header_raw=_header_with(alignment=1 << 30)),
                                       "alignment 2**30 in a 600-byte file: the metadata starts inside the "
                                       "header's padding (checked in O(1) memory)"),
    "header_padding_nonzero": fails("CorruptCheckpointError", "§3.3 step 8",
                                    lambda: _poke(base(alignment=128), 100, 1),
                                    "alignment 128, padding byte 100 set to 1"),
    # §5.2 reading the footer
    "cut_after_header": fails("TruncatedCheckpointError", "§5.2 step 1", lambda: base()[:64],
                              "only the header"),
    "cut_in_blob": fails("TruncatedCheckpointError", "§5.2 step 1", lambda: base()[:140], "cut inside blob 1"),
    "cut_in_metadata": fails("TruncatedCheckpointError", "§5.2 step 1",
                             lambda: base()[: metadata_range(base())[0] + 20], "cut inside the metadata"),
    "cut_in_footer": fails("TruncatedCheckpointError", "§5.2 step 1", lambda: base()[:-10],
                           "the last 10 bytes (footer checksum, end of magic) missing"),
    "footer_magic": fails("TruncatedCheckpointError", "§5.2 step 1", lambda: flip(base(), -16),
                          "a flipped bit in the footer magic"),
    "footer_checksum": fails("ChecksumMismatchError", "§5.2 step 2", lambda: flip(base(), -64 + 8),
                             "a flipped bit in the footer's metadata length, the footer checksum not recomputed"),
    "footer_reserved": fails("InvalidMetadataError", "§5.2 step 3",
                             lambda: _refoot(base(), reserved=b"\x01" + bytes(23)), "reserved footer byte 24 set"),
    "footer_range": fails("InvalidMetadataError", "§5.2 step 4", lambda: _refoot(base(), length_delta=-1),
                          "metadata length one short of the footer"),
    "metadata_claims_8_gib": fails("InvalidMetadataError", "§5.2 step 4", lambda: _refoot(base(), length=8 << 30),
                                   "metadata length 8 GiB in a small file (offset + length != footer start)"),
    "metadata_in_header_region": fails("InvalidMetadataError", "§5.2 step 4", lambda: _meta_at(base(), 32),
                                       "metadata offset 32 with the length adjusted to end at the footer"),
    "metadata_over_cap": fails("MetadataLimitError", "§5.2 step 5, §8.1", lambda: base(),
                               "a valid file opened with Limits(max_metadata_bytes=100)",
                               limits={"max_metadata_bytes": 100}),
    "metadata_checksum": fails("ChecksumMismatchError", "§5.2 step 6",
                               lambda: flip(base(), metadata_range(base())[0] + 3), "a flipped bit in the metadata"),
    # §7 blobs, §8.2 full verification
    "blob_checksum": Case(lambda: flip(base(), 64), "§7", None, "ChecksumMismatchError", False,
                          "a flipped bit in blob 0: opens (blobs are checked lazily), refuses to load"),
    "blob_padding_nonzero": Case(lambda: _poke(base(), 100, 7), "§8.2 (full verification)", None, None, False,
                                 "a padding byte after blob 0 set: loads, fails verification"),
    "bool_byte_2": Case(lambda: build_file(blobs=[Blob("bool", (3,), b"\x00\x01\x02")]), "§6", None, None, False,
                        "a bool tensor holding the byte 2: loads as is, fails verification"),
    # §8.2 rule 2: the metadata map
    "metadata_not_a_map": fails("InvalidMetadataError", "§8.2 rule 2", lambda: base(meta_raw=b"\x91\xc0"),
                                "the metadata is [nil]"),
    "metadata_trailing_bytes": fails("InvalidMetadataError", "§8.2 rule 2", lambda: base(meta_raw=_meta(base()) + b"\xc0"),
                                     "one nil after the map"),
    "metadata_invalid_msgpack": fails("InvalidMetadataError", "§8.2 rule 2",
                                      lambda: base(meta_raw=b"\x81\xa4tree\xc1"), "the never-used byte 0xc1"),
    "metadata_duplicate_key": fails("InvalidMetadataError", "§8.2 rule 2",
                                    lambda: base(meta_pairs=with_pairs(("user", {}))), "two 'user' entries"),
    "metadata_int_key": fails("InvalidMetadataError", "§8.2 rule 2", lambda: base(meta_pairs=with_pairs((1, 2))),
                              "a top-level key 1 (not a str)"),
    "metadata_no_tree": fails("InvalidMetadataError", "§8.2 rule 2", lambda: base(meta_pairs=replace_pair("tree", ...)),
                              "no 'tree' entry"),
    "metadata_no_tensors": fails("InvalidMetadataError", "§8.2 rule 2",
                                 lambda: base(meta_pairs=replace_pair("tensors", ...)), "no 'tensors' entry"),
    "created_not_str": fails("InvalidMetadataError", "§4.1", lambda: base(meta_pairs=replace_pair("created", 5)),
                             "'created' is the int 5"),
    "producer_not_map": fails("InvalidMetadataError", "§4.1", lambda: base(meta_pairs=replace_pair("producer", [])),
                              "'producer' is an array"),
    "user_not_map": fails("InvalidMetadataError", "§4.1", lambda: base(meta_pairs=replace_pair("user", "x")),
                          "'user' is a str"),
    "tensors_not_map": fails("InvalidMetadataError", "§4.3", lambda: base(meta_pairs=replace_pair("tensors", [1])),
                             "'tensors' is an array"),
    "tensors_int_key": fails("InvalidMetadataError", "§4.3", lambda: _table_with_pair(7, b"x"),
                             "the tensor map has a key 7 (keys are str)"),
    "tensors_duplicate_column": fails("InvalidMetadataError", "§4.3", lambda: _table_with_pair("count", 2),
                                      "two 'count' entries in the tensor map"),
    # §8.2 rule 3: the tree
    "tree_unknown_ext": fails("InvalidMetadataError", "§8.2 rule 3", lambda: base(tree=t_map(["a", "b", "x"], [0, 1, msgpack.ExtType(9, b"")])),
                              "an ext type 9 leaf"),
    "tree_timestamp": fails("InvalidMetadataError", "§8.2 rule 3",
                            lambda: base(tree_raw=msgpack.packb(msgpack.ExtType(
                                5, b"\x92" + msgpack.packb(["a", "b", "x"]) + b"\x93\x00\x01\xd6\xff" + bytes(4)))),
                            "a msgpack timestamp (ext -1) leaf"),
    "tree_msgpack_map": fails("InvalidMetadataError", "§8.2 rule 3", lambda: base(tree={"a": 0, "b": 1}),
                              "the tree is a msgpack map, not ext 5"),
    "tree_negative_int": fails("InvalidMetadataError", "§8.2 rules 3-4", lambda: base(tree=[0, 1, -1]),
                               "a bare int -1"),
    "tree_duplicate_key": fails("InvalidMetadataError", "§8.2 rule 3", lambda: base(tree=t_map(["a", "a"], [0, 1])),
                                "a tree dict with the key 'a' twice"),
    "tree_int_and_str_key": fails("InvalidMetadataError", "§4.2", lambda: base(tree=t_map([1, "1"], [0, 1])),
                                  "a tree dict with the keys 1 and '1' (equal key paths)"),
    "tree_float_key": fails("InvalidMetadataError", "§4.2", lambda: base(tree=t_map([1.5, "b"], [0, 1])),
                            "a tree dict key 1.5"),
    "tree_map_payload_shape": fails("InvalidMetadataError", "§8.2 rule 3",
                                    lambda: base(tree=msgpack.ExtType(5, msgpack.packb([["a", "b"], [0]]))),
                                    "an ext 5 payload whose arrays differ in length"),
    "tree_tuple_payload_not_array": fails("InvalidMetadataError", "§8.2 rule 3",
                                          lambda: base(tree=[0, 1, msgpack.ExtType(2, msgpack.packb(3))]),
                                          "an ext 2 payload that is the int 3"),
    "tree_scalar_payload_size": fails("InvalidMetadataError", "§4.2",
                                      lambda: base(tree=[0, 1, msgpack.ExtType(3, b"\x00\x00")]),
                                      "an ext 3 payload of 2 bytes (a u32 is 4)"),
    "tree_scalar_not_0d": fails("InvalidMetadataError", "§4.2", lambda: base(tree=[0, t_scalar(1)]),
                                "an ext 3 naming row 1, which is 2-d"),
    "tree_int_payload_not_int": fails("InvalidMetadataError", "§4.2",
                                      lambda: base(tree=[0, 1, msgpack.ExtType(4, msgpack.packb("7"))]),
                                      "an ext 4 payload that is a str"),
    "nesting_bomb_tuples": fails("MetadataLimitError", "§8.2 rule 3, §8.1", lambda: base(tree=[1, nested_tuples(65)]),
                                 "65 nested tuples around row 0"),
    "nesting_bomb_lists": fails("MetadataLimitError", "§8.2 rule 3, §8.1", lambda: base(tree_raw=b"\x91" * 2000 + b"\x90"),
                                "2000 nested lists"),
    "container_bomb": fails("MetadataLimitError", "§8.1", lambda: build_file(tree_raw=b"\xdc\xff\xff" + b"\x90" * 65535),
                            "65535 empty arrays (one container per byte)"),
    # §8.2 rule 4: references
    "reference_out_of_range": fails("InvalidMetadataError", "§8.2 rule 4", lambda: base(tree=[0, 1, 2]),
                                    "a bare int 2 in a table of 2 rows"),
    "row_not_referenced": fails("InvalidMetadataError", "§8.2 rule 4", lambda: base(tree=[0]),
                                "row 1 referenced by nothing (hidden payload)"),
    "view_not_referenced": fails("InvalidMetadataError", "§8.2 rule 4",
                                 lambda: build_file(blobs=[u8_base(16)], tree=[0],
                                                    views=view_table([("uint8", (4,), (1,), 0, 0)])),
                                 "a view row the tree does not reference"),
    # §8.2 rule 5: columns
    "column_missing": fails("InvalidMetadataError", "§8.2 rule 5", lambda: base(edit_table=table_edit(nbytes=None)),
                            "no 'nbytes' column"),
    "column_not_bin": fails("InvalidMetadataError", "§8.2 rule 5", lambda: base(edit_table=table_edit(ndim=[1, 2])),
                            "'ndim' is an array, not bin"),
    "column_wrong_length": fails("InvalidMetadataError", "§8.2 rule 5",
                                 lambda: base(edit_table=table_edit(offset=bytes(8))), "'offset' holds 1 row of 2"),
    "dtype_index_out_of_range": fails("InvalidMetadataError", "§8.2 rule 5",
                                      lambda: base(edit_table=table_edit(dtype=b"\x00\x05")), "dtype index 5 of 2"),
    "dtypes_repeated": fails("InvalidMetadataError", "§8.2 rule 5",
                             lambda: base(edit_table=table_edit(dtypes=["float32", "float32"], dtype=b"\x00\x01")),
                             "'dtypes' names float32 twice"),
    "unknown_dtype_in_1_0": fails("InvalidMetadataError", "§6",
                                  lambda: build_file(blobs=[Blob("float4_e2m1", (2,), b"\x00\x01")]),
                                  "a dtype name 1.0 does not define, in a 1.0 file"),
    "unknown_codec": Case(lambda: _unknown_codec(), "§13.2, §13.4", None, "UnsupportedCodecError", True,
                          "format 1.1, compressed feature: tensor 'b' names codec 'lz4-next', which 1.1 does not "
                          "define: opens and verifies (its stored bytes), refuses to decode that tensor"),
    "unknown_dtype_in_later_minor": Case(
        lambda: build_file(blobs=[Blob("float4_e2m1", (2,), b"\x00\x01")], header={"minor": 2}),
        "§6, §9.2", None, "UnsupportedDTypeError", True,
        "the same in a file of a later minor (1.2): opens and verifies, refuses to load that tensor"),
    # §8.2 rule 6: sizes
    "shape_nbytes_mismatch": fails("InvalidMetadataError", "§8.2 rule 6",
                                   lambda: base(blobs=[Blob("float32", (4,), A.data), B]),
                                   "shape (4,) float32 over a 12-byte blob"),
    "dimension_2_63": fails("InvalidMetadataError", "§8.2 rule 6",
                            lambda: build_file(blobs=[Blob("uint8", (0, 1 << 63), b"")]), "a dimension of 2**63"),
    "empty_but_2_63_bytes": fails("InvalidMetadataError", "§8.2 rule 6",
                                  lambda: build_file(blobs=[Blob("float32", (0, 1 << 61), b"")]),
                                  "shape (0, 2**61) float32: no elements, but 2**63 bytes of non-zero dimensions"),
    "ndim_over_cap": fails("MetadataLimitError", "§8.1", _big_ndim, "a tensor of 65 dimensions"),
    "tensor_count_over_cap": fails("MetadataLimitError", "§8.1", lambda: base(), "2 tensors with Limits(max_tensors=1)",
                                   limits={"max_tensors": 1}),
    # §8.2 rule 7: layout
    "blobs_overlap": fails("InvalidMetadataError", "§8.2 rule 7", lambda: base(edit_table=table_edit(offset=_u64([64, 64]))),
                           "blob 1 claims blob 0's offset"),
    "blob_out_of_file": fails("InvalidMetadataError", "§8.2 rule 7",
                              lambda: base(edit_table=table_edit(offset=_u64([64, 1 << 40]))), "blob 1 at 1 TiB"),
    "blob_misaligned": fails("InvalidMetadataError", "§8.2 rule 7",
                             lambda: base(edit_table=table_edit(offset=_u64([64, 96]))), "blob 1 at 96, alignment 64"),
    "empty_blob_offset": fails("InvalidMetadataError", "§4.5",
                               lambda: build_file(blobs=[Blob("float32", (0,), b"")], edit_table=table_edit(offset=_u64([64]))),
                               "an empty blob at offset 64 (must be 0)"),
    "empty_blob_checksum": fails("InvalidMetadataError", "§4.5",
                                 lambda: build_file(blobs=[Blob("float32", (0,), b"")], edit_table=table_edit(checksum=_u64([0]))),
                                 "an empty blob whose checksum is not xxh3('')"),
    # §8.2 rule 8: user and producer
    "user_ext": fails("InvalidMetadataError", "§8.2 rule 8", lambda: base(meta_pairs=replace_pair("user", {"x": msgpack.ExtType(4, b"\x07")})),
                      "user metadata holding an ext 4"),
    "user_duplicate_key": fails("InvalidMetadataError", "§8.2 rule 8",
                                lambda: base(meta_raw=_meta(base()).replace(b"\xa4user\x80", b"\xa4user\x82\xa1k\x01\xa1k\x02")),
                                "user metadata {'k': 1, 'k': 2}"),
    "user_too_deep": fails("MetadataLimitError", "§8.1", lambda: base(meta_pairs=replace_pair("user", _deep_user(65))),
                           "user metadata nested 65 deep"),
    # §8.2 rule 9, §4.7: views
    "view_base_out_of_range": fails("InvalidMetadataError", "§8.2 rule 9", lambda: one_view(("uint8", (4,), (1,), 1, 0)),
                                    "a view of row 1 in a table of 1 row"),
    "view_outside_base": fails("InvalidMetadataError", "§8.2 rule 9", lambda: one_view(("uint8", (4,), (4,), 0, 4)),
                               "a view reaching byte 16 of a 16-byte base"),
    "view_negative_reach": fails("InvalidMetadataError", "§8.2 rule 9", lambda: one_view(("uint8", (4,), (-1,), 0, 2)),
                                 "a view reaching byte -1"),
    "view_column_wrong_length": fails("InvalidMetadataError", "§8.2 rule 9",
                                      lambda: build_file(blobs=[u8_base(16)], tree=t_map(["b", "v"], [0, t_view(0)]),
                                                         views={**view_table([("uint8", (4,), (1,), 0, 0)]), "strides": b""}),
                                      "a 'strides' column of 0 bytes for one dimension"),
    "view_dimension_2_63": fails("InvalidMetadataError", "§4.7", lambda: one_view(("uint8", (1 << 63,), (0,), 0, 0)),
                                 "a view dimension of 2**63"),
    "view_stride0_2_62_elements": fails("InvalidMetadataError", "§4.7",
                                        lambda: one_view(("float32", (1 << 62,), (0,), 0, 0)),
                                        "a float32 view of 2**62 elements with stride 0 over a 16-byte base"),
    "view_stride0_2_40_elements": fails("MetadataLimitError", "§4.7, §8.1",
                                        lambda: one_view(("float32", (1 << 40,), (0,), 0, 0)),
                                        "a stride-0 view of 2**40 float32 elements (4 TiB) over a 16-byte base"),
    # §11: errors of the API, exercised on files
    "key_path_4301_digits": Case(lambda: base(tree=[0, 1]), "§4.4, §11", None, "CheckpointKeyError", True,
                                 "a valid file; load(keys=['1' * 4301]) names nothing", keys=["1" * 4301]),
    "key_path_bad_escape": Case(lambda: base(), "§4.4, §11", None, "InvalidKeyError", True,
                                "a valid file; load(keys=['a~2']) is a malformed key path", keys=["a~2"]),
    # issue 11 §1: what must be accepted
    "ok_unknown_entries": Case(lambda: base(meta_pairs=with_pairs(("zfuture", [msgpack.ExtType(9, b"x"), _Dup()]))),
                               "§4.1, §9.1", None, None, True,
                               "an unknown top-level entry holding an ext 9 and a map with a repeated key: ignored"),
    "ok_unknown_column": Case(lambda: _table_with_pair("zcolumn", _Dup(), repeat=True), "§4.3, §9.1", None, None, True,
                              "two unknown tensor-table entries 'zcolumn' holding a map with a repeated key: ignored"),
    "ok_empty_huge_dims": Case(lambda: build_file(blobs=[Blob("float32", (0, 1 << 60), b"")]), "§8.2 rule 6",
                               None, None, True, "shape (0, 2**60) float32: 0 bytes, representable"),
    "ok_int_key_2_64": Case(lambda: base(tree=t_map([(1 << 64) - 1, -(1 << 63)], [0, 1])), "§4.2", None, None, True,
                            "tree dict keys 2**64 - 1 and -2**63"),
    "ok_view_negative_stride": Case(lambda: one_view(("float32", (4,), (-4,), 0, 12)), "§4.7", None, None, True,
                                    "a reversed float32 view (torch loads it as a copy)"),
    "ok_view_misaligned": Case(lambda: one_view(("float32", (2,), (6,), 0, 1)), "§4.7", None, None, True,
                               "a float32 view at byte 1 with stride 6 (torch loads it as a copy)"),
}


class _Dup:
    """Marker: packs as the msgpack map {'k': 1, 'k': 2} (a repeated key)."""


def _packed(value: Any) -> bytes:
    if isinstance(value, _Dup):
        return b"\x82\xa1k\x01\xa1k\x02"
    if isinstance(value, list):
        return bytes([0x90 | len(value)]) + b"".join(_packed(v) for v in value)
    return msgpack.packb(value, use_bin_type=True)


def _meta(data: bytes) -> bytes:
    m, length = metadata_range(data)
    return data[m : m + length]


def _header_with(**fields: Any) -> bytes:
    f = {"magic": MAGIC, "major": 1, "minor": 0, "bom": 0x0A0B0C0D, "required": 0, "optional": 0, "alignment": 64,
         "reserved": bytes(28)}
    f.update(fields)
    body = struct.pack("<8sHHIIII28s", f["magic"], f["major"], f["minor"], f["bom"], f["required"], f["optional"],
                       f["alignment"], f["reserved"])
    return body + struct.pack("<Q", checksum(body))


def _poke(data: bytes, offset: int, value: int) -> bytes:
    b = bytearray(data)
    b[offset] = value
    return bytes(b)


def _refoot(data: bytes, *, reserved: bytes | None = None, length_delta: int = 0, length: int | None = None) -> bytes:
    """``data`` with a rebuilt footer (checksum right)."""
    m, n, s = struct.unpack_from("<QQQ", data, len(data) - 64)
    body = struct.pack("<QQQ24s8s", m, length if length is not None else n + length_delta, s,
                       reserved or bytes(24), b"CKPTFOOT")
    return data[:-64] + body + struct.pack("<Q", checksum(body))


def _meta_at(data: bytes, offset: int) -> bytes:
    m, n, _ = struct.unpack_from("<QQQ", data, len(data) - 64)
    body = struct.pack("<QQQ24s8s", offset, n + m - offset, checksum(data[offset:-64]), bytes(24), b"CKPTFOOT")
    return data[:-64] + body + struct.pack("<Q", checksum(body))


def _deep_user(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = {"k": node}
    return node


def _table_with_pair(key: Any, value: Any, *, repeat: bool = False) -> bytes:
    """The baseline with one more (raw) entry in the tensor map; ``repeat``: that entry twice."""
    table, _ = tensor_table([A, B], 64)
    n = len(table) + (2 if repeat else 1)
    raw = bytes([0x80 | n]) + b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in table.items())
    raw += (msgpack.packb(key) + _packed(value)) * (2 if repeat else 1)
    return _with_raw_section(base(), "tensors", raw)


def _with_raw_section(data: bytes, key: str, raw: bytes) -> bytes:
    """Rebuild the baseline's metadata with section ``key`` replaced by the msgpack bytes ``raw``."""
    meta = msgpack.unpackb(_meta(data), raw=False, strict_map_key=False)
    out = bytearray(bytes([0x80 | len(meta)]))
    for k, v in meta.items():
        out += msgpack.packb(k)
        if k == key:
            out += raw
        elif k == "tree":
            out += msgpack.packb(t_map(["a", "b"], [0, [1, t_int(7)]]))
        else:
            out += msgpack.packb(v, use_bin_type=True)
    return base(meta_raw=bytes(out))


def _unknown_codec() -> bytes:
    """{"a": float32[3] raw, "b": float32[4] under codec "lz4-next" (10 stored bytes, one piece)} in a 1.1 file."""
    stored = Blob("float32", (4,), bytes(range(10)))

    def compressed(table: dict[str, Any]) -> None:
        table.update(nbytes=_u64([12, 16]), codecs=["raw", "lz4-next"], codec=_u8([0, 1]), stored=_u64([12, 10]),
                     pieces=_u64([0, 1]), piece_bytes=_u64([10]), chunk_bytes=1 << 20)

    return base(blobs=[A, stored], header={"minor": 1, "required_features": FEATURE_COMPRESSED},
                edit_table=compressed)


def _manifest_entry(name: str, case: Case) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": f"{name}.ckpt", "rule": case.rule, "open": case.open, "load": case.load,
                             "verify_ok": case.verify, "how": case.how}
    if case.limits:
        entry["limits"] = case.limits
    if case.keys is not None:
        entry["keys"] = case.keys
    return entry


def main(out: str = OUT) -> None:
    """Write every case and the manifest into ``out``."""
    os.makedirs(out, exist_ok=True)
    entries = []
    for name, case in CASES.items():
        with open(os.path.join(out, f"{name}.ckpt"), "wb") as f:
            f.write(case.make())
        entries.append(_manifest_entry(name, case))
    directory = os.path.join(out, "a_directory.ckpt")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "README"), "w") as f:
        f.write("A directory where a checkpoint file is expected (NotACheckpointFileError).\n")
    entries.append({"file": "a_directory.ckpt", "rule": "§11", "open": "NotACheckpointFileError",
                    "load": "NotACheckpointFileError", "verify_ok": "NotACheckpointFileError",
                    "how": "a directory"})
    entries.append({"file": "missing.ckpt", "rule": "§11", "open": "CheckpointNotFoundError",
                    "load": "CheckpointNotFoundError", "verify_ok": "CheckpointNotFoundError",
                    "how": "no such file (deliberately absent)"})
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("# Corrupt files (format 1.0; cases whose rule is in §13 are format 1.1)\n\nGenerated by `conformance/make_corrupt.py` (do not edit by hand); "
                "`manifest.json` is the machine-readable form of this table, read by "
                "`tests/test_corrupt_conformance.py`. `open`/`load`: the exception class a reader raises (— : it "
                "succeeds); `verify`: whether a full verification passes. Files named `ok_*` are the valid cases of "
                "the 1.0 corrections (issue 11 §1) that a reader must accept.\n\n"
                "| file | rule | open | load | verify | how it is made |\n|---|---|---|---|---|---|\n")
        for e in entries:
            f.write(f"| `{e['file']}` | {e['rule']} | {e['open'] or '—'} | {e['load'] or '—'} | {e['verify_ok']} "
                    f"| {e['how']}{' (limits ' + json.dumps(e['limits']) + ')' if 'limits' in e else ''} |\n")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"format": "1.0", "generator": "conformance/make_corrupt.py", "cases": entries}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else OUT)
