"""convert(): round trips from files written here by torch, safetensors and numpy, bit for bit."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from convert_testlib import assert_same_tensor, assert_trees_equal, raw_bytes

import ckptfmt
import ckptfmt.convert
from ckptfmt.convert import (
    ConversionReport,
    CorruptSourceError,
    FileArray,
    SameFileError,
    UnsafePickleError,
    convert,
)


class Custom:
    """A class torch.load(weights_only=True) refuses."""

    def __init__(self, value: int) -> None:
        self.value = value


class Bar:
    """A tqdm stand-in: total and update(n)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.n = 0
        self.refreshed = False

    def update(self, n: int) -> None:
        self.n += n

    def refresh(self) -> None:
        self.refreshed = True


# ------------------------------------------------------------------ torch


def training_state() -> dict[str, Any]:
    """A whole training checkpoint: tied weights, Adam state (int keys, tuples), scheduler, scaler, config."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 4)
            self.body = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.norm = torch.nn.BatchNorm1d(4)  # an int64 0-d buffer

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(2):
        loss = net.head(net.norm(net.body(net.emb(torch.tensor([1, 2, 3]))))).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
        "epoch": 3,
        "step": 2**40 + 1,
        "config": {"name": "tiny", "dropout": 0.1, "flags": [True, False, None], "dims": (4, 11), "": "empty key"},
        "extra": {
            "bf16": torch.randn(3, 5).to(torch.bfloat16),
            "f16": torch.randn(2, 2).half(),
            "i8": torch.tensor([-1, 2], dtype=torch.int8),
            "u8": torch.tensor([255, 0], dtype=torch.uint8),
            "mask": torch.tensor([True, False]),
            "c64": torch.tensor([1 + 2j], dtype=torch.complex64),
            "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
            "base": base,
            "row": base[1],  # a view: shares base's storage
            "cols": base[:, 2:4],  # a strided view
            "nan": torch.tensor([float("nan"), -0.0]),
        },
    }


def _storage(t: Any) -> int:
    return int(t.untyped_storage().data_ptr())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_training_checkpoint(tmp_path: Path, legacy: bool) -> None:
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    state = training_state()
    if legacy:  # torch cannot read back float8 (nor uint16) from its own legacy format
        del state["extra"]["f8"]
    src = tmp_path / "checkpoint.ckpt.pt"
    torch.save(state, src, _use_new_zipfile_serialization=not legacy)
    report = convert(src, tmp_path / "out.ckpt")
    assert isinstance(report, ConversionReport)
    assert report.source_format == ("torch-legacy" if legacy else "torch-zip")
    want = torch.load(src, weights_only=True)
    got = ckptfmt.torch.load(tmp_path / "out.ckpt")
    assert_trees_equal(got, want)
    # int keys of the optimizer state stay ints, tuples stay tuples
    assert sorted(got["optimizer"]["state"]) == sorted(want["optimizer"]["state"])
    assert all(type(k) is int for k in got["optimizer"]["state"])
    assert got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    # shared storages stay shared
    assert _storage(got["model"]["emb.weight"]) == _storage(got["model"]["head.weight"])
    assert _storage(got["extra"]["row"]) == _storage(got["extra"]["base"])
    assert _storage(got["extra"]["cols"]) == _storage(got["extra"]["base"])
    assert got["extra"]["cols"].stride() == (6, 1)
    n = sum(1 for _ in _tensors(want))
    assert report.tensors == n
    assert report.bytes == sum(t.nbytes for t in _tensors(want))
    assert report.file_size == os.path.getsize(tmp_path / "out.ckpt")
    versions = {k: dict(v) for k, v in want["model"]._metadata.items()}  # OrderedDict._metadata: module versions
    assert ckptfmt.open(tmp_path / "out.ckpt").metadata == {
        "converted_from": {"format": report.source_format, "path": "checkpoint.ckpt.pt"},
        "torch_state_dict_metadata": {"model": versions}}


def _tensors(tree: Any) -> Any:
    import torch

    seen: set[int] = set()
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                yield x
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


def test_torch_progress_and_metadata(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    emb = torch.randn(300, 1000)
    state = {"emb": emb, "head": emb, "small": torch.ones(3), "half": emb[:10]}
    torch.save(state, tmp_path / "m.pth")
    calls: list[int] = []
    report = convert(tmp_path / "m.pth", tmp_path / "a.ckpt", progress=calls.append, metadata={"run": "x", "n": 1})
    assert all(n > 0 for n in calls) and sum(calls) == report.bytes  # increments
    assert report.bytes == emb.nbytes + 12 + emb[:10].nbytes
    bar = Bar()
    convert(tmp_path / "m.pth", tmp_path / "b.ckpt", progress=bar)
    assert bar.total == report.bytes == bar.n and bar.refreshed
    for name in ("a.ckpt", "b.ckpt"):
        got = ckptfmt.torch.load(tmp_path / name)
        assert_trees_equal(got, state)
        assert _storage(got["emb"]) == _storage(got["head"]) == _storage(got["half"])
    assert ckptfmt.open(tmp_path / "a.ckpt").metadata == {
        "converted_from": {"format": "torch-zip", "path": "m.pth"}, "run": "x", "n": 1}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refused_pickle(tmp_path: Path, legacy: bool) -> None:
    torch = pytest.importorskip("torch")
    src = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "extra": {"obj": Custom(3)}}, src, _use_new_zipfile_serialization=not legacy)
    name = f"{Custom.__module__}.Custom"
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")) as e:
        convert(src, tmp_path / "out.ckpt")
    assert e.value.globals == [name]
    assert isinstance(e.value, pickle.UnpicklingError) and isinstance(e.value, ckptfmt.CheckpointError)
    assert "allow_pickle=True" in str(e.value) and "UNSAFE" in str(e.value)
    # allowed, the pickle loads, but the object itself has no ckptfmt form: refused by key path
    with pytest.raises(ckptfmt.UnsupportedObjectError, match=r"'extra/obj'.*Custom"):
        convert(src, tmp_path / "out.ckpt", allow_pickle=True)
    assert os.listdir(tmp_path) == ["model.pt"]  # nothing written, no temporary left


def test_allow_pickle_converts_what_ckptfmt_holds(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    src = tmp_path / "rng.pt"
    state = {"w": torch.ones(2), "np": np.arange(4, dtype=np.int32), "obj": Custom(1)}
    torch.save(state, src)
    with pytest.raises(UnsafePickleError, match="Custom"):
        convert(src, tmp_path / "out.ckpt")
    del state["obj"]
    torch.save(state, src)
    convert(src, tmp_path / "out.ckpt", allow_pickle=True)
    got = ckptfmt.load(tmp_path / "out.ckpt")
    assert_trees_equal(got["np"], state["np"])
    assert_same_tensor(ckptfmt.torch.load(tmp_path / "out.ckpt")["w"], state["w"], "w")


def test_callable_module_and_bad_destinations(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(3))
    report = ckptfmt.convert(tmp_path / "a.npy", tmp_path / "a.ckpt")  # type: ignore[operator]
    assert report.source_format == "npy" and report.tensors == 1 and report.bytes == 24
    assert report.mb_per_s > 0 and report.to_dict()["dst"] == str(tmp_path / "a.ckpt")
    with pytest.raises(ckptfmt.NotACheckpointFileError):
        convert(tmp_path / "a.npy", tmp_path)
    with pytest.raises(SameFileError, match="the destination is the source"):
        convert(tmp_path / "a.ckpt", tmp_path / "a.ckpt")
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        convert(tmp_path / "a.npy", tmp_path / "b.ckpt", metadata=[1])  # type: ignore[arg-type]


def test_ckptfmt_source_keeps_views_and_metadata(tmp_path: Path) -> None:
    base = np.arange(20, dtype=np.float32)
    tree = {"base": base, "rev": base[::-2], "n": 3, "s": np.float32(1.5)}
    ckptfmt.save(tmp_path / "a.ckpt", tree, metadata={"k": "v"})
    convert(tmp_path / "a.ckpt", tmp_path / "b.ckpt")
    got = ckptfmt.load(tmp_path / "b.ckpt")
    assert_trees_equal({k: v for k, v in got.items() if k != "s"}, {k: v for k, v in tree.items() if k != "s"})
    assert type(got["s"]) is np.float32 and got["s"] == 1.5
    assert np.shares_memory(got["base"], got["rev"])
    assert ckptfmt.diff(tmp_path / "a.ckpt", tmp_path / "b.ckpt") == {"only_a": [], "only_b": [], "changed": []}
    assert ckptfmt.open(tmp_path / "b.ckpt").metadata == {"k": "v", "converted_from": {"format": "ckptfmt",
                                                                                       "path": "a.ckpt"}}


def test_ckptfmt_source_bfloat16(tmp_path: Path) -> None:
    """bfloat16 and float8 rows pass through as raw bytes: ml_dtypes is not needed."""
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    state = {"bf": torch.randn(4, 3).to(torch.bfloat16), "f8": torch.tensor([1.0, -3.0]).to(torch.float8_e4m3fn)}
    state["bf_row"] = state["bf"][1]
    ckptfmt.torch.save(tmp_path / "a.ckpt", state)
    assert convert(tmp_path / "a.ckpt", tmp_path / "b.ckpt").bytes == 12 * 2 + 2 + 3 * 2
    got = ckptfmt.torch.load(tmp_path / "b.ckpt")
    assert_trees_equal(got, state)
    assert _storage(got["bf"]) == _storage(got["bf_row"])


def test_torch_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + bytes(64))  # a legacy torch.save start
    assert ckptfmt.convert.detect(src) == "torch-legacy"
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ckptfmt.MissingDependencyError, match=r"ckptfmt\[torch\]"):
        convert(src, tmp_path / "out.ckpt")


def test_hdf5_without_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "model.h5"
    src.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    monkeypatch.setitem(sys.modules, "ckptfmt.convert._hdf5", None)  # as if the module were not installed
    with pytest.raises(ckptfmt.MissingDependencyError, match="HDF5"):
        convert(src, tmp_path / "out.ckpt")


# ------------------------------------------------------------------ safetensors


def _st_tensors() -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed.weight": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "model.layers.0.w": torch.randn(3, 3, generator=g),
        "model.layers.0.b": torch.randn(3, generator=g).half(),
        "model.layers.1.w": torch.randn(3, 3, generator=g).double(),
        "model.layers.1.idx": torch.arange(5, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "model.f8": torch.tensor([1.0, -0.25]).to(torch.float8_e5m2),
        "model.scalar": torch.tensor(3, dtype=torch.int32),
        "model.empty": torch.zeros(0, 2, dtype=torch.uint8),
    }


def test_safetensors_single(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    import ckptfmt.torch

    save_file(_st_tensors(), str(tmp_path / "model.safetensors"), metadata={"format": "pt", "author": "me"})
    report = convert(tmp_path / "model.safetensors", tmp_path / "out.ckpt", metadata={"author": "you"})
    assert report.source_format == "safetensors" and report.tensors == len(_st_tensors())
    want = load_file(str(tmp_path / "model.safetensors"))
    got = ckptfmt.torch.load(tmp_path / "out.ckpt")
    assert sorted(got) == sorted(want)
    for k in want:
        assert_same_tensor(got[k], want[k], k)
    assert ckptfmt.open(tmp_path / "out.ckpt").metadata == {
        "format": "pt", "author": "you", "converted_from": {"format": "safetensors", "path": "model.safetensors"}}


def _write_sharded(directory: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors = _st_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return tensors


def test_safetensors_sharded(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    import ckptfmt.torch

    model = tmp_path / "hf-model"
    model.mkdir()
    tensors = _write_sharded(model)
    (model / "config.json").write_text("{}")
    for src in (model, model / "model.safetensors.index.json"):
        report = convert(src, tmp_path / "out.ckpt")
        assert report.source_format == "safetensors-sharded" and report.tensors == len(tensors)
        got = ckptfmt.torch.load(tmp_path / "out.ckpt")
        # a stable order: shard by shard (by file name), each shard's tensors in the order of their bytes
        order = []
        for shard in sorted(set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
                                .values())):
            data = (model / shard).read_bytes()
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            header.pop("__metadata__")
            order += sorted(header, key=lambda k: header[k]["data_offsets"][0])
            with safe_open(str(model / shard), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    assert_same_tensor(got[k], f.get_tensor(k), k)
        assert list(got) == order and sorted(order) == sorted(tensors)
        assert ckptfmt.open(tmp_path / "out.ckpt").metadata == {
            "format": "pt", "total_size": sum(t.nbytes for t in tensors.values()),
            "converted_from": {"format": "safetensors-sharded", "path": os.path.basename(src)},
            "hf_files": {"config.json": {}}}  # the model directory's side files


def test_safetensors_sharded_inconsistent(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    _write_sharded(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.missing"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptSourceError, match=r"'model\.missing'.*not there"):
        convert(tmp_path, tmp_path / "out.ckpt")
    index["weight_map"] = {"x": "../outside.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptSourceError, match="outside"):
        convert(tmp_path, tmp_path / "out.ckpt")


def test_safetensors_header_checks(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CorruptSourceError, match="span 4 bytes"):
        convert(p, tmp_path / "out.ckpt")
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ckptfmt.UnsupportedDTypeError, match="'F4'"):
        convert(p, tmp_path / "out.ckpt")


# ------------------------------------------------------------------ numpy


def _numpy_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "big_endian": np.arange(12, dtype=">i4").reshape(3, 4),
        "fortran": np.asfortranarray(rng.standard_normal((3, 7))),
        "fortran_be": np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3)),
        "bool": np.array([True, False, True]),
        "c128": np.array([1 + 2j, -3j]),
        "f16": np.arange(5, dtype=np.float16),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "scalar": np.array(7, dtype=np.int16),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "large": np.arange(300_000, dtype=np.int64).reshape(1000, 300),  # several chunks when read in small pieces
        "nested/name": np.arange(3, dtype=np.uint8),
    }


def _little(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder("<"))


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_compressed"])
def test_numpy_round_trip(tmp_path: Path, kind: str) -> None:
    arrays = _numpy_arrays()
    if kind == "npy":
        for name, a in arrays.items():
            np.save(tmp_path / f"{name.replace('/', '_')}.npy", a)
            convert(tmp_path / f"{name.replace('/', '_')}.npy", tmp_path / "out.ckpt")
            got = ckptfmt.load(tmp_path / "out.ckpt")
            assert_same_tensor(got, _little(a), name)
            assert got.flags.c_contiguous
        return
    save = np.savez if kind == "npz" else np.savez_compressed
    save(tmp_path / "arrays.npz", **arrays)
    report = convert(tmp_path / "arrays.npz", tmp_path / "out.ckpt")
    assert report.source_format == "npz" and report.tensors == len(arrays)
    got = ckptfmt.load(tmp_path / "out.ckpt")
    assert list(got) == list(arrays)
    with np.load(tmp_path / "arrays.npz") as want:
        for name in arrays:
            assert_same_tensor(got[name], _little(want[name]), name)


def test_npz_members_are_lazy(tmp_path: Path) -> None:
    from ckptfmt.convert._numpy import ZipMemberArray, read_npz

    arrays = _numpy_arrays()
    np.savez(tmp_path / "s.npz", **arrays)
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    stored = read_npz(str(tmp_path / "s.npz"), allow_pickle=False)
    packed = read_npz(str(tmp_path / "c.npz"), allow_pickle=False)
    assert all(isinstance(v, FileArray) for v in stored.values())
    assert all(isinstance(v, ZipMemberArray) for v in packed.values())
    for name, a in arrays.items():  # read in pieces smaller than a row
        for lazy in (stored[name], packed[name]):
            data = b"".join(c.tobytes() for c in lazy.chunks(64))
            assert max((c.nbytes for c in lazy.chunks(64)), default=0) <= 64
            assert data == raw_bytes(_little(np.ascontiguousarray(a))), name


def test_numpy_object_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.array({"w": np.arange(3), "n": 1}, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="allow_pickle=True"):
        convert(tmp_path / "d.npy", tmp_path / "out.ckpt")
    convert(tmp_path / "d.npy", tmp_path / "out.ckpt", allow_pickle=True)
    got = ckptfmt.load(tmp_path / "out.ckpt")
    assert_trees_equal(got, {"w": np.arange(3), "n": 1})
    np.savez(tmp_path / "o.npz", a=np.arange(2), o=np.array([1, "x"], dtype=object))
    with pytest.raises(UnsafePickleError, match=r"'o\.npy'"):
        convert(tmp_path / "o.npz", tmp_path / "out.ckpt")
    convert(tmp_path / "o.npz", tmp_path / "out.ckpt", allow_pickle=True)
    assert_trees_equal(ckptfmt.load(tmp_path / "out.ckpt"), {"a": np.arange(2), "o": [1, "x"]})


def test_numpy_unsupported_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.array(["a", "bc"]))
    with pytest.raises(ckptfmt.UnsupportedDTypeError, match="<U2"):
        convert(tmp_path / "s.npy", tmp_path / "out.ckpt")


# ------------------------------------------------------------------ memory


_MEMORY_CHILD = textwrap.dedent("""
    import os, sys, threading, time
    peak = [0]
    def anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0
    import torch, ckptfmt.convert, ckptfmt.backends.torch
    base = anon()
    done = threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)
    t = threading.Thread(target=watch)
    t.start()
    report = ckptfmt.convert.convert(sys.argv[1], sys.argv[2])
    done.set()
    t.join()
    peak[0] = max(peak[0], anon())
    print(peak[0] - base, report.bytes)
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux)")
def test_big_torch_file_streams(tmp_path: Path) -> None:
    """A 300 MB torch.save file converts with anonymous memory far below its size (mmap + streaming)."""
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    n = 25 * 1024 * 1024  # 100 MB per tensor
    state = {"a": torch.arange(n, dtype=torch.int32), "b": torch.full((n // 2,), 1.5, dtype=torch.float64),
             "c": torch.arange(n, dtype=torch.int32).to(torch.bfloat16)[: n // 2]}
    state["tied"] = state["a"]
    torch.save(state, tmp_path / "big.pt")
    nbytes = sum(t.nbytes for t in state.values() if t is not state["tied"])
    del state
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "big.pt"), str(tmp_path / "big.ckpt")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    growth, converted = map(int, out.stdout.split())
    assert converted == nbytes + 100 * 1024 * 1024  # "tied" counts as a tensor of its own bytes
    assert growth < 64 * 1024 * 1024, f"anonymous memory grew by {growth / 2**20:.0f} MiB for a {nbytes >> 20} MiB file"
    assert ckptfmt.verify(tmp_path / "big.ckpt").ok
    got = ckptfmt.torch.load(tmp_path / "big.ckpt")
    want = torch.load(tmp_path / "big.pt", mmap=True, weights_only=True)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8) if k == "c" else got[k], want[k].view(torch.uint8) if k == "c"
                           else want[k])
    assert _storage(got["a"]) == _storage(got["tied"])
