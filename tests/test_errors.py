"""What save, load and open refuse, with which exception, and what they leave behind."""

from __future__ import annotations

import collections
import errno
import gc
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import nested

import ckptfmt
from ckptfmt import errors


class Custom:
    pass


Point = collections.namedtuple("Point", "x y")

# (object, exception, key path that the message must name)
UNSUPPORTED = {
    "set": ({"a": {"b": {1, 2}}}, ckptfmt.UnsupportedObjectError, "'a/b'"),
    "custom class": ({"x": [1, 2, Custom()]}, ckptfmt.UnsupportedObjectError, "'x/2'"),
    "namedtuple": ({"p": Point(1, 2)}, ckptfmt.UnsupportedObjectError, "'p'"),
    "function": ({"f": (print,)}, ckptfmt.UnsupportedObjectError, "'f/0'"),
    "int too big": ({"n": {"big": 2**64}}, ckptfmt.UnsupportedObjectError, "'n/big'"),
    "int too small": ({"n": [-(2**63) - 1]}, ckptfmt.UnsupportedObjectError, "'n/0'"),
    "float key": ({"d": {1.5: 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "tuple key": ({"d": {(1, 2): 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "bool key": ({"d": {True: 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "None key": ({"d": {None: 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "bytes key": ({"d": {b"k": 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "int key too big": ({"d": {2**64: 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "int key too small": ({"d": {-(2**63) - 1: 0}}, ckptfmt.UnsupportedObjectError, "'d'"),
    "1 and '1'": ({"d": {"e": {1: "a", "1": "b"}}}, ckptfmt.InvalidKeyError, "'d/e'"),
    "escaped path": ({"a/b": {"c~d": object()}}, ckptfmt.UnsupportedObjectError, "'a~1b/c~0d'"),
    "top level": (Custom(), ckptfmt.UnsupportedObjectError, "top level"),
    "too deep": ({"d": nested(70, "list")}, ckptfmt.UnsupportedObjectError, "nesting"),
}
DTYPE_REFUSED = {
    "object array": ({"w": {"v": np.array([1, "a"], dtype=object)}}, "'w/v'"),
    "string array": ({"w": [np.array(["a", "b"])]}, "'w/0'"),
    "bytes array": ({"w": np.array([b"a"])}, "'w'"),
    "record array": ({"w": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])}, "'w'"),
    "datetime array": ({"w": np.array(["2020-01-01"], dtype="datetime64[D]")}, "'w'"),
    "float128": ({"w": np.zeros(2, dtype=np.longdouble)}, "'w'"),
    "float128 scalar": ({"w": [np.longdouble(1)]}, "'w/0'"),
}


def assert_nothing_written(directory: Path) -> None:
    assert os.listdir(directory) == [], "a refused save left a file or a temporary behind"


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_values_are_refused_naming_the_key_path(tmp_ckpt: Path, name: str) -> None:
    obj, exc, where = UNSUPPORTED[name]
    with pytest.raises(exc) as info:
        ckptfmt.save(tmp_ckpt, obj)
    assert where in str(info.value)
    assert isinstance(info.value, ckptfmt.CheckpointError)
    assert_nothing_written(tmp_ckpt.parent)


@pytest.mark.parametrize("name", list(DTYPE_REFUSED))
def test_arrays_without_a_canonical_dtype_are_refused_naming_the_key_path(tmp_ckpt: Path, name: str) -> None:
    obj, where = DTYPE_REFUSED[name]
    with pytest.raises(ckptfmt.UnsupportedDTypeError) as info:
        ckptfmt.save(tmp_ckpt, obj)
    assert isinstance(info.value, TypeError) and "dtype" in str(info.value)
    assert where in str(info.value)
    assert_nothing_written(tmp_ckpt.parent)


def test_numpy_subclasses_are_saved_as_their_data(tmp_ckpt: Path) -> None:
    mm = np.memmap(tmp_ckpt.parent / "raw.bin", dtype=np.float32, mode="w+", shape=(4,))
    mm[:] = [1, 2, 3, 4]
    ckptfmt.save(tmp_ckpt, {"mm": mm})
    got = ckptfmt.load(tmp_ckpt)["mm"]
    assert type(got) is np.ndarray and got.tolist() == [1, 2, 3, 4]
    del mm


def test_masked_arrays_are_refused_cleanly(tmp_ckpt: Path) -> None:
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        ckptfmt.save(tmp_ckpt, {"m": np.ma.masked_array([1.0, 2.0], mask=[0, 1])})
    assert_nothing_written(tmp_ckpt.parent)


@pytest.mark.parametrize("metadata", [
    [("a", 1)], "text", {"x": {1, 2}}, {"x": [Custom()]}, {"x": np.ones(2)}, {(1, 2): 0}, {"x": {None: 1}},
    {"x": 2**64}, {"x": np.float32(1)},
])
def test_unsupported_user_metadata_is_refused_before_writing(tmp_ckpt: Path, metadata: Any) -> None:
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        ckptfmt.save(tmp_ckpt, {"w": np.ones(3)}, metadata=metadata)
    assert_nothing_written(tmp_ckpt.parent)


def test_out_of_range_int_key_in_metadata_is_refused(tmp_ckpt: Path) -> None:
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        ckptfmt.save(tmp_ckpt, {"w": np.ones(3)}, metadata={2**70: "x"})
    assert_nothing_written(tmp_ckpt.parent)


def test_deep_but_allowed_nesting_is_saved(tmp_ckpt: Path) -> None:
    obj: Any = "leaf"
    for _ in range(63):
        obj = [obj]
    ckptfmt.save(tmp_ckpt, {"d": obj})
    got = ckptfmt.load(tmp_ckpt)["d"]
    for _ in range(63):
        got = got[0]
    assert got == "leaf"


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("call", ["load", "open", "verify", "inspect"])
def test_missing_file_is_checkpoint_not_found(tmp_path: Path, call: str) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ckptfmt.CheckpointNotFoundError) as info:
        getattr(ckptfmt, call)(missing)
    e = info.value
    assert isinstance(e, FileNotFoundError) and isinstance(e, OSError) and isinstance(e, ckptfmt.CheckpointError)
    assert e.errno == errno.ENOENT and e.filename == str(missing)
    assert str(missing) in str(e)


def test_missing_file_in_diff(tmp_path: Path) -> None:
    ckptfmt.save(tmp_path / "a.ckpt", {"x": 1})
    with pytest.raises(FileNotFoundError):
        ckptfmt.diff(tmp_path / "a.ckpt", tmp_path / "b.ckpt")
    with pytest.raises(FileNotFoundError):
        ckptfmt.diff(tmp_path / "b.ckpt", tmp_path / "a.ckpt")


@pytest.mark.parametrize("call", ["load", "open", "verify", "inspect"])
def test_a_directory_is_not_a_checkpoint(tmp_path: Path, call: str) -> None:
    with pytest.raises(ckptfmt.NotACheckpointFileError, match="directory") as info:
        getattr(ckptfmt, call)(tmp_path)
    assert isinstance(info.value, IsADirectoryError) and isinstance(info.value, ckptfmt.CheckpointError)


def test_saving_onto_a_directory_fails_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    with pytest.raises(OSError):
        ckptfmt.save(target, {"x": np.ones(2)})
    assert os.listdir(tmp_path) == ["d"] and os.listdir(target) == []


def test_failed_open_closes_its_descriptor_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    unraisable: list[Any] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(ckptfmt.BadMagicError):
            ckptfmt.open(bad)
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert [u.exc_value for u in unraisable] == []


def test_failed_open_does_not_close_someone_elses_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x89CKPT\r\n\x1a" + bytes(100))  # header checksum mismatch
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    sys_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: None
    try:
        try:
            ckptfmt.open(bad)
        except ckptfmt.ChecksumMismatchError as e:
            err = e  # keeps the half-built Checkpoint alive through the traceback
        with open(victim, "rb") as f:
            del err
            gc.collect()  # the Checkpoint's __del__ runs now, after its descriptor number was reused
            assert f.read() == b"precious"
    finally:
        sys.unraisablehook = sys_hook


# ---------------------------------------------------------------- keys


@pytest.fixture
def saved(tmp_ckpt: Path) -> Path:
    ckptfmt.save(tmp_ckpt, {"model": {"w": np.ones(3), "layers": [np.zeros(2), 5]}, "step": 1})
    return tmp_ckpt


@pytest.mark.parametrize("key", ["nope", "model/nope", "model/layers/2", "model/layers/-1", "model/layers/01",
                                 "model/layers/+1", "step/0", "model/w/0", "model//w", "/model", "model/"])
def test_a_key_that_names_nothing_is_a_checkpoint_key_error(saved: Path, key: str) -> None:
    with pytest.raises(ckptfmt.CheckpointKeyError) as info:
        ckptfmt.load(saved, keys=[key])
    assert isinstance(info.value, KeyError) and isinstance(info.value, ckptfmt.CheckpointError)
    assert repr(key) in str(info.value)
    with ckptfmt.open(saved) as ckpt:
        assert key not in ckpt
        with pytest.raises(KeyError):
            ckpt.get(key)
        with pytest.raises(KeyError):
            ckpt.info(key)


def test_info_of_a_plain_value_is_a_key_error(saved: Path) -> None:
    with ckptfmt.open(saved) as ckpt, pytest.raises(ckptfmt.CheckpointKeyError, match="not a tensor"):
        ckpt.info("step")


@pytest.mark.parametrize("key", ["a~2", "model~", "~", "model/~x", "~~0"])
def test_a_malformed_escape_is_an_invalid_key_error(saved: Path, key: str) -> None:
    with pytest.raises(ckptfmt.InvalidKeyError) as info:
        ckptfmt.load(saved, keys=[key])
    assert isinstance(info.value, ValueError)
    with ckptfmt.open(saved) as ckpt:
        assert key not in ckpt
        with pytest.raises(ckptfmt.InvalidKeyError):
            ckpt.get(key)


def test_a_non_str_key_path_is_refused(saved: Path) -> None:
    with pytest.raises(ckptfmt.InvalidKeyError):
        ckptfmt.load(saved, keys=[1])  # type: ignore[list-item]
    with ckptfmt.open(saved) as ckpt:
        assert 1 not in ckpt and None not in ckpt


def test_unknown_backend_and_device_are_refused(saved: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        ckptfmt.load(saved, backend="no-such-backend")
    with pytest.raises(ValueError):
        ckptfmt.load(saved, device="cuda:0")


def test_a_closed_checkpoint_refuses_reads(saved: Path) -> None:
    ckpt = ckptfmt.open(saved)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(ckptfmt.CheckpointError, match="closed"):
        ckpt.load()
    assert ckpt.keys() == ["model/w", "model/layers/0", "model/layers/1", "step"]  # metadata stays readable


# ---------------------------------------------------------------- the hierarchy

HIERARCHY = {
    "CheckpointError": (Exception,),
    "CheckpointNotFoundError": (errors.CheckpointError, FileNotFoundError),
    "NotACheckpointFileError": (errors.CheckpointError, IsADirectoryError),
    "CorruptCheckpointError": (errors.CheckpointError, ValueError),
    "BadMagicError": (errors.CorruptCheckpointError,),
    "TruncatedCheckpointError": (errors.CorruptCheckpointError,),
    "ChecksumMismatchError": (errors.CorruptCheckpointError,),
    "InvalidMetadataError": (errors.CorruptCheckpointError,),
    "MetadataLimitError": (errors.InvalidMetadataError,),
    "UnsupportedVersionError": (errors.CheckpointError, ValueError),
    "UnsupportedDTypeError": (errors.CheckpointError, TypeError),
    "UnsupportedCodecError": (errors.CheckpointError, TypeError),
    "UnsupportedObjectError": (errors.CheckpointError, TypeError),
    "ObjectLimitError": (errors.UnsupportedObjectError,),
    "InvalidKeyError": (errors.CheckpointError, ValueError),
    "CheckpointKeyError": (errors.CheckpointError, KeyError),
    "CheckpointClosedError": (errors.CheckpointError, ValueError),
    "MissingDependencyError": (errors.CheckpointError, ImportError),
    "DiskFullError": (errors.CheckpointError, OSError),
}


@pytest.mark.parametrize("name", list(HIERARCHY))
def test_exception_hierarchy(name: str) -> None:
    cls = getattr(errors, name)
    assert getattr(ckptfmt, name) is cls
    assert cls.__bases__ == HIERARCHY[name]
    assert issubclass(cls, errors.CheckpointError)


def test_exception_tree_is_complete() -> None:
    assert sorted(errors.__all__) == sorted(HIERARCHY)


def test_exception_attributes() -> None:
    e = errors.ChecksumMismatchError("/x.ckpt", "bad", region="blob", key="a/b")
    assert (e.region, e.key, e.path, e.reason) == ("blob", "a/b", "/x.ckpt", "bad")
    assert str(e) == "/x.ckpt: bad"
    assert str(errors.CorruptCheckpointError(None, "no path")) == "no path"
    assert str(errors.CheckpointKeyError("no key 'x'")) == "no key 'x'"  # no KeyError repr quoting
    nf = errors.CheckpointNotFoundError(Path("/a/b.ckpt"))
    assert nf.filename == "/a/b.ckpt" and str(nf) == "checkpoint not found: /a/b.ckpt"
    uv = errors.UnsupportedVersionError("/x", "too new")
    assert uv.path == "/x" and "too new" in str(uv)
