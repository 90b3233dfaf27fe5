"""Atomic commit: a failed, interrupted or killed save never damages the previous checkpoint."""

from __future__ import annotations

import errno
import fcntl as real_fcntl
import os
import random
import signal
import stat
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
import ckptfmt._atomic
import ckptfmt._writer
from ckptfmt._atomic import SLOTS, atomic_file, is_temp_name, open_temp, remove_stale_temps, temp_path

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
    # the save's own threads (trailing hasher, writeback) have stopped; a staging pool's idle copy
    # threads, kept for its next background save, may remain from earlier tests in this process
    assert [t.name for t in threading.enumerate()
            if t.name.startswith("ckptfmt") and not t.name.startswith("ckptfmt-stage")] == []


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
    tmp = temp_path(str(tmp_ckpt), 0)
    name = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(tmp_ckpt.parent)
    assert name.startswith(".model.ckpt.") and name.endswith(".ckptfmt-tmp.0")
    assert is_temp_name(name)
    assert temp_path(str(tmp_ckpt), 0) == tmp  # slots are fixed: the sweep probes them, never lists
    assert temp_path(str(tmp_ckpt.parent / "other.ckpt"), 0) != tmp
    overflow = os.path.basename(temp_path(str(tmp_ckpt)))
    assert is_temp_name(overflow) and overflow != os.path.basename(temp_path(str(tmp_ckpt)))  # random
    for other in ["model.ckpt", ".model.ckpt", ".model.ckpt.0123abcd.ckptfmt-tmp.x",
                  ".model.ckpt.0123abcd.ckptfmt-tmp.12", "model.ckpt.0123abcd.ckptfmt-tmp.1",
                  ".model.ckpt.0123abcd.ckptfmt-tmp.1.extra", ".model.ckpt.ckptfmt-tmp.1"]:
        assert not is_temp_name(other), other


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


# ---------------------------------------------------------------- liveness, names, links, modes, fsync

HOLDER = r"""
import os, sys, time
from ckptfmt._atomic import open_temp
tmp, fd = open_temp(sys.argv[1])
os.write(fd, b"partial")
pid = os.fork()
if pid == 0:  # the lock holder: shares the open file (and its lock) with its parent
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(tmp, pid, flush=True)
os._exit(0)  # the creator dies: its PID is dead here, as a writer's of another PID namespace looks
"""


def test_the_sweep_never_deletes_a_temporary_whose_lock_is_held(tmp_ckpt: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_ckpt)], capture_output=True, text=True, timeout=60,
                          check=True)
    tmp, holder = proc.stdout.split()
    try:
        ckptfmt.save(tmp_ckpt, {"w": np.ones(3)})  # sweeps the target's slots: the held one stays
        assert Path(tmp).read_bytes() == b"partial"
        assert remove_stale_temps(str(tmp_ckpt.parent)) == []
        assert Path(tmp).exists() and ckptfmt.load(tmp_ckpt)["w"].tolist() == [1, 1, 1]
    finally:
        os.kill(int(holder), signal.SIGKILL)
    for _ in range(200):  # the holder is reaped by init; its lock goes with its last descriptor
        if subprocess.run(["kill", "-0", holder], capture_output=True).returncode != 0:
            break
        time.sleep(0.05)
    ckptfmt.save(tmp_ckpt, {"w": np.zeros(3)})
    assert temp_leftovers(tmp_ckpt.parent) == []


def test_a_save_sweeps_only_its_own_slots_and_never_lists_the_directory(tmp_ckpt: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_ckpt.parent
    own = [temp_path(str(tmp_ckpt), s) for s in (0, 3, 7)]
    other = temp_path(str(directory / "other.ckpt"), 0)
    overflow = temp_path(str(tmp_ckpt))  # past the slots: only a directory sweep finds it
    lookalike = directory / ".model.ckpt.ckptfmt-tmp.notes.txt"
    for p in [*own, other, overflow, lookalike]:
        Path(p).write_bytes(b"stale")

    def no_listing(*args: Any) -> Any:
        raise AssertionError("a save listed the directory")

    monkeypatch.setattr(os, "listdir", no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    ckptfmt.save(tmp_ckpt, {"w": np.ones(3)})
    monkeypatch.undo()
    assert set(os.listdir(directory)) == {"model.ckpt", os.path.basename(other), os.path.basename(overflow),
                                          lookalike.name}
    assert sorted(remove_stale_temps(str(directory))) == sorted([other, overflow])
    assert set(os.listdir(directory)) == {"model.ckpt", lookalike.name}


def test_more_writers_than_slots_use_random_names(tmp_ckpt: Path) -> None:
    held = [open_temp(str(tmp_ckpt)) for _ in range(SLOTS + 2)]
    try:
        names = [os.path.basename(p) for p, _ in held]
        assert names[:SLOTS] == [os.path.basename(temp_path(str(tmp_ckpt), s)) for s in range(SLOTS)]
        assert all(is_temp_name(n) and ".ckptfmt-tmp.r" in n for n in names[SLOTS:])
        assert remove_stale_temps(str(tmp_ckpt.parent)) == []  # all held (same process, own locks)
        ckptfmt.save(tmp_ckpt, {"w": np.ones(2)})
    finally:
        for _, fd in held:
            os.close(fd)
    assert len(remove_stale_temps(str(tmp_ckpt.parent))) == SLOTS + 2
    assert os.listdir(tmp_ckpt.parent) == ["model.ckpt"]


@pytest.mark.parametrize("length", [200, 240, 255])
def test_long_target_names_fit_name_max(tmp_path: Path, length: int) -> None:
    target = tmp_path / ("x" * (length - 5) + ".ckpt")
    ckptfmt.save(target, {"w": np.arange(4)})
    assert ckptfmt.load(target)["w"].tolist() == [0, 1, 2, 3]
    for slot in (0, None):
        assert len(os.fsencode(os.path.basename(temp_path(str(target), slot)))) <= 255
    unicode = tmp_path / ("é" * 120 + ".ckpt")  # 245 bytes in UTF-8
    assert len(os.fsencode(os.path.basename(temp_path(str(unicode), None)))) <= 255
    ckptfmt.save(unicode, {"w": np.arange(2)})
    assert temp_leftovers(tmp_path) == []


def test_saving_through_a_symlink_replaces_the_file_it_names(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "step100.ckpt"
    ckptfmt.save(real, {"step": 100})
    link = tmp_path / "latest.ckpt"
    link.symlink_to(os.path.relpath(real, tmp_path))
    ckptfmt.save(link, {"step": 101})
    assert link.is_symlink() and os.readlink(link) == os.path.join("runs", "step100.ckpt")
    assert ckptfmt.load(real) == {"step": 101}
    dangling = tmp_path / "next.ckpt"
    dangling.symlink_to("runs/step200.ckpt")
    ckptfmt.save(dangling, {"step": 200})  # as open(path, "wb") would: the file the link names is created
    assert dangling.is_symlink() and ckptfmt.load(tmp_path / "runs" / "step200.ckpt") == {"step": 200}
    assert temp_leftovers(tmp_path) == [] and temp_leftovers(tmp_path / "runs") == []


def test_the_existing_files_mode_is_kept_and_new_files_honour_the_umask(tmp_path: Path) -> None:
    kept = tmp_path / "private.ckpt"
    ckptfmt.save(kept, {"v": 1})
    os.chmod(kept, 0o600)
    ckptfmt.save(kept, {"v": 2})
    assert (kept.stat().st_mode & 0o777, ckptfmt.load(kept)) == (0o600, {"v": 2})
    old = os.umask(0o027)
    try:
        ckptfmt.save(tmp_path / "new.ckpt", {"v": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "new.ckpt").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("code, ignored", [(errno.EINVAL, True), (errno.ENOTSUP, True), (errno.EBADF, True),
                                           (errno.EIO, False), (errno.EACCES, False)])
def test_fsync_directory_ignores_only_unsupported(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                                  ignored: bool) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if ignored:
        ckptfmt.save(tmp_ckpt, {"v": 1})
    else:
        with pytest.raises(OSError) as info:
            ckptfmt.save(tmp_ckpt, {"v": 1})
        assert info.value.errno == code
    monkeypatch.undo()
    assert ckptfmt.load(tmp_ckpt) == {"v": 1}  # renamed either way; only its durability was in doubt
    assert temp_leftovers(tmp_ckpt.parent) == []


class FakeMacFcntl:
    """``fcntl`` as on macOS: F_FULLFSYNC exists (flock delegates to the real one)."""

    F_FULLFSYNC = 51
    LOCK_EX, LOCK_NB = real_fcntl.LOCK_EX, real_fcntl.LOCK_NB

    def __init__(self, refuse: bool = False) -> None:
        self.full: list[int] = []
        self.refuse = refuse

    def flock(self, fd: int, op: int) -> None:
        real_fcntl.flock(fd, op)

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        assert cmd == self.F_FULLFSYNC
        if self.refuse:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        self.full.append(fd)
        return 0


@pytest.mark.parametrize("refuse", [False, True])
def test_full_fsync_where_the_platform_has_it(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                              refuse: bool) -> None:
    fake = FakeMacFcntl(refuse)
    synced: list[int] = []
    monkeypatch.setattr(ckptfmt._atomic, "fcntl", fake)
    monkeypatch.setattr(os, "fsync", synced.append)
    ckptfmt.save(tmp_ckpt, {"v": 1})
    monkeypatch.undo()
    assert (len(fake.full), len(synced)) == ((0, 2) if refuse else (2, 0))  # file and directory
    assert ckptfmt.load(tmp_ckpt) == {"v": 1}


def test_without_fcntl_liveness_is_a_failed_unlink(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows: no fcntl, no os.kill probe; a temporary whose unlink fails belongs to a live writer."""
    monkeypatch.setattr(ckptfmt._atomic, "fcntl", None)

    def no_kill(*args: Any) -> None:
        raise AssertionError("os.kill is no liveness probe on Windows (signal 0 is CTRL_C_EVENT)")

    monkeypatch.setattr(os, "kill", no_kill)
    stale = Path(temp_path(str(tmp_ckpt), 0))
    live = Path(temp_path(str(tmp_ckpt), 1))
    stale.write_bytes(b"dead writer")
    live.write_bytes(b"live writer")
    real_unlink = os.unlink

    def windows_unlink(p: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(p) == str(live):
            raise PermissionError(errno.EACCES, "The process cannot access the file: it is being used")
        real_unlink(p, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", windows_unlink)
    ckptfmt.save(tmp_ckpt, {"v": 1})
    assert not stale.exists() and live.read_bytes() == b"live writer"
    monkeypatch.undo()
    assert ckptfmt.load(tmp_ckpt) == {"v": 1}


def test_atomic_file_gives_a_seekable_file_object(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    target.write_bytes(b"old")
    with atomic_file(target) as f:
        f.write(b"hello world")
        f.seek(0)
        assert f.read(5) == b"hello"
        assert target.read_bytes() == b"old"  # nothing visible before the commit
    assert target.read_bytes() == b"hello world"
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("failed midway")
    assert target.read_bytes() == b"hello world" and temp_leftovers(tmp_path) == []


def test_h5py_writes_through_atomic_file(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    target = tmp_path / "x.h5"
    with atomic_file(target) as f, h5py.File(f, "w") as h5:
        h5["a"] = np.arange(5)
    with h5py.File(target, "r") as h5:
        assert h5["a"][()].tolist() == [0, 1, 2, 3, 4]
    assert temp_leftovers(tmp_path) == []
