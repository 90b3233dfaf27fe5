"""TensorFlow checkpoints written by TensorFlow 2.21 (data/tensorflow), converted without TensorFlow.

The committed checkpoints and ``expected.json`` (what ``tf.train.load_checkpoint`` returns) come from
``data/tensorflow/make_tf_checkpoints.py``; hostile indexes are built with ``tf_table``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tf_table as tt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnknownFormatError, UnsupportedSourceError, convert, detect
from ckptfmt.convert._crc32c import crc32c, mask, unmask
from ckptfmt.convert._tensorflow import MAX_STRING_BYTES, read_tensorflow, slice_key
from ckptfmt.errors import CheckpointError

DATA = Path(__file__).parent / "data" / "tensorflow"
EXPECTED = json.loads((DATA / "expected.json").read_text())["checkpoints"]
CHECKPOINTS = sorted(EXPECTED)


def flat(value: Any) -> list[bytes]:
    if isinstance(value, bytes):
        return [value]
    return [b for v in value for b in flat(v)]


def assert_matches(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        value = got[key]
        if want["dtype"] == "string":
            assert [s.hex() for s in flat(value)] == want["strings"], key
            if not want["shape"]:
                assert isinstance(value, bytes), key
            continue
        arr = np.asarray(value)
        assert list(arr.shape) == want["shape"], key
        assert str(arr.dtype) == want["dtype"], key
        assert np.ascontiguousarray(arr).tobytes().hex() == want["hex"], key


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_converts_what_tensorflow_reads(name: str, tmp_path: Path) -> None:
    prefix = DATA / name
    assert detect(prefix) == "tensorflow"
    report = convert(prefix, tmp_path / "out.ckpt")
    assert report.source_format == "tensorflow"
    assert_matches(ckptfmt.load(tmp_path / "out.ckpt", backend="numpy"), EXPECTED[name])


def test_every_way_of_naming_a_checkpoint(tmp_path: Path) -> None:
    names = [DATA / "tf1", DATA / "tf1" / "model.ckpt-7", DATA / "tf1" / "model.ckpt-7.index",
             DATA / "tf1" / "model.ckpt-7.data-00002-of-00003"]
    for i, src in enumerate(names):
        assert detect(src) == "tensorflow", src
        convert(src, tmp_path / f"{i}.ckpt")
        assert_matches(ckptfmt.load(tmp_path / f"{i}.ckpt", backend="numpy"), EXPECTED["tf1/model.ckpt-7"])


def test_metadata_names_shards_slices_and_the_source(tmp_path: Path) -> None:
    convert(DATA / "tf2", tmp_path / "out.ckpt")
    with ckptfmt.open(tmp_path / "out.ckpt") as ckpt:
        meta = ckpt.metadata
    tf = meta["tensorflow"]
    assert tf["num_shards"] == 4 and tf["version"]["producer"] == 1
    assert tf["partitioned"] == {"model/extras/table/.ATTRIBUTES/VARIABLE_VALUE": 7,
                                 "model/layers/1/kernel/.ATTRIBUTES/VARIABLE_VALUE": 4}
    assert tf["crc32c"] in ("numpy", "google-crc32c")
    assert meta["converted_from"] == {"format": "tensorflow", "path": "tf2"}


def test_partitioned_tensors_stream_in_small_chunks() -> None:
    """The grid of slices reassembled a few bytes at a time (rows bigger than a chunk) equals TF's tensor."""
    tree, _ = read_tensorflow(str(DATA / "dtypes" / "all"))
    for key in ("sliced/grid", "sliced/bf16", "sliced/tall"):
        want = EXPECTED["dtypes/all"][key]["hex"]
        for limit in (4, 8, 16, 1 << 20):
            got = bytearray()
            for c in tree[key].chunks(limit):  # each chunk is valid until the next: copied at once
                assert c.nbytes <= max(limit, tree[key].itemsize)
                got += c.tobytes()
            assert got.hex() == want, (key, limit)


def test_progress_is_reported(tmp_path: Path) -> None:
    seen: list[int] = []
    report = convert(DATA / "tf2", tmp_path / "out.ckpt", progress=seen.append)
    assert seen and sum(seen) == report.bytes > 0  # increments of tensor bytes


def test_slice_keys_match_tensorflow() -> None:
    """OrderedCode keys of the committed TF2 slices (including a 2-byte signed number)."""
    data = (DATA / "tf2" / "ckpt-1.index").read_bytes()
    name = b"model/extras/table/.ATTRIBUTES/VARIABLE_VALUE"
    assert slice_key(name, ((0, 22),)) in data
    assert slice_key(b"a\x00b\xff", ((-1, -1),)) == b"\x00a\x00\xffb\xff\x00\x00\x01\x01\x01\x7f\x7f"
    assert slice_key(b"x", ((64, 8191),)) == b"\x00x\x00\x01\x01\x01\xc0\x40\xdf\xff"
    keys = {k for k, _ in _parse((DATA / "dtypes" / "all.index").read_bytes())}
    assert slice_key(b"sliced/tall", ((100, 100), (0, -1))) in keys  # two-byte numbers, as TensorFlow wrote them


# ------------------------------------------------------------------ CRC-32C


def test_crc32c_numpy_matches_the_reference() -> None:
    assert crc32c(b"123456789", use_library=False) == 0xE3069283  # the CRC-32C check value
    assert unmask(mask(0x12345678)) == 0x12345678
    rng = np.random.default_rng(1)
    google = pytest.importorskip("google_crc32c") if os.environ.get("CKPTFMT_TEST_GOOGLE_CRC") else None
    for n in (0, 1, 255, 256, 4097, 65536 * 4 + 3, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        slow = 0xFFFFFFFF
        if n <= 4097:
            for b in data.tobytes():  # the bitwise definition
                slow ^= b
                for _ in range(8):
                    slow = (slow >> 1) ^ (0x82F63B78 if slow & 1 else 0)
            assert crc32c(data, use_library=False) == slow ^ 0xFFFFFFFF, n
        whole = crc32c(data, use_library=False)
        assert crc32c(data[n // 3 :], crc32c(data[: n // 3], use_library=False), use_library=False) == whole
        assert crc32c(data) == whole
        if google is not None:
            assert google.value(data.tobytes()) == whole


# ------------------------------------------------------------------ damaged checkpoints


def copy(name: str, tmp_path: Path) -> Path:
    src = DATA / name
    dst = tmp_path / src.parent.name
    shutil.copytree(src.parent, dst)
    return dst / src.name


def test_a_flipped_tensor_byte_fails_the_crc_and_writes_nothing(tmp_path: Path) -> None:
    prefix = copy("tf1/model.ckpt-7", tmp_path)
    shard = Path(f"{prefix}.data-00002-of-00003")
    raw = bytearray(shard.read_bytes())
    raw[1] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptSourceError, match="CRC-32C mismatch") as info:
        convert(prefix, tmp_path / "out.ckpt")
    assert str(shard) in str(info.value) and "decoder/" in str(info.value)
    assert not (tmp_path / "out.ckpt").exists()
    tree, meta = read_tensorflow(str(prefix), verify=False)  # the documented way past a bad checksum
    assert meta["tensorflow"]["crc32c"] == "not verified"
    for value in tree.values():
        if hasattr(value, "chunks"):
            list(value.chunks(1 << 20))


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    prefix = copy("tf1/model.ckpt-7", tmp_path)
    os.remove(f"{prefix}.data-00001-of-00003")
    with pytest.raises(CorruptSourceError, match=r"data-00001-of-00003.*missing"):
        convert(prefix, tmp_path / "out.ckpt")


def test_a_truncated_shard_is_refused_before_reading(tmp_path: Path) -> None:
    prefix = copy("tf2/ckpt-1", tmp_path)
    shard = Path(f"{prefix}.data-00003-of-00004")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorruptSourceError, match="truncated"):
        read_tensorflow(str(prefix))


@pytest.mark.parametrize("cut", [0, 10, 47, 200, -1])
def test_a_truncated_index_is_a_typed_error(cut: int, tmp_path: Path) -> None:
    prefix = copy("tf2/ckpt-1", tmp_path)
    index = Path(f"{prefix}.index")
    raw = index.read_bytes()
    index.write_bytes(raw[:cut])
    with pytest.raises(CorruptSourceError, match=r"ckpt-1\.index"):
        convert(prefix, tmp_path / "out.ckpt")


def test_a_directory_with_two_checkpoints_and_no_state_file(tmp_path: Path) -> None:
    for name in ("a", "b"):
        for f in (DATA / "dtypes").iterdir():
            shutil.copy(f, tmp_path / f.name.replace("all", name))
    with pytest.raises(UnknownFormatError, match="several TensorFlow checkpoints"):
        detect(tmp_path)
    assert detect(tmp_path / "a") == "tensorflow"


def test_the_state_file_cannot_lead_outside_the_directory(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    shutil.copytree(DATA / "dtypes", outside)
    inner = tmp_path / "run"
    inner.mkdir()
    (inner / "checkpoint").write_text(f'model_checkpoint_path: "{outside}/all"\n')
    with pytest.raises(UnknownFormatError):
        detect(inner)  # the absolute path is looked up by its base name in `run/` only
    shutil.copy(outside / "all.index", inner / "all.index")
    shutil.copy(outside / "all.data-00000-of-00001", inner / "all.data-00000-of-00001")
    assert detect(inner) == "tensorflow"


# ------------------------------------------------------------------ hostile indexes (built by hand)


def write_bundle(tmp_path: Path, entries: list[tuple[bytes, bytes]], data: bytes = b"", *,
                 num_shards: int = 1, compression: int = 0) -> str:
    prefix = str(tmp_path / "h")
    items = sorted([(b"", tt.header(num_shards)), *entries])
    Path(prefix + ".index").write_bytes(tt.table(items, compression=compression))
    for k in range(num_shards):
        Path(f"{prefix}.data-{k:05d}-of-{num_shards:05d}").write_bytes(data)
    return prefix


def f32(values: list[float]) -> tuple[bytes, int]:
    raw = np.asarray(values, dtype="<f4").tobytes()
    return raw, mask(crc32c(raw))


def test_the_hand_built_bundle_reads(tmp_path: Path) -> None:
    raw, crc = f32([1, 2, 3, 4, 5, 6])
    prefix = write_bundle(tmp_path, [(b"w", tt.entry(1, (2, 3), size=24, crc=crc))], raw)
    tree, _ = read_tensorflow(prefix)
    assert b"".join(c.tobytes() for c in tree["w"].chunks(1 << 20)) == raw


@pytest.mark.parametrize(("dtype", "what"), [(20, "resource"), (21, "variant"), (29, "int4"), (99, "DataType 99")])
def test_refused_dtypes(dtype: int, what: str, tmp_path: Path) -> None:
    prefix = write_bundle(tmp_path, [(b"handle", tt.entry(dtype, (2,), size=8))], b"\0" * 8)
    with pytest.raises(UnsupportedSourceError, match=rf"'handle' has dtype {what}"):
        read_tensorflow(prefix)


def test_quantized_dtypes_keep_their_tf_name(tmp_path: Path) -> None:
    raw = bytes([1, 2, 255])
    prefix = write_bundle(tmp_path, [(b"q", tt.entry(11, (3,), size=3, crc=mask(crc32c(raw))))], raw)
    convert(prefix, tmp_path / "out.ckpt")
    with ckptfmt.open(tmp_path / "out.ckpt") as ckpt:
        assert ckpt.metadata["tensorflow"]["dtypes"] == {"q": "qint8"}
    assert ckptfmt.load(tmp_path / "out.ckpt", backend="numpy")["q"].tolist() == [1, 2, -1]


@pytest.mark.parametrize("case", ["past_end", "size_mismatch", "bad_shard", "negative_dim", "huge_shape",
                                  "huge_empty"])
def test_entries_checked_against_the_shard(case: str, tmp_path: Path) -> None:
    raw, crc = f32([1, 2, 3, 4])
    e = {"past_end": tt.entry(1, (2, 2), offset=8, size=16, crc=crc),
         "size_mismatch": tt.entry(1, (2, 3), size=16, crc=crc),
         "bad_shard": tt.entry(1, (2, 2), shard=3, size=16, crc=crc),
         "negative_dim": tt.entry(1, (-2, 2), size=16, crc=crc),
         "huge_shape": tt.entry(1, (1 << 40, 1 << 40), size=16, crc=crc),
         "huge_empty": tt.entry(1, (1 << 62, 0), size=0)}[case]
    prefix = write_bundle(tmp_path, [(b"w", e)], raw)
    with pytest.raises(CorruptSourceError, match=r"'w'|dimension"):
        read_tensorflow(prefix)


def sliced_bundle(tmp_path: Path, boxes: list[list[tuple[int, int]]], shape: tuple[int, ...],
                  listed: list[list[tuple[int, int]]] | None = None) -> str:
    data = bytearray()
    entries = []
    for box in boxes:
        n = int(np.prod([ln for _, ln in box]))
        raw, crc = f32(list(range(n)))
        entries.append((slice_key(b"p", tuple(box)), tt.entry(1, tuple(ln for _, ln in box), offset=len(data),
                                                               size=len(raw), crc=crc)))
        data += raw
    entries.append((b"p", tt.entry(1, shape, slices=listed if listed is not None else boxes)))
    return write_bundle(tmp_path, entries, bytes(data))


def test_slices_that_tile_are_reassembled(tmp_path: Path) -> None:
    prefix = sliced_bundle(tmp_path, [[(0, 1), (0, 2)], [(0, 1), (2, 1)], [(1, 2), (0, 3)]], (3, 3))
    tree, _ = read_tensorflow(prefix)
    got = np.frombuffer(b"".join(c.tobytes() for c in tree["p"].chunks(8)), "<f4").reshape(3, 3)
    assert got.tolist() == [[0, 1, 0], [0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(("boxes", "listed", "match"), [
    ([[(0, 2), (0, 3)], [(1, 2), (0, 3)]], None, r"overlap|cover"),           # row 1 twice
    ([[(0, 2), (0, 3)]], None, "cover"),                                       # a row missing
    ([[(0, 2), (0, 3)], [(2, 2), (0, 3)]], None, "outside"),                  # past the end
    ([[(0, 3), (0, 3)]], [[(0, 3), (0, 3)], [(0, 3), (0, 3)]], "twice"),      # listed twice
    ([[(0, 3), (0, 3)]], [[(0, 3), (0, 2)]], "no entry"),                     # listed, not stored
    ([[(0, 3), (0, 3)]], [[(0, 3)]], "dimensions"),
])
def test_slices_that_do_not_tile_are_refused(boxes: Any, listed: Any, match: str, tmp_path: Path) -> None:
    prefix = sliced_bundle(tmp_path, boxes, (3, 3), listed)
    with pytest.raises(CorruptSourceError, match=match):
        read_tensorflow(prefix)


def test_overlapping_slices_of_the_right_total_are_refused(tmp_path: Path) -> None:
    # 2x2 + 2x2 + 1x... : same volume as the 3x3 whole, but two slices overlap and a cell is uncovered
    boxes = [[(0, 2), (0, 2)], [(1, 2), (1, 2)], [(0, 1), (2, 1)]]
    prefix = sliced_bundle(tmp_path, boxes, (3, 3))
    with pytest.raises(CorruptSourceError, match=r"cover|overlap"):
        read_tensorflow(prefix)
    boxes = [[(0, 2), (0, 2)], [(1, 2), (1, 2)], [(0, 1), (2, 1)], [(2, 1), (0, 1)]]  # volume 9, overlapping
    (tmp_path / "b").mkdir()
    prefix = sliced_bundle(tmp_path / "b", boxes, (3, 3))
    with pytest.raises(CorruptSourceError, match="overlap"):
        read_tensorflow(prefix)


def test_index_structure_errors(tmp_path: Path) -> None:
    raw, crc = f32([1])
    good = [(b"w", tt.entry(1, (1,), size=4, crc=crc))]
    prefix = write_bundle(tmp_path, good, raw, compression=1)
    with pytest.raises(UnsupportedSourceError, match="snappy"):
        read_tensorflow(prefix)
    for shards in (0, -1):
        prefix = write_bundle(tmp_path, good, raw, num_shards=1)
        items = sorted([(b"", tt.header(shards)), *good])
        Path(prefix + ".index").write_bytes(tt.table(items))
        with pytest.raises(CorruptSourceError, match="num_shards"):
            read_tensorflow(prefix)
    items = sorted([(b"", tt.header(1, endianness=1)), *good])
    Path(prefix + ".index").write_bytes(tt.table(items))
    with pytest.raises(UnsupportedSourceError, match="big-endian"):
        read_tensorflow(prefix)
    Path(prefix + ".index").write_bytes(tt.table(good))  # no header entry
    with pytest.raises(CorruptSourceError):
        convert(prefix, tmp_path / "out.ckpt")


def test_string_tensors_too_large_are_skipped_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptfmt.convert._tensorflow as tfmod

    monkeypatch.setattr(tfmod, "MAX_STRING_BYTES", 8)
    convert(DATA / "dtypes" / "all", tmp_path / "out.ckpt")
    with ckptfmt.open(tmp_path / "out.ckpt") as ckpt:
        skipped = ckpt.metadata["tensorflow"]["skipped"]
    assert set(skipped) == {"strings/matrix", "strings/scalar", "strings/vector"}
    assert MAX_STRING_BYTES == 64 << 20


def test_string_lengths_are_checked(tmp_path: Path) -> None:
    body = b"abc"
    lengths = tt.varint(5)  # claims 5 bytes, 3 follow
    raw = lengths + struct.pack("<I", mask(crc32c(struct.pack("<I", 5)))) + body
    prefix = write_bundle(tmp_path, [(b"s", tt.entry(7, (1,), size=len(raw)))], raw)
    with pytest.raises(CorruptSourceError, match=r"'s'.*sum"):
        read_tensorflow(prefix)


# ------------------------------------------------------------------ fuzz: mutations of a real index


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run_one(prefix: Path, out: Path) -> None:
    """Either a conversion or a CheckpointError; nothing else (no crash, no MemoryError, no other type)."""
    try:
        convert(prefix, out)
    except CheckpointError:
        return
    ckptfmt.load(out, backend="numpy")


@FUZZ
@given(rng=st.randoms(use_true_random=False), edits=st.integers(1, 4))
def test_byte_mutations_of_the_index(rng: random.Random, edits: int, tmp_path: Path) -> None:
    """Raw byte edits: mostly caught by the block CRCs, which must fail typed."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    prefix = copy("tf2/ckpt-1", work)
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    for _ in range(edits):
        op = rng.randrange(3)
        pos = rng.randrange(len(raw))
        if op == 0:
            raw[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            del raw[pos : pos + rng.randrange(1, 16)]
        else:
            raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    index.write_bytes(bytes(raw))
    run_one(prefix, work / "out.ckpt")


def _parse(raw: bytes) -> list[tuple[bytes, bytes]]:
    from ckptfmt.convert._sstable import read_table

    return list(read_table(raw))


@FUZZ
@given(rng=st.randoms(use_true_random=False), edits=st.integers(1, 3))
def test_structured_mutations_with_valid_checksums(rng: random.Random, edits: int, tmp_path: Path) -> None:
    """Entries edited inside a table rebuilt with correct CRCs: the protobuf and bundle checks must hold."""
    name = rng.choice(["tf2/ckpt-1", "tf1/model.ckpt-7", "dtypes/all"])
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    prefix = copy(name, work)
    index = Path(f"{prefix}.index")
    items = _parse(index.read_bytes())
    for _ in range(edits):
        i = rng.randrange(len(items))
        key, value = items[i]
        value = bytearray(value)
        op = rng.randrange(5)
        if op == 0 and value:
            value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        elif op == 1 and value:
            value[rng.randrange(len(value))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        elif op == 2 and value:
            del value[rng.randrange(len(value)) :]
        elif op == 3:
            value += tt.field(rng.choice([1, 2, 3, 4, 5, 7, 15]), rng.choice([0, 1, 2**31, 2**63 - 1, 2**64 - 1,
                                                                                b"\x0a\x02\x08\x05"]))
        else:
            items[i] = (key[: rng.randrange(len(key) + 1)] + bytes([rng.randrange(256)]), bytes(value))
            items.sort()
            dedup = dict(items)
            items = sorted(dedup.items())
            continue
        items[i] = (key, bytes(value))
    index.write_bytes(tt.table(items, per_block=rng.choice([1, 4, 64]), restart_every=rng.choice([1, 3, 16])))
    run_one(prefix, work / "out.ckpt")


def test_prefix_compression_cannot_expand_keys_without_bound(tmp_path: Path) -> None:
    """256 keys sharing a 200 KB prefix: ~400 KB of index, 51 MB of keys once rebuilt; refused at 16x + 1 MiB."""
    stem = b"v" * 200_000
    items = sorted([(b"", tt.header())] + [(stem + bytes([i]), tt.entry(1, (0,))) for i in range(256)])
    prefix = tmp_path / "h"
    Path(f"{prefix}.index").write_bytes(tt.table(items, per_block=300, restart_every=1000))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"")
    assert os.path.getsize(f"{prefix}.index") < 500_000  # the data block and its 200 KB index separator
    with pytest.raises(CorruptSourceError, match="exceed"):
        read_tensorflow(str(prefix))


def test_the_command_line_converts_a_prefix(tmp_path: Path) -> None:
    """`ckptfmt convert PREFIX DST --json` in a child process (the installed package, not the source tree)."""
    out = subprocess.run([sys.executable, "-m", "ckptfmt", "convert", str(DATA / "tf1" / "model.ckpt-7"),
                          str(tmp_path / "out.ckpt"), "--json"], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    report = json.loads(out.stdout)
    assert report["source_format"] == "tensorflow" and report["tensors"] == 7
    assert_matches(ckptfmt.load(tmp_path / "out.ckpt", backend="numpy"), EXPECTED["tf1/model.ckpt-7"])


def test_a_saved_model_directory_converts_its_variables(tmp_path: Path) -> None:
    """SavedModel layout: ``variables/variables.index`` + shards beside ``saved_model.pb`` (never read)."""
    (tmp_path / "model" / "variables").mkdir(parents=True)
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"\x08\x01")
    for f in (DATA / "tf2").glob("ckpt-1.*"):
        shutil.copy(f, tmp_path / "model" / "variables" / f.name.replace("ckpt-1", "variables"))
    assert detect(tmp_path / "model") == "tensorflow"
    convert(tmp_path / "model", tmp_path / "out.ckpt")
    assert_matches(ckptfmt.load(tmp_path / "out.ckpt", backend="numpy"), EXPECTED["tf2/ckpt-1"])


@settings(FUZZ, max_examples=100)
@given(rng=st.randoms(use_true_random=False), verify=st.booleans())
def test_data_shard_mutations(rng: random.Random, verify: bool, tmp_path: Path) -> None:
    """Damaged shard bytes (string tensors parsed from them too), with and without the CRC check."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    prefix = copy(rng.choice(["dtypes/all", "tf2/ckpt-1"]), work)
    shard = rng.choice(sorted(prefix.parent.glob("*.data-*")))
    raw = bytearray(shard.read_bytes())
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    if rng.random() < 0.2:
        raw = raw[: rng.randrange(len(raw) + 1)]
    shard.write_bytes(bytes(raw))
    try:
        tree, meta = read_tensorflow(str(prefix), verify=verify)
        ckptfmt.save(work / "out.ckpt", tree, metadata=meta)
    except CheckpointError:
        return
    ckptfmt.load(work / "out.ckpt", backend="numpy")
