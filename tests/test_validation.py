"""The reader's rules (spec §3.3, §5.2, §8), one crafted file per rule.

Every file here is packed by hand (tests/conftest.py) with all checksums right, so that the only
thing wrong with it is the rule under test.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import (
    Blob,
    Crafted,
    MapPairs,
    PlainInt,
    Raw,
    ScalarRef,
    blob,
    encode_tree,
    ext,
    footer_bytes,
    header_bytes,
    ml_dtypes,
    nested,
    pack,
    xxh,
)

import ckptfmt

Craft = Callable[[], Crafted]


def open_fails(path: Path, exc: type[Exception], match: str | None = None,
               limits: ckptfmt.Limits | None = None) -> Exception:
    """``path`` is refused by open, load and verify, with ``exc``."""
    with pytest.raises(exc, match=match) as info:
        ckptfmt.open(path, limits=limits)
    with pytest.raises(exc):
        ckptfmt.load(path, limits=limits)
    report = ckptfmt.verify(path, limits=limits)
    assert not report.ok and len(report.errors) == 1
    return info.value


def invalid(c: Crafted, path: Path, match: str | None = None, limits: ckptfmt.Limits | None = None,
            exc: type[Exception] = ckptfmt.InvalidMetadataError, **build: Any) -> Exception:
    c.write(path, **build)
    return open_fails(path, exc, match, limits)


def loads(c: Crafted, path: Path, limits: ckptfmt.Limits | None = None, **build: Any) -> Any:
    c.write(path, **build)
    assert ckptfmt.verify(path, limits=limits).ok
    return ckptfmt.load(path, limits=limits)


# ---------------------------------------------------------------- the baseline is valid


def test_the_crafted_baseline_is_a_valid_file(crafted: Craft, tmp_ckpt: Path) -> None:
    got = loads(crafted(), tmp_ckpt)
    np.testing.assert_array_equal(got["a"], np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(got["b"][0], np.arange(4).reshape(2, 2))
    assert got["b"][1] == 7 and type(got["b"][1]) is int
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.info("b/0").offset == 128 and ckpt.producer == {"name": "tests", "version": "0"}


def test_the_crafted_baseline_matches_the_writer(crafted: Craft, tmp_path: Path) -> None:
    """The hand-packed file and the library's own output agree on every byte before the metadata."""
    c = crafted()
    mine = c.build()
    ckptfmt.save(tmp_path / "w.ckpt", {"a": np.arange(3, dtype=np.float32), "b": [np.arange(4).reshape(2, 2), 7]},
                 alignment=64)
    theirs = (tmp_path / "w.ckpt").read_bytes()
    assert mine[:192] == theirs[:192]
    off, length, _ = struct.unpack_from("<QQQ", theirs, len(theirs) - 64)
    meta = msgpack.unpackb(theirs[off:off + length], raw=False, strict_map_key=False)
    assert meta["tree"] == c.meta["tree"]  # the same ext 5 / ext 4 bytes
    assert meta["tensors"] == c.table


# ---------------------------------------------------------------- header (§3.3)


@pytest.mark.parametrize("major", [0, 2, 3, 0xFFFF])
def test_other_major_versions_are_unsupported(crafted: Craft, tmp_ckpt: Path, major: int) -> None:
    c = crafted()
    c.header = {"major": major}
    e = invalid(c, tmp_ckpt, exc=ckptfmt.UnsupportedVersionError, match="upgrade")
    assert isinstance(e, ValueError) and not isinstance(e, ckptfmt.CorruptCheckpointError)


@pytest.mark.parametrize("minor, optional", [(1, 1), (1, 0x8000_0000), (0, 4), (7, 0xFFFF_FFFF)])
def test_unknown_optional_feature_bits_are_ignored(crafted: Craft, tmp_ckpt: Path, minor: int, optional: int) -> None:
    c = crafted()
    c.header = {"minor": minor, "optional": optional}
    assert loads(c, tmp_ckpt)["b"][1] == 7
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.version == (1, minor)


@pytest.mark.parametrize("minor, required", [(0, 4), (1, 4), (1, 0x8000_0000), (3, 0x10)])  # 0x1, 0x2: format 1.1
def test_unknown_required_feature_bits_are_unsupported(crafted: Craft, tmp_ckpt: Path, minor: int,
                                                       required: int) -> None:
    c = crafted()
    c.header = {"minor": minor, "required": required}
    invalid(c, tmp_ckpt, exc=ckptfmt.UnsupportedVersionError, match="feature")


def test_version_is_checked_before_the_byte_order_mark(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.header = {"major": 2, "bom": 0}
    invalid(c, tmp_ckpt, exc=ckptfmt.UnsupportedVersionError)


@pytest.mark.parametrize("bom", [0x0D0C0B0A, 0, 0x0A0B0C0E])
def test_wrong_byte_order_mark(crafted: Craft, tmp_ckpt: Path, bom: int) -> None:
    c = crafted()
    c.header = {"bom": bom}
    invalid(c, tmp_ckpt, match="byte-order")


@pytest.mark.parametrize("index", [0, 13, 27])
def test_reserved_header_bytes_must_be_zero_in_a_known_minor(crafted: Craft, tmp_ckpt: Path, index: int) -> None:
    reserved = bytearray(28)
    reserved[index] = 1
    c = crafted()
    c.header = {"reserved": bytes(reserved)}
    invalid(c, tmp_ckpt, match="reserved")
    c.header = {"reserved": bytes(reserved), "minor": 5}  # a later minor may have given them a meaning
    assert loads(c, tmp_ckpt)["b"][1] == 7


@pytest.mark.parametrize("alignment", [0, 1, 32, 63, 100, 96, 2**31, 2**32 - 1])
def test_alignment_must_be_a_power_of_two_in_range(crafted: Craft, tmp_ckpt: Path, alignment: int) -> None:
    c = crafted()
    c.header = {"alignment": alignment}
    invalid(c, tmp_ckpt, match="alignment")


@pytest.mark.parametrize("alignment", [64, 128, 4096])
def test_crafted_files_load_at_several_alignments(tmp_ckpt: Path, alignment: int) -> None:
    c = Crafted(blobs=[blob(np.arange(100, dtype=np.int16)), blob(np.ones(3))], tree=[0, 1], alignment=alignment)
    got = loads(c.layout(), tmp_ckpt)
    assert got[0].sum() == 4950 and got[1].sum() == 3


def test_nonzero_header_padding(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.ones(2))], tree=[0], alignment=4096).layout()
    data = bytearray(c.build())
    data[100] = 1
    tmp_ckpt.write_bytes(bytes(data))
    e = open_fails(tmp_ckpt, ckptfmt.CorruptCheckpointError, match="padding")
    assert not isinstance(e, (ckptfmt.ChecksumMismatchError, ckptfmt.InvalidMetadataError))


# ---------------------------------------------------------------- footer (§5.2)


def test_reserved_footer_bytes(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    invalid(c, tmp_ckpt, match="reserved", footer={"reserved": b"\x01" + bytes(23)})
    c.header = {"minor": 2}  # a minor later than this reader's
    assert loads(c, tmp_ckpt, footer={"reserved": b"\x01" + bytes(23)})["b"][1] == 7


@pytest.mark.parametrize("change", [{"offset": +1}, {"offset": -1}, {"length": +1}, {"length": -1},
                                    {"length": 2**40}, {"offset": 2**63}])
def test_metadata_range_must_end_where_the_footer_starts(crafted: Craft, tmp_ckpt: Path,
                                                          change: dict[str, int]) -> None:
    c = crafted()
    meta = c.metadata_bytes()
    fields = {"offset": 192, "length": len(meta)}
    fields = {k: v + change.get(k, 0) for k, v in fields.items()}
    invalid(c, tmp_ckpt, footer=fields)


@pytest.mark.parametrize("offset", [0, 8, 63, 64, 4095])
def test_metadata_offset_inside_the_header_region(tmp_ckpt: Path, offset: int) -> None:
    """The footer points into [0, align_up(64, A)): refused before anything is read there."""
    meta = pack({"tree": [], "tensors": Crafted().layout().table})
    head = header_bytes(alignment=4096)
    if offset < len(head):  # the "metadata" overlaps the header: it runs from there to the footer
        data = head + meta
        tmp_ckpt.write_bytes(data + footer_bytes(offset, len(data) - offset, xxh(data[offset:])))
    else:
        data = head + bytes(offset - len(head)) + meta
        tmp_ckpt.write_bytes(data + footer_bytes(offset, len(meta), xxh(meta)))
    open_fails(tmp_ckpt, ckptfmt.InvalidMetadataError, match="header")


def test_metadata_length_over_the_cap_is_refused_before_reading(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    size = len(c.metadata_bytes())
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_metadata_bytes=size - 1))
    assert ckptfmt.load(tmp_ckpt, limits=ckptfmt.Limits(max_metadata_bytes=size))["b"][1] == 7


def test_a_claimed_terabyte_of_metadata_is_refused_without_allocating(tmp_ckpt: Path) -> None:
    """A sparse file of 1 TiB whose footer says the metadata is all of it (the default cap is 256 MiB)."""
    length = 2**40
    size = 64 + length + 64
    with open(tmp_ckpt, "wb") as f:
        f.write(header_bytes(alignment=64))
        try:
            f.truncate(size - 64)
        except OSError:
            pytest.skip("the filesystem cannot hold a sparse 1 TiB file")
        f.seek(size - 64)
        f.write(footer_bytes(64, length, 0))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ckptfmt.MetadataLimitError, match="cap"):
            ckptfmt.open(tmp_ckpt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        tmp_ckpt.unlink()
    assert peak < 1 << 20 and time.perf_counter() - t0 < 5


def test_a_claimed_huge_blob_is_refused_without_allocating(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[Blob("float32", (2**38,), b"")], tree=[0]).layout()
    c.table["nbytes"] = struct.pack("<Q", 2**40)
    c.table["offset"] = struct.pack("<Q", 64)
    c.write(tmp_ckpt)
    tracemalloc.start()
    try:
        with pytest.raises(ckptfmt.InvalidMetadataError):
            ckptfmt.load(tmp_ckpt, mmap=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ---------------------------------------------------------------- metadata map (§4.1, §8.2 rule 2)


@pytest.mark.parametrize("meta", [b"", b"\x90", b"\xc0", b"\x07", b"\xa3abc", b"\x81"])
def test_metadata_must_be_one_msgpack_map(crafted: Craft, tmp_ckpt: Path, meta: bytes) -> None:
    invalid(crafted(), tmp_ckpt, meta_bytes=meta)


@pytest.mark.parametrize("key", ["tree", "tensors"])
def test_required_entries(crafted: Craft, tmp_ckpt: Path, key: str) -> None:
    c = crafted()
    del c.meta[key]
    invalid(c, tmp_ckpt, match=key)


@pytest.mark.parametrize("key", ["producer", "created", "user"])
def test_optional_entries(crafted: Craft, tmp_ckpt: Path, key: str) -> None:
    c = crafted()
    del c.meta[key]
    assert loads(c, tmp_ckpt)["b"][1] == 7


def test_unknown_top_level_keys_are_ignored(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.meta["added_in_1_3"] = {"anything": [1, 2, b"x"]}
    assert loads(c, tmp_ckpt)["b"][1] == 7


@pytest.mark.parametrize("key", ["tree", "tensors", "user", "created"])
def test_duplicate_top_level_key(crafted: Craft, tmp_ckpt: Path, key: str) -> None:
    c = crafted()
    c.meta = MapPairs([*c.meta.items(), (key, c.meta[key])])
    invalid(c, tmp_ckpt, match=key)


@pytest.mark.parametrize("key", [1, b"tree", None, 1.5])
def test_non_str_top_level_key(crafted: Craft, tmp_ckpt: Path, key: Any) -> None:
    c = crafted()
    c.meta = MapPairs([*c.meta.items(), (key, 0)])
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"\x80", b"\xff" * 5])
def test_trailing_bytes_after_the_metadata_map(crafted: Craft, tmp_ckpt: Path, extra: bytes) -> None:
    c = crafted()
    invalid(c, tmp_ckpt, meta_bytes=c.metadata_bytes() + extra)


def test_metadata_map_cut_short(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    invalid(c, tmp_ckpt, meta_bytes=c.metadata_bytes()[:-3])


BAD_UTF8 = Raw(b"\xa2\xff\xfe")


@pytest.mark.parametrize("where", ["tree value", "tree key", "user value", "user key", "top-level key", "dtypes",
                                   "created"])
def test_invalid_utf8(crafted: Craft, tmp_ckpt: Path, where: str) -> None:
    c = crafted()
    if where == "tree value":
        c.tree = {"a": 0, "b": [1, PlainInt(7)], "s": BAD_UTF8}
        c.layout()
    elif where == "tree key":
        c.meta["tree"] = ext(5, [["a", "b", BAD_UTF8], [0, encode_tree([1, PlainInt(7)]), "x"]])
    elif where == "user value":
        c.meta["user"] = {"k": BAD_UTF8}
    elif where == "user key":
        c.meta["user"] = MapPairs([(BAD_UTF8, 1)])
    elif where == "top-level key":
        c.meta = MapPairs([*c.meta.items(), (BAD_UTF8, 1)])
    elif where == "dtypes":
        c.table["dtypes"] = ["float32", BAD_UTF8]
    else:
        c.meta["created"] = BAD_UTF8
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("what, value", [("producer", [1]), ("producer", "me"), ("created", 5), ("created", None),
                                         ("tensors", [1, 2]), ("tensors", "x")])
def test_wrong_types_of_known_entries(crafted: Craft, tmp_ckpt: Path, what: str, value: Any) -> None:
    c = crafted()
    c.meta[what] = value
    invalid(c, tmp_ckpt)


def test_user_metadata_must_be_a_map(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.meta["user"] = [1, 2]
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("what", ["user", "producer"])
def test_duplicate_key_in_user_or_producer(crafted: Craft, tmp_ckpt: Path, what: str) -> None:
    c = crafted()
    c.meta[what] = MapPairs([("k", 1), ("j", 2), ("k", 3)])
    invalid(c, tmp_ckpt, match="duplicate")


def test_duplicate_key_nested_in_user(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.meta["user"] = {"outer": [MapPairs([(1, "a"), (1, "b")])]}
    invalid(c, tmp_ckpt, match="duplicate")


@pytest.mark.parametrize("where", ["user", "producer"])
@pytest.mark.parametrize("value", [PlainInt(3), ScalarRef(0), (1, 2), {"x": "y"}, msgpack.ExtType(9, b"")])
def test_ext_types_outside_the_tree(crafted: Craft, tmp_ckpt: Path, where: str, value: Any) -> None:
    c = crafted()
    c.meta[where] = {"k": [encode_tree(value)]}
    invalid(c, tmp_ckpt)


def test_ext_type_in_the_tensor_table(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.table["count"] = msgpack.ExtType(4, msgpack.packb(2))
    invalid(c, tmp_ckpt)


# ---------------------------------------------------------------- the tree (§4.2, §8.2 rules 3-4)


def test_duplicate_key_inside_a_tree_dict(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": MapPairs([("x", 1), ("y", "s"), ("x", PlainInt(7))])}
    c.layout()
    invalid(c, tmp_ckpt, match="duplicate")


def test_duplicate_int_key_deep_inside_the_tree(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, (MapPairs([(5, "p"), (5, "q")]),)]}
    c.layout()
    invalid(c, tmp_ckpt, match="duplicate")


def test_int_and_str_keys_with_the_same_path(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "c": {1: "int", "1": "str"}}
    c.layout()
    invalid(c, tmp_ckpt)


def test_a_msgpack_map_in_the_tree(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.meta["tree"] = {"a": 0, "b": encode_tree([1, PlainInt(7)])}  # a plain msgpack map, not ext 5
    invalid(c, tmp_ckpt, match="map")


@pytest.mark.parametrize("payload", [
    [["a", "b"], [0]],  # keys and values of different lengths
    [["a", "b"], [0, [1, ext(4, b"\x07")]], []],  # three arrays
    [["a", "b"]],  # one array
    [],
    [{"a": 0}, [0]],  # keys as a map
    "ab",  # not an array
    {"a": 0},  # a map
])
def test_malformed_ext5_payload(crafted: Craft, tmp_ckpt: Path, payload: Any) -> None:
    c = crafted()
    c.meta["tree"] = ext(5, payload)
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("key", [1.5, None, b"a", True, [1]])
def test_tree_dict_keys_must_be_str_or_int(crafted: Craft, tmp_ckpt: Path, key: Any) -> None:
    c = crafted()
    c.meta["tree"] = ext(5, [["a", "b", key], [0, encode_tree([1, PlainInt(7)]), "x"]])
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("code", [1, 6, 7, 64, 127])
def test_unknown_ext_types_in_the_tree(crafted: Craft, tmp_ckpt: Path, code: int) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "x": msgpack.ExtType(code, b"\x00\x00\x00\x00")}
    c.layout()
    invalid(c, tmp_ckpt, match="ext" if code != 5 else None)


def test_the_msgpack_timestamp_is_not_a_tree_value(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "t": Raw(b"\xd6\xff" + bytes(4))}  # fixext 4, type -1
    c.layout()
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00"])
def test_scalar_reference_payload_is_four_bytes(crafted: Craft, tmp_ckpt: Path, payload: bytes) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "s": msgpack.ExtType(3, payload)}
    c.layout()
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("payload", [b"", b"\xa1x", b"\xc0", b"\x07\x07", b"\xcb" + bytes(8)])
def test_plain_int_payload_is_one_msgpack_int(crafted: Craft, tmp_ckpt: Path, payload: bytes) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, msgpack.ExtType(4, payload)]}
    c.layout()
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("payload", [b"\xa1x", b"\x80", b"\x07", b"\x91\x00\x00"])
def test_tuple_payload_is_one_msgpack_array(crafted: Craft, tmp_ckpt: Path, payload: bytes) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "t": msgpack.ExtType(2, payload)}
    c.layout()
    invalid(c, tmp_ckpt)


def test_float32_and_all_plain_leaf_encodings_are_accepted(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(-(2**63))], "f32": Raw(b"\xca" + struct.pack(">f", 1.5)), "n": None,
              "t": True, "s": "x", "by": b"\x00", "u": PlainInt(2**64 - 1), "tu": (), "l": [], "d": {}}
    c.layout()
    got = loads(c, tmp_ckpt)
    assert got["f32"] == 1.5 and type(got["f32"]) is float
    assert got["b"][1] == -(2**63) and got["u"] == 2**64 - 1
    assert (got["n"], got["t"], got["s"], got["by"], got["tu"], got["l"], got["d"]) == (None, True, "x", b"\x00",
                                                                                          (), [], {})


@pytest.mark.parametrize("ref", [2, 3, 2**32, 2**64 - 1, -1, -(2**63)])
def test_tensor_reference_out_of_range(crafted: Craft, tmp_ckpt: Path, ref: int) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "bad": ref}
    c.layout()
    invalid(c, tmp_ckpt, match="tensor" if ref >= 0 else None)


@pytest.mark.parametrize("row", [2, 2**32 - 1])
def test_scalar_reference_out_of_range(crafted: Craft, tmp_ckpt: Path, row: int) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": [1, PlainInt(7)], "s": ScalarRef(row)}
    c.layout()
    invalid(c, tmp_ckpt)


def test_scalar_reference_must_name_a_zero_d_tensor(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": ScalarRef(0), "b": [1, PlainInt(7)]}
    c.layout()
    invalid(c, tmp_ckpt)


def test_unreferenced_tensor_is_hidden_payload(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.tree = {"a": 0, "b": ["not a tensor", PlainInt(7)]}
    c.layout()
    invalid(c, tmp_ckpt, match="referenced")


def test_a_table_with_no_references_at_all(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.ones(2))], tree={"x": "no tensors here"}).layout()
    invalid(c, tmp_ckpt, match="referenced")


def test_the_same_row_referenced_twice_is_one_object(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.ones(2))], tree={"x": 0, "y": [0, (0,)]}).layout()
    got = loads(c, tmp_ckpt)
    assert got["x"] is got["y"][0] is got["y"][1][0]


# ---------------------------------------------------------------- nesting caps (§8.1)


@pytest.mark.parametrize("kind", ["dict", "tuple", "list"])
def test_nesting_up_to_the_cap_loads(tmp_ckpt: Path, kind: str) -> None:
    c = Crafted(tree=nested(5, kind)).layout()
    got = loads(c, tmp_ckpt, limits=ckptfmt.Limits(max_depth=5))
    for _ in range(5):
        got = got["k"] if kind == "dict" else got[0]
    assert got == "x"


@pytest.mark.parametrize("kind", ["dict", "tuple", "list"])
def test_nesting_one_over_the_cap_is_refused(tmp_ckpt: Path, kind: str) -> None:
    c = Crafted(tree=nested(6, kind)).layout()
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_depth=5), match="deeper")


@pytest.mark.parametrize("kind", ["dict", "tuple", "list"])
def test_nesting_far_over_the_cap_is_refused(tmp_ckpt: Path, kind: str) -> None:
    c = Crafted(tree=nested(8, kind)).layout()
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_depth=5))


def test_mixed_nesting_counts_every_container(tmp_ckpt: Path) -> None:
    c = Crafted(tree={"k": [({"k": [("x",)]},)]}).layout()  # dict, list, tuple, dict, list, tuple
    assert loads(c, tmp_ckpt, limits=ckptfmt.Limits(max_depth=6))
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_depth=4))


def test_tuple_nesting_beyond_the_default_cap(tmp_ckpt: Path) -> None:
    tree: Any = encode_tree(("x",))
    for _ in range(200):
        tree = ext(2, [tree])
    c = Crafted().layout()
    c.meta["tree"] = tree
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError)


def test_dict_nesting_beyond_the_default_cap(tmp_ckpt: Path) -> None:
    c = Crafted(tree=nested(70, "dict")).layout()
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError)
    assert ckptfmt.load(tmp_ckpt, limits=ckptfmt.Limits(max_depth=80))["k"]["k"]["k"]  # raising the cap reads it


def test_list_nesting_far_beyond_the_default_cap_is_refused(tmp_ckpt: Path) -> None:
    c = Crafted().layout()
    c.meta["tree"] = Raw(b"\x91" * 5000 + b"\xc0")
    invalid(c, tmp_ckpt)


def test_list_nesting_far_beyond_the_default_cap_is_a_limit_error(tmp_ckpt: Path) -> None:
    c = Crafted().layout()
    c.meta["tree"] = Raw(b"\x91" * 5000 + b"\xc0")
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError)


def test_user_metadata_nesting_over_the_cap_is_a_limit_error(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.meta["user"] = nested(10, "dict")
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_depth=5))


def test_user_metadata_nesting_over_the_cap_is_refused(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.meta["user"] = nested(10, "dict")
    invalid(c, tmp_ckpt, match="deeper", limits=ckptfmt.Limits(max_depth=5))
    assert ckptfmt.load(tmp_ckpt)["b"][1] == 7


# ---------------------------------------------------------------- tensor table (§4.3, §8.2 rules 5-6)


def test_tensor_count_cap(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.ones(1)) for _ in range(5)], tree=[0, 1, 2, 3, 4]).layout()
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_tensors=4), match="tensors")
    assert len(ckptfmt.load(tmp_ckpt, limits=ckptfmt.Limits(max_tensors=5))) == 5


def test_a_huge_claimed_count_fails_on_the_columns(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.table["count"] = ckptfmt.Limits().max_tensors
    t0 = time.perf_counter()
    invalid(c, tmp_ckpt, match="column")
    assert time.perf_counter() - t0 < 2


def test_ndim_cap(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.ones((1,) * 6))], tree=[0]).layout()
    invalid(c, tmp_ckpt, exc=ckptfmt.MetadataLimitError, limits=ckptfmt.Limits(max_ndim=5), match="dimensions")
    assert ckptfmt.load(tmp_ckpt, limits=ckptfmt.Limits(max_ndim=6))[0].shape == (1,) * 6


@pytest.mark.parametrize("count", [-1, 3, 1, "2", 2.0, None, True])
def test_bad_count(crafted: Craft, tmp_ckpt: Path, count: Any) -> None:
    c = crafted()
    c.table["count"] = count
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("column", ["dtype", "ndim", "shape", "offset", "nbytes", "checksum"])
@pytest.mark.parametrize("how", ["short", "long", "missing", "list", "str"])
def test_bad_column(crafted: Craft, tmp_ckpt: Path, column: str, how: str) -> None:
    c = crafted()
    raw = c.table[column]
    width = 1 if column in ("dtype", "ndim") else 8
    if how == "short":
        c.table[column] = raw[:-width]
    elif how == "long":
        c.table[column] = raw + raw[:width]
    elif how == "missing":
        del c.table[column]
    elif how == "list":
        c.table[column] = list(raw)
    else:
        c.table[column] = raw.decode("latin-1")
    if column == "checksum" and how == "missing":
        assert loads(c, tmp_ckpt)["b"][1] == 7  # the only optional column
        assert ckptfmt.verify(tmp_ckpt).checksummed is False
    else:
        invalid(c, tmp_ckpt, match=column)


def test_unknown_columns_are_ignored(crafted: Craft, tmp_ckpt: Path) -> None:
    c = crafted()
    c.table["strides"] = b"\x00" * 16
    assert loads(c, tmp_ckpt)["b"][1] == 7


@pytest.mark.parametrize("dtypes", [["float32"], ["float32", "int64", "float32"], "float32,int64", ["float32", 5],
                                    None, ["float32", "int64"] + [f"x{i}" for i in range(254)]])
def test_bad_dtypes_list(crafted: Craft, tmp_ckpt: Path, dtypes: Any) -> None:
    c = crafted()
    c.table["dtypes"] = dtypes
    c.header = {"minor": 1}  # so that unknown names alone would be acceptable
    invalid(c, tmp_ckpt)


@pytest.mark.parametrize("code", [2, 255])
def test_dtype_code_out_of_range(crafted: Craft, tmp_ckpt: Path, code: int) -> None:
    c = crafted()
    c.table["dtype"] = bytes([0, code])
    invalid(c, tmp_ckpt, match="dtype")


@pytest.mark.parametrize("name", ["float4_e2m1", "Float32", "float", "int128", ""])
def test_unknown_dtype_in_a_1_0_file(tmp_ckpt: Path, name: str) -> None:
    c = Crafted(blobs=[Blob(name, (4,), bytes(4)), blob(np.ones(2, np.float32))], tree={"n": 0, "f": 1}).layout()
    invalid(c, tmp_ckpt, match="dtype")


def new_dtype_file() -> Crafted:
    """A 1.1 file with a dtype this reader does not know, next to one it does."""
    return Crafted(blobs=[Blob("float4_e2m1", (4,), b"\x12\x34"), blob(np.ones(2, np.float32))],
                   tree={"n": 0, "f": 1, "s": "x"}, header={"minor": 2}).layout()


def test_unknown_dtype_in_a_later_minor_opens_and_refuses_only_that_tensor(tmp_ckpt: Path) -> None:
    new_dtype_file().write(tmp_ckpt)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.keys() == ["n", "f", "s"] and ckpt.tensor_keys() == ["n", "f"]
        info = ckpt.info("n")
        assert (info.dtype, info.shape, info.nbytes) == ("float4_e2m1", (4,), 2)
        np.testing.assert_array_equal(ckpt.get("f"), np.ones(2, np.float32))
        assert ckpt.get("s") == "x"
        with pytest.raises(ckptfmt.UnsupportedDTypeError, match="float4_e2m1") as e:
            ckpt.get("n")
        assert isinstance(e.value, TypeError) and "'n'" in str(e.value)
    with pytest.raises(ckptfmt.UnsupportedDTypeError):
        ckptfmt.load(tmp_ckpt)
    assert ckptfmt.load(tmp_ckpt, keys=["f", "s"])["s"] == "x"
    assert [leaf["dtype"] for leaf in ckptfmt.inspect(tmp_ckpt)["leaves"] if leaf["kind"] == "tensor"] == [
        "float4_e2m1", "float32"]


def test_verify_checks_blobs_of_unknown_dtypes(tmp_ckpt: Path) -> None:
    new_dtype_file().write(tmp_ckpt)
    report = ckptfmt.verify(tmp_ckpt)
    assert report.ok and report.tensors_checked == 2


@pytest.mark.parametrize("shape, data", [
    ((3,), bytes(16)),  # 3 x float32 is 12 bytes, not 16
    ((5,), bytes(12)),
    ((), bytes(8)),  # a scalar is one element
    ((2, 0), bytes(4)),  # empty shape, bytes present
    ((1, 1, 1), bytes(0)),
])
def test_nbytes_must_equal_shape_times_itemsize(tmp_ckpt: Path, shape: tuple[int, ...], data: bytes) -> None:
    c = Crafted(blobs=[Blob("float32", shape, data)], tree=[0]).layout()
    invalid(c, tmp_ckpt, match="nbytes")


@pytest.mark.parametrize("shape, nbytes", [
    ((2**62,), 8),  # a huge dimension with tiny nbytes
    ((2**63,), 0),  # a dimension of 2**63 or more
    ((2**64 - 1,), 4),
    ((2**32, 2**32), 0),  # product wraps to 0 in 64 bits
    ((8, 2**61 + 1), 8),  # product wraps to exactly the bytes present
    ((2**21,) * 3, 0),
])
def test_overflowing_shapes_are_refused(tmp_ckpt: Path, shape: tuple[int, ...], nbytes: int) -> None:
    c = Crafted(blobs=[Blob("uint8", shape, bytes(nbytes))], tree=[0]).layout()  # bytes really there
    invalid(c, tmp_ckpt)


def test_empty_tensor_with_an_unrepresentable_dimension(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[Blob("float32", (2**62, 0), b"")], tree=[0]).layout()
    c.write(tmp_ckpt)
    with pytest.raises(ckptfmt.CorruptCheckpointError):
        ckptfmt.load(tmp_ckpt)


@pytest.mark.parametrize("shape", [
    (2**40,) * 64,
    (2**40,) * 63 + (0,),
])
def test_shape_product_overflowing_float64_is_refused_without_warnings(tmp_ckpt: Path,
                                                                       shape: tuple[int, ...]) -> None:
    import warnings

    c = Crafted(blobs=[Blob("float32", shape, b"")], tree=[0]).layout()
    c.write(tmp_ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ckptfmt.InvalidMetadataError):
            ckptfmt.open(tmp_ckpt)


def test_zero_dimensional_and_empty_tensors_are_fine(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.array(2.5, np.float32)), Blob("float64", (0, 3), b""), Blob("int8", (4, 0, 2), b"")],
                tree=[0, 1, 2]).layout()
    got = loads(c, tmp_ckpt)
    assert got[0].shape == () and got[0] == 2.5
    assert got[1].shape == (0, 3) and got[2].shape == (4, 0, 2) and got[2].dtype == np.int8


def test_an_empty_tensor_must_have_the_empty_checksum(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[Blob("float64", (0,), b""), blob(np.ones(1))], tree=[0, 1]).layout()
    c.table["checksum"] = struct.pack("<QQ", 1, xxh(np.ones(1).tobytes()))
    invalid(c, tmp_ckpt, match="empty")


def test_an_empty_tensor_must_have_offset_zero(tmp_ckpt: Path) -> None:
    c = Crafted(blobs=[blob(np.ones(1)), Blob("float64", (0,), b"")], tree=[0, 1]).layout()
    c.table["offset"] = struct.pack("<QQ", 64, 64)
    invalid(c, tmp_ckpt, match="offset")


# ---------------------------------------------------------------- blob layout (§4.5, §8.2 rule 7)


def three_blobs() -> Crafted:
    return Crafted(blobs=[blob(np.arange(3, dtype=np.uint8)), blob(np.arange(10, dtype=np.float64)),
                          blob(np.ones(2, np.int16))], tree=[0, 1, 2]).layout()


def set_offsets(c: Crafted, *offsets: int) -> None:
    c.table["offset"] = struct.pack(f"<{len(offsets)}Q", *offsets)


def test_three_blobs_baseline(tmp_ckpt: Path) -> None:
    c = three_blobs()
    assert c.offsets == [64, 128, 256]
    assert loads(c, tmp_ckpt)[1].sum() == 45


def test_overlapping_blobs(tmp_ckpt: Path) -> None:
    c = three_blobs()
    set_offsets(c, 64, 64, 256)
    invalid(c, tmp_ckpt, match="offset")


def test_blobs_out_of_table_order(tmp_ckpt: Path) -> None:
    c = three_blobs()
    body = bytearray(c.body)  # swap the placement of blobs 0 and 2 (both fit in 64 bytes)
    body[0:64], body[192:256] = body[192:256], body[0:64]
    c.body = bytes(body)
    set_offsets(c, 256, 128, 64)
    invalid(c, tmp_ckpt, match="offset")


def test_misaligned_blob(tmp_ckpt: Path) -> None:
    c = three_blobs()
    body = bytearray(c.body)
    second = bytes(body[64:144])
    body[64:144] = bytes(80)
    body[72:152] = second  # blob 1 moved 8 bytes later, still inside its padded span
    c.body = bytes(body)
    set_offsets(c, 64, 136, 256)
    invalid(c, tmp_ckpt, match="offset")


def test_gap_between_blobs_can_hide_a_payload(tmp_ckpt: Path) -> None:
    c = three_blobs()
    hidden = b"HIDDEN PAYLOAD".ljust(64, b"!")
    c.body = c.body[:64] + hidden + c.body[64:]  # blobs 1 and 2 shifted by one aligned unit
    set_offsets(c, 64, 192, 320)
    invalid(c, tmp_ckpt, match="offset")


def test_first_blob_must_start_right_after_the_header(tmp_ckpt: Path) -> None:
    c = three_blobs()
    c.body = bytes(64) + c.body
    set_offsets(c, 128, 192, 320)
    invalid(c, tmp_ckpt, match="offset")


def test_metadata_must_follow_the_last_blob(tmp_ckpt: Path) -> None:
    c = three_blobs()
    c.body = c.body + bytes(64)
    invalid(c, tmp_ckpt, match="metadata starts")


def test_blob_beyond_the_end_of_the_file(tmp_ckpt: Path) -> None:
    c = three_blobs()
    set_offsets(c, 64, 128, 1 << 40)
    invalid(c, tmp_ckpt, match="offset")


def test_metadata_with_no_blobs_starts_at_the_aligned_header_end(tmp_ckpt: Path) -> None:
    c = Crafted(tree={"only": "values"}, alignment=4096).layout()
    assert loads(c, tmp_ckpt) == {"only": "values"}
    assert len(c.build()) == 4096 + len(c.metadata_bytes()) + 64


@pytest.mark.parametrize("name, width", [("bfloat16", 2), ("float8_e4m3fn", 1), ("float8_e5m2", 1)])
def test_ml_dtypes_read_bit_exact_with_or_without_ml_dtypes(tmp_ckpt: Path, name: str, width: int) -> None:
    data = bytes(range(7, 7 + 3 * width))
    c = Crafted(blobs=[Blob(name, (3,), data)], tree={"x": 0}).layout()
    got = loads(c, tmp_ckpt)["x"]
    assert got.shape == (3,) and got.dtype.itemsize == width and got.tobytes() == data
    if ml_dtypes is not None:
        assert got.dtype == np.dtype(getattr(ml_dtypes, name))
    else:  # spec 6: raw bytes of the same width
        assert got.dtype == np.dtype(f"V{width}")
