"""save -> load gives back what was saved: every dtype, layout, plain value and container shape."""

from __future__ import annotations

import itertools
import math
import os
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import (
    BOM,
    FOOTER_MAGIC,
    HEADER_SIZE,
    MAGIC,
    PlainInt,
    ScalarRef,
    align_up,
    ml_dtypes,
    read_footer,
    read_metadata,
    requires_ml_dtypes,
    xxh,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptfmt
from ckptfmt._writer import CHUNK_SIZE, SMALL_BLOB

NATIVE_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128"]
ML_DTYPES = ["bfloat16", "float8_e4m3fn", "float8_e5m2"]
ALL_DTYPES = NATIVE_DTYPES + (ML_DTYPES if ml_dtypes is not None else [])

PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def np_dtype(name: str) -> np.dtype:
    if name in ML_DTYPES:
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# ---------------------------------------------------------------- reference model of the format


def esc(element: str | int) -> str:
    """Key-path element, written from the format description (not the library)."""
    if type(element) is int:
        return str(element)
    assert isinstance(element, str)
    return element.replace("~", "~0").replace("/", "~1")


def ref_leaves(obj: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str, Any]]:
    """(key path, leaf) of a user object, in tree order; empty containers have no leaves."""
    if type(obj) is dict:
        return [kv for k, v in obj.items() for kv in ref_leaves(v, (*path, k))]
    if type(obj) in (list, tuple):
        return [kv for i, v in enumerate(obj) for kv in ref_leaves(v, (*path, i))]
    return [("/".join(esc(e) for e in path), obj)]


def is_tensor(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def le_bytes(a: np.ndarray | np.generic) -> bytes:
    """Element bytes of ``a`` in C order, little-endian."""
    arr = np.asarray(a)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def assert_same(orig: Any, got: Any, where: str = "") -> None:
    """``got`` is ``orig`` as a checkpoint returns it: same containers, types, dtypes, shapes and bits."""
    if type(orig) is dict:
        assert type(got) is dict, where
        assert list(got) == list(orig), where
        for k in orig:
            assert_same(orig[k], got[k], f"{where}/{k}")
    elif type(orig) in (list, tuple):
        assert type(got) is type(orig), where
        assert len(got) == len(orig), where
        for i, (a, b) in enumerate(zip(orig, got, strict=True)):
            assert_same(a, b, f"{where}/{i}")
    elif isinstance(orig, np.ndarray):
        assert type(got) is np.ndarray, where
        assert got.dtype == orig.dtype.newbyteorder("=") or got.dtype == orig.dtype, (where, got.dtype, orig.dtype)
        assert got.dtype.byteorder in "=|<", where
        assert got.shape == orig.shape, where
        assert le_bytes(got) == le_bytes(orig), where
    elif isinstance(orig, np.generic):
        assert type(got) is type(orig), (where, type(got), type(orig))
        assert got.dtype == orig.dtype, where
        assert le_bytes(got) == le_bytes(orig), where
    elif type(orig) is float:
        assert type(got) is float, where
        assert struct.pack("<d", got) == struct.pack("<d", orig), (where, got, orig)
    else:
        assert type(got) is type(orig), (where, type(got), type(orig))
        assert got == orig, where


# ---------------------------------------------------------------- strategies


@st.composite
def raw_arrays(draw: st.DrawFn, dtypes: list[str] = ALL_DTYPES, max_dims: int = 4) -> np.ndarray:
    """An array of any supported dtype with arbitrary bits (NaNs, infs, subnormals...) and any shape."""
    name = draw(st.sampled_from(dtypes))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5))
    dt = np_dtype(name)
    if name == "bool":
        return draw(hnp.arrays(np.bool_, shape))
    raw = draw(hnp.arrays(np.uint8, (*shape, dt.itemsize)))
    return raw.view(dt).reshape(shape)


def relayout(arr: np.ndarray, how: str) -> np.ndarray:
    """The same elements in another memory layout (a view where numpy gives one)."""
    if how == "transposed":
        return arr.T
    if how == "fortran":
        return np.asfortranarray(arr)
    if how == "strided":  # every other element along the first axis, from a doubled base
        base = np.repeat(arr, 2, axis=0) if arr.ndim else arr
        return base[::2] if arr.ndim else base
    if how == "reversed":
        return arr[::-1] if arr.ndim else arr
    if how == "big-endian":
        return arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 and arr.dtype.kind != "V" else arr
    return arr


LAYOUTS = ["contiguous", "transposed", "fortran", "strided", "reversed", "big-endian"]

int64s = st.integers(-(2**63), 2**64 - 1)
plain_leaves = st.one_of(
    st.none(), st.booleans(), int64s, st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, -math.inf, -0.0]),
    st.text(), st.binary(),
)
numpy_scalars = st.builds(lambda a: a[()], raw_arrays(max_dims=0))
keys = st.one_of(st.text(max_size=6), st.sampled_from(["", "/", "~", "a/b", "~0", "~1", "a~b/c"]),
                 st.integers(-(2**63), 2**63 - 1))


def _distinct_paths(d: dict[Any, Any]) -> bool:
    return len({str(k) for k in d}) == len(d)


@st.composite
def trees(draw: st.DrawFn) -> Any:
    leaf = st.one_of(plain_leaves, numpy_scalars, st.builds(relayout, raw_arrays(max_dims=3), st.sampled_from(LAYOUTS)))
    return draw(st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.lists(kids, max_size=4).map(tuple),
            st.dictionaries(keys, kids, max_size=4).filter(_distinct_paths),
        ),
        max_leaves=12,
    ))


# ---------------------------------------------------------------- properties


@PROPERTY
@given(obj=trees(), mmap=st.booleans())
def test_any_tree_round_trips(tmp_path: Path, obj: Any, mmap: bool) -> None:
    path = tmp_path / "t.ckpt"
    ckptfmt.save(path, obj, durable=False)
    got = ckptfmt.load(path, mmap=mmap)
    assert_same(obj, got)
    for _, leaf in ref_leaves(got):
        if isinstance(leaf, np.ndarray):
            assert leaf.flags.writeable is (not mmap)
    assert ckptfmt.verify(path).ok


@PROPERTY
@given(arr=raw_arrays(max_dims=4), how=st.sampled_from(LAYOUTS), mmap=st.booleans())
def test_every_dtype_shape_and_layout_round_trips(tmp_path: Path, arr: np.ndarray, how: str, mmap: bool) -> None:
    path = tmp_path / "a.ckpt"
    view = relayout(arr, how)
    ckptfmt.save(path, {"x": view}, durable=False)
    got = ckptfmt.load(path, mmap=mmap)["x"]
    assert_same(view, got)
    with ckptfmt.open(path) as ckpt:
        info = ckpt.info("x")
        assert info.dtype == view.dtype.name
        assert info.shape == view.shape
        assert info.nbytes == view.nbytes
        assert info.checksum == xxh(le_bytes(view))
        assert info.offset % 4096 == 0 or view.nbytes == 0


container_roots = st.one_of(
    st.dictionaries(keys, trees(), min_size=1, max_size=3).filter(_distinct_paths),
    st.lists(trees(), max_size=3), st.lists(trees(), max_size=3).map(tuple),
)


@PROPERTY
@given(obj=container_roots)
def test_lazy_reader_agrees_with_the_saved_tree(tmp_path: Path, obj: Any) -> None:
    """Every key path keys() lists resolves to its leaf (a root that is itself a leaf: see test_keypath.py)."""
    path = tmp_path / "t.ckpt"
    ckptfmt.save(path, obj, durable=False)
    expected = ref_leaves(obj)
    with ckptfmt.open(path) as ckpt:
        assert ckpt.keys() == [k for k, _ in expected]
        assert list(ckpt) == ckpt.keys()
        assert ckpt.tensor_keys() == [k for k, v in expected if is_tensor(v)]
        for k, leaf in expected:
            assert k in ckpt
            assert_same(leaf, ckpt.get(k))
            if is_tensor(leaf):
                info = ckpt.info(k)
                assert info.key == k
                assert info.shape == np.shape(leaf)
                assert info.nbytes == np.asarray(leaf).nbytes
        selected = [k for k, _ in expected][::2]
        got = ckptfmt.load(path, keys=selected)
        assert list(got) == selected
        for k in selected:
            assert_same(dict(expected)[k], got[k])
        assert ckpt.verify().ok


# ---------------------------------------------------------------- examples


def test_every_dtype_round_trips_as_array_and_scalar(tmp_ckpt: Path) -> None:
    rng = np.random.default_rng(0)
    state = {}
    for name in ALL_DTYPES:
        dt = np_dtype(name)
        raw = rng.integers(0, 256, size=(3, 4, dt.itemsize), dtype=np.uint8)
        arr = (raw[..., 0] & 1).astype(bool) if name == "bool" else raw.view(dt).reshape(3, 4)
        state[name] = {"array": arr, "scalar": arr[1, 2], "zero_d": arr[1, 2, ...], "empty": arr[:0]}
    ckptfmt.save(tmp_ckpt, state)
    for mmap in (True, False):
        got = ckptfmt.load(tmp_ckpt, mmap=mmap)
        assert_same(state, got)
        for name in ALL_DTYPES:
            assert got[name]["array"].dtype == np_dtype(name)
            assert isinstance(got[name]["scalar"], np.generic)
            assert type(got[name]["scalar"]) is np_dtype(name).type
            assert type(got[name]["zero_d"]) is np.ndarray and got[name]["zero_d"].shape == ()
            assert got[name]["empty"].shape == (0, 4)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert {ckpt.info(f"{n}/array").dtype for n in ALL_DTYPES} == set(ALL_DTYPES)
        assert ckpt.info("float32/scalar").shape == ()


@requires_ml_dtypes
def test_ml_dtypes_values_survive(tmp_ckpt: Path) -> None:
    vals = np.array([0.0, -1.5, 3.0, np.inf, np.nan], dtype=np.float32)
    state = {"bf16": vals.astype(ml_dtypes.bfloat16), "e5m2": vals.astype(ml_dtypes.float8_e5m2),
             "e4m3": vals[:3].astype(ml_dtypes.float8_e4m3fn), "s": ml_dtypes.bfloat16(2.5)}
    ckptfmt.save(tmp_ckpt, state)
    got = ckptfmt.load(tmp_ckpt)
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), vals)
    np.testing.assert_array_equal(got["e5m2"].astype(np.float32), vals)
    np.testing.assert_array_equal(got["e4m3"].astype(np.float32), vals[:3])
    assert type(got["s"]) is type(state["s"]) and float(got["s"]) == 2.5


def test_non_contiguous_views_are_saved_element_order(tmp_ckpt: Path) -> None:
    base = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    views = {
        "T": base.T, "slice": base[:, ::2, 1::2], "neg": base[::-1, :, ::-2],
        "bcast": np.broadcast_to(base[0, 0], (3, 5)),
        "be": base.astype(">f8")[:, 1], "be_int": np.arange(7, dtype=">i4"), "col": base[:, 0, :1],
        "fortran": np.asfortranarray(base), "ro": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
    }
    ckptfmt.save(tmp_ckpt, views)
    got = ckptfmt.load(tmp_ckpt)
    for k, v in views.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got[k].dtype == v.dtype.newbyteorder("=")
    assert got["be"].dtype == np.dtype("<f8")
    # views of one allocation come back as views of one blob (spec 4.7); big-endian ones are converted
    assert all(np.shares_memory(got["T"], got[k]) for k in ("slice", "neg", "col", "bcast"))
    assert not np.shares_memory(got["be"], got["T"]) and got["be"].flags.c_contiguous


def test_plain_leaves_round_trip_exactly(tmp_ckpt: Path) -> None:
    state = {
        "ints": [0, 1, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**31, -(2**31) - 1],
        "floats": [0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308],
        "bools": [True, False], "none": None,
        "strs": ["", "ascii", "ünïcødé", "日本語", "emoji 🎉", "nul\x00byte", "a/b~c"],
        "bytes": [b"", b"\x00\xff" * 10, bytes(range(256))],
    }
    ckptfmt.save(tmp_ckpt, state)
    got = ckptfmt.load(tmp_ckpt)
    assert_same(state, got)
    assert all(type(i) is int for i in got["ints"])
    assert all(type(b) is bool for b in got["bools"])


def test_containers_keep_their_types_and_key_kinds(tmp_ckpt: Path) -> None:
    arr = np.ones(2, np.float32)
    state = {
        "t": (1, (2.0, "x"), ()), "l": [[], [[]], {}], "empty_d": {}, "empty_t": (),
        "ik": {0: "zero", -5: "neg", 2**62: "big", "s": "str"},
        "odd keys": {"": 1, "/": 2, "~": 3, "~1": 4, "a/b": arr, "~0/~1": 5, " ": 6},
        "tuple_of_arrays": (arr, np.zeros((0, 3))),
    }
    ckptfmt.save(tmp_ckpt, state)
    got = ckptfmt.load(tmp_ckpt)
    assert_same(state, got)
    assert list(got["ik"]) == [0, -5, 2**62, "s"]
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.get("ik/-5") == "neg"
        assert ckpt.get("ik/4611686018427387904") == "big"
        assert ckpt.get("odd keys/~1") == 2
        assert ckpt.get("odd keys/~0") == 3
        assert ckpt.get("odd keys/~01") == 4
        assert ckpt.get("odd keys/~00~1~01") == 5
        assert ckpt.get("odd keys/") == 1
        assert ckpt.get("t/1/1") == "x"
        assert ckpt.get("t/1") == (2.0, "x")
        np.testing.assert_array_equal(ckpt.get("odd keys/a~1b"), arr)


def test_root_may_be_a_single_leaf(tmp_path: Path) -> None:
    for i, obj in enumerate([np.arange(5), np.float32(2.0), 7, "text", None, [], (), {}]):
        path = tmp_path / f"{i}.ckpt"
        ckptfmt.save(path, obj)
        assert_same(obj, ckptfmt.load(path))


def test_numpy_scalars_come_back_as_numpy_scalars(tmp_ckpt: Path) -> None:
    state = {"f32": np.float32(1.25), "i64": np.int64(-7), "u8": np.uint8(255), "b": np.bool_(True),
             "c64": np.complex64(1 + 2j), "f16": np.float16(0.5), "u64": np.uint64(2**64 - 1), "py": 1.25}
    ckptfmt.save(tmp_ckpt, state)
    for mmap in (True, False):
        got = ckptfmt.load(tmp_ckpt, mmap=mmap)
        assert_same(state, got)
        assert type(got["py"]) is float
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.info("f32").shape == () and ckpt.info("f32").dtype == "float32"
        assert "f32" in ckpt.tensor_keys() and "py" not in ckpt.tensor_keys()


def test_the_same_array_twice_is_stored_once_and_loaded_as_one_object(tmp_ckpt: Path) -> None:
    w = np.arange(1000, dtype=np.float32)
    s = np.float64(3.5)
    other = w.copy()
    state = {"a": w, "b": [w, (w,)], "c": other, "s1": s, "s2": s}  # s: one row, two references
    ckptfmt.save(tmp_ckpt, state)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert len(ckpt) == 3  # w, other, s
        assert ckpt.info("a").offset == ckpt.info("b/0").offset == ckpt.info("b/1/0").offset
        assert ckpt.info("c").offset != ckpt.info("a").offset
    for mmap in (True, False):
        got = ckptfmt.load(tmp_ckpt, mmap=mmap)
        assert got["a"] is got["b"][0] is got["b"][1][0]
        assert got["c"] is not got["a"]
        assert got["s1"] == got["s2"] == s and type(got["s1"]) is np.float64
        part = ckptfmt.load(tmp_ckpt, keys=["a", "b"], mmap=mmap)
        assert part["a"] is part["b"][0]


def test_the_same_numpy_scalar_twice_is_loaded_as_one_object(tmp_ckpt: Path) -> None:
    s = np.float32(1.5)
    ckptfmt.save(tmp_ckpt, {"a": s, "b": [s]})
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert len(ckpt) == 1
    got = ckptfmt.load(tmp_ckpt)
    assert got["a"] is got["b"][0]


def test_mmap_loads_are_read_only_and_copies_are_writable(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"w": np.arange(10.0), "e": np.zeros((0, 2)), "z": np.array(1.0)})
    view = ckptfmt.load(tmp_ckpt, mmap=True)
    for a in view.values():
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[...] = 0
    fresh = ckptfmt.load(tmp_ckpt, mmap=False)
    for a in fresh.values():
        assert a.flags.writeable
        a[...] = 5
    assert ckptfmt.load(tmp_ckpt)["w"][0] == 0.0  # the file did not change
    with ckptfmt.open(tmp_ckpt) as ckpt:
        w = ckpt.get("w")
    assert w.sum() == 45.0  # views stay valid after close
    del view
    os.unlink(tmp_ckpt)
    assert w[9] == 9.0  # and after the file is gone


def test_partial_load_reads_the_selected_keys(tmp_ckpt: Path) -> None:
    state = {"model": {"w": np.ones((3, 3)), "b": np.zeros(3)}, "step": 5, "opt": [np.arange(4), {"lr": 0.1}]}
    ckptfmt.save(tmp_ckpt, state)
    got = ckptfmt.load(tmp_ckpt, keys=["model/w", "step", "opt/1", "model"])
    assert list(got) == ["model/w", "step", "opt/1", "model"]
    np.testing.assert_array_equal(got["model/w"], np.ones((3, 3)))
    assert got["step"] == 5 and type(got["step"]) is int
    assert got["opt/1"] == {"lr": 0.1}
    assert_same(state["model"], got["model"])
    assert ckptfmt.load(tmp_ckpt, keys="opt/0")["opt/0"].tolist() == [0, 1, 2, 3]
    assert ckptfmt.load(tmp_ckpt, keys=[]) == {}


def test_lazy_reader_surface(tmp_ckpt: Path) -> None:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.int32(4), "cfg": {"name": "x", "n": 3},
             "t": (np.zeros(1), 2)}
    ckptfmt.save(tmp_ckpt, state, metadata={"run": "r1"})
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert isinstance(ckpt, ckptfmt.Checkpoint)
        assert ckpt.version == (1, 0)
        assert ckpt.keys() == ["w", "s", "cfg/name", "cfg/n", "t/0", "t/1"]
        assert ckpt.tensor_keys() == ["w", "s", "t/0"]
        assert len(ckpt) == 3
        assert "cfg" in ckpt and "cfg/n" in ckpt and "cfg/x" not in ckpt and "t/2" not in ckpt and 3 not in ckpt
        info = ckpt.info("w")
        assert isinstance(info, ckptfmt.TensorInfo)
        assert (info.key, info.dtype, info.shape, info.nbytes) == ("w", "float32", (2, 3), 24)
        assert info.offset == 4096 and info.checksum == xxh(state["w"].tobytes())
        tree = ckpt.tree()
        assert tree["cfg"] == {"name": "x", "n": 3}
        assert isinstance(tree["w"], ckptfmt.TensorInfo) and tree["w"] == info
        assert isinstance(tree["t"], tuple) and isinstance(tree["t"][0], ckptfmt.TensorInfo) and tree["t"][1] == 2
        assert tree["s"].shape == () and tree["s"].dtype == "int32"
        assert ckpt.get("cfg") == {"name": "x", "n": 3}
        assert ckpt.get("s") == np.int32(4) and type(ckpt.get("s")) is np.int32
        assert ckpt.metadata == {"run": "r1"}
        assert ckpt.producer["name"] == "ckptfmt" and ckpt.producer["version"] == ckptfmt.__version__
        assert ckpt.created.endswith("Z") and ckpt.created[4] == "-"
        e = ckpt.entry(0)
        assert isinstance(e, ckptfmt.TensorEntry) and e.shape == (2, 3) and e.index == 0
        report = ckpt.verify()
        assert isinstance(report, ckptfmt.VerifyReport)
        assert report.ok and report.tensors_checked == 3 and report.bytes_checked == 24 + 4 + 8
        assert report.checksummed and report.errors == []
    with pytest.raises(ckptfmt.CheckpointError):
        ckpt.get("w")  # closed


def test_verify_progress_reports_every_byte(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"a": np.zeros(100), "b": np.zeros(0), "c": np.ones(3, np.int8)})
    seen: list[int] = []
    with ckptfmt.open(tmp_ckpt) as ckpt:
        report = ckpt.verify(progress=seen.append)
    assert sorted(seen) == [0, 3, 800] and report.bytes_checked == 803


@pytest.mark.parametrize("metadata", [
    None, {}, {"run": "baseline", "lr": 3e-4, "steps": [1, 2, 3], "nested": {"a": None, "b": b"\x00", "c": True},
               "big": 2**64 - 1, "neg": -(2**63), 7: "int key", "uni": "ß∂ƒ"},
])
def test_user_metadata_round_trips(tmp_ckpt: Path, metadata: dict[Any, Any] | None) -> None:
    ckptfmt.save(tmp_ckpt, {"x": 1}, metadata=metadata)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.metadata == (metadata or {})
        if metadata:
            assert type(ckpt.metadata["big"]) is int and ckpt.metadata["nested"]["b"] == b"\x00"


@pytest.mark.parametrize("alignment", [64, 128, 4096, 65536])
def test_alignment_places_every_blob_on_a_multiple(tmp_ckpt: Path, alignment: int) -> None:
    state = {"a": np.ones(3, np.int8), "b": np.zeros(0), "c": np.arange(1000.0), "d": np.float32(1), "e": np.ones(65)}
    ckptfmt.save(tmp_ckpt, state, alignment=alignment)
    data = tmp_ckpt.read_bytes()
    assert struct.unpack_from("<I", data, 24)[0] == alignment
    with ckptfmt.open(tmp_ckpt) as ckpt:
        infos = [ckpt.info(k) for k in ckpt.tensor_keys()]
        meta_off, _, _ = read_footer(data)
    assert infos[1].offset == 0 and infos[1].nbytes == 0  # empty tensors have no bytes
    placed = [i for i in infos if i.nbytes]
    assert placed[0].offset == align_up(HEADER_SIZE, alignment)
    for prev, nxt in itertools.pairwise(placed):
        assert nxt.offset == align_up(prev.offset + prev.nbytes, alignment)
    assert meta_off == align_up(placed[-1].offset + placed[-1].nbytes, alignment)
    assert all(i.offset % alignment == 0 for i in infos)
    assert_same(state, ckptfmt.load(tmp_ckpt))
    assert ckptfmt.inspect(tmp_ckpt)["alignment"] == alignment


@pytest.mark.parametrize("alignment", [0, 1, 32, 63, 100, 4095, 3 * 4096, 2**31, -64])
def test_invalid_alignment_is_refused_before_writing(tmp_ckpt: Path, alignment: int) -> None:
    with pytest.raises(ValueError, match="alignment"):
        ckptfmt.save(tmp_ckpt, {"x": np.ones(2)}, alignment=alignment)
    assert os.listdir(tmp_ckpt.parent) == []


def test_saved_file_follows_the_documented_layout(tmp_ckpt: Path) -> None:
    state = {"w": np.arange(5, dtype=np.float32), "e": np.zeros((2, 0), np.int16), "t": (1, "a"), "s": np.uint8(9)}
    ckptfmt.save(tmp_ckpt, state, metadata={"k": "v"})
    data = tmp_ckpt.read_bytes()
    magic, major, minor, bom, req, opt, align, reserved, hsum = struct.unpack_from("<8sHHIIII28sQ", data, 0)
    assert (magic, major, minor, bom, req, opt, align) == (MAGIC, 1, 0, BOM, 0, 0, 4096)
    assert reserved == bytes(28) and hsum == xxh(data[:56])
    assert data[64:4096] == bytes(4032)
    meta_off, meta_len, meta_sum = read_footer(data)
    foot = data[-64:]
    assert foot[24:48] == bytes(24) and foot[48:56] == FOOTER_MAGIC
    assert struct.unpack_from("<Q", foot, 56)[0] == xxh(foot[:56])
    assert meta_off + meta_len == len(data) - 64 and meta_sum == xxh(data[meta_off:meta_off + meta_len])
    meta = read_metadata(data)
    assert set(meta) == {"tree", "tensors", "producer", "created", "user"}
    assert meta["user"] == {"k": "v"} and meta["producer"] == {"name": "ckptfmt", "version": ckptfmt.__version__}
    assert meta["tree"] == {"w": 0, "e": 1, "t": (PlainInt(1), "a"), "s": ScalarRef(2)}
    raw_tree = msgpack.unpackb(data[meta_off:meta_off + meta_len], raw=False)["tree"]
    assert raw_tree.code == 5  # dicts are ext 5 [keys, values]
    assert msgpack.unpackb(raw_tree.data, raw=False)[0] == ["w", "e", "t", "s"]
    t = meta["tensors"]
    assert t["count"] == 3 and t["dtypes"] == ["float32", "int16", "uint8"]
    assert np.frombuffer(t["dtype"], "u1").tolist() == [0, 1, 2]
    assert np.frombuffer(t["ndim"], "u1").tolist() == [1, 2, 0]
    assert np.frombuffer(t["shape"], "<u8").tolist() == [5, 2, 0]
    assert np.frombuffer(t["offset"], "<u8").tolist() == [4096, 0, 8192]
    assert np.frombuffer(t["nbytes"], "<u8").tolist() == [20, 0, 1]
    assert np.frombuffer(t["checksum"], "<u8").tolist() == [xxh(state["w"].tobytes()), xxh(b""), xxh(b"\x09")]
    assert data[4096:4116] == state["w"].tobytes() and data[4116:8192] == bytes(8192 - 4116)
    assert data[8192] == 9 and data[8193:12288] == bytes(12288 - 8193) and meta_off == 12288


def test_checksum_false_files_load_and_report_unchecksummed(tmp_ckpt: Path) -> None:
    state = {"a": np.arange(100.0), "b": [np.ones(3, np.int8)], "big": np.ones(300_000)}
    ckptfmt.save(tmp_ckpt, state, checksum=False)
    data = tmp_ckpt.read_bytes()
    assert "checksum" not in read_metadata(data)["tensors"]
    for mmap in (True, False):
        assert_same(state, ckptfmt.load(tmp_ckpt, mmap=mmap))
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.info("a").checksum is None
    report = ckptfmt.verify(tmp_ckpt)
    assert report.ok and report.checksummed is False and report.tensors_checked == 3
    assert ckptfmt.inspect(tmp_ckpt)["checksummed"] is False


def test_a_large_non_contiguous_array_goes_through_the_chunked_path(tmp_ckpt: Path) -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2, 2_300_000), dtype=np.float32)  # 18.4 MB
    big_rows = base[:, ::-1]  # non-contiguous, larger than the conversion chunk
    tall = np.ascontiguousarray(np.broadcast_to(base[0, :9000], (500, 9000))).T  # 18 MB, 2 KB rows
    be = base[0].astype(">f4")  # 9.2 MB big-endian
    state = {"rows": big_rows, "tall": tall, "be": be}
    assert big_rows.nbytes > CHUNK_SIZE and tall.nbytes > CHUNK_SIZE
    ckptfmt.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.load(tmp_ckpt)
    for k, v in state.items():
        assert got[k].tobytes() == np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("=")).tobytes(), k
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.info("rows").checksum == xxh(np.ascontiguousarray(big_rows).tobytes())
    assert ckptfmt.verify(tmp_ckpt).ok


def test_very_long_rows_are_split_within_a_row(tmp_ckpt: Path) -> None:
    n = CHUNK_SIZE // 4 + 100_000
    row = np.arange(n, dtype=np.float32)  # a single row larger than the conversion chunk
    view = np.stack([row, row + 1])[:, ::-1]
    assert view.nbytes // 2 > CHUNK_SIZE
    ckptfmt.save(tmp_ckpt, {"v": view}, durable=False)
    got = ckptfmt.load(tmp_ckpt, mmap=False)["v"]
    assert got[0, 0] == n - 1 and got[1, -1] == 1 and np.array_equal(got, view)
    assert ckptfmt.verify(tmp_ckpt).ok


@pytest.mark.parametrize("checksum", [True, False])
def test_large_contiguous_tensors_hash_on_the_side(tmp_ckpt: Path, checksum: bool) -> None:
    rng = np.random.default_rng(2)
    state = {f"w{i}": rng.standard_normal(400_000 + i).astype(np.float32) for i in range(3)}  # 1.6 MB each
    assert all(v.nbytes > SMALL_BLOB for v in state.values())
    state["small"] = np.ones(10)
    ckptfmt.save(tmp_ckpt, state, checksum=checksum, durable=False)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        for k, v in state.items():
            assert ckpt.info(k).checksum == (xxh(v.tobytes()) if checksum else None)
    assert_same(state, ckptfmt.load(tmp_ckpt, mmap=False))
    assert ckptfmt.verify(tmp_ckpt).ok


def test_many_small_tensors_fill_and_flush_the_batch_buffer(tmp_ckpt: Path) -> None:
    state = {f"t{i}": np.full(700 + i, i, dtype=np.float64) for i in range(2000)}  # ~11 MB in 2000 blobs
    ckptfmt.save(tmp_ckpt, state, alignment=64, durable=False)
    got = ckptfmt.load(tmp_ckpt)
    assert all(got[k].shape == v.shape and got[k][0] == v[0] and got[k][-1] == v[-1] for k, v in state.items())
    assert ckptfmt.verify(tmp_ckpt).ok


def test_save_accepts_str_and_pathlike(tmp_path: Path) -> None:
    ckptfmt.save(str(tmp_path / "s.ckpt"), {"a": 1})
    ckptfmt.save(tmp_path / "p.ckpt", {"a": 1})
    assert ckptfmt.load(str(tmp_path / "p.ckpt")) == ckptfmt.load(tmp_path / "s.ckpt") == {"a": 1}


def test_int_enum_and_str_subclasses_are_stored_as_base_values(tmp_ckpt: Path) -> None:
    import enum

    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    ckptfmt.save(tmp_ckpt, {"c": Color.RED, "n": Name("x"), "d": {"k": Color.RED}})
    got = ckptfmt.load(tmp_ckpt)
    assert got == {"c": 1, "n": "x", "d": {"k": 1}}
    assert type(got["c"]) is int and type(got["n"]) is str and type(got["d"]["k"]) is int
