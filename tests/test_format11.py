"""Format 1.1: compressed blobs (spec §13) and packed small blobs (§14)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt import _codec, _versions
from ckptfmt._checksum import checksum
from ckptfmt._decode import stored_row
from ckptfmt._footer import FOOTER_SIZE, Footer, parse_footer
from ckptfmt._writer11 import byte_chunks

pytest.importorskip("zstandard")  # the compress extra; tests/test_packed.py covers what needs none
ml_dtypes = pytest.importorskip("ml_dtypes")
LEVELS = ["fast", "balanced", "maximum"]


def weights(n: int = 300_000, seed: int = 0) -> np.ndarray:
    """Trained-weight-like float32: narrow exponents, noisy mantissas."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)


def state() -> dict[str, Any]:
    w = weights().reshape(600, 500)
    return {
        "w": w, "bf16": w.astype(ml_dtypes.bfloat16), "f16": w[:7].astype(np.float16),
        "i8": np.arange(-50, 50, dtype=np.int8),
        "c64": (w[:3] + 1j * w[3:6]).astype(np.complex64), "b": np.arange(1000) % 3 == 0, "empty": np.zeros((0, 4)),
        "step": np.int64(7), "tied": [w, w[::-1]], "t": w.T, "opts": {"lr": 0.1, "name": "adam"},
    }


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b) or isinstance(a, np.ndarray | np.generic)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, np.ndarray | np.generic):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).shape == np.asarray(b).shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    else:
        assert a == b


def rewrite_meta(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a file's metadata map and write it back with fresh checksums."""
    data = path.read_bytes()
    footer = parse_footer(data[-FOOTER_SIZE:], len(data), 1)
    meta = msgpack.unpackb(data[footer.metadata_offset : footer.metadata_offset + footer.metadata_length],
                           raw=False, strict_map_key=False)
    change(meta)
    new = msgpack.packb(meta, use_bin_type=True)
    path.write_bytes(data[: footer.metadata_offset] + new + Footer(footer.metadata_offset, len(new),
                                                                    checksum(new)).pack())


def header_of(path: Path) -> tuple[int, int]:
    """(minor, required feature bits) from the header."""
    head = path.read_bytes()[:64]
    return int.from_bytes(head[10:12], "little"), int.from_bytes(head[16:20], "little")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("level", ["none", *LEVELS])
def test_every_level_round_trips_bit_for_bit(tmp_path: Path, level: str, pack: bool) -> None:
    path = tmp_path / "x.ckpt"
    obj = state()
    ckptfmt.save(path, obj, compression=level, pack=pack)
    for mmap in (True, False):
        same(obj, ckptfmt.load(path, mmap=mmap))
    back = ckptfmt.load(path)
    assert back["tied"][1].base is not None  # views stay views of one blob
    report = ckptfmt.verify(path)
    assert report.ok, report.errors
    bits = (_versions.FEATURE_COMPRESSED if level != "none" else 0) | (_versions.FEATURE_PACKED if pack else 0)
    assert header_of(path) == (1 if bits else 0, bits)


def test_a_file_using_no_feature_is_written_as_before(tmp_path: Path) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    try:
        ckptfmt.save(a, state())
        ckptfmt.save(b, state(), compression="none", pack=False)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert a.read_bytes() == b.read_bytes()
    assert header_of(a) == (0, 0)
    assert b"codec" not in a.read_bytes()[-4096:]


def test_compression_shrinks_weights_and_bf16_most(tmp_path: Path) -> None:
    w = weights(1 << 20)
    sizes = {}
    for name, arr in (("f32", w), ("bf16", w.astype(ml_dtypes.bfloat16))):
        ckptfmt.save(tmp_path / "c.ckpt", {"w": arr}, compression="fast")
        sizes[name] = arr.nbytes / os.path.getsize(tmp_path / "c.ckpt")
    assert sizes["f32"] > 1.1 and sizes["bf16"] > 1.3


@pytest.mark.parametrize("level", LEVELS)
def test_incompressible_data_grows_at_most_a_thousandth(tmp_path: Path, level: str) -> None:
    rnd = np.random.default_rng(1).integers(0, 256, 5 << 20, dtype=np.uint8).view(np.float32)
    ckptfmt.save(tmp_path / "r.ckpt", {"r": rnd}, compression=level)
    with ckptfmt.open(tmp_path / "r.ckpt") as ckpt:
        tt = ckpt.manifest.tensors
        assert int(tt.stored_sizes()[0]) <= rnd.nbytes * 1.001
        assert tt.codec_of(0) == "planes-zstd"
    assert os.path.getsize(tmp_path / "r.ckpt") <= rnd.nbytes * 1.001 + 8192


def test_chunking_is_deterministic_across_worker_counts(tmp_path: Path) -> None:
    from ckptfmt._atomic import atomic_write
    from ckptfmt._plan import plan
    from ckptfmt._writer11 import Writer11

    obj = {"w": weights(700_000), "v": weights(900, 1)}
    out = []
    for workers in (1, 2, 3):
        path = tmp_path / f"w{workers}.ckpt"
        what = plan(obj)
        with atomic_write(os.fspath(path), durable=False) as fd:
            w = Writer11(fd, alignment=4096, compression="fast", workers=workers, chunk_bytes=1 << 16)
            w.write_blobs(what.rows)
            w.finish(what.tree, producer={}, created="", user={}, views=what.views)
        out.append(path.read_bytes())
        same(obj, ckptfmt.load(path))
    assert out[0] == out[1] == out[2]


def test_non_contiguous_and_streamed_sources_compress(tmp_path: Path) -> None:
    from ckptfmt import DTYPES, LazyArray

    base = weights(400_000).reshape(800, 500)
    raw = base.tobytes()
    lazy = LazyArray.from_read((800, 500), DTYPES["float32"], lambda off, n: raw[off : off + n])
    big_endian = base.astype(">f4")
    ckptfmt.save(tmp_path / "s.ckpt", {"t": base[:, ::2], "lazy": lazy, "be": big_endian}, compression="fast")
    back = ckptfmt.load(tmp_path / "s.ckpt")
    np.testing.assert_array_equal(back["t"], base[:, ::2])
    np.testing.assert_array_equal(back["lazy"], base)
    np.testing.assert_array_equal(back["be"], base)


@given(n=st.integers(0, 5000), chunk=st.sampled_from([64, 128, 1024]))
@settings(max_examples=40, deadline=None)
def test_byte_chunks_cut_exactly(n: int, chunk: int) -> None:
    arr = np.arange(n, dtype=np.int32)[::-1]  # non-contiguous: the re-buffering path
    parts = list(byte_chunks(arr, arr.nbytes, chunk))
    assert all(p.size == chunk for p in parts[:-1]) and (not parts or 0 < parts[-1].size <= chunk)
    assert b"".join(p.tobytes() for p in parts) == np.ascontiguousarray(arr).tobytes()


# ---------------------------------------------------------------- partial reads


def test_a_partial_read_decodes_only_its_chunks(tmp_path: Path) -> None:
    from ckptfmt._writer11 import Writer11  # noqa: F401  (the writer under test)

    w = weights(1 << 20)  # 4 MiB: four 1 MiB chunks
    ckptfmt.save(tmp_path / "p.ckpt", {"w": w, "v": weights(10)}, compression="fast")
    with ckptfmt.open(tmp_path / "p.ckpt") as ckpt:
        row = stored_row(ckpt, 0)
        assert row.chunk_count() == 4
        mm = ckpt._map()
        reads: list[tuple[int, int]] = []

        def read(off: int, n: int) -> Any:
            reads.append((off, n))
            return memoryview(mm)[off : off + n]

        start, stop = 1_500_000, 2_200_000
        dest = np.empty(stop - start, np.uint8)
        _codec.decode_into(row, read, dest, lambda: "w", start=start, stop=stop)
        assert dest.tobytes() == w.view(np.uint8)[start:stop].tobytes()
        assert len(reads) == 2  # chunks 1 and 2 only
        assert ckpt.get("v").tobytes() == weights(10).tobytes()  # keys=: one row decoded


@pytest.mark.parametrize("chunk", [64, 4096, 192 << 10, 1 << 26])
def test_chunk_bytes_sets_the_decoded_size_of_each_chunk(tmp_path: Path, chunk: int) -> None:
    w = weights(300_000)  # 1.2 MB
    ckptfmt.save(tmp_path / "c.ckpt", {"w": w}, compression="balanced", chunk_bytes=chunk)
    with ckptfmt.open(tmp_path / "c.ckpt") as ckpt:
        row = stored_row(ckpt, 0)
        assert row.chunk_bytes == chunk and row.chunk_count() == -(-w.nbytes // chunk)
        assert ckpt.get("w").tobytes() == w.tobytes()
        assert ckpt.get_slice("w")[123_456:200_001].tobytes() == w[123_456:200_001].tobytes()
    assert ckptfmt.verify(tmp_path / "c.ckpt").ok


@pytest.mark.parametrize("chunk", [0, -64, 100, (1 << 26) + 64, 2.0, True])
def test_chunk_bytes_outside_the_format_is_refused_before_writing(tmp_path: Path, chunk: Any) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        ckptfmt.save(tmp_path / "c.ckpt", {"w": weights(10)}, compression="fast", chunk_bytes=chunk)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- damage


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_flipped_stored_byte_never_yields_wrong_data(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "f.ckpt"
    w = weights(200_000)
    if not path.exists():
        ckptfmt.save(path, {"w": w}, compression="fast")
    clean = path.read_bytes()
    with ckptfmt.open(path) as ckpt:
        off, stored = ckpt.entry(0).offset, int(ckpt.manifest.tensors.stored_sizes()[0])
    pos = data.draw(st.integers(off, off + stored - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(clean)
    bad[pos] ^= 1 << bit
    path.write_bytes(bytes(bad))
    try:
        with pytest.raises(ckptfmt.ChecksumMismatchError):
            ckptfmt.load(path)
        assert not ckptfmt.verify(path).ok
        try:  # without verify, a zstd frame's own content checksum still refuses
            got = ckptfmt.load(path, verify=False)["w"]
        except ckptfmt.CorruptCheckpointError:
            pass
        else:  # only a piece stored raw can come back altered, and then only at that byte
            assert np.count_nonzero(got.view(np.uint8) != w.view(np.uint8)) == 1
    finally:
        path.write_bytes(clean)


def test_unknown_codec_fails_only_that_tensor(tmp_path: Path) -> None:
    path = tmp_path / "u.ckpt"
    ckptfmt.save(path, {"a": weights(5000), "b": weights(5000, 1), "s": "x"}, compression="fast")

    def rename(meta: dict[str, Any]) -> None:
        t = meta["tensors"]
        t["codecs"] = [*t["codecs"], "lz4-next"]
        codes = bytearray(t["codec"])
        codes[0] = len(t["codecs"]) - 1
        t["codec"] = bytes(codes)

    rewrite_meta(path, rename)
    with ckptfmt.open(path) as ckpt:
        np.testing.assert_array_equal(ckpt.get("b"), weights(5000, 1))
        with pytest.raises(ckptfmt.UnsupportedCodecError, match="lz4-next") as e:
            ckpt.get("a")
        assert isinstance(e.value, TypeError) and "'a'" in str(e.value)
    assert ckptfmt.verify(path).ok  # stored bytes are checked without the codec


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("stored"), "stored"),
    (lambda t: t.update(chunk_bytes=100), "chunk_bytes"),
    (lambda t: t.update(chunk_bytes=1 << 27), "chunk_bytes"),
    (lambda t: t.update(codecs=["raw", "raw"]), "codecs"),
    (lambda t: t.update(stored=(1).to_bytes(8, "little") + t["stored"][8:]), "stored size|piece"),
    (lambda t: t.update(pieces=(0).to_bytes(8, "little") + t["pieces"][8:]), "piece"),
    (lambda t: t.update(piece_bytes=(5 << 20).to_bytes(8, "little") + t["piece_bytes"][8:]), "piece"),
    (lambda t: t.update(pack_alignment=64, pack_below=4096), "feature bit"),
])
def test_compressed_columns_are_validated(tmp_path: Path, change: Callable[[dict[str, Any]], Any],
                                          match: str) -> None:
    path = tmp_path / "v.ckpt"
    ckptfmt.save(path, {"a": weights(300_000)}, compression="fast")
    rewrite_meta(path, lambda meta: change(meta["tensors"]))
    with pytest.raises(ckptfmt.InvalidMetadataError, match=match):
        ckptfmt.open(path)


def test_a_piece_claiming_a_huge_ratio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "z.ckpt"
    ckptfmt.save(path, {"z": np.zeros(1 << 20, np.uint8)}, compression="fast")  # zeros: tiny frames

    def shrink(meta: dict[str, Any]) -> None:
        t = meta["tensors"]
        t["piece_bytes"] = (1).to_bytes(8, "little") + t["piece_bytes"][8:]
    rewrite_meta(path, shrink)
    with pytest.raises(ckptfmt.InvalidMetadataError):
        ckptfmt.open(path)


def test_a_one_zero_reader_refuses_a_one_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckptfmt.save(tmp_path / "c.ckpt", {"w": weights(1000)}, compression="fast")
    ckptfmt.save(tmp_path / "p.ckpt", {"w": weights(1000)}, pack=True)
    monkeypatch.setattr(_versions, "KNOWN_REQUIRED_FEATURES", 0)  # what a 1.0 reader knows
    for name in ("c.ckpt", "p.ckpt"):
        with pytest.raises(ckptfmt.UnsupportedVersionError, match="feature"):
            ckptfmt.load(tmp_path / name)


def test_compressed_files_need_the_compress_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckptfmt.save(tmp_path / "c.ckpt", {"w": weights(1000)}, compression="fast")
    ckptfmt.save(tmp_path / "p.ckpt", {"w": weights(1000)}, pack=True)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(ckptfmt.MissingDependencyError, match=r"ckptfmt\[compress\]") as e:
        ckptfmt.load(tmp_path / "c.ckpt")
    assert isinstance(e.value, ImportError)
    with pytest.raises(ckptfmt.MissingDependencyError):
        ckptfmt.save(tmp_path / "d.ckpt", {"w": weights(10)}, compression="fast")
    assert not (tmp_path / "d.ckpt").exists()
    np.testing.assert_array_equal(ckptfmt.load(tmp_path / "p.ckpt")["w"], weights(1000))
    with ckptfmt.open(tmp_path / "c.ckpt") as ckpt:  # the structure reads without the codec
        assert ckpt.info("w").shape == (1000,)


def test_unknown_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        ckptfmt.save(tmp_path / "x.ckpt", {}, compression="zstd")


def test_compressed_files_never_take_the_direct_device_path(tmp_path: Path) -> None:
    numpy_backend = ckptfmt.get_backend("numpy")

    class DirectBackend:
        """A device backend with GPU-direct reads, which would read stored (compressed) bytes as data."""

        name = "direct"

        def read_to_device(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("compressed rows must be decoded on the host")

        def from_host(self, array: np.ndarray, dtype: Any, *, scalar: bool, device: str | None) -> Any:
            return numpy_backend.from_host(array, dtype, scalar=scalar, device=None)

        def view(self, *args: Any) -> Any:
            return numpy_backend.view(*args)

    w = weights(100_000)
    ckptfmt.save(tmp_path / "c.ckpt", {"w": w}, compression="fast")
    got = ckptfmt.load(tmp_path / "c.ckpt", backend=DirectBackend(), device="cuda:0")  # type: ignore[arg-type]
    assert got["w"].tobytes() == w.tobytes()


def test_diff_compares_decoded_values_across_encodings(tmp_path: Path) -> None:
    obj = state()
    for level in ("none", "fast", "maximum"):
        ckptfmt.save(tmp_path / f"{level}.ckpt", obj, compression=level)
    assert ckptfmt.diff(tmp_path / "none.ckpt", tmp_path / "fast.ckpt")["changed"] == []
    assert ckptfmt.diff(tmp_path / "fast.ckpt", tmp_path / "maximum.ckpt")["changed"] == []
    obj["w"] = obj["w"] + 1
    ckptfmt.save(tmp_path / "changed.ckpt", obj, compression="fast")
    assert "w" in ckptfmt.diff(tmp_path / "none.ckpt", tmp_path / "changed.ckpt")["changed"]
