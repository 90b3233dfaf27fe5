"""Exports to safetensors and torch.save (and the export() dispatcher)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert._errors import ConversionError
from ckptfmt.convert._export import ExportError, export, export_safetensors

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - the minimal environment
    ml_dtypes = None

requires_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")

ST_CODES = {"bool": "BOOL", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8",
            "uint16": "U16", "uint32": "U32", "uint64": "U64", "float16": "F16", "float32": "F32",
            "float64": "F64", "complex64": "C64"}


def sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    dt = np.dtype(dtype)
    n = math.prod(shape)
    if dt == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    raw = np.random.default_rng(seed).integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(header, {name: raw bytes}) parsed by the format's description, checking its layout rules."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    assert (8 + n) % 8 == 0
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    spans = sorted((tuple(v["data_offsets"]), k) for k, v in header.items() if k != "__metadata__")
    end = 0
    for (start, stop), _ in spans:
        assert start == end  # dense, in order
        end = stop
    assert end == len(body)
    return header, {k: body[a:b] for (a, b), k in spans}


def ckpt(tmp_path: Path, tree: Any, metadata: dict[str, Any] | None = None) -> Path:
    p = tmp_path / "src.ckpt"
    ckptfmt.save(p, tree, metadata=metadata)
    return p


# ---------------------------------------------------------------- safetensors


def test_safetensors_holds_every_tensor_by_key_path_bit_for_bit(tmp_path: Path) -> None:
    tree = {"model": {f"{name}.w": sample(name, (3, 4), seed=i) for i, name in enumerate(ST_CODES)},
            "layers": [{"0d": sample("float32", ()), "empty": np.zeros((0, 5), np.int16)}],
            "a/b": np.arange(3, dtype=np.int64), "scalar": np.float64(2.5)}
    src, dst = ckpt(tmp_path, tree), tmp_path / "out.safetensors"
    export_safetensors(src, dst)
    header, raw = read_safetensors(dst)
    expected = {"a~1b": tree["a/b"], "layers/0/0d": tree["layers"][0]["0d"],
                "layers/0/empty": tree["layers"][0]["empty"], "scalar": np.asarray(tree["scalar"])}
    expected.update({f"model/{k}": v for k, v in tree["model"].items()})
    assert set(raw) == set(expected)
    for name, arr in expected.items():
        assert header[name]["dtype"] == ST_CODES[arr.dtype.name] and header[name]["shape"] == list(arr.shape)
        assert raw[name] == np.ascontiguousarray(arr).tobytes(), name
    assert list(header)[1:] == [*(f"model/{k}" for k in tree["model"]), "layers/0/0d", "layers/0/empty", "a~1b",
                                "scalar"]  # tree order
    assert header["__metadata__"] == {"format": "pt"}


def test_safetensors_library_reads_the_export(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    tree = {"w": sample("float32", (4, 5)), "i": np.arange(3, dtype=np.int64), "b": np.array([True, False]),
            "e": np.zeros((0,), np.float16)}
    src, dst = ckpt(tmp_path, tree, {"run": "r1", "step": 10}), tmp_path / "out.safetensors"
    export(src, dst, to="safetensors")
    got = load_file(str(dst))
    assert set(got) == set(tree)
    for k, v in tree.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    with st.safe_open(str(dst), "np") as f:
        assert f.metadata() == {"run": "r1", "step": "10", "format": "pt"}


@requires_ml_dtypes
def test_safetensors_export_of_bfloat16_and_float8_loads_in_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    tree = {"bf": np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(256, 256),
            "e4": np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
            "e5": np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2),
            "c": sample("complex64", (3,)), "u": sample("uint32", (5,))}
    src, dst = ckpt(tmp_path, tree), tmp_path / "out.safetensors"
    export_safetensors(src, dst)
    got = load_file(str(dst))
    assert got["bf"].dtype == torch.bfloat16 and got["e4"].dtype == torch.float8_e4m3fn
    assert got["e5"].dtype == torch.float8_e5m2 and got["c"].dtype == torch.complex64
    for k, v in tree.items():
        assert got[k].contiguous().view(torch.uint8).numpy().tobytes() == v.tobytes(), k


def test_non_tensor_leaves_are_refused_by_name_unless_dropped(tmp_path: Path) -> None:
    tree = {"w": np.ones(2), "step": 7, "opt": {"state": {}, "lr": 0.1}, "names": ["a"], "empty": []}
    src, dst = ckpt(tmp_path, tree), tmp_path / "out.safetensors"
    dst.write_bytes(b"previous")
    with pytest.raises(ExportError) as e:
        export(src, dst, to="safetensors")
    assert isinstance(e.value, ValueError) and isinstance(e.value, ConversionError)
    assert isinstance(e.value, ckptfmt.CheckpointError)
    assert e.value.keys == ["step", "opt/state", "opt/lr", "names/0", "empty"]
    for k in e.value.keys:
        assert repr(k) in str(e.value)
    assert "flatten='drop'" in str(e.value)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "src.ckpt"]
    export(src, dst, to="safetensors", flatten="drop")
    _, raw = read_safetensors(dst)
    assert set(raw) == {"w"} and raw["w"] == np.ones(2).tobytes()


def test_shared_tensors_are_refused_by_name_unless_copied(tmp_path: Path) -> None:
    w = sample("float32", (4, 6))
    tree = {"embed": w, "head": w, "t": w.T, "own": np.ones(3), "half": w[:2]}
    src, dst = ckpt(tmp_path, tree), tmp_path / "out.safetensors"
    with pytest.raises(ExportError, match="share storage") as e:
        export_safetensors(src, dst)
    assert sorted(e.value.keys) == ["embed", "half", "head", "t"]
    assert not dst.exists()
    for flatten in ("copy", "duplicate"):
        export_safetensors(src, dst, flatten=flatten)
        header, raw = read_safetensors(dst)
        assert set(raw) == set(tree)
        for k, v in tree.items():
            assert raw[k] == np.ascontiguousarray(v).tobytes() and header[k]["shape"] == list(v.shape), k


def test_both_flatten_modes_together(tmp_path: Path) -> None:
    w = np.arange(6.0).reshape(2, 3)
    src, dst = ckpt(tmp_path, {"a": w, "b": w.T, "n": None}), tmp_path / "out.safetensors"
    for flatten in ("drop", "copy"):
        with pytest.raises(ExportError):
            export_safetensors(src, dst, flatten=flatten)
    export_safetensors(src, dst, flatten="drop,copy")
    _, raw = read_safetensors(dst)
    assert raw == {"a": w.tobytes(), "b": np.ascontiguousarray(w.T).tobytes()}


@pytest.mark.parametrize("flatten", ["", "squash", "drop,squash", 1])
def test_unknown_flatten_words_are_refused(tmp_path: Path, flatten: Any) -> None:
    src = ckpt(tmp_path, {"w": np.ones(1)})
    with pytest.raises(ValueError, match="flatten"):
        export_safetensors(src, tmp_path / "o.safetensors", flatten=flatten)


def test_what_safetensors_can_never_hold_is_refused_whatever_flatten_says(tmp_path: Path) -> None:
    src = ckpt(tmp_path, {"c": np.ones(2, np.complex128), "__metadata__": np.ones(1), "ok": np.ones(1)})
    with pytest.raises(ExportError, match="complex128") as e:
        export_safetensors(src, tmp_path / "o.safetensors", flatten="drop,copy")
    assert e.value.keys == ["c", "__metadata__"] and "reserves" in str(e.value)


def test_user_metadata_goes_to_the_safetensors_metadata(tmp_path: Path) -> None:
    meta = {"run": "r", "step": 3, "cfg": {"lr": 0.1, "layers": [1, 2]}, "format": "np", "raw": b"\x00"}
    src, dst = ckpt(tmp_path, {"w": np.ones(1)}, meta), tmp_path / "o.safetensors"
    with pytest.raises(ExportError, match="metadata") as e:
        export_safetensors(src, dst)
    assert e.value.keys == ["metadata:raw"]
    export_safetensors(src, dst, flatten="drop")
    header, _ = read_safetensors(dst)
    assert header["__metadata__"] == {"run": "r", "step": "3", "cfg": '{"lr": 0.1, "layers": [1, 2]}',
                                      "format": "np"}


def test_a_large_tensor_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptfmt import _writer

    monkeypatch.setattr(_writer, "CHUNK_SIZE", 1 << 12)
    w = sample("float64", (100, 300))
    src, dst = ckpt(tmp_path, {"w": w, "t": w.T}), tmp_path / "o.safetensors"
    export_safetensors(src, dst, flatten="copy")
    _, raw = read_safetensors(dst)
    assert raw["w"] == w.tobytes() and raw["t"] == np.ascontiguousarray(w.T).tobytes()


# ---------------------------------------------------------------- torch


def tbytes(t: Any) -> bytes:
    import torch

    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def test_torch_export_loads_with_weights_only_and_equals_the_source(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    names = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
             "float32", "float64", "complex64", "complex128"]
    tree: dict[Any, Any] = {"tensors": {n: sample(n, (2, 3), seed=i) for i, n in enumerate(names)}}
    if ml_dtypes is not None:
        tree["ml"] = {"bf": sample(ml_dtypes.bfloat16, (4,)), "e4": sample(ml_dtypes.float8_e4m3fn, (4,)),
                      "e5": sample(ml_dtypes.float8_e5m2, (2, 2))}
    tree.update({"0d": np.array(1.5, np.float32), "empty": np.zeros((0, 3)), "scalar": np.int64(4),
                 "plain": [None, True, 1, 2**64 - 1, -(2**63), 1.5, math.nan, "s", b"\x00b", (1, (2,)), {}],
                 3: {-1: "int keys"}, "tuple": (np.ones(2), "x")})
    src, dst = ckpt(tmp_path, tree, {"dropped": True}), tmp_path / "out.pt"
    export(src, dst, to="torch")
    got = torch.load(dst, weights_only=True)

    def same(a: Any, b: Any, where: str) -> None:
        if isinstance(a, (np.ndarray, np.generic)):
            assert isinstance(b, torch.Tensor), where
            assert tuple(b.shape) == a.shape and tbytes(b) == np.ascontiguousarray(a).tobytes(), where
            return
        assert type(a) is type(b), where
        if isinstance(a, dict):
            assert list(a) == list(b), where
            for k in a:
                same(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                same(x, y, f"{where}/{i}")
        elif isinstance(a, float) and math.isnan(a):
            assert math.isnan(b), where
        else:
            assert a == b, where

    same(tree, got, "")
    assert got["tensors"]["uint16"].dtype == torch.uint16 and got["tensors"]["complex128"].dtype == torch.complex128
    if ml_dtypes is not None:
        assert got["ml"]["bf"].dtype == torch.bfloat16 and got["ml"]["e5"].dtype == torch.float8_e5m2
    assert got["scalar"].shape == ()  # array scalars become 0-d tensors


def test_torch_export_keeps_shared_storage(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    src = tmp_path / "src.ckpt"
    ckptfmt.save(src, {"embed": w, "head": w, "t": w.t(), "row": w[1]})
    dst = tmp_path / "out.pt"
    export(src, dst, to="torch")
    got = torch.load(dst, weights_only=True)
    assert got["embed"] is got["head"]
    ptr = got["embed"].untyped_storage().data_ptr()
    assert got["t"].untyped_storage().data_ptr() == ptr and got["row"].untyped_storage().data_ptr() == ptr
    assert torch.equal(got["t"], w.t()) and torch.equal(got["row"], w[1])
    got["embed"][1, 0] = 100.0
    assert got["row"][0] == 100.0 and got["t"][0, 1] == 100.0


def test_torch_export_copies_views_torch_cannot_express(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = np.arange(10, dtype=np.int32)
    src = ckpt(tmp_path, {"base": base, "rev": base[::-1]})
    dst = tmp_path / "out.pt"
    export(src, dst, to="torch")
    got = torch.load(dst, weights_only=True)
    assert got["rev"].tolist() == list(range(9, -1, -1)) and got["base"].tolist() == list(range(10))


def test_torch_export_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    src, dst = ckpt(tmp_path, {"w": np.ones(2)}), tmp_path / "out.pt"
    dst.write_bytes(b"previous")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export(src, dst, to="torch")
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "src.ckpt"]


# ---------------------------------------------------------------- the dispatcher


def test_export_to_hdf5_passes_the_options(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    src, dst = ckpt(tmp_path, {"w": np.zeros((64, 64))}), tmp_path / "o.h5"
    seen: list[int] = []
    export(src, dst, to="hdf5", compression="gzip", compression_opts=1, progress=seen.append)
    with h5py.File(dst) as f:
        assert f["w"].compression == "gzip" and f["w"].compression_opts == 1
    assert seen == [64 * 64 * 8]


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"to": "onnx"}, ValueError),
    ({"to": "torch", "flatten": "drop"}, ValueError),
    ({"to": "hdf5", "flatten": "copy"}, ValueError),
    ({"to": "safetensors", "compression": "gzip"}, TypeError),
    ({"to": "torch", "chunks": True}, TypeError),
])
def test_export_refuses_wrong_arguments_before_writing(tmp_path: Path, kwargs: dict[str, Any],
                                                       error: type[Exception]) -> None:
    src = ckpt(tmp_path, {"w": np.ones(1)})
    with pytest.raises(error):
        export(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_of_a_missing_checkpoint_raises_not_found(tmp_path: Path) -> None:
    for to in ("safetensors", "torch"):
        if to == "torch":
            pytest.importorskip("torch")
        with pytest.raises(ckptfmt.CheckpointNotFoundError):
            export(tmp_path / "missing.ckpt", tmp_path / "out", to=to)
    assert list(tmp_path.iterdir()) == []
