"""Crash consistency, full disks and concurrency, proven with real processes (spec/SECURITY.md).

- SIGKILL at random moments of ``ckptfmt.save`` and ``CheckpointManager.save``: afterwards the
  target (the latest listed checkpoint) loads and verifies, the previous one is intact, and
  temporaries do not accumulate.
- ENOSPC injected at the OS calls: a typed :class:`DiskFullError`, the temporary removed, the
  previous file intact.
- Four processes racing saves to one path end with one whole file; readers opening during the
  replacements see the old or the new file, whole.

Children are forked from the test process (already importing numpy and ckptfmt), so a kill costs
milliseconds; the large-count campaigns are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import temp_leftovers

import ckptfmt
from ckptfmt._atomic import is_temp_name
from ckptfmt.errors import DiskFullError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                reason="needs fork and SIGKILL (POSIX)")


def state(step: int, n: int = 4, size: int = 16 << 10) -> dict[str, Any]:
    """A small checkpoint whose every value says which step wrote it."""
    return {"step": step, "arrays": [np.full(size, step, dtype=np.float64) for _ in range(n)]}


def check(path: Path) -> int:
    """The file is one whole checkpoint of one step (every checksum verified); return that step."""
    report = ckptfmt.verify(path)
    assert report.ok, report.errors
    got = ckptfmt.load(path, mmap=False)
    step = got["step"]
    with ckptfmt.open(path) as ckpt:
        assert ckpt.metadata["step"] == step
    assert all(np.all(a == step) for a in got["arrays"]) and len(got["arrays"]) == 4
    return int(step)


@contextlib.contextmanager
def forked(body: Callable[[], None]) -> Iterator[int]:
    """Run ``body`` in a forked child (exit status 0 when it returns, 1 on an error); yield its PID."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def kill_during(body: Callable[[], None], delay: float) -> bool:
    """Fork ``body``, SIGKILL it ``delay`` seconds after it starts; True when it was killed (not finished)."""
    r, w = os.pipe()

    def started() -> None:
        os.write(w, b"s")
        body()

    try:
        with forked(started) as pid:
            assert os.read(r, 1) == b"s"
            time.sleep(delay)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                return False
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    finally:
        os.close(r)
        os.close(w)
    return False


def child_span(body: Callable[[], None], repeat: int = 5) -> float:
    """How long ``body`` takes in a forked child, from its start to its exit (median): the window kills fall in."""
    times = []
    for _ in range(repeat):
        r, w = os.pipe()

        def started(w: int = w) -> None:
            os.write(w, b"s")
            body()

        try:
            with forked(started) as pid:
                assert os.read(r, 1) == b"s"
                t0 = time.perf_counter()
                _, status = os.waitpid(pid, 0)
                times.append(time.perf_counter() - t0)
                assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(r)
            os.close(w)
    return sorted(times)[len(times) // 2]


#: the large campaigns run only on request (CI runs ``slow`` tests too): CKPTFMT_LONG_CAMPAIGNS=1
LONG = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("CKPTFMT_LONG_CAMPAIGNS"),
                                             reason="long campaign: set CKPTFMT_LONG_CAMPAIGNS=1")]

#: kills and outcomes of the campaigns of this run, for spec/SECURITY.md (printed with -s)
FIGURES: dict[str, dict[str, int]] = {}


# ---------------------------------------------------------------- SIGKILL: ckptfmt.save


@pytest.mark.parametrize("kills", [200, pytest.param(2000, marks=LONG)])
def test_sigkill_at_random_moments_of_save(tmp_path: Path, kills: int) -> None:
    rng = random.Random(kills)
    target = tmp_path / "run.ckpt"
    ckptfmt.save(target, state(0), metadata={"step": 0})
    span = child_span(lambda: ckptfmt.save(tmp_path / "probe.ckpt", state(0)))
    os.unlink(tmp_path / "probe.ckpt")
    step, outcomes = 0, {"killed": 0, "old": 0, "new": 0, "finished": 0}
    i = 0
    while outcomes["killed"] < kills:  # kills fall anywhere in a save: before, during, after its rename
        i += 1
        assert i <= 5 * kills, outcomes
        killed = kill_during(lambda i=i: ckptfmt.save(target, state(i), metadata={"step": i}),
                             rng.uniform(0, span))
        outcomes["killed" if killed else "finished"] += 1
        now = check(target)
        assert now in (step, i), (now, step, i)  # the previous checkpoint, or the whole new one
        assert killed or now == i
        outcomes["new" if now == i else "old"] += 1
        step = now
        leftovers = [n for n in os.listdir(tmp_path) if n != target.name]
        assert all(is_temp_name(n) for n in leftovers) and len(leftovers) <= 1, leftovers  # never accumulate
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    ckptfmt.save(target, state(-1), metadata={"step": -1})  # the next save reaps the killed writer's temporary
    assert os.listdir(tmp_path) == [target.name] and check(target) == -1
    FIGURES[f"save x{kills}"] = outcomes
    print(f"\nsave x{kills}: {outcomes}")


# ---------------------------------------------------------------- SIGKILL: CheckpointManager.save


@pytest.mark.parametrize("kills", [200, pytest.param(1000, marks=LONG)])
def test_sigkill_at_random_moments_of_manager_save(tmp_path: Path, kills: int) -> None:
    torch = pytest.importorskip("torch")
    from ckptfmt._index import INDEX, step_of
    from ckptfmt.torch import CheckpointManager

    def model(step: int) -> dict[str, Any]:
        return {f"w{k}": torch.full((4096,), float(step)) for k in range(4)}

    def intact(manager: CheckpointManager, step: int) -> None:
        ckpt = manager.load(step)
        assert ckpt.step == step and all(torch.all(v == step) for v in ckpt.model_state.values())
        assert ckptfmt.verify(manager.path(step)).ok

    rng = random.Random(kills)
    probe = tmp_path.parent / f"{tmp_path.name}-probe"
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(0, model(0), rng=False)
    span = child_span(lambda: CheckpointManager(probe, keep_last=2).save(1, model(1), rng=False))
    outcomes = {"killed": 0, "finished": 0, "saved": 0, "lost-in-flight": 0}
    last = killed_since = i = 0
    while outcomes["killed"] < kills:
        i += 1
        assert i <= 5 * kills, outcomes
        killed = kill_during(lambda i=i: CheckpointManager(tmp_path, keep_last=2).save(i, model(i), rng=False),
                             rng.uniform(0, span))
        outcomes["killed" if killed else "finished"] += 1
        killed_since = killed_since + 1 if killed else 0
        manager = CheckpointManager(tmp_path, keep_last=2)  # a restarted run
        listed = [e["step"] for e in manager.list()]
        assert listed and listed[-1] in (last, i) and all(s <= i for s in listed), (listed, last, i)
        assert killed or listed[-1] == i
        outcomes["saved" if listed[-1] == i else "lost-in-flight"] += 1
        last = listed[-1]
        if i % 10 == 0:
            assert manager.latest() == listed[-1]
        intact(manager, listed[-1])  # the latest listed loads and verifies
        if len(listed) > 1:
            intact(manager, listed[-2])  # and the one before it is whole
        names = os.listdir(tmp_path)
        steps = [s for s in map(step_of, names) if s is not None]
        assert len(steps) <= 2 + killed_since, names  # keep_last, plus those kills stopped before their prune
        temps = [n for n in names if is_temp_name(n)]
        assert len(temps) <= 2, names  # at most the checkpoint's and the index's, reaped by the next save
        assert set(names) <= {INDEX, *temps, *(f"step-{s:08d}.ckpt" for s in steps)}, names
    manager.save(i + 1, model(i + 1), rng=False)
    assert sorted(os.listdir(tmp_path)) == sorted([INDEX, f"step-{last:08d}.ckpt", f"step-{i + 1:08d}.ckpt"])
    FIGURES[f"manager x{kills}"] = outcomes
    print(f"\nmanager x{kills}: {outcomes}")


# ---------------------------------------------------------------- disk full


class Enospc:
    """``os.write`` (and ``os.writev``, through :meth:`writev`) failing with ENOSPC after ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.real = os.write
        self.real_writev = os.writev

    def _spend(self, n: int) -> None:
        if n > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n

    def __call__(self, fd: int, data: Any) -> int:
        self._spend(memoryview(data).nbytes)
        return self.real(fd, data)

    def writev(self, fd: int, buffers: Any) -> int:
        self._spend(sum(memoryview(b).nbytes for b in buffers))
        return self.real_writev(fd, buffers)


def full_disk(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Inject a disk that fills up after ``budget`` bytes into ``os.write`` and ``os.writev``."""
    fake = Enospc(budget)
    monkeypatch.setattr(os, "write", fake)
    monkeypatch.setattr(os, "writev", fake.writev)


@pytest.mark.parametrize("budget", [0, 4096, 100_000, 300_000])
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  budget: int) -> None:
    target = tmp_path / "model.ckpt"
    ckptfmt.save(target, state(1), metadata={"step": 1})
    before = target.read_bytes()
    full_disk(monkeypatch, budget)
    with pytest.raises(DiskFullError) as info:
        ckptfmt.save(target, state(2, size=64 << 10), metadata={"step": 2})
    monkeypatch.undo()
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and isinstance(e, ckptfmt.CheckpointError)
    assert "no space left" in str(e) and str(target) in str(e) and "previous file is untouched" in str(e)
    assert target.read_bytes() == before and temp_leftovers(tmp_path) == [] and check(target) == 1


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_enospc_reported_late_is_a_disk_full_error_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       call: str) -> None:
    target = tmp_path / "model.ckpt"
    ckptfmt.save(target, state(1), metadata={"step": 1})

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # NFS and quotas report it at fsync/close

    monkeypatch.setattr(os, call, full)
    with pytest.raises(DiskFullError):
        ckptfmt.save(target, state(2), metadata={"step": 2})
    monkeypatch.undo()
    assert check(target) == 1 and temp_leftovers(tmp_path) == []


def test_a_full_disk_during_a_manager_save_keeps_every_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from ckptfmt.torch import CheckpointManager

    manager = CheckpointManager(tmp_path, keep_last=2)
    for s in (1, 2):
        manager.save(s, {"w": torch.full((20_000,), float(s))}, rng=False)
    full_disk(monkeypatch, 50_000)
    with pytest.raises(DiskFullError):
        manager.save(3, {"w": torch.full((20_000,), 3.0)}, rng=False)
    monkeypatch.undo()
    assert [e["step"] for e in manager.list()] == [1, 2] and manager.latest() == 2
    assert temp_leftovers(tmp_path) == []
    assert torch.all(manager.load().model_state["w"] == 2)


# ---------------------------------------------------------------- concurrency


def test_four_processes_racing_saves_on_one_path_end_with_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.ckpt"

    def racer(base: int) -> Callable[[], None]:
        def body() -> None:
            for k in range(25):
                ckptfmt.save(target, state(base + k), metadata={"step": base + k})
        return body

    with contextlib.ExitStack() as stack:
        pids = [stack.enter_context(forked(racer(1000 * p))) for p in range(1, 5)]
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    assert check(target) % 1000 == 24  # one writer's last save, whole
    assert os.listdir(tmp_path) == [target.name]


def test_readers_opening_during_replacements_see_old_or_new_whole(tmp_path: Path) -> None:
    target = tmp_path / "live.ckpt"
    ckptfmt.save(target, state(0), metadata={"step": 0})
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        for k in range(1, 10**9):
            ckptfmt.save(target, state(k), metadata={"step": k}, durable=False)

    def reader() -> None:
        try:
            while not stop.is_set():
                with ckptfmt.open(target) as ckpt:
                    step = ckpt.metadata["step"]
                    got = ckpt.load(mmap=bool(len(seen) % 2))
                assert got["step"] == step and all(np.all(a == step) for a in got["arrays"])
                seen.append(step)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    with forked(writer):
        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(seen) > 50 and len(set(seen)) > 5, (len(seen), len(set(seen)))  # replaced under the readers
    FIGURES["readers"] = {"reads": len(seen), "versions seen": len(set(seen))}


def test_print_figures() -> None:
    """Prints what the campaigns of this session measured (run with -s), for spec/SECURITY.md."""
    for name, figures in FIGURES.items():
        print(f"\n{name}: {figures}")
