"""Saves to and loads from file objects, pipes, sockets and bytes (no path, no seek)."""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptfmt
import ckptfmt.numpy
from ckptfmt._writer import SMALL_BLOB

STATE = {
    "big": np.arange(3 * SMALL_BLOB // 4, dtype=np.float32).reshape(-1, 1024),  # written in place, not batched
    "small": np.ones((3, 5), np.int16),
    "strided": np.arange(64, dtype=np.float64).reshape(8, 8)[:, ::2],
    "meta": {"step": 7, "name": "run", "betas": (0.9, 0.95)},
}


def _same(a: Any, b: Any) -> None:
    assert set(a) == set(b)
    for k in ("big", "small", "strided"):
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype
    assert a["meta"] == b["meta"]


def test_bytes_round_trip_equals_file_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    data = ckptfmt.save_bytes(STATE, metadata={"m": 1})
    ckptfmt.save(tmp_path / "a.ckpt", STATE, metadata={"m": 1})
    assert data == (tmp_path / "a.ckpt").read_bytes()  # a stream gets the very bytes of a file
    _same(ckptfmt.load_bytes(data), STATE)
    _same(ckptfmt.numpy.load_bytes(ckptfmt.numpy.save_bytes(STATE)), STATE)
    assert ckptfmt.load_bytes(bytearray(data), keys="small")["small"].shape == (3, 5)


def test_pipe_streams_both_ways() -> None:
    """A pipe cannot seek: the save streams into it while a thread loads from the other end."""
    rfd, wfd = os.pipe()
    got: list[Any] = []
    def read() -> None:
        with os.fdopen(rfd, "rb") as f:
            got.append(ckptfmt.load(f))

    reader = threading.Thread(target=read)
    reader.start()
    with os.fdopen(wfd, "wb") as f:
        assert ckptfmt.save(f, STATE) is None
    reader.join(30)
    _same(got[0], STATE)


def test_socketpair_streams() -> None:
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            ckptfmt.save(a, STATE)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    with b:
        got = ckptfmt.load(b)
    t.join(30)
    a.close()
    assert not errors
    _same(got, STATE)


def test_regular_file_objects(tmp_path: Path) -> None:
    p = tmp_path / "f.ckpt"
    with open(p, "wb") as f:  # durable: flushed and fsynced through the descriptor
        ckptfmt.save(f, STATE, durable=True)
    with open(p, "rb") as f:  # at offset 0: read in place (memory-mapped), no copy of the stream
        _same(ckptfmt.load(f), STATE)
        f.seek(0)
        with ckptfmt.open(f) as ckpt:
            assert ckpt.path == str(p) and "big" in ckpt
    with open(p, "rb", buffering=0) as raw, ckptfmt.open(raw) as ckpt:  # a raw FileIO
        np.testing.assert_array_equal(ckpt.get("small"), STATE["small"])
    buf = io.BytesIO()
    ckptfmt.save(buf, STATE)
    buf.seek(0)
    _same(ckptfmt.load(buf), STATE)


def test_stream_loads_validate_everything() -> None:
    data = bytearray(ckptfmt.save_bytes(STATE))
    with pytest.raises(ckptfmt.TruncatedCheckpointError):
        ckptfmt.load(io.BytesIO(bytes(data[:100])))
    with pytest.raises(ckptfmt.CorruptCheckpointError):
        ckptfmt.load(io.BytesIO(bytes(data[:-10])))
    bad = bytearray(data)
    bad[4096 + 5] ^= 1  # a byte of the first blob
    with pytest.raises(ckptfmt.ChecksumMismatchError, match="<BytesIO>"):
        ckptfmt.load(io.BytesIO(bytes(bad)))
    with pytest.raises(ckptfmt.ChecksumMismatchError, match="<bytes>"):
        ckptfmt.load_bytes(bytes(bad))
    with pytest.raises(ckptfmt.BadMagicError):
        ckptfmt.load_bytes(b"not a checkpoint at all, but long enough to hold a header and more " * 4)
    assert ckptfmt.load_bytes(bytes(bad), verify=False)["meta"]["step"] == 7


def test_stream_memory_is_bounded_by_its_length() -> None:
    """A tiny stream that claims a huge file costs its own size, not the claim."""
    head = ckptfmt.save_bytes({})[:64]
    with pytest.raises(ckptfmt.CheckpointError):
        ckptfmt.load(io.BytesIO(head))


def test_unusable_targets() -> None:
    with pytest.raises(TypeError, match="binary file object"):
        ckptfmt.save(object(), STATE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary file object"):
        ckptfmt.load(object())


def test_failed_stream_save_raises(tmp_path: Path) -> None:
    with open(tmp_path / "ro", "wb") as f, open(f.fileno(), "rb", closefd=False) as ro, pytest.raises(OSError):
        ckptfmt.save(ro, STATE)


@settings(max_examples=25, deadline=None)
@given(arrays=st.lists(hnp.arrays(st.sampled_from([np.float32, np.int8, np.uint64, np.bool_]),
                                  hnp.array_shapes(min_dims=0, max_dims=3, max_side=9)), max_size=5))
def test_bytes_round_trip_property(arrays: list[np.ndarray]) -> None:
    back = ckptfmt.load_bytes(ckptfmt.save_bytes({"xs": arrays}))["xs"]
    assert len(back) == len(arrays)
    for x, y in zip(arrays, back, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
