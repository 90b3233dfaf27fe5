"""The global index and the value codec against hostile bytes: bounded, typed errors; no spawn needed."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.distributed import _index as I
from ckptfmt.distributed._values import decode_value, encode_value
from ckptfmt.errors import CheckpointError, ChecksumMismatchError, InvalidMetadataError, MetadataLimitError

torch = pytest.importorskip("torch")
import ckptfmt.distributed as cd  # noqa: E402


@pytest.fixture()
def saved(tmp_path):
    """A one-process sharded checkpoint (no process group)."""
    p = str(tmp_path / "c")
    cd.save({"w": torch.arange(40000, dtype=torch.float32).reshape(200, 200), "step": 3, "b": (1, "x", b"\0")}, p,
            options=cd.SaveOptions(block_size=4096))
    return p


def _index_path(p: str) -> str:
    return os.path.join(p, I.INDEX_NAME)


def _idx(p: str) -> I.Index:
    with open(_index_path(p), "rb") as f:
        return I.parse_index(f.read())


def _rewrite(p: str, fn) -> None:
    with open(_index_path(p), "rb") as f:
        m = msgpack.unpackb(f.read(), raw=False)
    fn(m)
    with open(_index_path(p), "wb") as f:
        f.write(msgpack.packb(m, use_bin_type=True))


def test_values_round_trip_without_pickle():
    v = {"betas": (0.9, 0.999), "n": None, "nested": [(1, (2, 3)), {"k": b"\x00\x01"}], "big": 2**63 - 1}
    assert decode_value(encode_value(v)) == v
    assert type(decode_value(encode_value((1, 2)))) is tuple
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        encode_value(object())
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        encode_value({1: 2})
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        encode_value(2**70)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_value_bytes_raise_typed(data):
    try:
        decode_value(data)
    except InvalidMetadataError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_hostile_index_bytes_raise_typed(data):
    try:
        I.parse_index(data, path="x")
    except CheckpointError:
        pass


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.update(format="pickle"), "format"),
    (lambda m: m.update(block_size=3000), "block_size"),
    (lambda m: m["files"][0].update(name="../../etc/passwd"), "plain file name"),
    (lambda m: m["files"][0].update(size=10), "run past the end"),
    (lambda m: m["tensors"][0]["chunks"][0].update(length=12), r"chunks\[0\]"),
    (lambda m: m["tensors"][0]["chunks"][0].update(checksums=b"\0" * 8), "checksums"),
    (lambda m: m["tensors"][0]["chunks"][0].update(offsets=[199, 0]), "exceeds shape"),
    (lambda m: m["tensors"][0].update(dtype="object"), "unknown dtype"),
    (lambda m: m["tensors"][0].update(shape=[1] * 100), "dimensions"),
    (lambda m: m["tensors"][0]["chunks"][0].update(file=5), "out of range"),
    (lambda m: m.update(tensors={"a": 1}), "expected list"),
    (lambda m: m["planner_data"].update(w=[{"x": 1}]), "planner_data"),
])
def test_index_defects_are_named(saved, mutate, match):
    _rewrite(saved, mutate)
    with pytest.raises(InvalidMetadataError, match=match):
        cd.consolidate(saved)
    with pytest.raises(cd.DistributedCheckpointError, match=match):  # the DCP path: one typed error
        cd.load({"w": torch.zeros(200, 200), "step": 0, "b": None}, saved)
    assert not cd.verify(saved).ok


def test_index_size_is_capped(saved):
    with open(_index_path(saved), "rb") as f:
        data = f.read()
    with pytest.raises(MetadataLimitError):
        I.parse_index(data, max_bytes=len(data) - 1)


def test_newer_index_version_is_refused(saved):
    _rewrite(saved, lambda m: m.update(version=3))
    with pytest.raises(ckptfmt.UnsupportedVersionError):
        cd.consolidate(saved)


def test_bit_flip_is_caught_by_its_block(saved):
    """A flipped byte fails the block that holds it, on a partial read too; verify reports it."""
    idx = _idx(saved)
    c = idx.tensors["w"].chunks[0].extent
    f = os.path.join(saved, idx.files[c.file].name)
    with open(f, "r+b") as fh:
        fh.seek(c.offset + 5 * 4096 + 7)
        b = fh.read(1)
        fh.seek(c.offset + 5 * 4096 + 7)
        fh.write(bytes([b[0] ^ 1]))
    rep = cd.verify(saved)
    assert not rep.ok and any("block 5" in e or "checksum" in e for e in rep.errors), rep.errors
    with pytest.raises(ChecksumMismatchError, match="block 5"):
        cd.consolidate(saved)
    # a load that needs only rows outside the damaged block still works (partial reads verify only their blocks)
    from ckptfmt.distributed._read import open_index, read_range
    from ckptfmt.distributed._store import Location

    loc = Location(saved)
    ext = open_index(loc).tensors["w"].chunks[0].extent
    assert read_range(loc, idx, ext, 0, 4096).size == 4096
    assert loc.bytes_read == 4096
    with pytest.raises(ChecksumMismatchError):
        read_range(loc, idx, ext, 5 * 4096, 5 * 4096 + 1)
    loc.close()


def test_truncated_container_is_refused(saved):
    idx = _idx(saved)
    f = os.path.join(saved, idx.files[0].name)
    os.truncate(f, 100)
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        cd.consolidate(saved)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ckptfmt.CheckpointNotFoundError):
        cd.consolidate(tmp_path / "nope")
    with pytest.raises(cd.DistributedCheckpointError, match="not found"):
        cd.load({"w": torch.zeros(1)}, tmp_path / "nope")


def test_errors_pickle():
    import pickle

    e = cd.DistributedCheckpointError("x: save failed", {0: "OSError: disk", 1: "killed"}, "x")
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.failures == e.failures and str(e2) == str(e) and isinstance(e2, CheckpointError)


def test_block_checksums_layout(saved):
    """The checksums field is the xxh3 of each block, little-endian u64 (spec/DISTRIBUTED.md §3)."""
    from ckptfmt._checksum import checksum

    idx = _idx(saved)
    ext = idx.tensors["w"].chunks[0].extent
    with open(os.path.join(saved, idx.files[0].name), "rb") as f:
        f.seek(ext.offset)
        data = f.read(ext.length)
    for i in range(0, ext.length, idx.block_size):
        assert struct.unpack_from("<Q", ext.checksums, 8 * (i // idx.block_size))[0] == checksum(
            data[i:i + idx.block_size])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 160000), st.integers(0, 160000))
def test_read_range_into_any_range(tmp_path_factory, a, b):
    """Any byte range: the saved bytes, read straight into the caller's buffer, over-reading < 1 block per end."""
    import numpy as np

    from ckptfmt.distributed._read import read_range, read_range_into
    from ckptfmt.distributed._store import Location

    p = str(tmp_path_factory.getbasetemp() / "rr")
    if not os.path.exists(p):
        cd.save({"w": torch.arange(40000, dtype=torch.float32)}, p, options=cd.SaveOptions(block_size=4096))
    start, stop = min(a, b), max(a, b)
    want = torch.arange(40000, dtype=torch.float32).numpy().view(np.uint8)[start:stop]
    loc = Location(p)
    idx = _idx(p)
    ext = idx.tensors["w"].chunks[0].extent
    out = np.full(stop - start, 0xAA, np.uint8)
    read_range_into(loc, idx, ext, start, stop, out, key="w")
    assert np.array_equal(out, want)
    assert loc.bytes_read < (stop - start) + 2 * 4096 or stop == start
    assert np.array_equal(read_range(loc, idx, ext, start, stop), want)
    with pytest.raises(ValueError):
        read_range_into(loc, idx, ext, start, stop, np.empty(stop - start + 1, np.uint8))
    loc.close()
