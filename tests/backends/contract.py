"""The contract every array backend keeps: one test class that each backend's test module subclasses.

A subclass says which backend it tests (``backend``, the ``backend=`` name of loads), on which
``device`` loads land, which canonical ``dtypes`` its framework can hold, and how to go between its
arrays and numpy (``make``, ``to_numpy``); the tests below then run against it unchanged. Arrays are
compared bit for bit (dtype, shape and bytes), so nan payloads and -0.0 count.

Not collected by itself (no ``test_`` prefix, no ``Test`` class name).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptfmt

try:
    import ml_dtypes
except ImportError:  # the "minimal" tox environment: no bfloat16/float8 on the numpy side
    ml_dtypes = None

NATIVE_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128")
ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
#: every canonical dtype numpy can hold here (spec §6)
NUMPY_DTYPES = NATIVE_DTYPES + (ML_DTYPES if ml_dtypes is not None else ())
ITEMSIZE = {"bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4,
            "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
            "float8_e4m3fn": 1, "float8_e5m2": 1}
#: same-width unsigned integers, to carry any dtype's bits where numpy lacks the type
RAW_UINT = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8"), 16: np.dtype("V16")}

#: pytest makes one instance of the test class per test, so a property test of the shared class runs on
#: several "executors"; the instances hold no state, which is what that health check guards against.
PROPERTY = settings(max_examples=20, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.differing_executors])


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a canonical name, written from spec §6 (not from the library)."""
    if name in ML_DTYPES:
        if ml_dtypes is None:
            return np.dtype(f"V{ITEMSIZE[name]}")
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def from_bytes(name: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """An array of dtype ``name`` and ``shape`` holding exactly ``data`` (bools made 0/1, spec §6)."""
    raw = np.frombuffer(data, dtype=np.uint8).copy()
    if name == "bool":
        raw &= 1
    return raw.view(np_dtype(name)).reshape(shape)


def pattern(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A deterministic array of ``name`` whose elements all differ in their bytes (bools alternate)."""
    n = math.prod(shape) * ITEMSIZE[name]
    data = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    if name in ("float8_e4m3fn",):
        data &= 0x77  # keep clear of the nan encodings, so values compare with == as well
    return from_bytes(name, shape, data.tobytes())


def same_bits(got: np.ndarray, want: np.ndarray, where: str = "") -> None:
    """Equal dtype, shape and C-order bytes."""
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{where}: bytes differ"


def leaf_kinds(path: Path) -> dict[str, str]:
    """key path -> 'tensor' | 'view' | 'scalar' | 'value', from ``ckptfmt.inspect``."""
    return {leaf["key"]: leaf["kind"] for leaf in ckptfmt.inspect(path)["leaves"]}


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


class BackendContract:
    """Tests every backend passes. Subclasses fill in the class attributes and the four hooks."""

    #: the name loads pass as ``backend=``
    backend: ClassVar[str]
    #: where loads put arrays (``device=``); None for the backend's default
    device: ClassVar[str | None] = None
    #: canonical dtype names the framework can hold
    dtypes: ClassVar[tuple[str, ...]] = ()
    #: whether loads honour ``mmap`` (device loads read through host buffers whatever it says)
    mmap_modes: ClassVar[tuple[bool, ...]] = (True, False)
    #: known library bugs -> reason; the matching cases are strict xfails. A key is a dtype name (every case
    #: of that dtype) or ``"<test name>[mmap=<bool>]"`` (one mmap mode of one test)
    known_bugs: ClassVar[dict[str, str]] = {}

    # ---------------------------------------------------------------- hooks

    def make(self, a: np.ndarray) -> Any:
        """A framework array (on the device under test) holding ``a``'s dtype, shape and bytes."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A host numpy copy of framework array ``x``, as the numpy dtype of its canonical dtype."""
        raise NotImplementedError

    def shares_memory(self, a: Any, b: Any) -> bool:
        """Whether two framework arrays live in the same allocation."""
        raise NotImplementedError

    def is_native(self, x: Any) -> bool:
        """Whether ``x`` is an array of this framework on the device under test."""
        raise NotImplementedError

    def bitcast(self, x: Any, name: str) -> Any:
        """``x``'s bytes reinterpreted as the same-width canonical dtype ``name`` (a view, no copy)."""
        raise NotImplementedError

    def load(self, path: Path, **kw: Any) -> Any:
        """Load through this backend."""
        return ckptfmt.load(path, backend=self.backend, device=self.device, **kw)

    def save(self, path: Path, obj: Any, **kw: Any) -> None:
        ckptfmt.save(path, obj, durable=False, **kw)

    # ---------------------------------------------------------------- parametrization

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """``dtype_name`` runs over the subclass's dtypes; ``mmap`` over its mmap modes."""
        if "dtype_name" in metafunc.fixturenames:
            metafunc.parametrize("dtype_name", [
                pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=self.known_bugs[name]))
                if name in self.known_bugs else name for name in self.dtypes])
        if "mmap" in metafunc.fixturenames:
            params = []
            for m in self.mmap_modes:
                reason = self.known_bugs.get(f"{metafunc.function.__name__}[mmap={m}]")
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                params.append(pytest.param(m, id=f"mmap={m}", marks=marks))
            metafunc.parametrize("mmap", params)

    def check(self, got: Any, want: np.ndarray, where: str = "") -> None:
        assert self.is_native(got), f"{where}: loaded a {type(got)!r}, not an array of {self.backend}"
        same_bits(self.to_numpy(got), want, where)

    # ---------------------------------------------------------------- round trips

    def test_subclass_is_complete(self) -> None:
        assert self.backend and self.dtypes
        assert set(self.dtypes) <= set(ckptfmt.DTYPES), "dtypes must be canonical names (spec §6)"
        assert ckptfmt.get_backend(self.backend).name == self.backend

    @PROPERTY
    @given(data=st.data())
    def test_every_dtype_round_trips_bit_exactly(self, tmp_path: Path, dtype_name: str, data: st.DataObject) -> None:
        shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), label="shape")
        n = math.prod(shape) * ITEMSIZE[dtype_name]
        want = from_bytes(dtype_name, shape, data.draw(st.binary(min_size=n, max_size=n), label="bytes"))
        mmap = data.draw(st.sampled_from(self.mmap_modes), label="mmap")
        path = tmp_path / "x.ckpt"
        self.save(path, {"x": self.make(want)})
        got = self.load(path, mmap=mmap)
        assert list(got) == ["x"]
        self.check(got["x"], want, f"{dtype_name}{shape}")
        with ckptfmt.open(path) as ckpt:
            info = ckpt.info("x")
            assert (info.dtype, info.shape, info.nbytes) == (dtype_name, shape, n)

    def test_zero_d_and_empty_arrays(self, tmp_path: Path, dtype_name: str, mmap: bool) -> None:
        state = {"zero_d": pattern(dtype_name, ()), "empty": pattern(dtype_name, (0,)),
                 "empty2": pattern(dtype_name, (3, 0, 2)), "one": pattern(dtype_name, (1,))}
        path = tmp_path / "x.ckpt"
        self.save(path, {k: self.make(v) for k, v in state.items()})
        got = self.load(path, mmap=mmap)
        for k, v in state.items():
            self.check(got[k], v, k)
        assert leaf_kinds(path) == dict.fromkeys(state, "tensor")

    def test_nested_structure_keeps_containers_and_plain_leaves(self, tmp_path: Path, mmap: bool) -> None:
        w, b = pattern("float32", (3, 4)), pattern("int64", (2,), seed=1)
        state = {
            "model": {"w": self.make(w), "layers": [self.make(b), (self.make(w), 7, "relu")]},
            "step": 12, "lr": 0.5, "name": "run", "blob": b"\x00\xff", "none": None, "flag": False,
            "big": 2**64 - 1, "neg": -(2**63), 3: "int key", "empty": {"l": [], "t": (), "d": {}},
        }
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        got = self.load(path, mmap=mmap)
        assert list(got) == list(state)
        self.check(got["model"]["w"], w, "model/w")
        layers = got["model"]["layers"]
        assert type(layers) is list and type(layers[1]) is tuple and len(layers[1]) == 3
        self.check(layers[0], b, "model/layers/0")
        self.check(layers[1][0], w, "model/layers/1/0")
        assert layers[1][1:] == (7, "relu") and type(layers[1][1]) is int
        for k in ("step", "lr", "name", "blob", "none", "flag", "big", "neg", 3):
            assert got[k] == state[k] and type(got[k]) is type(state[k]), k
        assert got["empty"] == {"l": [], "t": (), "d": {}} and type(got["empty"]["t"]) is tuple

    def test_non_contiguous_inputs_are_stored_in_c_order(self, tmp_path: Path, dtype_name: str) -> None:
        # one base per view: arrays that share no allocation, so each is a tensor row of its own
        def fresh(seed: int) -> tuple[Any, np.ndarray]:
            a = pattern(dtype_name, (4, 6), seed)
            return self.make(a), a

        x1, a1 = fresh(1)
        x2, a2 = fresh(2)
        x3, a3 = fresh(3)
        x4, a4 = fresh(4)
        state = {"transpose": x1.T, "step": x2[:, ::2], "block": x3[1:3, 1::3], "column": x4[:, 5]}
        want = {"transpose": a1.T, "step": a2[:, ::2], "block": a3[1:3, 1::3], "column": a4[:, 5]}
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        assert leaf_kinds(path) == dict.fromkeys(state, "tensor")
        with ckptfmt.open(path) as ckpt:
            for k, v in want.items():
                assert ckpt.info(k).shape == v.shape and ckpt.info(k).nbytes == v.nbytes
        for mmap in self.mmap_modes:
            got = self.load(path, mmap=mmap)
            for k, v in want.items():
                self.check(got[k], np.ascontiguousarray(v), k)
        # the numpy reader sees C-order bytes whoever wrote them
        for k, v in ckptfmt.load(path, mmap=False).items():
            assert np.ascontiguousarray(want[k]).tobytes() == v.tobytes(), k
        assert ckptfmt.verify(path).ok

    # ---------------------------------------------------------------- shared storage (spec §4.7)

    def shared_state(self, dtype_name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        a = pattern(dtype_name, (4, 6))
        base = self.make(a)
        state = {"base": base, "t": base.T, "slice": base[1:3, ::2], "row": base[2], "again": base}
        want = {"base": a, "t": a.T, "slice": a[1:3, ::2], "row": a[2], "again": a}
        return state, want

    def test_shared_storage_is_stored_once_and_loaded_shared(self, tmp_path: Path, dtype_name: str) -> None:
        state, want = self.shared_state(dtype_name)
        path = tmp_path / "x.ckpt"
        self.save(path, state, alignment=64)
        doc = ckptfmt.inspect(path)
        assert doc["tensor_count"] == 1 and doc["tensor_bytes"] == want["base"].nbytes
        assert leaf_kinds(path) == {"base": "tensor", "t": "view", "slice": "view", "row": "view", "again": "tensor"}
        rows = {leaf["key"]: leaf.get("row", leaf.get("base_row")) for leaf in doc["leaves"]}
        assert set(rows.values()) == {0}
        # the file holds the base's bytes once: header + its aligned blob + metadata + footer
        meta_offset = 64 + -(-want["base"].nbytes // 64) * 64
        assert doc["file_size"] < meta_offset + 2048
        with ckptfmt.open(path) as ckpt:
            assert ckpt.info("t").offset == ckpt.info("base").offset
            assert ckpt.info("row").offset == ckpt.info("base").offset + 2 * 6 * ITEMSIZE[dtype_name]
        for mmap in self.mmap_modes:
            got = self.load(path, mmap=mmap)
            for k, v in want.items():
                self.check(got[k], v, f"{k} (mmap={mmap})")
                assert self.shares_memory(got[k], got["base"]), f"{k} does not share memory with base (mmap={mmap})"
            assert got["again"] is got["base"]
        assert ckptfmt.verify(path).ok

    def test_overlapping_slices_without_their_base_share_one_blob(self, tmp_path: Path, mmap: bool) -> None:
        a = pattern("float32", (10,))
        base = self.make(a)
        state = {"head": base[:6], "tail": base[4:9], "mid": base[2:8:3]}
        want = {"head": a[:6], "tail": a[4:9], "mid": a[2:8:3]}
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        doc = ckptfmt.inspect(path)
        # one uint8 blob covering the bytes the group touches: elements 0..8
        assert doc["tensor_count"] == 1 and doc["dtype_bytes"] == {"uint8": 9 * 4}
        assert leaf_kinds(path) == dict.fromkeys(state, "view")
        got = self.load(path, mmap=mmap)
        for k, v in want.items():
            self.check(got[k], v, k)
        assert self.shares_memory(got["head"], got["tail"]) and self.shares_memory(got["head"], got["mid"])

    def test_a_reinterpreting_view_keeps_its_dtype_and_shares(self, tmp_path: Path, mmap: bool) -> None:
        a = pattern("float32", (2, 3))
        base = self.make(a)
        state = {"f": base, "i": self.bitcast(base, "int32"), "u": self.bitcast(base, "uint32")[1]}
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        assert leaf_kinds(path) == {"f": "tensor", "i": "view", "u": "view"}
        got = self.load(path, mmap=mmap)
        self.check(got["f"], a, "f")
        self.check(got["i"], a.view(np.int32), "i")
        self.check(got["u"], a.view(np.uint32)[1], "u")
        assert self.shares_memory(got["i"], got["f"]) and self.shares_memory(got["u"], got["f"])

    def test_resaving_a_loaded_subset_stores_only_that_subset(self, tmp_path: Path, mmap: bool) -> None:
        keep_a, keep_b = pattern("float32", (16,)), pattern("int64", (4,), 1)
        dropped = pattern("uint8", (1 << 20,), 2)
        src, dst, again = tmp_path / "src.ckpt", tmp_path / "dst.ckpt", tmp_path / "again.ckpt"
        self.save(src, {"a": self.make(keep_a), "dropped": self.make(dropped), "b": self.make(keep_b)})
        got = self.load(src, mmap=mmap)
        # everything loaded, saved again, loads equal
        self.save(again, got)
        back = self.load(again, mmap=mmap)
        for k, v in {"a": keep_a, "dropped": dropped, "b": keep_b}.items():
            self.check(back[k], v, k)
        # a subset: only its bytes are written, as plain tensors, and nothing of the dropped tensor
        self.save(dst, {"a": got["a"], "b": got["b"]})
        assert leaf_kinds(dst) == {"a": "tensor", "b": "tensor"}
        assert dst.stat().st_size < 64 << 10, f"{dst.stat().st_size} bytes for 96 bytes of tensors"
        assert dropped[:4096].tobytes() not in dst.read_bytes()
        sub = self.load(dst, mmap=mmap)
        self.check(sub["a"], keep_a, "a")
        self.check(sub["b"], keep_b, "b")

    # ---------------------------------------------------------------- partial loads

    def test_partial_loads_read_only_the_selected_keys(self, tmp_path: Path, mmap: bool) -> None:
        state, want = self.shared_state("float32")
        state["other"] = self.make(pattern("int16", (5,)))
        state["cfg"] = {"depth": 3}
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        got = self.load(path, keys=["row", "cfg/depth", "t"], mmap=mmap)
        assert list(got) == ["row", "cfg/depth", "t"]
        self.check(got["row"], want["row"], "row")
        self.check(got["t"], want["t"], "t")
        assert got["cfg/depth"] == 3
        assert self.shares_memory(got["row"], got["t"])
        one = self.load(path, keys="other", mmap=mmap)
        assert list(one) == ["other"]
        self.check(one["other"], pattern("int16", (5,)), "other")
        assert self.load(path, keys=[], mmap=mmap) == {}
        with pytest.raises(ckptfmt.CheckpointKeyError):
            self.load(path, keys=["nope"], mmap=mmap)

    # ---------------------------------------------------------------- integrity

    def test_verify_is_ok_for_what_this_backend_wrote(self, tmp_path: Path) -> None:
        state, _ = self.shared_state("float64")
        state["big"] = self.make(pattern("uint8", (3, 1 << 19)))  # 1.5 MiB: the large-blob path
        state["scalar"] = self.make(pattern("int32", ()))
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        report = ckptfmt.verify(path)
        assert report.ok and report.errors == [] and report.tensors_checked == 3

    def test_a_corrupted_blob_is_detected_by_this_backends_load(self, tmp_path: Path, mmap: bool) -> None:
        good = pattern("float32", (64,))
        state = {"good": self.make(good), "bad": self.make(pattern("float32", (8, 8), seed=1)), "n": 1}
        path = tmp_path / "x.ckpt"
        self.save(path, state)
        with ckptfmt.open(path) as ckpt:
            offset = ckpt.info("bad").offset
        flip_byte(path, offset + 17)
        with pytest.raises(ckptfmt.ChecksumMismatchError, match="bad") as err:
            self.load(path, mmap=mmap)
        assert err.value.key == "bad"
        with pytest.raises(ckptfmt.ChecksumMismatchError):
            self.load(path, keys=["bad"], mmap=mmap)
        # loads are verified lazily: an untouched tensor still loads, and verify=False skips the check
        self.check(self.load(path, keys=["good"], mmap=mmap)["good"], good, "good")
        unchecked = self.load(path, verify=False, mmap=mmap)
        assert self.to_numpy(unchecked["bad"]).tobytes() != pattern("float32", (8, 8), seed=1).tobytes()
        assert not ckptfmt.verify(path).ok

    def test_a_corrupted_view_base_is_detected_through_the_view(self, tmp_path: Path, mmap: bool) -> None:
        state, _ = self.shared_state("int32")
        path = tmp_path / "x.ckpt"
        self.save(path, {"t": state["t"], "row": state["row"], "base": state["base"]})
        with ckptfmt.open(path) as ckpt:
            offset = ckpt.info("base").offset
        flip_byte(path, offset)
        with pytest.raises(ckptfmt.ChecksumMismatchError):
            self.load(path, keys=["row"], mmap=mmap)
