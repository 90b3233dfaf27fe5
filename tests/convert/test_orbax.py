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
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnsupportedSourceError, convert, detect
from ckptfmt.errors import MissingDependencyError

DATA = Path(__file__).parent / "data" / "orbax"
_spec = importlib.util.spec_from_file_location("orbax_generate", DATA / "generate.py")
assert _spec is not None and _spec.loader is not None
_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generate)  # the values the generator writes (it imports orbax only when run)
expected, kv_expected = _generate.expected, _generate.kv_expected
READABLE = ("ocdbt", "ocdbt3", "zarr2", "zarr3", "codecs", "codecs3")


def _sources() -> list[Any]:
    out: list[Any] = [pytest.param(DATA / "written", id="committed")]
    if importlib.util.find_spec("orbax") is not None:
        out.append(pytest.param(None, id="fresh"))
    return out


@pytest.fixture(scope="module", params=_sources())
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of checkpoints: the committed one, or one orbax writes now (in a child process)."""
    pytest.importorskip("zstandard", reason="Orbax writes zstd-coded OCDBT nodes and chunks (ckptfmt[compress])")
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
    assert got["noise"].dtype == np.uint32 and np.array_equal(got["noise"], want["noise"])
    assert np.array_equal(got["sharded"], want["sharded"])  # 4 chunks, one per device, side by side
    assert got["step"] == 42 and got["lr"] == 0.25 and got["name"] == "run" and got["nothing"] is None
    assert type(got["count"]) is np.int32 and got["count"] == 7


def test_without_zstandard_the_extra_is_named(tmp_path: Path) -> None:
    """Without zstandard an OCDBT checkpoint (zstd-coded nodes) is refused naming the extra; nothing is written."""
    if importlib.util.find_spec("zstandard") is not None:
        pytest.skip("zstandard is installed (the tox env 'minimal' runs this)")
    with pytest.raises(MissingDependencyError, match=r"ckptfmt\[compress\]"):
        convert(DATA / "written" / "ocdbt", tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()


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
    by_device = json.loads((written / "zarr2" / "sharded" / ".zarray").read_text())
    assert by_device["shape"] == [4, 8] and by_device["chunks"] == [4, 2]


def test_the_ocdbt_layouts_hold_what_they_should(written: Path) -> None:
    """The OCDBT checkpoints are databases (no per-array directories); zarr 3 values lie out of line."""
    from ckptfmt.convert._ocdbt import read_ocdbt

    for name in ("ocdbt", "ocdbt3"):
        assert (written / name / "manifest.ocdbt").is_file() and not (written / name / "big").exists()
    keys = read_ocdbt(str(written / "ocdbt3"))
    assert "big/zarr.json" in keys and "params.dense.kernel/zarr.json" in keys
    assert isinstance(keys["noise/c/0"], tuple) and "ocdbt.process_0" in keys["noise/c/0"][0]


def test_an_ocdbt_btree_of_many_levels_reads_every_key(written: Path) -> None:
    """A database tensorstore wrote with 256-byte nodes: every key, inline or out of line, reads back."""
    from ckptfmt.convert import _ocdbt
    from ckptfmt.convert._zarr import read_value

    heights: list[int] = []
    walk = _ocdbt._Db.walk

    def spy(self: Any, *args: Any) -> None:
        heights.append(args[5])
        walk(self, *args)

    _ocdbt._Db.walk = spy  # type: ignore[method-assign]
    try:
        got = _ocdbt.read_ocdbt(str(written / "kv"))
    finally:
        _ocdbt._Db.walk = walk  # type: ignore[method-assign]
    assert max(heights) >= 2 and len(heights) > 10
    assert {k: read_value(v, k) for k, v in got.items()} == kv_expected()
    assert any(isinstance(v, tuple) for v in got.values()) and any(isinstance(v, bytes) for v in got.values())


def _manifest(body: bytes, magic: int = 0x0CDB3A2A) -> bytes:
    """An encoded OCDBT manifest or node (uncompressed) around ``body``, with its length and crc32c."""
    import struct

    from ckptfmt.convert._zarr import crc32c

    head = struct.pack(">I", magic)
    length = 4 + 8 + 2 + len(body) + 4
    raw = head + struct.pack("<Q", length) + b"\0\0" + body
    return raw + struct.pack("<I", crc32c(raw))


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _manifest_naming(path: bytes, length: int = 40) -> bytes:
    """A manifest whose one version's root node lies in the data file ``path``."""
    config = b"\1" * 16 + b"\0" + _varint(16) + _varint(1 << 20) + b"\4" + b"\0"
    table = _varint(1) + _varint(len(path)) + _varint(0) + path
    versions = _varint(1) + _varint(1) + b"\0" + _varint(0) + _varint(0) + _varint(length) + b"\0\0\0" + b"\0" * 8
    return _manifest(config + table + versions + _varint(0))


@pytest.mark.parametrize("path", [b"../outside", b"/etc/passwd", b"d/../../x", b"link"])
def test_ocdbt_data_files_cannot_leave_the_directory(written: Path, tmp_path: Path, path: bytes) -> None:
    src = _copy(written, "ocdbt", tmp_path)
    (tmp_path / "outside").write_bytes(b"\0" * 64)
    os.symlink(tmp_path / "outside", src / "link")
    (src / "manifest.ocdbt").write_bytes(_manifest_naming(path))
    with pytest.raises(CorruptSourceError, match=r"inside the checkpoint|outside"):
        convert(src, tmp_path / "o.ckpt")


def test_hostile_ocdbt_manifests_and_nodes(written: Path, tmp_path: Path) -> None:
    src = _copy(written, "ocdbt", tmp_path)
    manifest = src / "manifest.ocdbt"
    good = manifest.read_bytes()
    manifest.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptSourceError, match="crc32c"):
        convert(src, tmp_path / "o.ckpt")
    manifest.write_bytes(good[:20])
    with pytest.raises(CorruptSourceError):
        convert(src, tmp_path / "o.ckpt")
    data = next((src / "d").iterdir())
    manifest.write_bytes(_manifest_naming(f"d/{data.name}".encode(), length=data.stat().st_size + 100))
    with pytest.raises(CorruptSourceError, match="data file"):  # a node running past its file
        convert(src, tmp_path / "o.ckpt")
    manifest.write_bytes(_manifest_naming(b"d/missing"))
    with pytest.raises(CorruptSourceError):
        convert(src, tmp_path / "o.ckpt")
    raw = bytearray(data.read_bytes())
    raw[20] ^= 0xFF
    data.write_bytes(bytes(raw))
    manifest.write_bytes(good)
    with pytest.raises(CorruptSourceError):
        convert(src, tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()


def test_an_ocdbt_checkpoint_without_its_manifest_is_refused(written: Path, tmp_path: Path) -> None:
    src = _copy(written, "ocdbt", tmp_path)
    (src / "manifest.ocdbt").unlink()
    with pytest.raises(CorruptSourceError, match=r"manifest\.ocdbt"):
        convert(src, tmp_path / "o.ckpt")


def test_blosc_is_refused_naming_the_codec(written: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSourceError, match=r"blosc.*save it again"):
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
    zarray["shape"], zarray["chunks"] = [10, 30], [1 << 40, 30]  # a small array, a huge chunk
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


def test_the_older_aggregate_layout_converts(written: Path, tmp_path: Path) -> None:
    """No _METADATA: the `checkpoint` msgpack tree, its placeholders replaced by the zarr arrays they name."""
    src = _copy(written, "legacy", tmp_path)
    (src / "_CHECKPOINT_METADATA").unlink()  # told by the aggregate file alone
    assert detect(src) == "orbax"
    convert(src, tmp_path / "o.ckpt")
    got = ckptfmt.load(tmp_path / "o.ckpt", backend="numpy")
    got["layers"] = [got["layers"]["0"], got["layers"]["1"]]  # without _METADATA sequences stay {"0": ...}
    _check(got)


def test_aggregated_values_win_over_missing_arrays(written: Path, tmp_path: Path) -> None:
    """With _METADATA too, a leaf whose value sits in the aggregate file is taken from there."""
    src = _copy(written, "legacy", tmp_path)
    shutil.copy(written / "zarr2" / "_METADATA", src / "_METADATA")
    shutil.copy(written / "zarr2" / "_strings.json", src / "_strings.json")
    convert(src, tmp_path / "o.ckpt")
    _check(ckptfmt.load(tmp_path / "o.ckpt", backend="numpy"))


@pytest.mark.parametrize("name", ["../outside", "/abs", ""])
def test_placeholders_cannot_leave_the_directory(written: Path, tmp_path: Path, name: str) -> None:
    src = _copy(written, "legacy", tmp_path)
    data = (src / "checkpoint").read_bytes()
    old = b"PLACEHOLDER://big"
    new = f"PLACEHOLDER://{name}".encode()
    assert len(old) < 32 and len(new) < 32  # both fixstr: the length is one byte
    data = data.replace(bytes([0xA0 | len(old)]) + old, bytes([0xA0 | len(new)]) + new)
    (src / "checkpoint").write_bytes(data)
    with pytest.raises(CorruptSourceError, match=r"inside the checkpoint|outside"):
        convert(src, tmp_path / "o.ckpt")


_FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@_FUZZ
@given(layout=st.sampled_from(["ocdbt", "ocdbt3", "zarr3", "codecs", "legacy"]), pick=st.integers(0, 1 << 30),
       edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 1 << 30)))
def test_mutated_checkpoints_give_data_or_a_typed_error(tmp_path: Path, layout: str, pick: int,
                                                        edits: list[tuple[int, int]], cut: int | None) -> None:
    """Bytes flipped or cut in any file (manifest, nodes, shards, chunks, metadata): data or a CheckpointError."""
    src = DATA / "written" / layout
    work = tmp_path / f"m{uuid.uuid4().hex}"  # tmp_path is shared by the examples
    shutil.copytree(src, work)
    files = sorted(p for p in work.rglob("*") if p.is_file())
    target = files[pick % len(files)]
    data = bytearray(target.read_bytes())
    for offset, byte in edits:
        if data:
            data[offset % len(data)] = byte
    if cut is not None and data:
        del data[cut % len(data):]
    target.write_bytes(bytes(data))
    try:
        convert(work, work.with_suffix(".ckpt"))
    except ckptfmt.CheckpointError:
        pass
    finally:
        shutil.rmtree(work)


@pytest.mark.skipif(importlib.util.find_spec("tensorstore") is None, reason="needs tensorstore to write the arrays")
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3), data=st.data(),
       dtype=st.sampled_from(["<f4", ">f8", "<i2", "|u1", "|b1", "<c8", ">u4"]),
       codec=st.sampled_from([None, "zstd", "zlib", "gzip"]), version=st.sampled_from([2, 3]),
       order=st.sampled_from(["C", "F"]), shard=st.booleans())
def test_zarr_arrays_tensorstore_writes_read_back_exactly(
        tmp_path: Path, shape: list[int], data: st.DataObject, dtype: str, codec: str | None, version: int,
        order: str, shard: bool) -> None:
    """Any shape, chunking (edge chunks included), dtype, byte order, codec, chunk order and sharding."""
    import tensorstore as ts

    from ckptfmt.convert._zarr import Store, open_zarr

    chunks = [data.draw(st.integers(1, max(d, 1) + 2)) for d in shape]
    rng = np.random.default_rng(len(shape))
    value = (rng.standard_normal(shape) * 100).astype(np.dtype(dtype).newbyteorder("="))
    if value.dtype.kind == "c":
        value = value + 1j * value
    name = f"a{uuid.uuid4().hex}"  # tmp_path is shared by the examples
    path = tmp_path / name
    if version == 2:
        meta: dict[str, Any] = {"shape": shape, "chunks": chunks, "dtype": dtype,
                                "order": order if len(shape) > 1 else "C",  # tensorstore: F needs 2 axes
                                "compressor": None if codec is None else {"id": codec}}
        spec: dict[str, Any] = {"driver": "zarr", "metadata": meta}
    else:
        endian = "big" if dtype[0] == ">" else "little"
        inner: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": endian}}]
        if codec in ("zstd", "gzip"):
            inner.append({"name": codec})
        codecs: list[dict[str, Any]] = inner
        grid = chunks
        if shard and shape:
            grid = [c * 2 for c in chunks]
            codecs = [{"name": "sharding_indexed", "configuration": {"chunk_shape": chunks, "codecs": inner}}]
        spec = {"driver": "zarr3", "metadata": {"shape": shape, "data_type": value.dtype.name, "codecs": codecs,
                                                "chunk_grid": {"name": "regular",
                                                               "configuration": {"chunk_shape": grid}}}}
    spec["kvstore"] = {"driver": "file", "path": str(path)}
    store = ts.open(spec, create=True).result()
    store.write(value).result()
    array = open_zarr(Store(os.path.realpath(tmp_path)), name, allow_missing=True)  # tensorstore skips fill chunks
    got = b"".join(bytes(c) for c in array.chunks(64))
    assert got == np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"))).tobytes()
    assert array.shape == tuple(shape)


def test_a_leaf_too_deep_is_refused(written: Path, tmp_path: Path) -> None:
    src = _copy(written, "zarr2", tmp_path)
    _add_leaf(src, ["k"] * 5000, value_type="None")
    with pytest.raises(UnsupportedSourceError, match="deep"):
        convert(src, tmp_path / "o.ckpt")


def test_an_ocdbt_node_reached_twice_is_refused(tmp_path: Path) -> None:
    """A B+tree whose interior node names one leaf twice (a DAG: exponential work if followed) is refused."""
    leaf = _manifest(b"\0" + _varint(0) + _varint(1) + _varint(1) + b"k" + _varint(1) + _varint(0) + b"v",
                     magic=0x0CDB20DE)  # height 0, no data files, one key "k" with the inline value "v"
    n = 2
    interior_body = (b"\1" + _varint(1) + _varint(3) + _varint(0) + b"d/x"  # height 1, data file table ["d/x"]
                     + _varint(n) + _varint(0) * (n - 1) + _varint(1) * n + _varint(0) * n + b"ab"
                     + _varint(0) * n + _varint(0) * n + _varint(len(leaf)) * n + _varint(0) * (3 * n))
    interior = _manifest(interior_body, magic=0x0CDB20DE)
    db = tmp_path / "db"
    (db / "d").mkdir(parents=True)
    (db / "d" / "x").write_bytes(leaf + interior)
    config = b"\1" * 16 + b"\0" + _varint(16) + _varint(1 << 20) + b"\4" + b"\0"
    table = _varint(1) + _varint(3) + _varint(0) + b"d/x"
    versions = (_varint(1) + _varint(1) + b"\1" + _varint(0) + _varint(len(leaf)) + _varint(len(interior))
                + b"\0\0\0" + b"\0" * 8)
    (db / "manifest.ocdbt").write_bytes(_manifest(config + table + versions + _varint(0)))
    from ckptfmt.convert._ocdbt import read_ocdbt

    with pytest.raises(UnsupportedSourceError, match="two paths"):
        read_ocdbt(str(db))


def test_a_tensorflow_checkpoint_state_file_is_not_an_orbax_aggregate(tmp_path: Path) -> None:
    """TensorFlow also writes a file named `checkpoint` (text): it does not make the directory an Orbax one."""
    from ckptfmt.convert._orbax import is_orbax_dir

    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n')
    assert not is_orbax_dir(str(tmp_path))
    (tmp_path / "checkpoint").write_bytes(b"\x81\xa1a\xa1b")  # a msgpack map with neither arrays nor placeholders
    assert not is_orbax_dir(str(tmp_path))
