"""The numpy backend against the backend contract, and what is particular to numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from contract import NUMPY_DTYPES, BackendContract, leaf_kinds, ml_dtypes, np_dtype, pattern, same_bits

import ckptfmt
import ckptfmt.numpy


class TestNumpyContract(BackendContract):
    backend = "numpy"
    device = None
    dtypes: ClassVar[tuple[str, ...]] = NUMPY_DTYPES

    def make(self, a: np.ndarray) -> Any:
        return np.array(a, copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def shares_memory(self, a: Any, b: Any) -> bool:
        return bool(np.shares_memory(a, b))

    def is_native(self, x: Any) -> bool:
        return type(x) is np.ndarray

    def bitcast(self, x: Any, name: str) -> Any:
        return x.view(np_dtype(name))


class TestNumpyContractThroughTheNumpyModule(TestNumpyContract):
    """The same contract through ``ckptfmt.numpy.save``/``load`` (which take no backend or device), on a few dtypes."""

    dtypes: ClassVar[tuple[str, ...]] = ("bool", "float32", "complex128") + (("bfloat16",) if ml_dtypes else ())

    def load(self, path: Path, **kw: Any) -> Any:
        return ckptfmt.numpy.load(path, **kw)

    def save(self, path: Path, obj: Any, **kw: Any) -> None:
        ckptfmt.numpy.save(path, obj, durable=False, **kw)


# ---------------------------------------------------------------- numpy specifics


def test_mmap_loads_of_views_are_read_only_and_fresh_loads_writable(tmp_ckpt: Path) -> None:
    a = np.arange(12.0).reshape(3, 4)
    ckptfmt.save(tmp_ckpt, {"a": a, "t": a.T, "r": a[1]}, durable=False)
    mapped = ckptfmt.load(tmp_ckpt, mmap=True)
    for k, v in mapped.items():
        assert not v.flags.writeable, k
    fresh = ckptfmt.load(tmp_ckpt, mmap=False)
    fresh["t"][0, 1] = -1.0  # a view of the fresh base: the write shows through the base and the row
    assert fresh["a"][1, 0] == -1.0 and fresh["r"][0] == -1.0
    assert ckptfmt.load(tmp_ckpt)["a"][1, 0] == 4.0


def test_negative_and_zero_strides_round_trip(tmp_ckpt: Path) -> None:
    a = pattern("int16", (4, 5))
    state = {"a": a, "rev": a[::-1], "rev_cols": a[:, ::-2], "both": a[::-1, ::-1].T,
             "bcast": np.broadcast_to(a[0], (3, 5))}
    ckptfmt.save(tmp_ckpt, state, durable=False)
    kinds = leaf_kinds(tmp_ckpt)
    assert kinds["a"] == "tensor" and {kinds[k] for k in ("rev", "rev_cols", "both", "bcast")} == {"view"}
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert len(ckpt) == 1
    for mmap in (True, False):
        got = ckptfmt.load(tmp_ckpt, mmap=mmap)
        for k, v in state.items():
            same_bits(got[k], v, k)
            assert np.shares_memory(got[k], got["a"]), k
        assert got["bcast"].strides == (0, 2)


def test_unaligned_zero_d_and_reinterpreting_views(tmp_ckpt: Path) -> None:
    raw = np.arange(10, dtype=np.uint8)
    b = np.arange(3.0)
    c = np.arange(6.0).reshape(2, 3)
    state = {"raw": raw, "unaligned": raw[1:9].view(np.float32), "b": b, "zero_d": b[1:2].reshape(()),
             "c": c, "column": c[:, 1:2], "empty": c[0:0]}
    ckptfmt.save(tmp_ckpt, state, durable=False)
    kinds = leaf_kinds(tmp_ckpt)
    assert kinds["unaligned"] == kinds["zero_d"] == kinds["column"] == "view" and kinds["empty"] == "tensor"
    for mmap in (True, False):
        got = ckptfmt.load(tmp_ckpt, mmap=mmap)
        for k, v in state.items():
            same_bits(got[k], v, k)
        assert got["zero_d"].shape == () and np.shares_memory(got["zero_d"], got["b"])
        assert np.shares_memory(got["unaligned"], got["raw"])


def test_big_endian_members_of_a_group_are_stored_converted(tmp_ckpt: Path) -> None:
    a = np.arange(8, dtype=">f4")
    state = {"a": a, "half": a[::2], "native": np.arange(3.0)}
    ckptfmt.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.load(tmp_ckpt)
    for k, v in state.items():
        same_bits(got[k], v.astype(v.dtype.newbyteorder("=")), k)
    assert leaf_kinds(tmp_ckpt) == {"a": "tensor", "half": "tensor", "native": "tensor"}


def test_numpy_subclasses_are_saved_as_their_data(tmp_path: Path) -> None:
    mm = np.memmap(tmp_path / "raw.bin", dtype=np.float32, mode="w+", shape=(4,))
    mm[:] = [1, 2, 3, 4]
    path = tmp_path / "x.ckpt"
    ckptfmt.save(path, {"mm": mm, "f": np.asfortranarray(np.arange(6).reshape(2, 3))}, durable=False)
    got = ckptfmt.load(path)
    assert type(got["mm"]) is np.ndarray and got["mm"].tolist() == [1, 2, 3, 4]
    assert got["f"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["f"].flags.c_contiguous
    del mm


def test_masked_arrays_are_refused(tmp_ckpt: Path) -> None:
    with pytest.raises(ckptfmt.UnsupportedObjectError, match="m"):
        ckptfmt.save(tmp_ckpt, {"m": np.ma.masked_array([1, 2], mask=[0, 1])})
    assert not tmp_ckpt.exists()


@pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")
def test_ml_dtypes_scalars_come_back_as_scalars(tmp_ckpt: Path) -> None:
    state = {"bf": ml_dtypes.bfloat16(1.5), "e4": ml_dtypes.float8_e4m3fn(-2.0), "e5": ml_dtypes.float8_e5m2(0.25)}
    ckptfmt.save(tmp_ckpt, state, durable=False)
    assert leaf_kinds(tmp_ckpt) == dict.fromkeys(state, "scalar")
    got = ckptfmt.load(tmp_ckpt)
    for k, v in state.items():
        assert type(got[k]) is type(v) and np.asarray(got[k]).tobytes() == np.asarray(v).tobytes(), k


def test_get_backend_numpy() -> None:
    be = ckptfmt.get_backend("numpy")
    assert isinstance(be, ckptfmt.ArrayBackend) and be.name == "numpy"
    assert be.is_array(np.ones(2)) and be.is_array(np.float32(1))
    assert not be.is_array(np.str_("x")) and not be.is_array([1.0]) and not be.is_array(np.ma.ones(2))
    with pytest.raises(ValueError, match="numpy"):
        be.from_host(np.ones(2), ckptfmt.DTYPES["float64"], scalar=False, device="cuda:0")


def test_numpy_use_of_ckptfmt_never_imports_torch(tmp_path: Path) -> None:
    # tests/test_api.py checks plain save/load; this adds the numpy adapter itself, shared-storage views
    # (alias_key, alias_info, storage_bytes, view), ml_dtypes and the ckptfmt.numpy module
    code = f"""
import json, sys
import numpy as np
import ckptfmt.backends.numpy, ckptfmt, ckptfmt.numpy
p = {str(tmp_path / "x.ckpt")!r}
a = np.arange(24.0).reshape(4, 6)
state = {{"a": a, "t": a.T, "s": [a[1:3], a[2:4]], "x": np.float32(1)}}
try:
    import ml_dtypes
    state["bf"] = np.ones(3, ml_dtypes.bfloat16)
except ImportError:
    pass
ckptfmt.numpy.save(p, state)
ckptfmt.numpy.load(p); ckptfmt.load(p, mmap=False, backend="numpy"); ckptfmt.numpy.load(p, keys=["t"])
ckptfmt.get_backend("numpy"); ckptfmt.verify(p)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cupy", "jax", "tensorflow")
                        or m in ("ckptfmt.backends.torch", "ckptfmt.backends.cupy", "ckptfmt.backends._cuda"))))
"""
    # run from tmp_path: from the repo root, the source folder would shadow a non-editable install (tox)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(out.stdout) == []
