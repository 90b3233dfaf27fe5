"""Splitting the metadata's maps in place (ckptfmt/_sections.py), and msgpack's skip where it takes over.

The top-level map and the tensor map are split from msgpack headers (``skip``); a value of many
objects sends the whole map to msgpack's own skip, over one copy. Both must agree with msgpack and
refuse what it refuses. Crafted files come from conformance/make_corrupt.py's builder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

import ckptfmt
from ckptfmt import _sections

_spec = importlib.util.spec_from_file_location("make_corrupt", Path(__file__).parent.parent / "conformance" /
                                               "make_corrupt.py")
assert _spec is not None and _spec.loader is not None
mc = importlib.util.module_from_spec(_spec)
sys.modules["make_corrupt"] = mc
_spec.loader.exec_module(mc)


@pytest.mark.parametrize("n", [3, _sections.SKIP_STEPS + 10])
def test_user_metadata_of_few_and_of_many_objects(tmp_ckpt: Path, n: int) -> None:
    user = {"vocab": [f"w{i}" for i in range(n)], "nested": {"a": [1, [2, [3]]]}}
    ckptfmt.save(tmp_ckpt, {"w": np.ones(2)}, metadata=user)
    with ckptfmt.open(tmp_ckpt) as c:
        assert c.metadata == user


def test_an_unknown_section_of_many_objects_is_kept_verbatim(tmp_ckpt: Path) -> None:
    extra = msgpack.packb({"later": list(range(3 * _sections.SKIP_STEPS)), "ext": msgpack.ExtType(9, b"z")})
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A], header={"minor": 9},
                                       meta_pairs=mc.with_pairs(("future", msgpack.unpackb(extra)))))
    with ckptfmt.open(tmp_ckpt) as c:
        assert msgpack.unpackb(c.manifest.unknown["future"]) == msgpack.unpackb(extra)


def test_skip_matches_msgpack_on_every_kind_of_object() -> None:
    values = [None, True, False, 0, 127, -1, -33, 255, 2**16, 2**32, 2**63, -(2**63), 1.5,
              msgpack.ExtType(1, b""), msgpack.ExtType(1, b"a"), msgpack.ExtType(1, b"ab"),
              msgpack.ExtType(1, b"abcd"), msgpack.ExtType(1, b"a" * 8), msgpack.ExtType(1, b"a" * 16),
              msgpack.ExtType(1, b"a" * 3), msgpack.ExtType(1, b"a" * 300), msgpack.ExtType(1, b"a" * 70000),
              "", "a" * 31, "a" * 32, "a" * 300, "a" * 70000, b"", b"b" * 300, b"b" * 70000,
              [], [1] * 15, [1] * 16, [[1, [2]], {"k": [3]}], {}, {str(i): i for i in range(15)},
              {str(i): i for i in range(16)}, {str(i): [i] for i in range(80)}]
    for v in values:
        packed = msgpack.packb(v, use_bin_type=True)
        data = memoryview(b"\x01" + packed + b"\x02")
        assert _sections.skip(data, 1) == 1 + len(packed), v if not isinstance(v, (list, dict)) else len(v)
    with pytest.raises(_sections.ManyObjects):
        _sections.skip(memoryview(msgpack.packb(list(range(_sections.SKIP_STEPS)))), 0)


@pytest.mark.parametrize("raw", [b"\xc1", b"\xc4\x05ab", b"\xda\x00", b"\xdc\x00\x03\x01", b"\x92\x01",
                                 b"\xc7\x10\x05", b"\xcf\x00\x00"])
def test_skip_refuses_malformed_and_truncated_objects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        _sections.skip(memoryview(raw), 0)


def test_a_column_whose_length_runs_past_its_map_is_invalid_metadata(tmp_ckpt: Path) -> None:
    data = mc.build_file(blobs=[mc.A, mc.B])
    offset, length = mc.metadata_range(data)
    meta = data[offset : offset + length]
    i = meta.index(b"\xa6offset\xc4\x10") + 8  # the length byte of the 16-byte 'offset' column
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A, mc.B], meta_raw=meta[:i] + b"\xff" + meta[i + 1:]))
    with pytest.raises(ckptfmt.InvalidMetadataError):
        ckptfmt.open(tmp_ckpt)


def test_an_unknown_column_of_many_objects_is_skipped(tmp_ckpt: Path) -> None:
    many = {"later": list(range(3 * _sections.SKIP_STEPS)), "ext": msgpack.ExtType(9, b"z")}
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A, mc.B], edit_table=lambda t: t.update(future=many)))
    with ckptfmt.open(tmp_ckpt) as c:
        assert c.manifest.tensors.shape(1) == (2, 2)
        np.testing.assert_array_equal(c.get("t1"), np.arange(4).reshape(2, 2))
