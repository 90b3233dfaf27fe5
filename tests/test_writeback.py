"""Early writeback: a durable save starts the disk write of what it has written while it goes on."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
import ckptfmt._writeback
from ckptfmt._writeback import EarlyWriteback

linux_only = pytest.mark.skipif(ckptfmt._writeback._sync_file_range is None, reason="sync_file_range is Linux's")


def _spy(monkeypatch: pytest.MonkeyPatch, result: int | None = None) -> list[tuple[int, int, int]]:
    """Record each sync_file_range call; call the real one unless ``result`` is given."""
    calls: list[tuple[int, int, int]] = []
    real = ckptfmt._writeback._sync_file_range

    def spy(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes, flags))
        return result if result is not None else real(fd, offset, nbytes, flags)  # type: ignore[misc]

    monkeypatch.setattr(ckptfmt._writeback, "_sync_file_range", spy)
    monkeypatch.setattr(ckptfmt._writeback, "WINDOW", 1 << 20)
    monkeypatch.setattr(ckptfmt._writeback, "POLL", 1e-4)
    return calls


def _write_slowly(fd: int, pieces: int, size: int = 1 << 20) -> None:
    for i in range(pieces):
        os.write(fd, bytes([i]) * size)
        time.sleep(0.01)  # the thread looks many times per piece


@linux_only
def test_each_appended_stretch_is_sent_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        early = EarlyWriteback(fd)
        _write_slowly(fd, 5)
        early.stop()
        early.stop()  # idempotent
    finally:
        os.close(fd)
    assert calls, "no writeback was started"
    assert {flags for _, _, flags in calls} == {2}  # SYNC_FILE_RANGE_WRITE only: it never waits
    ends = 0
    for offset, nbytes, _ in calls:
        assert offset == ends and nbytes >= 1 << 20  # contiguous stretches from 0, each at least a window
        ends = offset + nbytes
    assert ends <= 5 << 20
    assert not [t for t in threading.enumerate() if t.name == "ckptfmt-writeback"]


def test_a_refused_call_stops_the_thread_and_the_fsync_does_it_all(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, result=-1)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        early = EarlyWriteback(fd)
        _write_slowly(fd, 4)
        assert len(calls) == 1  # refused once, never asked again
        early.stop()
    finally:
        os.close(fd)


def test_a_durable_save_starts_writeback_while_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, result=0)
    state = {f"w{i}": np.full(1 << 19, i, np.float32) for i in range(16)}  # 32 MiB

    real_write = ckptfmt._writer.write_all

    def slow_write_all(fd: Any, data: Any) -> None:
        real_write(fd, data)
        time.sleep(0.002)

    monkeypatch.setattr(ckptfmt._writer, "write_all", slow_write_all)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    ckptfmt.save(tmp_path / "x.ckpt", state, durable=True)
    assert calls and fsyncs  # started early, and still fsynced at the end
    assert all(np.array_equal(ckptfmt.load(tmp_path / "x.ckpt")[k], v) for k, v in state.items())
    calls.clear()
    ckptfmt.save(tmp_path / "y.ckpt", state, durable=False)
    assert calls == []  # a save that is not durable leaves writeback to the kernel


def test_without_sync_file_range_nothing_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckptfmt._writeback, "_sync_file_range", None)
    before = {t.ident for t in threading.enumerate()}
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        early = EarlyWriteback(fd)
        assert {t.ident for t in threading.enumerate()} == before
        early.stop()
    finally:
        os.close(fd)
    ckptfmt.save(tmp_path / "x.ckpt", {"w": np.arange(10)})
    assert ckptfmt.load(tmp_path / "x.ckpt")["w"].sum() == 45


def test_only_linux_has_it() -> None:
    assert (ckptfmt._writeback._load() is not None) == sys.platform.startswith("linux")
