"""The writer's batched small-blob path: blobs written in place with one ``writev`` per batch, in order."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from conftest import ml_dtypes
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfmt
import ckptfmt._writer
from ckptfmt._writer import _IOV_MAX, BUFFER_SIZE, SMALL_BLOB

PROPERTY = settings(max_examples=40, deadline=None, database=None)
DTYPES = ["uint8", "int16", "float32", "float64", ">f4", ">i8", "complex64"] + \
    (["bfloat16"] if ml_dtypes is not None else [])


def _array(kind: str, dtype: str, n: int, seed: int) -> np.ndarray:
    dt = np.dtype(getattr(ml_dtypes, dtype)) if dtype == "bfloat16" else np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, max(2 * n * dt.itemsize, 1), dtype=np.uint8)
    flat = raw[: 2 * n * dt.itemsize].view(dt)
    if kind == "strided":
        return flat[::2]
    if kind == "scalar":
        return flat[0] if n else np.zeros((), dt)[()]
    if kind == "2d" and n >= 2:
        return flat[: n - n % 2].reshape(2, -1)
    return flat[:n]


arrays = st.tuples(st.sampled_from(["flat", "strided", "2d", "scalar"]), st.sampled_from(DTYPES),
                   st.sampled_from([0, 1, 3, 100, 1000, SMALL_BLOB // 8 - 1, SMALL_BLOB // 8 + 1, 40000]),
                   st.integers(0, 1 << 16))


def _little(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(x.dtype.newbyteorder("<")) if x.dtype.byteorder == ">" else x


def _same(a: Any, b: Any) -> bool:
    """Equal dtype (byte order aside: files are little-endian), shape and bits."""
    a, b = _little(a), _little(b)
    return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())


@PROPERTY
@given(st.lists(arrays, min_size=1, max_size=120), st.sampled_from([64, 4096, 1 << 17]), st.booleans())
def test_mixed_rows_round_trip_and_match_a_stream(tmp_path_factory: pytest.TempPathFactory, specs: list[Any],
                                                  alignment: int, checksum: bool) -> None:
    state = {f"t{i}": _array(*spec) for i, spec in enumerate(specs)}
    path = tmp_path_factory.mktemp("w") / "x.ckpt"
    with mock.patch.dict(os.environ, {"SOURCE_DATE_EPOCH": "0"}):  # both files get the same time
        ckptfmt.save(path, state, alignment=alignment, checksum=checksum, durable=False)
        buf = io.BytesIO()  # a callable sink gets the same bytes as a file descriptor
        ckptfmt.save(buf, state, alignment=alignment, checksum=checksum, durable=False)
    assert buf.getvalue() == path.read_bytes()
    back = ckptfmt.load(path)
    assert all(_same(back[k], v) for k, v in state.items())
    if checksum:
        assert ckptfmt.verify(path).ok


def test_many_small_blobs_span_several_batches(tmp_path: Path) -> None:
    n = 3 * _IOV_MAX + 7  # more buffers than one writev takes, and more bytes than one batch
    state = {f"t{i}": np.full(1 + i % 700, i, np.float32) for i in range(n)}
    ckptfmt.save(tmp_path / "x.ckpt", state, durable=False)
    assert (tmp_path / "x.ckpt").stat().st_size > 2 * BUFFER_SIZE
    back = ckptfmt.load(tmp_path / "x.ckpt")
    assert all(np.array_equal(back[k], v) for k, v in state.items())
    assert ckptfmt.verify(tmp_path / "x.ckpt").ok


def test_short_writev_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev
    calls = []

    def short(fd: int, buffers: Any) -> int:  # writes at most 1000 bytes, ending mid-buffer
        calls.append(len(buffers))
        total, out = 0, []
        for b in buffers:
            view = memoryview(b).cast("B") if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8).data
            out.append(view[: 1000 - total])
            total += len(out[-1])
            if total >= 1000:
                break
        return real(fd, out)

    monkeypatch.setattr(ckptfmt._writer.os, "writev", short)
    state = {f"t{i}": np.arange(i, i + 300, dtype=np.float64) for i in range(50)}
    ckptfmt.save(tmp_path / "x.ckpt", state, durable=False)
    assert calls and max(calls) > 1
    back = ckptfmt.load(tmp_path / "x.ckpt")
    assert all(np.array_equal(back[k], v) for k, v in state.items())


def test_bool_bytes_other_than_0_and_1_are_stored_as_1(tmp_path: Path) -> None:
    """numpy keeps any byte a buffer gave a bool array; the file stores 0 or 1 (§6) and still verifies."""
    odd = np.frombuffer(b"\x00\x02\x01\xff" * 3, dtype=np.bool_)
    strided = np.frombuffer(b"\x00\x07" * 4, dtype=np.bool_)[::2]  # all 0: kept as is, no copy needed
    mixed = np.frombuffer(b"\x05\x00" * 4, dtype=np.bool_)[::2]
    for checksum in (True, False):
        p = tmp_path / f"b{checksum}.ckpt"
        ckptfmt.save(p, {"odd": odd, "strided": strided, "mixed": mixed, "many": [odd] * 40}, checksum=checksum)
        assert ckptfmt.verify(p).ok
        got = ckptfmt.load(p)
        assert got["odd"].view(np.uint8).tolist() == [0, 1, 1, 1] * 3
        assert got["strided"].tolist() == [False] * 4
        assert got["mixed"].view(np.uint8).tolist() == [1] * 4
    assert odd.view(np.uint8).tolist() == [0, 2, 1, 255] * 3  # the caller's array is not changed


# ---------------------------------------------------------------- the trailing hasher

def _mixed_large_state() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {"emb": rng.standard_normal((700, 1024)).astype(np.float32),          # 2.7 MiB: several pieces
            "bias": rng.standard_normal(300).astype(np.float32),                # small: hashed in its run
            "w": [rng.standard_normal(200_000) for _ in range(6)],              # 1.5 MiB each
            "odd": rng.standard_normal(1_000_003).astype(np.float32)[::3],       # converted: hashed inline
            "big_endian": rng.standard_normal(300_000).astype(">f8"),
            "step": 3}


def _saved_bytes(path: Path, state: dict[str, Any], monkeypatch: pytest.MonkeyPatch, *, trail_after: int) -> bytes:
    monkeypatch.setattr(ckptfmt._writer, "TRAIL_AFTER", trail_after)
    monkeypatch.setattr(ckptfmt._writer, "_CORES", 2)
    with mock.patch.dict(os.environ, {"SOURCE_DATE_EPOCH": "0"}):
        ckptfmt.save(path, state, durable=False)
    return path.read_bytes()


class _Counting(ckptfmt._writer._TrailingHasher):
    started = 0

    def __init__(self) -> None:
        type(self).started += 1
        super().__init__()


def test_blobs_hashed_behind_the_write_give_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _mixed_large_state()
    monkeypatch.setattr(ckptfmt._writer, "_TrailingHasher", _Counting)
    monkeypatch.setattr(_Counting, "started", 0)
    inline = _saved_bytes(tmp_path / "inline.ckpt", state, monkeypatch, trail_after=1 << 62)
    assert _Counting.started == 0
    trailing = _saved_bytes(tmp_path / "trailing.ckpt", state, monkeypatch, trail_after=0)
    assert _Counting.started == 1
    assert trailing == inline  # the same checksums, whichever thread computed them
    assert ckptfmt.verify(tmp_path / "trailing.ckpt").ok
    back = ckptfmt.load(tmp_path / "trailing.ckpt")
    assert all(np.array_equal(a, b) for a, b in zip(back["w"], state["w"], strict=True))
    assert not [t for t in threading.enumerate() if t.name == "ckptfmt-hash"]


def test_the_trailing_hasher_starts_only_after_a_threshold_and_with_a_second_core(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"w{i}": np.full(1 << 18, i, np.float32) for i in range(4)}  # 1 MiB each
    monkeypatch.setattr(ckptfmt._writer, "_TrailingHasher", _Counting)
    monkeypatch.setattr(_Counting, "started", 0)
    _saved_bytes(tmp_path / "a.ckpt", state, monkeypatch, trail_after=3 << 20)  # the 4th row trails
    assert _Counting.started == 1
    monkeypatch.setattr(ckptfmt._writer, "_CORES", 1)
    ckptfmt.save(tmp_path / "b.ckpt", state, durable=False)
    monkeypatch.setattr(ckptfmt._writer, "_CORES", 2)
    ckptfmt.save(tmp_path / "c.ckpt", state, durable=False, checksum=False)
    assert _Counting.started == 1
    assert ckptfmt.verify(tmp_path / "a.ckpt").ok and ckptfmt.verify(tmp_path / "b.ckpt").ok


class _Broken(ckptfmt._writer._TrailingHasher):
    def add(self, row: int, piece: Any, last: bool) -> None:
        super().add(row, object(), last)  # not a buffer: the hasher thread's update raises TypeError


def test_an_error_on_the_trailing_hasher_fails_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.ckpt"
    ckptfmt.save(path, {"old": np.arange(3)})
    before = path.read_bytes()
    monkeypatch.setattr(ckptfmt._writer, "_TrailingHasher", _Broken)
    with pytest.raises(TypeError):
        _saved_bytes(path, _mixed_large_state(), monkeypatch, trail_after=0)
    assert path.read_bytes() == before
    assert not [t for t in threading.enumerate() if t.name == "ckptfmt-hash"]
