"""detect(): formats are told by content, whatever the file is called; broken files get clear errors."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import (
    FORMATS,
    ConversionError,
    CorruptSourceError,
    UnknownFormatError,
    convert,
    detect,
)


def test_formats_listed() -> None:
    assert FORMATS == ("ckptfmt", "torch-zip", "torch-legacy", "torchscript", "lightning", "safetensors",
                       "safetensors-sharded", "torch-sharded", "npy", "npz", "hdf5", "dcp", "gguf",
                       "keras", "flax-msgpack", "tensorflow", "orbax")


def test_numpy_and_ckptfmt_by_content(tmp_path: Path) -> None:
    # every file gets the extension of another format
    with open(tmp_path / "weights.safetensors", "wb") as f:
        np.save(f, np.arange(3))
    with open(tmp_path / "arrays.pt", "wb") as f:
        np.savez(f, a=np.arange(3))
    with open(tmp_path / "packed.bin", "wb") as f:
        np.savez_compressed(f, a=np.arange(3))
    with open(tmp_path / "empty.h5", "wb") as f:
        np.savez(f)
    ckptfmt.save(tmp_path / "model.npy", {"a": np.arange(3)})
    assert detect(tmp_path / "weights.safetensors") == "npy"
    assert detect(tmp_path / "arrays.pt") == "npz"
    assert detect(tmp_path / "packed.bin") == "npz"
    assert detect(tmp_path / "empty.h5") == "npz"
    assert detect(str(tmp_path / "model.npy")) == "ckptfmt"


def test_torch_by_content(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "model.npz")
    torch.save({"w": torch.ones(2)}, tmp_path / "old.safetensors", _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2)}, tmp_path / "old4.bin", _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert detect(tmp_path / "model.npz") == "torch-zip"
    assert detect(tmp_path / "old.safetensors") == "torch-legacy"
    assert detect(tmp_path / "old4.bin") == "torch-legacy"


def test_safetensors_by_content(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.pt"))
    assert detect(tmp_path / "model.pt") == "safetensors"
    shard = tmp_path / "sharded"
    shard.mkdir()
    st.save_file({"w": np.ones(2, np.float32)}, str(shard / "model-00001-of-00001.safetensors"))
    index = {"metadata": {"total_size": 8}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(shard / "model.safetensors.index.json", shard / "index.txt")
    assert detect(shard) == "safetensors-sharded"
    assert detect(shard / "model.safetensors.index.json") == "safetensors-sharded"
    assert detect(shard / "index.txt") == "safetensors-sharded"  # the content makes it an index
    plain = tmp_path / "plain"
    plain.mkdir()
    st.save_file({"w": np.ones(2, np.float32)}, str(plain / "model.safetensors"))
    assert detect(plain) == "safetensors-sharded"  # a directory of shards without an index


def test_hdf5_by_content(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "model.pt", "w") as f:
        f["w"] = np.ones(2)
    with h5py.File(tmp_path / "blocked.bin", "w", userblock_size=1024) as f:
        f["w"] = np.ones(2)
    assert detect(tmp_path / "model.pt") == "hdf5"
    assert detect(tmp_path / "blocked.bin") == "hdf5"  # the signature after a user block


def test_hdf5_signature_without_h5py(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert detect(p) == "hdf5"
    q = tmp_path / "y.bin"
    q.write_bytes(b"userblock".ljust(512, b"\0") + b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert detect(q) == "hdf5"


def test_dcp_directory(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(b"\x80\x04.")
    (tmp_path / "__0_0.distcp").write_bytes(b"")
    assert detect(tmp_path) == "dcp"


@pytest.mark.parametrize("content", [b"hello world, not a checkpoint\n", bytes(range(256)) * 4, b"{\"a\": 1}",
                                     b"\x80\x04\x95garbage pickle"])
def test_garbage_is_unknown(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "model.pt"
    p.write_bytes(content)
    with pytest.raises(UnknownFormatError, match="not a format ckptfmt can convert") as e:
        detect(p)
    assert isinstance(e.value, ValueError) and isinstance(e.value, ckptfmt.CheckpointError)
    assert str(p) in str(e.value)
    with pytest.raises(UnknownFormatError):
        convert(p, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UnknownFormatError, match="empty"):
        detect(tmp_path / "empty.pt")
    with pytest.raises(ckptfmt.CheckpointNotFoundError):
        detect(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.pt", tmp_path / "out.ckpt")


def test_other_directories_and_zips(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match=r"neither a torch\.distributed\.checkpoint"):
        detect(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"")
    with pytest.raises(UnknownFormatError, match="incomplete DCP"):
        detect(tmp_path)
    z = tmp_path / "docs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(UnknownFormatError, match=r"neither a torch\.save file"):
        detect(z)


def test_two_indexes_are_ambiguous(tmp_path: Path) -> None:
    for name in ("model.safetensors.index.json", "adapter.safetensors.index.json"):
        (tmp_path / name).write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(UnknownFormatError, match="several safetensors index files"):
        detect(tmp_path)


def test_truncated_zip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    p = tmp_path / "model.bin"
    torch.save({"w": torch.ones(1000)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSourceError, match="truncated or corrupt") as e:
        detect(p)
    assert isinstance(e.value, ckptfmt.CorruptCheckpointError) and isinstance(e.value, ConversionError)


def test_truncated_safetensors(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    p = tmp_path / "model.safetensors"
    st.save_file({"w": np.ones(1000, np.float32)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:20])  # inside the header
    with pytest.raises(CorruptSourceError, match="truncated"):
        detect(p)
    p.write_bytes(data[:-100])  # inside the data: detected, refused when converted
    assert detect(p) == "safetensors"
    with pytest.raises(CorruptSourceError, match="truncated"):
        convert(p, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_truncated_npy_and_ckptfmt(tmp_path: Path) -> None:
    p = tmp_path / "a.npy"
    np.save(p, np.arange(1000))
    data = p.read_bytes()
    p.write_bytes(data[:-8])
    assert detect(p) == "npy"
    with pytest.raises(CorruptSourceError, match="truncated"):
        convert(p, tmp_path / "out.ckpt")
    p.write_bytes(data[:40])  # inside the header
    with pytest.raises(CorruptSourceError, match="npy header"):
        convert(p, tmp_path / "out.ckpt")
    c = tmp_path / "model.ckpt"
    ckptfmt.save(c, {"a": np.arange(3)})
    c.write_bytes(c.read_bytes()[:-10])
    assert detect(c) == "ckptfmt"
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        convert(c, tmp_path / "out.ckpt")
    c.write_bytes(b"\x89CK")
    assert detect(c) == "ckptfmt"
    assert not os.path.exists(tmp_path / "out.ckpt")
