"""ckptfmt.migrate and ``ckptfmt migrate``: lossless, streaming, atomic (spec §15)."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt._cli import main

pytest.importorskip("zstandard")  # 1.1 targets compress
ml_dtypes = pytest.importorskip("ml_dtypes")


def state() -> dict[str, Any]:
    w = (np.random.default_rng(0).standard_normal((300, 400)) * 0.02).astype(np.float32)
    return {"w": w, "bf16": w.astype(ml_dtypes.bfloat16), "tied": [w, w.T, w[::-1]], "step": np.int64(3),
            "empty": np.zeros((0, 2), np.float16), "n": 5, "small": [np.float32(i) for i in range(5)],
            "meta": {"name": "x", "big": 1 << 63}}


def header(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:64]
    return int.from_bytes(head[10:12], "little"), int.from_bytes(head[16:20], "little")


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray | np.generic):
        return bool(a.dtype == b.dtype and a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes())
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("level", ["fast", "balanced", "maximum", "none"])
def test_round_trip_1_0_to_1_1_and_back_is_byte_identical(tmp_path: Path, level: str) -> None:
    src, mid, back = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt"
    ckptfmt.save(src, state(), metadata={"run": 1})
    ckptfmt.migrate(src, mid, to="1.1", compression=level)
    assert header(mid)[0] == 1
    assert equal(ckptfmt.load(mid), ckptfmt.load(src))
    with ckptfmt.open(mid) as m, ckptfmt.open(src) as s:
        assert (m.metadata, m.producer, m.created) == (s.metadata, s.producer, s.created)
        assert len(m.manifest.views) == len(s.manifest.views) > 0  # views stay views
    ckptfmt.migrate(mid, back, to="1.0")
    assert back.read_bytes() == src.read_bytes()  # 1.1 -> 1.0 decodes: the very same file


def test_migrate_in_place_and_refuse_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    ckptfmt.save(path, state())
    want = ckptfmt.load(path, mmap=False)
    ckptfmt.migrate(path, path, to="1.1")
    assert header(path) == (1, 3) and equal(ckptfmt.load(path), want)
    data = bytearray(path.read_bytes())
    with ckptfmt.open(path) as ckpt:
        data[ckpt.info("w").offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    other = tmp_path / "o.ckpt"
    other.write_bytes(b"previous")
    with pytest.raises(ckptfmt.ChecksumMismatchError):
        ckptfmt.migrate(path, other, to="1.0")
    assert other.read_bytes() == b"previous"  # atomic: dst untouched
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "o.ckpt"]


def test_bad_options_are_refused(tmp_path: Path) -> None:
    ckptfmt.save(tmp_path / "a.ckpt", {"x": np.ones(3)})
    with pytest.raises(ValueError, match=r"1\.0"):
        ckptfmt.migrate(tmp_path / "a.ckpt", tmp_path / "b.ckpt", to="1.0", compression="fast")
    with pytest.raises(ValueError, match=r"2\.0"):
        ckptfmt.migrate(tmp_path / "a.ckpt", tmp_path / "b.ckpt", to="2.0")
    assert main(["migrate", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--to", "1.0",
                 "--compression", "fast", "--quiet"]) == 2


def test_memory_stays_bounded(tmp_path: Path) -> None:
    big = (np.random.default_rng(0).standard_normal(8 << 20) * 0.02).astype(np.float32)  # 32 MiB
    src, dst, back = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt"
    ckptfmt.save(src, {"w": big})
    del big
    for a, b, to in ((src, dst, "1.1"), (dst, back, "1.0")):
        tracemalloc.start()
        ckptfmt.migrate(a, b, to=to)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 24 << 20, peak  # chunks in flight, never the 32 MiB tensor
    assert back.read_bytes() == src.read_bytes()


def test_cli_migrate_with_progress(tmp_path: Path) -> None:
    ckptfmt.save(tmp_path / "a.ckpt", state())
    r = subprocess.run([sys.executable, "-m", "ckptfmt", "migrate", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"),
                        "--to", "1.1", "--compression", "maximum"], capture_output=True, text=True, check=False,
                       cwd=tmp_path)  # outside the repository: the installed ckptfmt
    assert r.returncode == 0, r.stderr
    assert "migrate" in r.stderr  # the tqdm bar
    assert equal(ckptfmt.load(tmp_path / "b.ckpt"), ckptfmt.load(tmp_path / "a.ckpt"))
    assert main(["migrate", str(tmp_path / "b.ckpt"), str(tmp_path / "c.ckpt"), "--to", "1.1", "--no-pack",
                 "--quiet"]) == 0
    assert header(tmp_path / "c.ckpt") == (1, 1)
