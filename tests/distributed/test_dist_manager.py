"""CheckpointManager with sharded steps on real ranks: FSDP2 save on every rank, retention by rank 0, restore."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_ranks as R  # noqa: E402

from ckptfmt.distributed._directory import hold_staging, is_live, release  # noqa: E402
from ckptfmt.torch import CheckpointManager  # noqa: E402


def _plain_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    return m, torch.optim.Adam(m.parameters(), lr=0.01)


def test_fsdp2_manager_save_retention_restore_and_reshard(tmp_path):
    """W=2 FSDP2: ``manager.save`` on every rank writes ``step-N/``; rank 0 prunes after each commit; a dead
    attempt is swept, a live one and foreign files are not; restore at W=2 (same next step), at W=3 and
    outside a process group (plain modules) gives the saved weights."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "notes.txt").write_text("not the manager's")
    (d / "step-7.ckpt").write_bytes(b"not a canonical step name")
    (d / "step-00000000").mkdir()  # an interrupted delete: the manager's name, no index
    (d / "step-00000000" / "rank00000.ckpt").write_bytes(b"left over")
    dead = d / ".step-00000009.ckptfmt-staging"  # a crashed save's attempt: nobody holds it
    dead.mkdir()
    (dead / "rank00000.ckpt").write_bytes(b"partial")
    live = str(d / ".step-00000010.ckptfmt-staging")  # an attempt in progress (this process writes it)
    fd = hold_staging(live)
    try:
        res = R.run(2, "manager_fsdp2", str(d))
        assert res[0]["listed"] == res[1]["listed"] == [
            [[1, True, 2]], [[1, True, 2], [2, True, 2]], [[2, True, 2], [3, True, 2]]]
        assert res[0]["full"] == res[1]["full"]
        assert sorted(os.listdir(d)) == [".step-00000010.ckptfmt-staging", "index.json", "notes.txt",
                                         "step-00000002", "step-00000003", "step-7.ckpt"]
        assert is_live(live)
    finally:
        release(fd)
    assert not is_live(live)

    m = CheckpointManager(d, keep_last=2)
    entries = m.list()
    assert [(e["step"], e["file"], e["sharded"]) for e in entries] == [
        (2, "step-00000002", True), (3, "step-00000003", True)]
    assert entries[-1]["metadata"]["loss"] == 1.5 and entries[-1]["size"] > 0
    assert m.latest(verify=True) == 3
    ck = m.load()  # consolidated, no process group
    assert ck.step == 3 and ck.config == {"lr": 0.01, "tag": "x"}

    # the saved weights, from the ranks' restore at W=2 before their extra step, are what W=3 restores
    w3 = R.run(3, "manager_restore", str(d))
    assert all(r["step"] == 3 for r in w3) and w3[0]["full"] == w3[1]["full"] == w3[2]["full"]
    for name, value in w3[0]["full"].items():
        assert torch.equal(ck.model_state[name], torch.tensor(value)), name

    model, opt = _plain_model()
    got = m.restore(model, opt)  # outside a process group, into plain modules
    assert got is not None and got.step == 3
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.tensor(w3[0]["full"][name])), name
    assert len(opt.state_dict()["state"]) == 4

    m.save(4, model, opt)  # a single-file step; the now dead attempt goes, nothing else of others does
    assert sorted(os.listdir(d)) == ["index.json", "notes.txt", "step-00000003", "step-00000004.ckpt",
                                     "step-7.ckpt"]
