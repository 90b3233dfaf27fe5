"""The public surface: exports, import cost, inspect, diff, backends."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt

EXPORTS = [
    "DTYPES", "ArrayBackend", "DType", "DeviceSource", "DiskFullError",
    "BadMagicError", "Checkpoint", "CheckpointError", "CheckpointKeyError", "CheckpointNotFoundError",
    "ChecksumMismatchError", "CorruptCheckpointError", "FORMAT_MAJOR", "FORMAT_MINOR", "InvalidKeyError",
    "InvalidMetadataError", "LazyArray", "Limits", "MetadataLimitError", "MissingDependencyError",
    "NotACheckpointFileError", "ObjectLimitError", "SaveHandle", "StagingPool", "TensorEntry", "TensorInfo",
    "CheckpointClosedError", "TensorSlice", "UnsupportedCodecError", "migrate",
    "TruncatedCheckpointError", "UnsupportedDTypeError", "UnsupportedObjectError", "UnsupportedVersionError",
    "VerifyReport", "__version__", "convert", "diff", "get_backend", "inspect", "load", "load_bytes", "open",
    "register_backend",
    "save", "save_bytes",
    "verify",
]


def test_all_snapshot() -> None:
    assert sorted(ckptfmt.__all__) == sorted(EXPORTS)
    assert len(set(ckptfmt.__all__)) == len(ckptfmt.__all__)
    for name in ckptfmt.__all__:
        assert hasattr(ckptfmt, name), name


def test_version_constants() -> None:
    assert (ckptfmt.FORMAT_MAJOR, ckptfmt.FORMAT_MINOR) == (1, 1)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert ckptfmt.__version__ == pyproject["project"]["version"]


def test_importing_and_using_ckptfmt_imports_no_framework(tmp_path: Path) -> None:
    code = f"""
import json, sys
import ckptfmt, numpy as np
p = {str(tmp_path / "x.ckpt")!r}
ckptfmt.save(p, {{"w": np.ones(3), "s": np.float32(1), "n": 1}})
ckptfmt.load(p); ckptfmt.load(p, mmap=False); ckptfmt.inspect(p); ckptfmt.verify(p); ckptfmt.diff(p, p)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cupy", "jax", "tensorflow"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(out.stdout) == []


# ---------------------------------------------------------------- inspect


@pytest.fixture
def saved(tmp_ckpt: Path) -> Path:
    state = {"model": {"w": np.ones((2, 3), np.float32), "b": np.zeros(0, np.int8)}, "step": 10, "lr": 0.5,
             "name": "run", "blob": b"\x00\x01", "none": None, "scalar": np.float64(2.5), "t": (True,)}
    ckptfmt.save(tmp_ckpt, state, metadata={"tag": "x", "raw": b"abc", 3: [1, 2]}, alignment=128)
    return tmp_ckpt


def test_inspect_summary(saved: Path) -> None:
    doc = ckptfmt.inspect(saved)
    doc = json.loads(json.dumps(doc, allow_nan=False))  # JSON-ready as it is
    assert doc["path"] == str(saved) and doc["file_size"] == saved.stat().st_size
    assert doc["format_version"] == "1.0" and doc["alignment"] == 128
    assert doc["tensor_count"] == 3 and doc["tensor_bytes"] == 24 + 0 + 8
    assert doc["checksummed"] is True
    assert doc["dtype_bytes"] == {"float32": 24, "int8": 0, "float64": 8}
    assert doc["producer"] == {"name": "ckptfmt", "version": ckptfmt.__version__}
    assert doc["created"].endswith("Z")
    assert doc["metadata"] == {"tag": "x", "raw": {"type": "bytes", "len": 3}, "3": [1, 2]}
    leaves = {leaf["key"]: leaf for leaf in doc["leaves"]}
    with ckptfmt.open(saved) as ckpt:
        assert list(leaves) == ckpt.keys()
    w = leaves["model/w"]
    assert (w["kind"], w["dtype"], w["shape"], w["nbytes"], w["offset"]) == ("tensor", "float32", [2, 3], 24, 128)
    assert leaves["model/b"]["offset"] == 0 and leaves["model/b"]["shape"] == [0]
    assert leaves["scalar"]["kind"] == "scalar" and leaves["scalar"]["shape"] == []
    assert leaves["step"] == {"key": "step", "kind": "value", "type": "int", "value": 10}
    assert leaves["lr"]["value"] == 0.5 and leaves["name"]["value"] == "run" and leaves["none"]["value"] is None
    assert leaves["blob"]["value"] == {"type": "bytes", "len": 2}
    assert leaves["t/0"]["type"] == "bool"


def test_inspect_is_strict_json_with_non_finite_floats(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"loss": math.nan, "best": -math.inf}, metadata={"m": math.inf})
    doc = json.loads(json.dumps(ckptfmt.inspect(tmp_ckpt), allow_nan=False))  # `ckptfmt inspect --json`
    values = {leaf["key"]: leaf["value"] for leaf in doc["leaves"]}
    assert all(isinstance(v, str) for v in values.values()) and isinstance(doc["metadata"]["m"], str)


def test_verify_report_to_dict(saved: Path) -> None:
    d = ckptfmt.verify(saved).to_dict()
    assert json.loads(json.dumps(d)) == {"path": str(saved), "ok": True, "tensors_checked": 3, "bytes_checked": 32,
                                         "checksummed": True, "errors": []}


# ---------------------------------------------------------------- diff


def save(path: Path, obj: Any, **kw: Any) -> Path:
    ckptfmt.save(path, obj, **kw)
    return path


def test_diff_of_identical_checkpoints_is_empty(saved: Path, tmp_path: Path) -> None:
    assert ckptfmt.diff(saved, saved) == {"only_a": [], "only_b": [], "changed": []}
    a = save(tmp_path / "a.ckpt", {"w": np.arange(5.0), "n": 1})
    b = save(tmp_path / "b.ckpt", {"n": 1, "w": np.arange(5.0)}, alignment=64, checksum=False)
    assert ckptfmt.diff(a, b) == {"only_a": [], "only_b": [], "changed": []}


def test_diff_reports_added_removed_and_changed_keys(tmp_path: Path) -> None:
    base = {"same": np.arange(4), "vals": np.arange(4.0), "dtype": np.arange(4, dtype=np.int32),
            "shape": np.arange(4), "gone": 1, "int": 1, "str": "a", "scalar": np.float32(1), "kind": np.float32(1),
            "plain": 1.0, "nested": {"x": [1, 2]}}
    other = {"same": np.arange(4), "vals": np.arange(4.0) + np.array([0, 0, 0, 1e-9]),
             "dtype": np.arange(4, dtype=np.int64), "shape": np.arange(4).reshape(2, 2), "new": 2, "int": 1.0,
             "str": "b", "scalar": np.float32(2), "kind": np.array(1, np.float32), "plain": np.float64(1.0),
             "nested": {"x": [1, 2, 3]}}
    a = save(tmp_path / "a.ckpt", base)
    b = save(tmp_path / "b.ckpt", other)
    d = ckptfmt.diff(a, b)
    assert d["only_a"] == ["gone"]
    assert d["only_b"] == ["new", "nested/x/2"]
    assert d["changed"] == ["vals", "dtype", "shape", "int", "str", "scalar", "kind", "plain"]
    back = ckptfmt.diff(b, a)
    assert back["only_a"] == d["only_b"] and back["only_b"] == d["only_a"]
    assert sorted(back["changed"]) == sorted(d["changed"])


def test_diff_compares_bytes_when_checksums_are_absent(tmp_path: Path) -> None:
    a = save(tmp_path / "a.ckpt", {"w": np.zeros(100)}, checksum=False)
    b = save(tmp_path / "b.ckpt", {"w": np.eye(10).reshape(-1)}, checksum=False)
    assert ckptfmt.diff(a, b)["changed"] == ["w"]


def test_diff_treats_nan_tensors_bitwise(tmp_path: Path) -> None:
    a = save(tmp_path / "a.ckpt", {"w": np.array([np.nan, 1.0])})
    assert ckptfmt.diff(a, a)["changed"] == []


def test_diff_compares_plain_values_bit_for_bit(tmp_path: Path) -> None:
    a = save(tmp_path / "a.ckpt", {"loss": math.nan, "z": 0.0, "t": True, "big": 2**64 - 1})
    assert ckptfmt.diff(a, a)["changed"] == []  # nan is the same value as itself
    b = save(tmp_path / "b.ckpt", {"loss": math.nan, "z": -0.0, "t": 1, "big": 2**64 - 1})
    assert ckptfmt.diff(a, b)["changed"] == ["z", "t"]


# ---------------------------------------------------------------- backends


class Box:
    """A toy array type from a "framework" this test module plays."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a


class BoxBackend:
    name = "box-test"

    def is_array(self, obj: Any) -> bool:
        return isinstance(obj, Box)

    def host_view(self, obj: Any) -> tuple[np.ndarray, Any, bool]:
        return obj.a, ckptfmt.DTYPES[obj.a.dtype.name], False

    def alias_key(self, obj: Any) -> None:
        return None  # boxes never share memory

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        raise AssertionError("not called when alias_key is None")

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> np.ndarray:
        raise AssertionError("not called when alias_key is None")

    def from_host(self, array: np.ndarray, dtype: Any, *, scalar: bool, device: str | None) -> Any:
        return Box(np.array(array))

    def view(self, base: Any, dtype: Any, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        raise AssertionError("no views in these files")


def test_numpy_backend_is_registered() -> None:
    be = ckptfmt.get_backend("numpy")
    assert be.name == "numpy" and isinstance(be, ckptfmt.ArrayBackend)
    with pytest.raises(ValueError, match="unknown backend"):
        ckptfmt.get_backend("nope")


def test_a_registered_backend_saves_and_loads_its_arrays(tmp_ckpt: Path) -> None:
    be = BoxBackend()
    assert isinstance(be, ckptfmt.ArrayBackend)
    ckptfmt.register_backend(be, modules=(Box.__module__.partition(".")[0],))
    ckptfmt.save(tmp_ckpt, {"b": Box(np.arange(3)), "n": np.ones(2)})
    got = ckptfmt.load(tmp_ckpt, backend="box-test")
    assert isinstance(got["b"], Box) and got["b"].a.tolist() == [0, 1, 2]
    assert isinstance(got["n"], Box)  # every tensor comes back through the chosen backend
    plain = ckptfmt.load(tmp_ckpt)
    assert type(plain["b"]) is np.ndarray
    assert isinstance(ckptfmt.load(tmp_ckpt, backend=be)["n"], Box)


def test_diff_compares_structure_not_only_leaves(tmp_path: Path) -> None:
    a = save(tmp_path / "a.ckpt", {"seq": [1, 2], "empty": {}, "x": np.zeros(2)})
    b = save(tmp_path / "b.ckpt", {"seq": (1, 2), "x": np.zeros(2), "new_empty": []})
    assert ckptfmt.diff(a, b) == {"only_a": ["empty"], "only_b": ["new_empty"], "changed": ["seq"]}


def test_numpy_str_and_bytes_scalars_are_saved_as_plain_values(tmp_path: Path) -> None:
    path = save(tmp_path / "s.ckpt", {"s": np.str_("hello"), "b": np.bytes_(b"raw")})
    got = ckptfmt.load(path)
    assert got == {"s": "hello", "b": b"raw"} and type(got["s"]) is str and type(got["b"]) is bytes
