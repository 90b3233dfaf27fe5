"""CheckpointManager and sharded steps in one process: naming, listing, retention, verify, attempts and liveness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import ckptfmt.distributed as cd  # noqa: E402
from ckptfmt._index import read_cache  # noqa: E402
from ckptfmt.distributed import _directory  # noqa: E402
from ckptfmt.distributed._index import INDEX_NAME  # noqa: E402
from ckptfmt.errors import CheckpointNotFoundError  # noqa: E402
from ckptfmt.torch import CheckpointManager  # noqa: E402


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Linear(5, 3)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(2, 5)).sum().backward()
    opt.step()
    return m, opt


def test_sharded_steps_are_listed_pruned_loaded_and_deleted(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    model, opt = _model()
    for s in (1, 2):
        assert m.save(s, model, opt, sharded=True, loss=0.25 * s) == str(tmp_path / f"step-{s:08d}")
    m.save(3, model, opt)  # a single-file step between sharded ones
    # a sharded checkpoint written without the manager, at the manager's name for its step, is one of its steps
    assert cd.save({"model": model.state_dict()}, m.path(4, sharded=True)) == str(tmp_path / "step-00000004")
    assert [(e["step"], e["file"], e.get("sharded", False)) for e in m.list()] == [
        (2, "step-00000002", True), (3, "step-00000003.ckpt", False), (4, "step-00000004", True)]
    assert m.path(2, sharded=None).endswith("step-00000002") and m.path(3, sharded=None).endswith(".ckpt")
    ck = m.load(2)
    assert ck.step == 2 and ck.loss == 0.5 and torch.equal(ck.model_state["weight"], model.weight.detach())
    assert m.latest() == 4
    fut = m.save(5, model, opt, sharded=True, blocking=False)  # retention counts both kinds
    assert fut.result(60) == str(tmp_path / "step-00000005")
    m.wait()
    assert sorted(os.listdir(tmp_path)) == ["index.json", "step-00000004", "step-00000005"]
    m.delete(5)
    assert [e["step"] for e in m.list()] == [4] and not os.path.exists(tmp_path / "step-00000005")
    with pytest.raises(CheckpointNotFoundError):
        m.delete(5)


def test_restore_of_a_sharded_step_outside_a_process_group(tmp_path):
    m = CheckpointManager(tmp_path)
    model, opt = _model(0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    m.save(7, model, opt, sharded=True, scheduler=sched, epoch=2, extra={"pos": [3, 4]})
    model2, opt2 = _model(1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    ck = m.restore(model2, opt2, scheduler=sched2)
    assert ck is not None and (ck.step, ck.epoch, ck.extra) == (7, 2, {"pos": [3, 4]})
    assert torch.equal(model2.weight, model.weight) and sched2.last_epoch == 1
    a, b = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])


def test_replacing_a_step_with_the_other_kind_keeps_one(tmp_path):
    m = CheckpointManager(tmp_path)
    model, opt = _model()
    m.save(5, model, opt)
    m.save(5, model, opt, sharded=True)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "step-00000005"]
    m.save(5, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "step-00000005.ckpt"]


def _damage(path: str) -> None:
    rank_file = os.path.join(path, "rank00000.ckpt")
    with open(rank_file, "r+b") as f:
        f.seek(os.path.getsize(rank_file) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_latest_verifies_sharded_steps_and_load_falls_back(tmp_path):
    m = CheckpointManager(tmp_path)
    model, opt = _model()
    m.save(1, model, opt, sharded=True)
    m.save(2, model, opt, sharded=True)
    _damage(m.path(2, sharded=True))
    assert m.latest(verify=False) == 2  # the index is fine
    assert m.latest(verify=True) == 1  # a block checksum is not
    assert m.load().step == 1
    os.unlink(os.path.join(m.path(1, sharded=True), INDEX_NAME))  # un-committed: no longer a checkpoint
    assert [e["step"] for e in m.list()] == [2]


def test_index_cache_entries_for_sharded_names_are_checked(tmp_path):
    m = CheckpointManager(tmp_path)
    model, opt = _model()
    m.save(3, model, opt, sharded=True)
    cache = read_cache(str(tmp_path))
    assert cache["step-00000003"]["sharded"] is True and cache["step-00000003"]["world_size"] == 1
    doc = json.loads((tmp_path / "index.json").read_text())
    doc["checkpoints"][0]["metadata"] = {"forged": True}
    doc["checkpoints"][0]["index_size"] += 1  # no longer matches the index file: re-read from the checkpoint
    doc["checkpoints"].append({"step": 4, "file": "step-00000004", "time": 0, "size": 1, "metadata": {}})
    (tmp_path / "index.json").write_text(json.dumps(doc))
    assert [(e["step"], "forged" in e["metadata"]) for e in m.list()] == [(3, False)]


def test_one_listing_and_delete_for_both_apis(tmp_path):
    assert cd.list_checkpoints is _directory.list_checkpoints and cd.delete is _directory.delete
    cd.save({"x": torch.ones(2)}, str(tmp_path / "a"))
    os.makedirs(tmp_path / ".a.ckptfmt-staging")
    os.makedirs(tmp_path / "b")
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert [os.path.basename(p) for p in cd.list_checkpoints(tmp_path)] == ["a"]
    with pytest.raises(CheckpointNotFoundError):
        cd.delete(tmp_path / "b")
    cd.delete(tmp_path / "a")
    assert cd.list_checkpoints(tmp_path) == []


_WRITER = """
import os, sys, time, torch
import ckptfmt.distributed as cd
from ckptfmt.distributed import _storage
real = _storage._save_ckpt
def slow(local, *a, **k):
    real(local, *a, **k)
    print("writing", flush=True)
    time.sleep(120)
_storage._save_ckpt = slow
cd.save({"x": torch.ones(3)}, sys.argv[1])
"""


def test_attempt_is_swept_only_once_its_writer_is_dead(tmp_path):
    """A real writer process: its staging directory is never listed, survives sweeps while the writer lives,
    and is removed by the next save once the writer was killed (its lock died with it)."""
    run = tmp_path / "run"
    m = CheckpointManager(run)
    model, opt = _model()
    m.save(1, model, opt, sharded=True)
    target = m.path(2, sharded=True)
    staging = _directory.staging_path(target)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, target], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        assert os.path.isdir(staging) and _directory.is_live(staging)
        m.save(3, model, opt, sharded=True)
        assert os.path.isdir(staging), "a live writer's attempt was removed"
        assert [e["step"] for e in m.list()] == [1, 3]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert os.path.isdir(staging) and not _directory.is_live(staging)
    assert [e["step"] for e in m.list()] == [1, 3]  # never listed
    m.save(4, model, opt)
    assert not os.path.exists(staging)
    assert not [n for n in os.listdir(run) if n.startswith(".")], os.listdir(run)


def test_a_second_save_of_one_checkpoint_never_removes_a_live_writers_attempt(tmp_path):
    """Two saves to the same path at once: the second is refused while the first (a real process) writes;
    once that writer is killed, its attempt is dead and the next save replaces it."""
    target = str(tmp_path / "c")
    staging = _directory.staging_path(target)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, target], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        before = sorted(os.listdir(staging))
        assert before
        with pytest.raises(Exception, match="another save of this checkpoint is in progress") as e:
            cd.save({"x": torch.zeros(3)}, target)
        assert isinstance(e.value, (FileExistsError, cd.DistributedCheckpointError))
        assert sorted(os.listdir(staging)) == before, "a live writer's files were touched"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    cd.save({"x": torch.full((3,), 7.0)}, target)
    assert cd.consolidate(target)["x"].tolist() == [7.0, 7.0, 7.0]
    assert not os.path.exists(staging)


def test_sweep_removes_only_dead_leftovers_of_the_managers_names(tmp_path):
    m = CheckpointManager(tmp_path)
    model, opt = _model()
    m.save(2, model, opt, sharded=True)
    old2 = tmp_path / ".step-00000002.ckptfmt-old"  # its step is committed and nobody commits it: garbage
    old3 = tmp_path / ".step-00000003.ckptfmt-old"  # its step is missing: kept for recovery by hand
    dead = tmp_path / ".step-00000004.ckptfmt-dead-0123456789abcdef"
    crashed = tmp_path / ".step-00000005.ckptfmt-staging"  # committed in staging, final missing: kept
    foreign = tmp_path / ".run.ckptfmt-staging"  # not a manager name
    for p in (old2, old3, dead, crashed, foreign):
        p.mkdir()
        (p / "rank00000.ckpt").write_bytes(b"x")
    (crashed / INDEX_NAME).write_bytes(b"x")
    m.save(6, model, opt)
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("."))
    assert left == [".run.ckptfmt-staging", ".step-00000003.ckptfmt-old", ".step-00000005.ckptfmt-staging"]
