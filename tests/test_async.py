"""Background saves: staging into a bounded pool, handles, errors, and crashes mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt._atomic import is_temp_name

SLAB = 1 << 16


def _state(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((300, 257)).astype(np.float32),  # spans several slabs
            "b": rng.standard_normal(7),
            "t": np.arange(24, dtype=np.int64).reshape(4, 6).T,  # strided: converted while staged
            "s": np.float16(1.5), "e": np.empty((0, 3), np.float32),
            "nested": [{"x": np.ones(5, np.uint8)}, 3, "text"]}


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_background_equals_foreground(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    state = _state()
    ckptfmt.save(tmp_path / "fg.ckpt", state)
    pool = ckptfmt.StagingPool(8 * SLAB, slab=SLAB)
    h = ckptfmt.save(tmp_path / "bg.ckpt", state, background=True, staging=pool)
    assert isinstance(h, ckptfmt.SaveHandle)
    h.wait()
    assert h.done() and h.exception() is None and "done" in repr(h)
    assert (tmp_path / "bg.ckpt").read_bytes() == (tmp_path / "fg.ckpt").read_bytes()
    _same(ckptfmt.load(tmp_path / "bg.ckpt"), state)
    assert pool.allocated <= pool.capacity


def test_changes_after_return_cannot_reach_the_checkpoint(tmp_path: Path) -> None:
    state = _state()
    expect = {k: np.copy(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    pool = ckptfmt.StagingPool(1 << 24, slab=SLAB)
    for i in range(3):  # the pool's slabs are reused across saves
        h = ckptfmt.save(tmp_path / f"{i}.ckpt", state, background=True, staging=pool)
        state["w"][:] = -1.0  # right after the call returns, while the writer may still run
        state["t"][...] = 0
        assert h is not None
        h.wait()
        got = ckptfmt.load(tmp_path / f"{i}.ckpt")
        np.testing.assert_array_equal(got["w"], expect["w"])
        np.testing.assert_array_equal(got["t"], expect["t"])
        state["w"][:] = expect["w"]
        state["t"][...] = expect["t"]
    assert pool.allocated <= 1 << 24


def test_large_pieces_copied_on_threads_are_complete_at_return(tmp_path: Path) -> None:
    """Pieces of 1 MiB and more are copied on the pool's threads; all are done when the call returns."""
    big = {f"b{i}": np.full((1024, 1024 + i), i, np.float32) for i in range(6)}  # 4 MiB each
    expect = {k: v.copy() for k, v in big.items()}
    pool = ckptfmt.StagingPool(12 << 20, slab=2 << 20)  # smaller than the state: writer runs meanwhile
    h = ckptfmt.save(tmp_path / "b.ckpt", big, background=True, staging=pool)
    for v in big.values():
        v[:] = -1
    assert h is not None
    h.wait()
    _same(ckptfmt.load(tmp_path / "b.ckpt"), expect)
    assert pool.allocated <= 12 << 20


def test_pool_smaller_than_the_state_stays_bounded(tmp_path: Path) -> None:
    """The call waits for slabs the writer frees; the pool never grows past its capacity."""
    state = {f"a{i}": np.full(50_000, i, np.float32) for i in range(20)}  # 4 MB through a 256 KiB pool
    pool = ckptfmt.StagingPool(4 * SLAB, slab=SLAB)
    h = ckptfmt.save(tmp_path / "x.ckpt", state, background=True, staging=pool)
    assert h is not None
    h.wait()
    assert pool.allocated == 4 * SLAB
    _same(ckptfmt.load(tmp_path / "x.ckpt"), state)


def test_errors_surface_at_wait_or_at_the_next_save(tmp_path: Path) -> None:
    pool = ckptfmt.StagingPool(4 * SLAB, slab=SLAB)
    missing = tmp_path / "no-such-dir" / "x.ckpt"
    h = ckptfmt.save(missing, _state(), background=True, staging=pool)
    assert h is not None
    with pytest.raises(FileNotFoundError):
        h.wait()
    assert isinstance(h.exception(), FileNotFoundError)
    ckptfmt.save(tmp_path / "ok.ckpt", _state(), background=True, staging=pool).wait()  # type: ignore[union-attr]
    # nobody waits for the failed one: the next save through the pool reports it, once
    ckptfmt.save(missing, _state(), background=True, staging=pool)
    with pytest.raises(FileNotFoundError):
        ckptfmt.save(tmp_path / "next.ckpt", _state(), background=True, staging=pool)
    h = ckptfmt.save(tmp_path / "next.ckpt", _state(), background=True, staging=pool)
    assert h is not None
    h.wait()
    _same(ckptfmt.load(tmp_path / "next.ckpt"), _state())


def test_bad_objects_raise_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ckptfmt.UnsupportedObjectError, match="'bad'"):
        ckptfmt.save(tmp_path / "x.ckpt", {"bad": object()}, background=True)
    assert not (tmp_path / "x.ckpt").exists()


def test_pool_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ckptfmt.StagingPool(10, slab=100)


def test_wait_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptfmt._writer

    real = ckptfmt._writer.write_all

    def slow(fd: Any, data: memoryview) -> None:
        time.sleep(0.2)
        real(fd, data)

    monkeypatch.setattr(ckptfmt._writer, "write_all", slow)
    h = ckptfmt.save(tmp_path / "x.ckpt", _state(), background=True, staging=ckptfmt.StagingPool(1 << 22, slab=SLAB))
    assert h is not None
    with pytest.raises(TimeoutError):
        h.wait(timeout=0.01)
    assert not h.done() and "running" in repr(h)
    h.wait()
    assert h.done()


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import ckptfmt, ckptfmt._writer
    path = sys.argv[1]
    ckptfmt.save(path, {"v": np.zeros(1 << 20, np.float32), "gen": 1})
    real = ckptfmt._writer.write_all
    def slow(fd, data):  # a slow disk: the kill lands while the new file is half written
        real(fd, data)
        time.sleep(0.05)
    ckptfmt._writer.write_all = slow
    h = ckptfmt.save(path, {"v": np.ones(1 << 22, np.float32), "gen": 2}, background=True,
                     staging=ckptfmt.StagingPool(1 << 20, slab=1 << 16))
    print("staging", flush=True)
    h.wait()
    print("finished", flush=True)
""")


def test_sigkill_mid_background_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "staging"
    deadline = time.monotonic() + 30
    while not any(is_temp_name(n) and os.path.getsize(tmp_path / n) > (1 << 20) for n in os.listdir(tmp_path)):
        assert time.monotonic() < deadline and proc.poll() is None, "the background write never started"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    got = ckptfmt.load(path)
    assert got["gen"] == 1 and not got["v"].any()  # the previous checkpoint, whole
    assert ckptfmt.verify(path).ok
    ckptfmt.save(path, {"gen": 3})  # the next save clears the dead process's temporary
    assert [n for n in os.listdir(tmp_path) if is_temp_name(n)] == []


def test_saves_from_several_threads_through_one_pool_take_turns(tmp_path: Path) -> None:
    import threading

    pool = ckptfmt.StagingPool(4 * SLAB, slab=SLAB)
    handles: list[Any] = []

    def save(i: int) -> None:
        handles.append(ckptfmt.save(tmp_path / f"{i}.ckpt", _state(i), background=True, staging=pool))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for h in handles:
        h.wait()
    for i in range(4):
        _same(ckptfmt.load(tmp_path / f"{i}.ckpt"), _state(i))
    assert pool.allocated <= 4 * SLAB
