"""CheckpointManager under attack and bad luck: a hostile or lost index, kills between steps, concurrent managers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ckptfmt._reader  # noqa: E402
from ckptfmt._atomic import is_temp_name  # noqa: E402
from ckptfmt._index import MAX_INDEX_BYTES, step_of  # noqa: E402
from ckptfmt.torch import CheckpointManager  # noqa: E402


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(s for s in map(step_of, os.listdir(directory)) if s is not None)


def indexed(directory: Path) -> list[int]:
    return [e["step"] for e in json.loads((directory / "index.json").read_text())["checkpoints"]]


def index_with(directory: Path, entries: list[Any]) -> None:
    doc = {"format": "ckptfmt.checkpoint-index", "version": 1, "checkpoints": entries}
    (directory / "index.json").write_text(json.dumps(doc))


# ---------------------------------------------------------------- a hostile index


def test_index_entries_naming_other_files_are_never_listed_nor_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    manager = CheckpointManager(run, keep_last=1)
    manager.save(1, net(1))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    absolute = tmp_path / "absolute.ckpt"
    absolute.write_text("precious too")
    (run / "step-1.ckpt").write_text("a name the manager never makes")
    meta = {"kind": "ckptfmt.training"}
    index_with(run, [{"step": 0, "file": "../victim", "time": 1.0, "size": 8, "metadata": meta},
                     {"step": 0, "file": str(absolute), "time": 1.0, "size": 12, "metadata": meta},
                     {"step": 1, "file": "step-1.ckpt", "time": 1.0, "size": 1, "metadata": meta},
                     {"step": True, "file": "step-00000001.ckpt"}, "junk", [1, 2], None])
    assert [e["file"] for e in manager.list()] == ["step-00000001.ckpt"]
    for step in (2, 3, 4):
        manager.save(step, net(step))
    assert victim.read_text() == "precious" and absolute.read_text() == "precious too"
    assert (run / "step-1.ckpt").exists()
    assert steps_on_disk(run) == [4] and indexed(run) == [4]


@pytest.mark.parametrize("content", [b"", b"{", b"[" * 100_000 + b"]" * 100_000, b'{"checkpoints": 7}',
                                     b"\xff\xfe garbage", b'{"checkpoints": [{"step": 1e999}]}'])
def test_a_damaged_index_falls_back_to_the_directory(tmp_path: Path, content: bytes) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2):
        manager.save(step, net(step))
    (tmp_path / "index.json").write_bytes(content)
    assert [e["step"] for e in manager.list()] == [1, 2]
    assert manager.latest() == 2 and manager.load().step == 2
    manager.save(3, net(3))
    assert indexed(tmp_path) == [1, 2, 3]


def test_an_oversized_index_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    manager.save(1, net(1))
    with open(tmp_path / "index.json", "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)
    assert [e["step"] for e in manager.list()] == [1]


def test_a_stale_index_entry_does_not_describe_a_replaced_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    manager.save(1, net(1), loss=1.0)
    doc = json.loads((tmp_path / "index.json").read_text())
    doc["checkpoints"][0]["metadata"]["loss"] = 123.0  # a lie about the file
    doc["checkpoints"][0]["time"] += 1
    (tmp_path / "index.json").write_text(json.dumps(doc))
    assert manager.list()[0]["metadata"]["loss"] == 1.0  # read back from the file itself


# ---------------------------------------------------------------- a lost index


def test_a_lost_index_does_not_restart_the_run(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, net(step))
    os.unlink(tmp_path / "index.json")
    model = net(99)
    ckpt = CheckpointManager(tmp_path, keep_last=2).restore(model)
    assert ckpt is not None and ckpt.step == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net(3).state_dict().values(),
                                                  strict=True))
    assert indexed(tmp_path) == [2, 3]  # rebuilt on open


# ---------------------------------------------------------------- kills between the steps of a save

KILL_AT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import ckptfmt._index, ckptfmt.torch.manager as m
    directory, step, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "before-index":  # the checkpoint is renamed into place, the index never written
        m.write_index = die
    else:  # the index is rewritten, the pruned files never unlinked
        real = os.unlink
        os.unlink = lambda p, *a, **k: die() if os.path.basename(p).startswith("step-") else real(p, *a, **k)
    torch.manual_seed(step)
    m.CheckpointManager(directory, keep_last=2).save(step, nn.Linear(4, 3))
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("where", ["before-index", "before-unlink"])
def test_a_kill_between_steps_leaves_no_orphan(tmp_path: Path, where: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2):
        manager.save(step, net(step))
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(tmp_path), "3", where], capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert steps_on_disk(tmp_path) == [1, 2, 3]  # step 1 not yet pruned either way
    assert manager.latest() == 3 and manager.load().step == 3  # the file is the truth
    manager.save(4, net(4))
    assert steps_on_disk(tmp_path) == [3, 4] and indexed(tmp_path) == [3, 4]  # no orphan left
    assert not [n for n in os.listdir(tmp_path) if is_temp_name(n)]


# ---------------------------------------------------------------- concurrent managers

RACER = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from ckptfmt.torch import CheckpointManager
    directory, first, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    manager = CheckpointManager(directory, keep_last=None if keep == "all" else int(keep))
    model = nn.Linear(2, 2)
    for k in range(10):
        manager.save(first + 4 * k, model, rng=False, durable=False)
""")


@pytest.mark.parametrize("keep", ["all", pytest.param("3", marks=[
    pytest.mark.slow, pytest.mark.skipif(not os.environ.get("CKPTFMT_LONG_CAMPAIGNS"),
                                         reason="long campaign: set CKPTFMT_LONG_CAMPAIGNS=1")])])
def test_four_processes_saving_through_managers_lose_nothing(tmp_path: Path, keep: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(p), keep], stderr=subprocess.PIPE)
             for p in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    expected = list(range(40)) if keep == "all" else [37, 38, 39]
    assert steps_on_disk(tmp_path) == expected
    assert indexed(tmp_path) == expected
    assert [e["step"] for e in CheckpointManager(tmp_path, keep_last=None).list()] == expected


# ---------------------------------------------------------------- every byte hashed once


def test_restore_hashes_each_byte_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    model = nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    opt.step()
    manager.save(1, model, opt, rng=False)
    with ckptfmt.open(manager.path(1)) as ckpt:
        blob_bytes = int(ckpt.manifest.tensors.nbytes.sum())
    hashed: list[int] = []
    real = ckptfmt._reader.checksum

    def counting(data: Any) -> int:
        hashed.append(memoryview(data).nbytes)
        return real(data)

    monkeypatch.setattr(ckptfmt._reader, "checksum", counting)
    target = nn.Linear(256, 256)
    assert manager.restore(target, torch.optim.Adam(target.parameters())) is not None
    big = sum(n for n in hashed if n >= 1024)  # blobs (the small ones are metadata and tiny tensors)
    assert blob_bytes <= sum(hashed) and big <= blob_bytes
    assert sum(hashed) < 1.5 * blob_bytes  # not twice, not three times


def test_the_directory_lock_falls_back_to_a_lock_file_where_directories_cannot_be_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl
    import stat

    import ckptfmt._atomic
    from ckptfmt._index import LOCK

    class NfsFcntl:
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        def flock(self, fd: int, op: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EBADF, "Bad file descriptor")  # NFS: flock emulated by POSIX locks
            fcntl.flock(fd, op)

    manager = CheckpointManager(tmp_path, keep_last=None)
    manager.save(1, net(1))
    assert not (tmp_path / LOCK).exists()  # locally the directory itself is locked
    monkeypatch.setattr(ckptfmt._atomic, "fcntl", NfsFcntl())
    manager.save(2, net(2))
    assert (tmp_path / LOCK).exists() and [e["step"] for e in manager.list()] == [1, 2]
