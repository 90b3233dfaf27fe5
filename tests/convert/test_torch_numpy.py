"""torch.save files holding numpy values and plain containers: allowed by name, converted faithfully."""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import UnsafePickleError, convert
from ckptfmt.convert._pickle_scan import global_paths

torch = pytest.importorskip("torch")


class Custom:
    """A class nothing allows."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_numpy_values_and_plain_containers_convert(tmp_path: Path) -> None:
    np.random.seed(1234)
    rng_state = np.random.get_state()
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = {
        "model": net.state_dict(),
        "rng": {"numpy": rng_state},
        "arr": np.arange(12, dtype=np.float32).reshape(3, 4),
        "big_endian": np.arange(4, dtype=">i4"),
        "f64": np.float64(2.5), "i64": np.int64(-3), "flag": np.bool_(True), "u8": np.uint8(7),
        "dtype": np.dtype("float16"), "tdtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "tags": {"b", "a", "c"}, "ids": frozenset({3, 1, 2}),
        "args": argparse.Namespace(lr=0.1, name="run", betas=(0.9, 0.99), nested=np.int32(4)),
    }
    src = tmp_path / "train.pt"
    torch.save(state, src)
    dst = tmp_path / "train.ckpt"
    report = convert(src, dst)
    assert report.source_format == "torch-zip"
    got = ckptfmt.load(dst, backend="numpy")
    assert list(got["model"]) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert np.array_equal(got["model"][k], v.numpy()), k
    name, keys, pos, has_gauss, cached = got["rng"]["numpy"]
    assert (name, pos, has_gauss, cached) == rng_state[0:1] + rng_state[2:]
    assert keys.dtype == np.uint32 and np.array_equal(keys, rng_state[1])
    np.random.set_state((name, keys, pos, has_gauss, cached))  # restorable as numpy wants it
    assert np.random.get_state()[1].tolist() == rng_state[1].tolist()
    assert got["arr"].dtype == np.float32 and np.array_equal(got["arr"], state["arr"])
    assert np.array_equal(got["big_endian"], np.arange(4)) and got["big_endian"].dtype == np.int32
    for k in ("f64", "i64", "flag", "u8"):
        assert type(got[k]) is type(state[k]) and got[k] == state[k], k
    assert got["dtype"] == "float16" and np.dtype(got["dtype"]) == np.float16
    assert got["tdtype"] == "torch.bfloat16"
    assert got["size"] == (2, 3)
    assert got["tags"] == ["a", "b", "c"] and got["ids"] == [1, 2, 3]
    assert got["args"] == {"lr": 0.1, "name": "run", "betas": (0.9, 0.99), "nested": np.int32(4)}
    with ckptfmt.open(dst) as ckpt:
        versions = ckpt.metadata["torch_state_dict_metadata"]
    assert versions["model"] == {k: dict(v) for k, v in net.state_dict()._metadata.items()}  # type: ignore[attr-defined]


def test_an_ordered_dict_keeps_its_order(tmp_path: Path) -> None:
    src = tmp_path / "od.pt"
    torch.save(OrderedDict([("z", torch.ones(1)), ("a", torch.zeros(1)), ("m", 3)]), src)
    convert(src, tmp_path / "od.ckpt")
    assert list(ckptfmt.load(tmp_path / "od.ckpt", backend="numpy")) == ["z", "a", "m"]


def test_other_globals_are_refused_naming_global_and_key_path(tmp_path: Path) -> None:
    src = tmp_path / "bad.pt"
    torch.save({"ok": np.zeros(2), "cfg": {"obj": Custom(1), "list": [1, Custom(2)]}}, src)
    with pytest.raises(UnsafePickleError) as info:
        convert(src, tmp_path / "bad.ckpt")
    name = f"{__name__}.Custom"
    assert info.value.globals == [name]
    assert name in str(info.value) and "'cfg/obj'" in str(info.value) and "'cfg/list/1'" in str(info.value)
    assert not (tmp_path / "bad.ckpt").exists()


def test_allow_pickle_is_still_the_escape_hatch(tmp_path: Path) -> None:
    src = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "epoch": 3, "cfg": argparse.Namespace(a=1)}, src)
    convert(src, tmp_path / "ok.ckpt", allow_pickle=True)
    got = ckptfmt.load(tmp_path / "ok.ckpt", backend="numpy")
    assert got["epoch"] == 3 and got["cfg"] == {"a": 1}


def test_numpy_object_arrays_are_refused(tmp_path: Path) -> None:
    """An object array would unpickle arbitrary items: its dtype class is not allowed."""
    src = tmp_path / "obj.pt"
    torch.save({"x": {"y": np.array([1, "a"], dtype=object)}}, src)
    with pytest.raises(UnsafePickleError, match="ObjectDType"):
        convert(src, tmp_path / "obj.ckpt")


def test_the_key_path_scan_runs_nothing(tmp_path: Path) -> None:
    """A pickle whose REDUCE would call os.system is only replayed as inert stand-ins."""

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    data = pickle.dumps({"a": [0, {"b": Evil()}]}, protocol=2)
    found = global_paths(data, {"posix.system", "os.system"})
    assert list(found.values()) == [["a/1/b"]]
    assert not (tmp_path / "pwned").exists()


def test_legacy_refusals_name_the_key_path(tmp_path: Path) -> None:
    """A legacy (non-zip) torch.save file's refused global is named with the key paths that use it."""
    src = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "cfg": {"obj": Custom(1), "list": [1, Custom(2)]}}, src,
               _use_new_zipfile_serialization=False)
    assert ckptfmt.convert.detect(src) == "torch-legacy"
    with pytest.raises(UnsafePickleError) as info:
        convert(src, tmp_path / "legacy.ckpt")
    name = f"{__name__}.Custom"
    assert info.value.globals == [name]
    assert "'cfg/obj'" in str(info.value) and "'cfg/list/1'" in str(info.value)
    assert not (tmp_path / "legacy.ckpt").exists()


def _hostile_zip(tmp_path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save zip whose data.pkl is replaced by ``pickle_bytes`` (every other member as torch wrote it)."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = tmp_path / "hostile.pt"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n in src.namelist():
            z.writestr(n, pickle_bytes if n.endswith("/data.pkl") else src.read(n))
    return out


@pytest.mark.parametrize(("pickle_bytes", "raised"), [
    (b"\x80\x02h\x05.", "KeyError"),  # BINGET of a memo slot never set
    (b"\x80\x02s.", "IndexError"),  # SETITEM on an empty stack
    (b"\x80\x02e.", "IndexError"),  # APPENDS without a MARK
    (b"\x80\x02K\x01Q.", "AssertionError"),  # BINPERSID of an int, not a tuple
    (b"\x80\x02(X\x07\x00\x00\x00storageK\x01tQ.", "ValueError"),  # a storage id of one field, not five
])
def test_hostile_zip_pickles_raise_typed_errors(tmp_path: Path, pickle_bytes: bytes, raised: str) -> None:
    """Whatever torch's weights-only unpickler lets through becomes a CorruptSourceError naming the file."""
    from ckptfmt.convert import CorruptSourceError

    src = _hostile_zip(tmp_path, pickle_bytes)
    assert ckptfmt.convert.detect(src) == "torch-zip"
    with pytest.raises(CorruptSourceError, match=raised) as info:
        convert(src, tmp_path / "out.ckpt")
    assert str(src) in str(info.value)
    assert not (tmp_path / "out.ckpt").exists()
