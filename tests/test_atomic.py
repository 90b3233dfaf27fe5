"""Atomic commit: a failed, interrupted or killed save never damages the previous checkpoint."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import temp_leftovers

import ckptfmt
import ckptfmt._writer
from ckptfmt._atomic import is_temp_name, remove_stale_temps, temp_path

OLD = {"w": np.arange(1000, dtype=np.float32), "step": 1}


@pytest.fixture
def old_file(tmp_ckpt: Path) -> tuple[Path, bytes]:
    ckptfmt.save(tmp_ckpt, OLD, metadata={"v": "old"})
    return tmp_ckpt, tmp_ckpt.read_bytes()


def assert_untouched(path: Path, content: bytes) -> None:
    assert path.read_bytes() == content
    assert temp_leftovers(path.parent) == []
    assert ckptfmt.load(path)["step"] == 1


def big_state(n: int = 3, mb: int = 5) -> dict[str, np.ndarray]:
    return {f"t{i}": np.full(mb * (1 << 20) // 8, i, dtype=np.float64) for i in range(n)}


# ---------------------------------------------------------------- failures in the process


def test_an_unsupported_late_leaf_fails_before_any_file_is_created(old_file: tuple[Path, bytes],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = old_file
    opened: list[str] = []
    real_open = os.open

    def recording_open(p: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    state = {"tensors": [np.ones(100) for _ in range(50)] + [{1, 2}]}
    with pytest.raises(ckptfmt.UnsupportedObjectError, match="tensors/50"):
        ckptfmt.save(path, state)
    monkeypatch.undo()
    assert not any("ckptfmt-tmp" in p for p in opened)
    assert_untouched(path, content)


def test_bad_metadata_fails_before_any_file_is_created(old_file: tuple[Path, bytes]) -> None:
    path, content = old_file
    with pytest.raises(ckptfmt.UnsupportedObjectError):
        ckptfmt.save(path, big_state(1), metadata={"x": object()})
    assert_untouched(path, content)


@pytest.mark.parametrize("fail_at, exc", [(1, OSError(errno.ENOSPC, "No space left on device")),
                                          (3, OSError(errno.EIO, "I/O error")), (2, KeyboardInterrupt())])
def test_a_write_failing_midway_leaves_the_old_file(old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
                                                    fail_at: int, exc: BaseException) -> None:
    path, content = old_file
    calls = []
    real = ckptfmt._writer.write_all

    def flaky(fd: int, data: Any) -> None:
        calls.append(len(data))
        if len(calls) == fail_at:
            raise exc
        real(fd, data)

    monkeypatch.setattr(ckptfmt._writer, "write_all", flaky)
    with pytest.raises(type(exc)):
        ckptfmt.save(path, big_state())
    monkeypatch.undo()
    assert len(calls) == fail_at
    assert_untouched(path, content)
    assert [t.name for t in threading.enumerate() if t.name.startswith("ckptfmt")] == []  # hashing thread stopped


def test_a_failing_fsync_leaves_the_old_file(old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = old_file

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        ckptfmt.save(path, {"w": np.ones(10)})
    monkeypatch.undo()
    assert_untouched(path, content)


def test_a_failing_rename_leaves_the_old_file(old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = old_file

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        ckptfmt.save(path, {"w": np.ones(10)})
    monkeypatch.undo()
    assert_untouched(path, content)


def test_durable_false_skips_fsync_and_still_commits(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    ckptfmt.save(tmp_ckpt, {"w": np.arange(5.0)}, durable=False)
    assert synced == []
    ckptfmt.save(tmp_ckpt, {"w": np.arange(6.0)}, durable=True)
    assert len(synced) == 2  # the file, then its directory
    monkeypatch.undo()
    assert ckptfmt.load(tmp_ckpt)["w"].tolist() == [0, 1, 2, 3, 4, 5]
    assert temp_leftovers(tmp_ckpt.parent) == []


def test_saving_into_a_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "x.ckpt"
    with pytest.raises(FileNotFoundError):
        ckptfmt.save(target, {"w": np.ones(2)})
    assert os.listdir(tmp_path) == []


def test_replacing_does_not_disturb_arrays_mapped_from_the_old_file(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"w": np.zeros(1000)})
    old = ckptfmt.load(tmp_ckpt)["w"]
    old_inode = tmp_ckpt.stat().st_ino
    ckptfmt.save(tmp_ckpt, {"w": np.ones(1000)})
    assert tmp_ckpt.stat().st_ino != old_inode  # a new file was renamed over the path
    assert old.sum() == 0 and ckptfmt.load(tmp_ckpt)["w"].sum() == 1000


def test_concurrent_saves_to_one_path_leave_one_complete_file(tmp_ckpt: Path) -> None:
    errors: list[BaseException] = []

    def worker(value: int) -> None:
        try:
            for _ in range(5):
                ckptfmt.save(tmp_ckpt, {"w": np.full(300_000, value), "v": value})
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = ckptfmt.load(tmp_ckpt)
    assert got["v"] in (1, 2) and np.all(got["w"] == got["v"])
    assert ckptfmt.verify(tmp_ckpt).ok and temp_leftovers(tmp_ckpt.parent) == []


# ---------------------------------------------------------------- temporaries


def test_temp_names_are_recognised(tmp_ckpt: Path) -> None:
    tmp = temp_path(str(tmp_ckpt))
    name = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(tmp_ckpt.parent)
    assert name.startswith(".model.ckpt.ckptfmt-tmp.") and f".{os.getpid()}." in name
    assert is_temp_name(name)
    assert temp_path(str(tmp_ckpt)) != tmp  # random part
    for other in ["model.ckpt", ".model.ckpt", ".model.ckpt.ckptfmt-tmp.host.12.zzzzzzzz",
                  ".model.ckpt.ckptfmt-tmp.host.x12.0123abcd", "model.ckpt.ckptfmt-tmp.host.12.0123abcd",
                  ".model.ckpt.ckptfmt-tmp.host.12.0123abcd.extra", ".m.ckptfmt-tmp.ho st.12.0123abcd"]:
        assert not is_temp_name(other), other


def with_pid(template: str, pid: int, tag: str = "0123abcd") -> str:
    """A temporary name as a process ``pid`` of this host would have made it."""
    return re.sub(r"\.\d+\.[0-9a-f]{8}$", f".{pid}.{tag}", os.path.basename(template))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_stale_temporaries_are_removed_by_the_next_save(tmp_ckpt: Path) -> None:
    directory = tmp_ckpt.parent
    template = temp_path(str(tmp_ckpt))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = with_pid(template, dead_pid(), "0000dead")
        other_target = with_pid(temp_path(str(directory / "other.ckpt")), dead_pid(), "0000beef")
        alive = with_pid(template, sleeper.pid, "000a11fe")
        mine = with_pid(template, os.getpid(), "0000a1e5")
        other_host = re.sub(r"ckptfmt-tmp\.[^.]+\.", "ckptfmt-tmp.some-other-host.", dead)
        lookalike = ".model.ckpt.ckptfmt-tmp.notes.txt"
        for name in (dead, other_target, alive, mine, other_host, lookalike):
            (directory / name).write_bytes(b"partial")
        ckptfmt.save(tmp_ckpt, {"w": np.ones(3)})
        left = set(os.listdir(directory))
        assert dead not in left and other_target not in left  # dead writers of this host
        assert {alive, mine, other_host, lookalike, "model.ckpt"} == left
        sleeper.kill()
        sleeper.wait()
        assert remove_stale_temps(str(directory)) == [str(directory / alive)]
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert set(os.listdir(directory)) == {mine, other_host, lookalike, "model.ckpt"}


# ---------------------------------------------------------------- SIGKILL at random moments

CHILD = r"""
import sys, numpy as np, ckptfmt
target, first = sys.argv[1], int(sys.argv[2])
arrays = [np.empty(50 << 17, dtype=np.float64) for _ in range(4)]  # 4 x 50 MiB
print("ready", flush=True)
step = first
while True:
    for a in arrays:
        a.fill(step)
    print("start", step, flush=True)
    ckptfmt.save(target, {"arrays": arrays, "step": step}, metadata={"step": step})
    print("saved", step, flush=True)
    step += 1
"""


def run_child(target: Path, first: int, wait_for: str, delay: float) -> tuple[int, list[str]]:
    """Start a saving loop, wait for a line starting with ``wait_for``, sleep ``delay``, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(first)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    lines = []
    try:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            assert line, f"child ended early: {lines}"
            lines.append(line.strip())
            if line.startswith(wait_for):
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid, lines


def check_consistent(target: Path) -> int:
    """The file at ``target`` is a complete checkpoint of one step; return that step."""
    report = ckptfmt.verify(target)
    assert report.ok, report.errors
    with ckptfmt.open(target) as ckpt:
        step = ckpt.metadata["step"]
        got = ckpt.load(mmap=False)
    assert got["step"] == step and len(got["arrays"]) == 4
    for a in got["arrays"]:
        assert a.shape == (50 << 17,) and a[0] == step and a[-1] == step and np.all(a == step)
    return int(step)


@pytest.mark.slow
def test_sigkill_during_saves_never_damages_the_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1234)
    target = tmp_path / "run.ckpt"
    try:
        _, lines = run_child(target, 0, "saved 0", 0)  # the first complete checkpoint
        step = check_consistent(target)
        assert step == 0
        kills = [("start", rng.uniform(0.0, 0.3)) for _ in range(3)] + [("ready", rng.uniform(0.0, 1.5))
                                                                          for _ in range(2)]
        for i, (wait_for, delay) in enumerate(kills):
            first = 100 * (i + 1)
            _, lines = run_child(target, first, wait_for, delay)
            saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
            now = check_consistent(target)
            assert now == step or now >= first, (now, step, lines)  # the old one, or one of this child's
            if saved:
                assert now >= max(saved)
            step = now
            names = [n for n in os.listdir(tmp_path) if n != target.name]
            assert all(is_temp_name(n) for n in names), names  # never anything else, never a partial target
        ckptfmt.save(target, {"done": True})  # the next save sweeps temporaries of the killed writers
        assert os.listdir(tmp_path) == [target.name]
        assert ckptfmt.load(target) == {"done": True}
    finally:
        for p in tmp_path.iterdir():
            p.unlink()
