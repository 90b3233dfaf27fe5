"""The HDF5 export commits through ckptfmt's one atomic-file helper (issue 9: its temporary was not exclusive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptfmt

h5py = pytest.importorskip("h5py")
from ckptfmt.convert._hdf5 import export_hdf5  # noqa: E402


def test_an_export_to_a_symlink_replaces_the_file_it_points_to(tmp_path: Path) -> None:
    src = tmp_path / "a.ckpt"
    ckptfmt.save(src, {"w": np.arange(10.0)})
    real, link = tmp_path / "real.h5", tmp_path / "latest.h5"
    real.write_bytes(b"old")
    link.symlink_to(real)
    export_hdf5(src, link)
    assert link.is_symlink()
    with h5py.File(real, "r") as f:
        np.testing.assert_array_equal(f["w"][...], np.arange(10.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "latest.h5", "real.h5"]


def test_a_failed_export_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.ckpt", tmp_path / "out.h5"
    ckptfmt.save(src, {"w": np.arange(1000.0)})
    export_hdf5(src, dst)
    before = dst.read_bytes()
    ckptfmt.save(src, {"w": np.zeros(1000)})
    with pytest.raises(ValueError):
        export_hdf5(src, dst, compression="gzip", compression_opts=99)  # refused before any byte
    blob = bytearray(src.read_bytes())
    blob[4096] ^= 0xFF  # the tensor's first byte: the export fails mid-way on its checksum
    src.write_bytes(bytes(blob))
    with pytest.raises(ckptfmt.ChecksumMismatchError):
        export_hdf5(src, dst)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "out.h5"]
