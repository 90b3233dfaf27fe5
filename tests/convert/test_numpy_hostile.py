"""npz sources with hostile members (issue 9): sizes checked before allocating, every member streamed."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ckptfmt
import ckptfmt.convert
from ckptfmt.convert._errors import CorruptSourceError, UnsupportedSourceError
from ckptfmt.convert._numpy import ZipMemberArray, read_npz


def deflated_zeros(path: Path, name: str, nbytes: int, prefix: bytes = b"") -> None:
    """A zip with one deflated member of ``prefix`` + ``nbytes`` zero bytes, compressed as it is written."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w", force_zip64=True) as m:
        m.write(prefix)
        block = bytes(16 << 20)
        for _ in range(nbytes // len(block)):
            m.write(block)


def test_a_member_that_is_not_npy_data_is_refused_after_six_bytes(tmp_path: Path) -> None:
    p = tmp_path / "bomb.npz"
    deflated_zeros(p, "payload.npy", 256 << 20)  # 256 MiB of zeros in 0.25 MB: was read whole (512 MiB peak)
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedSourceError, match=r"'payload\.npy' is not NPY data") as e:
            read_npz(str(p), allow_pickle=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and str(p) in str(e.value)
    with pytest.raises(UnsupportedSourceError):
        ckptfmt.convert(p, tmp_path / "out.ckpt")


def test_a_header_larger_than_its_member_is_refused_before_allocating(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    member = buf.getvalue() + bytes(16)
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        p = tmp_path / f"big{compression}.npz"
        with zipfile.ZipFile(p, "w", compression) as zf:
            zf.writestr("w.npy", member)
        tracemalloc.start()
        try:
            with pytest.raises(CorruptSourceError, match="'w") as e:
                read_npz(str(p), allow_pickle=False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert str(p) in str(e.value) and peak < 1 << 20


def patch_declared_size(path: Path, size: int) -> None:
    """Make the zip's central directory declare ``size`` uncompressed bytes for its first member."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, at + 24, size)
    path.write_bytes(bytes(data))


def test_a_member_declaring_more_than_deflate_can_make_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "lie.npz"
    np.savez_compressed(p, w=np.arange(10, dtype=np.int64))
    patch_declared_size(p, 0xFFFF_FFF0)
    with pytest.raises(CorruptSourceError, match="more than deflate can make"):
        read_npz(str(p), allow_pickle=False)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compression_methods_numpy_does_not_write_are_refused(tmp_path: Path, method: int) -> None:
    p = tmp_path / "m.npz"
    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    with zipfile.ZipFile(p, "w", method) as zf:
        zf.writestr("w.npy", buf.getvalue())
    with pytest.raises(UnsupportedSourceError, match="zip method"):
        read_npz(str(p), allow_pickle=False)


def test_a_compressed_fortran_order_member_streams_with_bounded_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = np.asfortranarray(rng.integers(0, 1000, size=(512, 2048), dtype=np.int64).astype(">i4"))  # 4 MiB
    p = tmp_path / "f.npz"
    np.savez_compressed(p, w=arr)
    member = read_npz(str(p), allow_pickle=False)["w"]
    assert isinstance(member, ZipMemberArray) and member.fortran_order
    want = np.ascontiguousarray(arr.astype("<i4")).reshape(-1).view(np.uint8)
    got = 0
    tracemalloc.start()
    try:
        for piece in member.chunks(256 << 10):
            assert np.array_equal(piece, want[got : got + piece.size])
            got += piece.size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == want.size
    assert peak < 2 << 20  # was the whole member, 4 MiB, read into memory at once
    ckptfmt.convert(p, tmp_path / "f.ckpt")
    assert np.array_equal(ckptfmt.load(tmp_path / "f.ckpt")["w"], arr)


def test_a_damaged_compressed_member_is_a_corrupt_source(tmp_path: Path) -> None:
    p = tmp_path / "t.npz"
    np.savez_compressed(p, w=np.random.default_rng(1).standard_normal(100_000))
    data = bytearray(p.read_bytes())
    for i in range(2000, 2064):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptSourceError, match=r"'w\.npy'"):
        ckptfmt.convert(p, tmp_path / "t.ckpt")
    assert not (tmp_path / "t.ckpt").exists()
