"""Damaged files: one flipped byte in each region, truncation anywhere, files that are not checkpoints."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_byte, read_footer, truncate

import ckptfmt

STATE = {
    "a": np.arange(1000, dtype=np.float32),
    "b": np.arange(100, dtype=np.int64).reshape(10, 10),
    "c": {"d": np.linspace(0, 1, 7), "e": np.zeros(0, np.int8)},
    "step": 3,
    "s": np.float16(2.5),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "good.ckpt"
    ckptfmt.save(path, STATE)
    assert ckptfmt.verify(path).ok
    return path


@pytest.fixture
def bad(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good file, to damage."""
    return Path(shutil.copyfile(pristine, tmp_path / "bad.ckpt"))


class Regions:
    """Where each region of the pristine file lies, from the lazy reader and the footer."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        self.size = len(data)
        self.meta_off, self.meta_len, _ = read_footer(data)
        with ckptfmt.open(path) as ckpt:
            self.blobs = {k: (ckpt.info(k).offset, ckpt.info(k).nbytes) for k in ckpt.tensor_keys()}
        self.footer = self.size - 64


@pytest.fixture(scope="module")
def regions(pristine: Path) -> Regions:
    return Regions(pristine)


def test_regions_are_where_the_format_puts_them(regions: Regions) -> None:
    assert regions.blobs["a"] == (4096, 4000)
    assert regions.blobs["b"] == (8192, 800)
    assert regions.blobs["c/d"] == (12288, 56)
    assert regions.blobs["c/e"] == (0, 0)
    assert regions.blobs["s"] == (16384, 2)
    assert regions.meta_off == 20480 and regions.meta_off + regions.meta_len == regions.footer


# ---------------------------------------------------------------- one flipped byte per region


@pytest.mark.parametrize("offset", [0, 1, 4, 7])
def test_header_magic(bad: Path, offset: int) -> None:
    flip_byte(bad, offset)
    with pytest.raises(ckptfmt.BadMagicError):
        ckptfmt.load(bad)


@pytest.mark.parametrize("offset", [8, 9, 10, 12, 15, 16, 20, 24, 27, 28, 40, 55, 56, 63])
def test_header_fields_and_checksum(bad: Path, offset: int) -> None:
    flip_byte(bad, offset, 0x01)
    with pytest.raises(ckptfmt.ChecksumMismatchError) as info:
        ckptfmt.open(bad)
    assert info.value.region == "header" and info.value.key is None
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("offset", [64, 65, 1000, 4095])
def test_header_padding(bad: Path, offset: int) -> None:
    flip_byte(bad, offset, 0x10)
    with pytest.raises(ckptfmt.CorruptCheckpointError, match="padding") as info:
        ckptfmt.open(bad)
    assert not isinstance(info.value, ckptfmt.ChecksumMismatchError)
    report = ckptfmt.verify(bad)
    assert not report.ok and "padding" in report.errors[0]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("mmap", [True, False])
def test_a_blob_byte(bad: Path, regions: Regions, where: str, mmap: bool) -> None:
    off, nb = regions.blobs["b"]
    flip_byte(bad, off + {"first": 0, "middle": nb // 2, "last": nb - 1}[where], 0x04)
    with pytest.raises(ckptfmt.ChecksumMismatchError) as info:
        ckptfmt.load(bad, mmap=mmap)
    assert info.value.region == "blob" and info.value.key == "b" and "'b'" in str(info.value)
    with pytest.raises(ckptfmt.ChecksumMismatchError):
        ckptfmt.load(bad, keys=["b"], mmap=mmap)
    with ckptfmt.open(bad) as ckpt:  # opening reads no blob
        with pytest.raises(ckptfmt.ChecksumMismatchError):
            ckpt.get("b", mmap=mmap)
        report = ckpt.verify()
    assert not report.ok and report.tensors_checked == 5
    assert len(report.errors) == 1 and "'b'" in report.errors[0]
    top = ckptfmt.verify(bad)
    assert not top.ok and top.errors == report.errors
    # the damaged tensor is still readable on request, and its neighbours are intact
    raw = ckptfmt.load(bad, keys=["b"], verify=False, mmap=mmap)["b"]
    assert raw.shape == (10, 10) and not np.array_equal(raw, STATE["b"])
    assert np.sum(raw != STATE["b"]) == 1
    part = ckptfmt.load(bad, keys=["a", "c", "step"], mmap=mmap)
    np.testing.assert_array_equal(part["a"], STATE["a"])
    np.testing.assert_array_equal(part["c"]["d"], STATE["c"]["d"])
    assert part["step"] == 3


def test_a_damaged_scalar_names_its_key(bad: Path, regions: Regions) -> None:
    flip_byte(bad, regions.blobs["s"][0])
    with pytest.raises(ckptfmt.ChecksumMismatchError) as info:
        ckptfmt.load(bad, keys=["s"])
    assert info.value.key == "s"


def test_two_damaged_blobs_are_both_reported(bad: Path, regions: Regions) -> None:
    flip_byte(bad, regions.blobs["a"][0] + 5)
    flip_byte(bad, regions.blobs["c/d"][0] + 5)
    report = ckptfmt.verify(bad)
    assert not report.ok and len(report.errors) == 2
    assert "'a'" in report.errors[0] and "'c/d'" in report.errors[1]
    assert report.tensors_checked == 5


@pytest.mark.parametrize("blob", ["a", "b", "c/d", "s"])
def test_padding_after_a_blob(bad: Path, regions: Regions, blob: str) -> None:
    off, nb = regions.blobs[blob]
    flip_byte(bad, off + nb + 1, 0x01)
    report = ckptfmt.verify(bad)
    assert not report.ok and len(report.errors) == 1 and "padding" in report.errors[0]
    assert repr(blob) in report.errors[0]
    loaded = ckptfmt.load(bad)  # loads may skip padding: it is never returned as data
    np.testing.assert_array_equal(loaded["a"], STATE["a"])


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_metadata(bad: Path, regions: Regions, where: str) -> None:
    at = {"first": 0, "middle": regions.meta_len // 2, "last": regions.meta_len - 1}[where]
    flip_byte(bad, regions.meta_off + at)
    with pytest.raises(ckptfmt.ChecksumMismatchError) as info:
        ckptfmt.open(bad)
    assert info.value.region == "metadata"
    assert not ckptfmt.verify(bad).ok


@pytest.mark.parametrize("offset", [0, 7, 8, 16, 23, 24, 47, 56, 63])
def test_footer_body_and_checksum(bad: Path, regions: Regions, offset: int) -> None:
    flip_byte(bad, regions.footer + offset, 0x01)
    with pytest.raises(ckptfmt.ChecksumMismatchError) as info:
        ckptfmt.load(bad)
    assert info.value.region == "footer"


@pytest.mark.parametrize("offset", [48, 52, 55])
def test_footer_magic(bad: Path, regions: Regions, offset: int) -> None:
    flip_byte(bad, regions.footer + offset)
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        ckptfmt.load(bad)


def test_every_single_byte_flip_is_detected(tmp_path: Path) -> None:
    """Every byte of a valid file is covered by a checksum, the zero-padding rule or a magic."""
    path = tmp_path / "small.ckpt"
    ckptfmt.save(path, {"w": np.arange(5, dtype=np.float32), "e": np.zeros(0), "i": 7, "t": ("x", np.int8(3))},
                 metadata={"m": 1}, alignment=64)
    good = path.read_bytes()
    assert len(good) < 1024
    undetected = []
    for i in range(len(good)):
        damaged = bytearray(good)
        damaged[i] ^= 0x20
        path.write_bytes(bytes(damaged))
        report = ckptfmt.verify(path)
        if report.ok:
            undetected.append(i)
    assert undetected == []


# ---------------------------------------------------------------- truncation


def cut_points(r: Regions) -> dict[str, int]:
    a_off, a_nb = r.blobs["a"]
    s_off, s_nb = r.blobs["s"]
    return {
        "empty": 0, "10 bytes": 10, "magic only": 8, "header-1": 63, "header": 64, "header+1": 65,
        "mid header padding": 2000, "blob a start": a_off, "mid blob a": a_off + a_nb // 2, "blob a end": a_off + a_nb,
        "mid padding a": a_off + a_nb + 10, "blob b start": r.blobs["b"][0], "last blob end": s_off + s_nb,
        "metadata start": r.meta_off, "mid metadata": r.meta_off + r.meta_len // 2, "footer start": r.footer,
        "mid footer": r.footer + 32, "last byte missing": r.size - 1,
    }


@pytest.mark.parametrize("cut", ["empty", "10 bytes", "magic only", "header-1", "header", "header+1",
                                 "mid header padding", "blob a start", "mid blob a", "blob a end", "mid padding a",
                                 "blob b start", "last blob end", "metadata start", "mid metadata", "footer start",
                                 "mid footer", "last byte missing"])
def test_truncation_at_region_boundaries(bad: Path, regions: Regions, cut: str) -> None:
    truncate(bad, cut_points(regions)[cut])
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        ckptfmt.load(bad)
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        ckptfmt.open(bad)
    report = ckptfmt.verify(bad)
    assert not report.ok and len(report.errors) == 1


def test_every_prefix_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "small.ckpt"
    ckptfmt.save(path, {"w": np.arange(5, dtype=np.float32), "x": [1, "two"]}, alignment=64)
    good = path.read_bytes()
    wrong = []
    for n in range(len(good)):
        path.write_bytes(good[:n])
        try:
            ckptfmt.open(path)
        except ckptfmt.TruncatedCheckpointError:
            continue
        except Exception as e:  # collected and reported below
            wrong.append((n, type(e).__name__))
        else:
            wrong.append((n, "opened"))
    assert wrong == []


def test_appended_bytes_are_detected(bad: Path) -> None:
    with open(bad, "ab") as f:
        f.write(b"\x00" * 64)
    with pytest.raises(ckptfmt.CorruptCheckpointError):
        ckptfmt.load(bad)


def test_a_blob_cut_short_after_open_is_a_truncation(bad: Path, regions: Regions) -> None:
    with ckptfmt.open(bad) as ckpt:
        truncate(bad, regions.blobs["a"][0] + 100)
        with pytest.raises(ckptfmt.TruncatedCheckpointError):
            ckpt.get("a", mmap=False)


# ---------------------------------------------------------------- not a checkpoint


@pytest.mark.parametrize("content", [
    b"abc", b"PK\x03\x04" + bytes(200), b"\x89PNG\r\n\x1a\n" + bytes(200), b'{"json": true}\n' * 20,
    b"\x80\x02}q\x00." + bytes(100), b"\x00" * 4096, np.random.default_rng(7).bytes(10_000),
    b"\x89CKPS\r\n\x1a" + bytes(200),
    b"\x89CKPT\n\x1a\x00" + bytes(200),  # text-mode mangled magic: CR LF -> LF
])
def test_not_a_checkpoint(tmp_ckpt: Path, content: bytes) -> None:
    tmp_ckpt.write_bytes(content)
    with pytest.raises(ckptfmt.BadMagicError) as info:
        ckptfmt.load(tmp_ckpt)
    assert isinstance(info.value, ValueError)
    report = ckptfmt.verify(tmp_ckpt)
    assert not report.ok and len(report.errors) == 1


@pytest.mark.parametrize("n", [1, 5, 7])
def test_a_prefix_of_the_magic_is_truncated(tmp_ckpt: Path, n: int) -> None:
    tmp_ckpt.write_bytes(b"\x89CKPT\r\n\x1a"[:n])
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        ckptfmt.load(tmp_ckpt)


def test_verify_reports_and_never_raises_for_corruption(bad: Path, regions: Regions, tmp_path: Path) -> None:
    flip_byte(bad, regions.meta_off + 3)
    report = ckptfmt.verify(bad)
    assert isinstance(report, ckptfmt.VerifyReport)
    assert report.ok is False and report.path == str(bad) and "checksum" in report.errors[0]
    d = report.to_dict()
    assert d["ok"] is False and d["errors"] == report.errors
    with pytest.raises(ckptfmt.CheckpointNotFoundError):
        ckptfmt.verify(tmp_path / "missing.ckpt")


def test_header_version_field_flip_is_corruption_not_a_newer_version(bad: Path) -> None:
    data = bytearray(bad.read_bytes())
    struct.pack_into("<H", data, 8, 2)  # major 2, checksum left as it was
    bad.write_bytes(bytes(data))
    with pytest.raises(ckptfmt.ChecksumMismatchError):
        ckptfmt.load(bad)


@pytest.mark.parametrize("mmap", [True, False])
def test_damage_in_large_blobs_read_on_worker_threads(tmp_ckpt: Path, mmap: bool) -> None:
    n = (5 << 20) // 4  # 5 MiB of float32: above the size the reader hashes on worker threads
    state = {"x": np.zeros(n, np.float32), "y": np.ones(n, np.float32), "z": np.full(n, 2, np.float32)}
    ckptfmt.save(tmp_ckpt, state, durable=False)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        off = ckpt.info("y").offset
    flip_byte(tmp_ckpt, off + 12345)
    with pytest.raises(ckptfmt.ChecksumMismatchError) as info:
        ckptfmt.load(tmp_ckpt, mmap=mmap)
    assert info.value.key == "y"
    part = ckptfmt.load(tmp_ckpt, keys=["x", "z"], mmap=mmap)
    assert part["x"].sum() == 0 and part["z"][-1] == 2
    report = ckptfmt.verify(tmp_ckpt)
    assert not report.ok and len(report.errors) == 1 and "'y'" in report.errors[0]
