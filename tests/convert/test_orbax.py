"""Orbax checkpoint directories written by the real orbax-checkpoint and tensorstore; converted without JAX.

The directories under data/orbax/written were made by data/orbax/generate.py (orbax-checkpoint 0.12.8,
tensorstore); where orbax is installed the test also writes them afresh and checks those.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnsupportedSourceError, convert, detect

DATA = Path(__file__).parent / "data" / "orbax"
sys.path.insert(0, str(DATA))
from generate import expected  # noqa: E402

sys.path.remove(str(DATA))
READABLE = ("zarr2", "zarr3", "codecs", "codecs3")


def _sources() -> list[Any]:
    out: list[Any] = [pytest.param(DATA / "written", id="committed")]
    if importlib.util.find_spec("orbax") is not None:
        out.append(pytest.param(None, id="fresh"))
    return out


@pytest.fixture(scope="module", params=_sources())
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of checkpoints: the committed one, or one orbax writes now (in a child process)."""
    if request.param is not None:
        return Path(request.param)
    out = tmp_path_factory.mktemp("orbax")
    subprocess.run([sys.executable, str(DATA / "generate.py"), str(out / "w")], check=True, timeout=600,
                   capture_output=True, cwd=out, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return out / "w"


def _copy(written: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(written / name, dst, symlinks=True)
    return dst


def _check(got: dict[str, Any]) -> None:
    want = expected()
    k = got["params"]["dense"]["kernel"]
    assert k.dtype == np.float32 and np.array_equal(k, want["params"]["dense"]["kernel"])
    assert np.array_equal(got["params"]["dense"]["bias"], want["params"]["dense"]["bias"])
    assert got["layers"][0]["w"].dtype == np.float16 and np.array_equal(got["layers"][0]["w"], want["layers"][0]["w"])
    assert got["layers"][1]["w"].dtype == np.bool_ and got["layers"][1]["w"].tolist() == [True, False]
    assert got["big"].dtype == np.int64 and np.array_equal(got["big"], want["big"])
    assert got["step"] == 42 and got["lr"] == 0.25 and got["name"] == "run" and got["nothing"] is None
    assert type(got["count"]) is np.int32 and got["count"] == 7


@pytest.mark.parametrize("layout", READABLE)
def test_orbax_checkpoints_convert_losslessly(written: Path, layout: str, tmp_path: Path) -> None:
    src = written / layout
    assert detect(src) == "orbax"
    report = convert(src, tmp_path / "o.ckpt")
    assert report.source_format == "orbax"
    _check(ckptfmt.load(tmp_path / "o.ckpt", backend="numpy"))
    with ckptfmt.open(tmp_path / "o.ckpt") as ckpt:
        assert "PyTreeCheckpointHandler" in ckpt.metadata["orbax"]["checkpoint"]["item_handlers"]
    if importlib.util.find_spec("torch"):  # bfloat16 read back through torch
        import torch

        embed = ckptfmt.load(tmp_path / "o.ckpt", backend="torch")["params"]["embed"]
        assert embed.dtype == torch.bfloat16 and embed.float().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_the_codec_variants_are_what_tensorstore_wrote(written: Path) -> None:
    """The committed files really exercise zlib + F order + many chunks, gzip, big-endian, zarr 3 gzip and crc32c."""
    big = json.loads((written / "codecs" / "big" / ".zarray").read_text())
    assert big["compressor"]["id"] == "zlib" and big["order"] == "F" and big["chunks"] == [3, 7]
    assert json.loads((written / "codecs" / "layers.1.w" / ".zarray").read_text())["compressor"]["id"] == "gzip"
    assert json.loads((written / "codecs" / "params.dense.kernel" / ".zarray").read_text())["dtype"] == ">f4"
    big3 = json.loads((written / "codecs3" / "big" / "zarr.json").read_text())
    assert [c["name"] for c in big3["codecs"]] == ["bytes", "gzip"] and big3["codecs"][0]["configuration"] == {
        "endian": "big"}
    sharded = json.loads((written / "zarr3" / "big" / "zarr.json").read_text())
    assert sharded["codecs"][0]["name"] == "sharding_indexed"


def test_ocdbt_is_refused_saying_how_to_resave(written: Path, tmp_path: Path) -> None:
    assert detect(written / "ocdbt") == "orbax"
    with pytest.raises(UnsupportedSourceError, match=r"OCDBT.*use_ocdbt=False"):
        convert(written / "ocdbt", tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()


def test_blosc_is_refused_naming_the_codec(written: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSourceError, match=r"blosc.*re-save"):
        convert(written / "blosc", tmp_path / "o.ckpt")


def test_a_step_directory_and_an_unfinished_save_are_refused(written: Path, tmp_path: Path) -> None:
    step = tmp_path / "7"
    step.mkdir()
    shutil.copytree(written / "zarr2", step / "default")
    shutil.copy(written / "zarr2" / "_CHECKPOINT_METADATA", step / "_CHECKPOINT_METADATA")
    assert detect(step) == "orbax"
    with pytest.raises(UnsupportedSourceError, match="default"):
        convert(step, tmp_path / "o.ckpt")
    convert(step / "default", tmp_path / "o.ckpt")
    tmp = tmp_path / "3.orbax-checkpoint-tmp"
    shutil.copytree(written / "zarr2", tmp)
    with pytest.raises(CorruptSourceError, match="unfinished"):
        convert(tmp, tmp_path / "t.ckpt")


def _add_leaf(src: Path, keys: list[str], value_type: str = "np.ndarray") -> None:
    meta = json.loads((src / "_METADATA").read_text())
    meta["tree_metadata"][repr(tuple(keys))] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                                                "value_metadata": {"value_type": value_type}}
    (src / "_METADATA").write_text(json.dumps(meta))


@pytest.mark.parametrize("keys", [[".."], ["/etc"], ["../../etc"], ["a/../../x"], ["a\\b"], ["x\0y"]])
def test_leaf_names_cannot_leave_the_directory(written: Path, tmp_path: Path, keys: list[str]) -> None:
    src = _copy(written, "zarr2", tmp_path)
    _add_leaf(src, keys)
    with pytest.raises(CorruptSourceError, match=r"inside the checkpoint|outside"):
        convert(src, tmp_path / "o.ckpt")


@pytest.mark.parametrize("what", ["array_dir", "chunk"])
def test_links_out_of_the_directory_are_refused(written: Path, tmp_path: Path, what: str) -> None:
    src = _copy(written, "zarr2", tmp_path)
    outside = _copy(written, "zarr2", tmp_path / "other")
    if what == "array_dir":
        shutil.rmtree(src / "big")
        os.symlink(outside / "big", src / "big")
    else:
        (src / "big" / "0.0").unlink()
        os.symlink(outside / "big" / "0.0", src / "big" / "0.0")
    with pytest.raises(CorruptSourceError, match="outside"):
        convert(src, tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()


def test_broken_chunks_are_corrupt(written: Path, tmp_path: Path) -> None:
    src = _copy(written, "zarr2", tmp_path)
    chunk = src / "big" / "0.0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # a truncated zstd frame
    with pytest.raises(CorruptSourceError, match=r"zstd|holds"):
        convert(src, tmp_path / "o.ckpt")
    chunk.unlink()  # orbax stores every chunk: a missing one is a broken copy
    with pytest.raises(CorruptSourceError, match="missing"):
        convert(src, tmp_path / "o.ckpt")
    src = _copy(written, "codecs", tmp_path / "c")
    chunk = src / "big" / "1.2"
    chunk.write_bytes(zlib.compress(b"\0" * 10))  # decodes, to the wrong size
    with pytest.raises(CorruptSourceError, match="holds 10 bytes"):
        convert(src, tmp_path / "c.ckpt")


def test_a_hostile_shape_is_refused_before_allocating(written: Path, tmp_path: Path) -> None:
    src = _copy(written, "zarr2", tmp_path)
    zarray = json.loads((src / "big" / ".zarray").read_text())
    zarray["shape"] = zarray["chunks"] = [1 << 40, 1 << 10]
    (src / "big" / ".zarray").write_text(json.dumps(zarray))
    with pytest.raises(UnsupportedSourceError, match="declares"):
        convert(src, tmp_path / "o.ckpt")


def test_hostile_zarr3_shards(written: Path, tmp_path: Path) -> None:
    src = _copy(written, "zarr3", tmp_path)
    shard = src / "big" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # the index no longer matches its crc32c
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptSourceError, match="crc32c"):
        convert(src, tmp_path / "o.ckpt")
    shard.write_bytes(bytes(data[:10]))  # too short for its index
    with pytest.raises(CorruptSourceError, match="index"):
        convert(src, tmp_path / "o.ckpt")


@pytest.mark.parametrize("change", [{"codecs": [{"name": "transpose", "configuration": {"order": [1, 0]}},
                                                {"name": "bytes"}]},
                                    {"data_type": "string"}, {"chunk_grid": {"name": "rectilinear"}}])
def test_unread_zarr3_features_are_refused(written: Path, tmp_path: Path, change: dict[str, Any]) -> None:
    src = _copy(written, "codecs3", tmp_path)
    meta = json.loads((src / "big" / "zarr.json").read_text())
    meta.update(change)
    (src / "big" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UnsupportedSourceError):
        convert(src, tmp_path / "o.ckpt")


def test_orbax_directories_are_told_by_content(written: Path, tmp_path: Path) -> None:
    """The name does not matter: a renamed checkpoint is still found; a directory without _METADATA is not one."""
    src = tmp_path / "anything"
    shutil.copytree(written / "zarr3", src)
    assert detect(src) == "orbax"
    (src / "_METADATA").unlink()
    (src / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(ckptfmt.convert.UnknownFormatError):
        detect(src)
