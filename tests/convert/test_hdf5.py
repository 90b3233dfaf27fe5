"""HDF5 export and import (spec/HDF5.md): exact round trips, plain-h5py readability, foreign files."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

import ckptfmt  # noqa: E402
from ckptfmt import _writer  # noqa: E402
from ckptfmt.convert import _hdf5  # noqa: E402
from ckptfmt.convert._errors import CorruptSourceError  # noqa: E402
from ckptfmt.convert._hdf5 import DatasetArray, escape_name, export_hdf5, is_hdf5, read_hdf5, unescape_name  # noqa: E402

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - the minimal environment
    ml_dtypes = None

requires_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")

NUMPY_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64", "complex64", "complex128"]


# ---------------------------------------------------------------- helpers


def sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bit patterns of ``dtype`` (nan payloads, -0.0, ... included), except for bool."""
    dt = np.dtype(dtype)
    n = math.prod(shape)
    if dt == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    raw = np.random.default_rng(seed).integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Same types (dict key types and order, tuple vs list), same array dtypes, shapes and bytes."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{where}: bytes differ"
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def roundtrip(tmp_path: Path, tree: Any, metadata: dict[str, Any] | None = None, *, lazy: bool = True,
              **options: Any) -> tuple[Path, Path, Any, dict[str, Any]]:
    """tree → a.ckpt → a.h5 → (read_hdf5 + save) b.ckpt; the HDF5 path, b.ckpt, and what read_hdf5 gave."""
    a, h5, b = tmp_path / "a.ckpt", tmp_path / "a.h5", tmp_path / "b.ckpt"
    ckptfmt.save(a, tree, metadata=metadata)
    export_hdf5(a, h5, **options)
    got, meta = read_hdf5(h5, lazy=lazy)
    ckptfmt.save(b, got, metadata=meta)
    return h5, b, got, meta


def assert_restored(tmp_path: Path, tree: Any, metadata: dict[str, Any] | None = None, **options: Any) -> Path:
    """The round trip gives back the tree and metadata exactly; returns the HDF5 path."""
    h5, b, _, _ = roundtrip(tmp_path, tree, metadata, **options)
    assert ckptfmt.diff(tmp_path / "a.ckpt", b) == {"only_a": [], "only_b": [], "changed": []}
    assert_identical(ckptfmt.load(tmp_path / "a.ckpt"), ckptfmt.load(b))
    with ckptfmt.open(tmp_path / "a.ckpt") as ca, ckptfmt.open(b) as cb:
        assert_identical(ca.metadata, cb.metadata)
    assert ckptfmt.verify(b).ok
    return h5


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_every_numpy_dtype_round_trips_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    tree = {"t": sample(dtype, (3, 5)), "zero_d": sample(dtype, ()), "empty": sample(dtype, (0, 4)),
            "scalar": sample(dtype, ())[()], "long": sample(dtype, (1000,), seed=2)}
    assert_restored(tmp_path, tree)


@requires_ml_dtypes
@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_ml_dtypes_round_trip_as_same_width_integers(tmp_path: Path, name: str) -> None:
    dt = np.dtype(getattr(ml_dtypes, name))
    every = np.arange(1 << (8 * dt.itemsize), dtype=np.uint16 if dt.itemsize == 2 else np.uint8).view(dt)
    tree = {"all_bits": every.reshape(-1, 16), "zero_d": every[7:8].reshape(()).copy(), "empty": every[:0],
            "scalar": every[5]}
    h5 = assert_restored(tmp_path, tree)
    with h5py.File(h5) as f:
        ds = f["all_bits"]
        assert ds.dtype == (np.uint16 if dt.itemsize == 2 else np.uint8)
        assert ds.attrs["ckptfmt.dtype"] == name
        assert np.array_equal(ds[()], every.reshape(-1, 16).view(ds.dtype))


def test_containers_key_types_and_odd_keys_round_trip(tmp_path: Path) -> None:
    odd = ["a/b", ".", "..", "", "~", "~1", "~0/~", "x\0y", "ckptfmt.kind", "ckptfmt.metadata", "~.", " ",
           "λ-日本", "layer1.weight"]
    tree = {
        "model": {k: np.full(2, i, np.int32) for i, k in enumerate(odd)},
        "values": {k: i for i, k in enumerate(odd)},
        "int_keys": {0: np.ones(1), -5: "neg", 2**63 - 1: None, 7: {1: (2, [3])}},
        "nested": [[(1, 2.5), {"k": [np.zeros(3), ()]}], (), [], {}],
        "tuple": (np.arange(3), "x", (None, b"\x00")),
        "order": {"z": 1, "a": 2, "m": np.ones(1), "b": 3},
    }
    assert_restored(tmp_path, tree)


def test_plain_values_of_every_type_round_trip(tmp_path: Path) -> None:
    values = [None, True, False, 0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.0, -0.0, 1.5, math.inf,
              -math.inf, math.nan, struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0], "", "text",
              "nul\0inside", "ünïcødé ☃", b"", b"\x00\xff\x00", bytes(range(256)) * 400, "x" * 100_000]
    tree = {"list": values, "tuple": tuple(values), "dict": {f"k{i}": v for i, v in enumerate(values)}}
    assert_restored(tmp_path, tree)


def test_user_metadata_round_trips_and_lives_in_a_group(tmp_path: Path) -> None:
    meta = {"run": "baseline", "lr": 3e-4, "steps": [1, 2, 3], "nested": {"a": {"b": [None, True, b"raw"]}},
            "big": 2**64 - 1, 5: "int key", "nan": math.nan, "ckptfmt.odd": "reserved prefix"}
    h5 = assert_restored(tmp_path, {"w": np.ones(3)}, meta)
    with h5py.File(h5) as f:
        assert f["ckptfmt.metadata"].attrs["run"] == "baseline"
        assert f["ckptfmt.metadata"].attrs["lr"] == 3e-4
        assert list(f) == ["ckptfmt.metadata", "w"]


def test_empty_metadata_writes_no_group(tmp_path: Path) -> None:
    h5 = assert_restored(tmp_path, {"w": np.ones(3)})
    with h5py.File(h5) as f:
        assert "ckptfmt.metadata" not in f


@pytest.mark.parametrize("root", [np.arange(6.0).reshape(2, 3), np.float32(2.5), 7, None, "text", b"raw",
                                  [np.ones(2), 3], (1, "a"), {}, [], ()])
def test_a_root_of_any_kind_round_trips(tmp_path: Path, root: Any) -> None:
    assert_restored(tmp_path, root)


def test_a_tensor_referenced_twice_is_one_dataset_with_two_hard_links(tmp_path: Path) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = np.float64(2.5)
    h5, b, got, _ = roundtrip(tmp_path, {"embed": w, "head": w, "list": [w, s, s]})
    with h5py.File(h5) as f:
        assert f["embed"].id == f["head"].id == f["list/0"].id
        assert f["list/1"].id == f["list/2"].id
    assert got["embed"] is got["head"] is got["list"][0]
    with ckptfmt.open(b) as c:
        assert len(c) == 2  # stored once again
    assert ckptfmt.diff(tmp_path / "a.ckpt", b) == {"only_a": [], "only_b": [], "changed": []}


def test_views_are_stored_as_datasets_of_their_own(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.int16).reshape(4, 6)
    tree = {"base": base, "t": base.T, "row": base[1], "step": base[::2, ::-3]}
    h5, b, _, _ = roundtrip(tmp_path, tree)
    with ckptfmt.open(tmp_path / "a.ckpt") as c:
        assert c.manifest.views is not None and len(c.manifest.views) == 3
    with h5py.File(h5) as f:
        for k in tree:
            assert f[k].shape == tree[k].shape and np.array_equal(f[k][()], tree[k])
    got = ckptfmt.load(b)
    for k in tree:
        assert_identical(np.ascontiguousarray(tree[k]), np.ascontiguousarray(got[k]), k)
    assert ckptfmt.diff(tmp_path / "a.ckpt", b)["changed"] == ["t", "row", "step"]  # views no more, same values


# ---------------------------------------------------------------- what plain h5py sees


def test_plain_h5py_reads_shapes_values_and_attributes(tmp_path: Path) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    c = np.array([1 + 2j, -3.5j], np.complex64)
    m = np.array([True, False, True])
    tree = {"model": {"layer1.weight": w, "mask": m, "c": c, "0d": np.array(3, np.int64)}, "step": 7,
            "name": "run", "betas": (0.9, 0.95), "a/b": np.ones(2, np.uint8)}
    a, h5 = tmp_path / "a.ckpt", tmp_path / "a.h5"
    ckptfmt.save(a, tree)
    export_hdf5(a, h5)
    with h5py.File(h5, "r") as f:
        assert f.attrs["ckptfmt.format"] == "ckptfmt-hdf5" and f.attrs["ckptfmt.version"] == 1
        ds = f["model/layer1.weight"]  # the HDF5 path is the key path
        assert ds.shape == (3, 4) and ds.dtype == np.float32 and np.array_equal(ds[()], w)
        assert ds.attrs["ckptfmt.dtype"] == "float32"
        assert f["model/mask"].dtype == np.bool_ and np.array_equal(f["model/mask"][()], m)
        assert f["model/c"].dtype == np.complex64 and np.array_equal(f["model/c"][()], c)
        assert f["model/0d"].shape == () and f["model/0d"][()] == 3
        assert f.attrs["step"] == 7 and f.attrs["name"] == "run"
        assert f["betas"].attrs["ckptfmt.kind"] == "tuple" and f["betas"].attrs["1"] == 0.95
        assert np.array_equal(f["a~1b"][()], [1, 1])
        assert json.loads(f.attrs["ckptfmt.keys"]) == ["model", "step", "name", "betas", "a/b"]
        assert f.attrs["ckptfmt.types"] == "giuga"


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump is not installed")
def test_h5dump_reads_an_export(tmp_path: Path) -> None:
    tree = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.ones(2, np.float16),
                      "c": np.array([1 + 1j]), "b": np.array([True])}, "step": 7, "none": None, "raw": b"ab",
            "t": (1, "x")}
    a, h5 = tmp_path / "a.ckpt", tmp_path / "a.h5"
    ckptfmt.save(a, tree, metadata={"run": "r"})
    export_hdf5(a, h5, compression="gzip", compression_opts=6)
    out = subprocess.run(["h5dump", str(h5)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"ckptfmt-hdf5"' in out.stdout and 'DATASET "w"' in out.stdout
    data = subprocess.run(["h5dump", "-p", "-d", "/model/w", str(h5)], capture_output=True, text=True, timeout=60)
    assert data.returncode == 0, data.stderr
    assert "COMPRESSION DEFLATE { LEVEL 6 }" in data.stdout and "(1,0): 3, 4, 5" in data.stdout


# ---------------------------------------------------------------- options


def test_gzip_and_chunking_options_reach_the_datasets(tmp_path: Path) -> None:
    tree = {"big": np.zeros((256, 256), np.float32), "zero_d": np.array(1.0), "empty": np.zeros((0, 2))}
    h5 = assert_restored(tmp_path, tree, compression="gzip", compression_opts=9)
    with h5py.File(h5) as f:
        assert f["big"].compression == "gzip" and f["big"].compression_opts == 9 and f["big"].chunks
        assert f["zero_d"].compression is None and f["empty"].compression is None
    assert os.path.getsize(h5) < 256 * 256 * 4 // 10
    h5 = assert_restored(tmp_path, tree, chunks=True)
    with h5py.File(h5) as f:
        assert f["big"].chunks and f["big"].compression is None
    h5 = assert_restored(tmp_path, tree)
    with h5py.File(h5) as f:
        assert f["big"].chunks is None and f["big"].compression is None


@pytest.mark.parametrize("options", [{"compression": "lzf"}, {"compression": "gzip", "compression_opts": 10},
                                     {"compression_opts": 4}, {"chunks": (4, 4)}, {"compression": "szip"}])
def test_bad_options_are_refused_before_anything_is_written(tmp_path: Path, options: dict[str, Any]) -> None:
    a = tmp_path / "a.ckpt"
    ckptfmt.save(a, {"w": np.ones(2)})
    with pytest.raises(ValueError):
        export_hdf5(a, tmp_path / "a.h5", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


def test_progress_reports_each_dataset(tmp_path: Path) -> None:
    a = tmp_path / "a.ckpt"
    w = np.ones((10, 10), np.float32)
    ckptfmt.save(a, {"w": w, "again": w, "b": np.ones(3, np.int8), "n": 1})
    seen: list[int] = []
    export_hdf5(a, tmp_path / "a.h5", progress=seen.append)
    assert seen == [400, 3]


def test_large_tensors_are_written_and_read_in_slabs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_hdf5, "_SLAB", 1000)
    monkeypatch.setattr(_writer, "CHUNK_SIZE", 1 << 10)
    tree = {"a": sample("float32", (7, 33, 5)), "b": sample("int64", (2, 300)), "c": sample("uint8", (5000,)),
            "t": sample("float64", (20, 30)).T}
    h5 = assert_restored(tmp_path, {k: np.ascontiguousarray(v) for k, v in tree.items()}, compression="gzip")
    got, _ = read_hdf5(h5)
    for k in tree:
        assert isinstance(got[k], DatasetArray)
        assert_identical(np.ascontiguousarray(tree[k]), got[k].numpy(), k)


def test_flat_reads_of_any_range_match_numpy(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f.create_dataset("chunked", data=arr, chunks=(1, 2, 3, 2))
        f["plain"] = arr
        f["be"] = arr.astype(">i4")
    got, _ = read_hdf5(tmp_path / "r.h5")
    flat = arr.reshape(-1)
    rng = np.random.default_rng(1)
    for name in ("chunked", "plain", "be"):
        lazy = got[name]
        for _ in range(200):
            a, b = sorted(int(x) for x in rng.integers(0, flat.size + 1, size=2))
            assert np.array_equal(lazy.read_bytes(4 * a, 4 * (b - a)).view("<i4"), flat[a:b])
        for limit in (4, 12, 100, 4 * 5 * 7, 1 << 20):
            assert b"".join(c.tobytes() for c in lazy.chunks(limit)) == flat.astype("<i4").tobytes()


def test_lazy_false_gives_writable_numpy_arrays(tmp_path: Path) -> None:
    _, _, got, _ = roundtrip(tmp_path, {"w": np.arange(4.0), "e": np.zeros((0,))}, lazy=False)
    assert type(got["w"]) is np.ndarray and got["w"].flags.writeable
    got["w"][0] = 5


# ---------------------------------------------------------------- atomicity and errors


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a, h5 = tmp_path / "a.ckpt", tmp_path / "a.h5"
    ckptfmt.save(a, {"x": np.ones(3), "y": np.ones(3)})
    h5.write_bytes(b"previous")
    calls = []

    def boom(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(_hdf5._Writer, "dataset", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_hdf5(a, h5)
    assert calls and h5.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.h5"]


def test_a_missing_source_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ckptfmt.CheckpointNotFoundError):
        export_hdf5(tmp_path / "nope.ckpt", tmp_path / "a.h5")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        read_hdf5(tmp_path / "nope.h5")


def test_a_file_that_is_not_hdf5_is_a_corrupt_source(tmp_path: Path) -> None:
    p = tmp_path / "x.h5"
    p.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(CorruptSourceError):
        read_hdf5(p)


def make_export(tmp_path: Path) -> Path:
    a, h5 = tmp_path / "a.ckpt", tmp_path / "a.h5"
    ckptfmt.save(a, {"m": {"w": np.ones(3, np.float32)}, "n": 1, "l": [1, 2]})
    export_hdf5(a, h5)
    return h5


BREAKS = {
    "no types": lambda f: f["m"].attrs.__delitem__("ckptfmt.types"),
    "bad tag": lambda f: f["m"].attrs.__setitem__("ckptfmt.types", "q"),
    "too many tags": lambda f: f["m"].attrs.__setitem__("ckptfmt.types", "aa"),
    "bad kind": lambda f: f["m"].attrs.__setitem__("ckptfmt.kind", "set"),
    "keys not json": lambda f: f["m"].attrs.__setitem__("ckptfmt.keys", "[w"),
    "keys not list": lambda f: f["m"].attrs.__setitem__("ckptfmt.keys", '{"w": 1}'),
    "bool key": lambda f: f["m"].attrs.__setitem__("ckptfmt.keys", "[true]"),
    "duplicate keys": lambda f: (f["m"].attrs.__setitem__("ckptfmt.keys", '["w", "w"]'),
                                 f["m"].attrs.__setitem__("ckptfmt.types", "aa")),
    "equal key text": lambda f: (f["m"].attrs.__setitem__("ckptfmt.keys", '["1", 1]'),
                                 f["m"].attrs.__setitem__("ckptfmt.types", "ii")),
    "missing member": lambda f: f["m"].__delitem__("w"),
    "missing attribute": lambda f: f.attrs.__delitem__("n"),
    "attribute of wrong type": lambda f: f.attrs.__setitem__("n", "one"),
    "group tagged dataset": lambda f: f.attrs.__setitem__("ckptfmt.types", "aig"),
    "no dtype": lambda f: f["m/w"].attrs.__delitem__("ckptfmt.dtype"),
    "wrong storage": lambda f: f["m/w"].attrs.__setitem__("ckptfmt.dtype", "int64"),
    "scalar of rank 1": lambda f: f["m"].attrs.__setitem__("ckptfmt.types", "s"),
    "other format": lambda f: f.attrs.__setitem__("ckptfmt.format", "something-else"),
    "version not int": lambda f: f.attrs.__setitem__("ckptfmt.version", "1"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_broken_export_is_a_corrupt_source_naming_the_place(tmp_path: Path, name: str) -> None:
    h5 = make_export(tmp_path)
    with h5py.File(h5, "r+") as f:
        BREAKS[name](f)
    with pytest.raises(CorruptSourceError) as e:
        read_hdf5(h5)
    assert isinstance(e.value, ckptfmt.CorruptCheckpointError) and str(h5) in str(e.value)


def test_a_later_version_is_refused(tmp_path: Path) -> None:
    h5 = make_export(tmp_path)
    with h5py.File(h5, "r+") as f:
        f.attrs["ckptfmt.version"] = np.int64(2)
    with pytest.raises(ckptfmt.UnsupportedVersionError, match="version 2"):
        read_hdf5(h5)


def test_an_unknown_dtype_is_refused_naming_the_dataset(tmp_path: Path) -> None:
    h5 = make_export(tmp_path)
    with h5py.File(h5, "r+") as f:
        f["m/w"].attrs["ckptfmt.dtype"] = "float4"
    with pytest.raises(ckptfmt.UnsupportedDTypeError, match="/m/w"):
        read_hdf5(h5)


# ---------------------------------------------------------------- names and detection


@pytest.mark.parametrize("text", ["", ".", "..", "a", "a/b", "~", "~0", "~1", "~2", "~.", "\0", "a\0/~",
                                  "ckptfmt.", "ckptfmt.x", "ckptfmtx", "-1", "λ"])
def test_names_escape_and_unescape(text: str) -> None:
    name = escape_name(text)
    assert "/" not in name and "\0" not in name and name not in ("", ".")
    assert not name.startswith("ckptfmt.")
    assert unescape_name(name) == text


def test_escaping_is_the_key_path_escaping_for_ordinary_keys() -> None:
    assert escape_name("layer1.weight") == "layer1.weight" and escape_name(3) == "3" and escape_name(-2) == "-2"
    assert escape_name("a/b~c") == "a~1b~0c" and escape_name("") == "~." and escape_name(".") == "~.."
    assert escape_name("ckptfmt.kind") == "~.ckptfmt.kind"


@pytest.mark.parametrize("name", ["~", "~3", "a~", "~.x", ".", "", "ckptfmt.x"])
def test_names_escape_name_cannot_make_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        unescape_name(name)


def test_is_hdf5_finds_the_signature_even_after_a_user_block(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "u.h5", "w", userblock_size=1024) as f:
        f["x"] = np.ones(2)
    ckptfmt.save(tmp_path / "c.ckpt", {"x": np.ones(2)})
    (tmp_path / "short").write_bytes(b"\x89HD")
    assert is_hdf5(tmp_path / "u.h5") and is_hdf5(make_export(tmp_path))
    assert not is_hdf5(tmp_path / "c.ckpt") and not is_hdf5(tmp_path / "short")
    assert not is_hdf5(tmp_path / "missing") and not is_hdf5(tmp_path)
    tree, _ = read_hdf5(tmp_path / "u.h5")
    assert np.array_equal(tree["x"].numpy(), [1, 1])


# ---------------------------------------------------------------- foreign files


def make_keras_file(path: Path) -> dict[str, np.ndarray]:
    """A file laid out like Keras 2's ``model.save("m.h5")``, plus a few HDF5 oddities."""
    rng = np.random.default_rng(0)
    weights = {"dense/kernel:0": rng.standard_normal((4, 3)).astype(np.float32),
               "dense/bias:0": rng.standard_normal(3).astype(np.float32),
               "dense_1/kernel:0": rng.standard_normal((3, 2)).astype(">f4"),  # big-endian data
               "dense_1/bias:0": np.zeros(2, np.float64)}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = np.bytes_(b"2.15.0")
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential"})
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([b"dense", b"dense_1"], dtype="S7")
        mw.attrs["backend"] = b"tensorflow"
        for layer in ("dense", "dense_1"):
            g = mw.create_group(layer)
            g.attrs["weight_names"] = np.array([f"{layer}/kernel:0".encode(), f"{layer}/bias:0".encode()])
            for name in ("kernel:0", "bias:0"):
                g.create_dataset(f"{layer}/{name}", data=weights[f"{layer}/{name}"])
        extra = f.create_group("extra")
        extra.attrs["scale"] = np.float32(0.5)
        extra.attrs["shape"] = np.array([[1, 2], [3, 4]], np.int64)
        extra.attrs["flag"] = np.bool_(True)
        extra.attrs["nothing"] = h5py.Empty("f4")
        extra.attrs["z"] = np.complex64(1 - 2j)
        extra["text"] = "hello"
        extra.create_dataset("words", data=np.array(["a", "bé"], dtype=h5py.string_dtype()))
        extra["scalar"] = np.int16(-3)
        extra["flags"] = np.array([True, False])
        extra.create_dataset("empty", data=h5py.Empty("f8"))
        extra.create_dataset("record", data=np.array([(1, 2.5), (3, 4.5)], dtype=[("i", "<i4"), ("x", "<f8")]))
        extra["gz"] = np.arange(1000, dtype=np.uint16)
        extra["same"] = mw["dense/dense/bias:0"]  # a hard link
        extra["soft"] = h5py.SoftLink("/model_weights/dense_1/dense_1/bias:0")
        extra["dangling"] = h5py.SoftLink("/nowhere")
    return weights


def test_a_keras_style_file_imports_as_nested_dicts_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "m.h5"
    weights = make_keras_file(src)
    tree, meta = read_hdf5(src)
    assert list(tree) == ["extra", "model_weights"]
    layers = tree["model_weights"]
    assert list(layers) == ["dense", "dense_1"] and list(layers["dense"]["dense"]) == ["bias:0", "kernel:0"]
    for key, w in weights.items():
        layer, name = key.split("/")
        got = layers[layer][layer][name]
        assert isinstance(got, DatasetArray) and got.shape == w.shape
        assert got.numpy().dtype == w.dtype.newbyteorder("<") and np.array_equal(got.numpy(), w)
    assert meta["/"] == {"keras_version": "2.15.0", "backend": "tensorflow",
                         "model_config": '{"class_name": "Sequential"}'}
    assert meta["/model_weights"] == {"layer_names": ["dense", "dense_1"], "backend": "tensorflow"}
    assert meta["/model_weights/dense"] == {"weight_names": ["dense/kernel:0", "dense/bias:0"]}
    assert meta["/extra"] == {"scale": 0.5, "shape": [[1, 2], [3, 4]], "flag": True, "nothing": None,
                              "z": [1.0, -2.0]}
    extra = tree["extra"]
    assert extra["text"] == "hello" and extra["words"] == ["a", "bé"] and extra["empty"] is None
    assert extra["scalar"].shape == () and extra["scalar"].numpy() == -3
    assert extra["flags"].dtype.name == "bool"
    assert np.array_equal(extra["record"]["i"], [1, 3]) and np.array_equal(extra["record"]["x"], [2.5, 4.5])
    assert extra["same"] is layers["dense"]["dense"]["bias:0"]
    assert np.array_equal(extra["soft"].numpy(), weights["dense_1/bias:0"])
    assert "dangling" not in extra

    dst = tmp_path / "m.ckpt"
    ckptfmt.save(dst, tree, metadata=meta)
    back = ckptfmt.load(dst)
    assert np.array_equal(back["model_weights"]["dense_1"]["dense_1"]["kernel:0"], weights["dense_1/kernel:0"])
    assert back["model_weights"]["dense_1"]["dense_1"]["kernel:0"].dtype == np.dtype("<f4")
    assert ckptfmt.open(dst).metadata["/model_weights"]["layer_names"] == ["dense", "dense_1"]
    assert ckptfmt.verify(dst).ok


def test_foreign_datasets_of_types_ckptfmt_lacks_are_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "v.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("ragged", (2,), dtype=h5py.vlen_dtype(np.int32))
        ds[0] = [1, 2]
        ds[1] = [3]
    with pytest.raises(ckptfmt.UnsupportedDTypeError, match="/ragged"):
        read_hdf5(p)


def test_a_cycle_of_groups_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.h5"
    with h5py.File(p, "w") as f:
        g = f.create_group("a/b")
        g["loop"] = f["a"]
    with pytest.raises(CorruptSourceError, match="cycle"):
        read_hdf5(p)


def test_a_foreign_file_read_eagerly_gives_numpy_arrays(tmp_path: Path) -> None:
    src = tmp_path / "m.h5"
    weights = make_keras_file(src)
    tree, _ = read_hdf5(src, lazy=False)
    got = tree["model_weights"]["dense_1"]["dense_1"]["kernel:0"]
    assert type(got) is np.ndarray and got.dtype == np.dtype("<f4")
    assert np.array_equal(got, weights["dense_1/kernel:0"])
