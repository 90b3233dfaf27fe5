"""Exports on a full disk: a typed DiskFullError (ENOSPC injected into os.write), the previous file intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert._errors import DiskFullError
from ckptfmt.convert._export import export


def full_after(limit: int) -> Any:
    """An os.write that fails with ENOSPC once ``limit`` bytes went through (a disk of that much free space)."""
    real = os.write
    written = [0]

    def write(fd: int, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if written[0] + n > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += n
        return real(fd, data)

    return write


@pytest.mark.parametrize("to", ["torch", "safetensors"])
def test_a_full_disk_raises_disk_full_and_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    to: str) -> None:
    if to == "torch":
        pytest.importorskip("torch")
    src = tmp_path / "m.ckpt"
    ckptfmt.save(src, {"w": np.arange(4096, dtype=np.float32), "b": np.ones(3, np.float64)})
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"previous export")
    monkeypatch.setattr(os, "write", full_after(3000))
    with pytest.raises(DiskFullError) as info:
        export(src, dst, to=to)
    monkeypatch.undo()
    e = info.value
    assert e.errno == errno.ENOSPC and isinstance(e, OSError) and isinstance(e, ckptfmt.CheckpointError)
    assert e.filename == str(dst) and "disk is full" in str(e)
    assert dst.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "out.bin"]  # no temporary left


def test_other_write_errors_are_not_called_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.ckpt"
    ckptfmt.save(src, {"w": np.arange(4096, dtype=np.float32)})

    def broken(fd: int, data: Any) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(OSError) as info:
        export(src, tmp_path / "out.safetensors", to="safetensors")
    assert not isinstance(info.value, DiskFullError) and info.value.errno == errno.EIO
