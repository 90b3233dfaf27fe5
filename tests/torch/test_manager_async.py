"""``CheckpointManager.save(blocking=False)``: staged at once, written, indexed and pruned on a thread."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import ckptfmt  # noqa: E402
from ckptfmt.torch import CheckpointManager  # noqa: E402


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))


def test_non_blocking_saves_index_prune_and_restore(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    pool = ckptfmt.StagingPool(1 << 22, slab=1 << 16)
    snapshots = {}
    for step in (1, 2, 3):
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        h = mgr.save(step, model, opt, blocking=False, staging=pool)
        assert isinstance(h, ckptfmt.SaveHandle)
        with torch.no_grad():  # training goes on at once: the checkpoint keeps the staged values
            for p in model.parameters():
                p.add_(100.0)
    mgr.wait()
    assert h.done()
    assert [e["step"] for e in mgr.list()] == [2, 3]  # indexed, pruned
    assert mgr.latest() == 3
    dst = _model()
    ckpt = mgr.restore(dst, torch.optim.AdamW(dst.parameters(), lr=0.1))
    assert ckpt is not None and ckpt.step == 3
    for k, v in snapshots[3].items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert pool.allocated <= pool.capacity


def test_one_save_in_flight_and_errors_reach_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model)  # a blocking save still returns the path
    real = CheckpointManager._commit

    def broken(self: Any, step: int, path: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CheckpointManager, "_commit", broken)
    h = mgr.save(2, model, blocking=False)
    with pytest.raises(OSError, match="No space"):
        h.wait()
    mgr.wait()  # already reported by h.wait(): not raised twice
    h = mgr.save(3, model, blocking=False)
    h.join()
    monkeypatch.setattr(CheckpointManager, "_commit", real)
    with pytest.raises(OSError, match="No space"):  # nobody waited: the next save reports it
        mgr.save(4, model, blocking=False)
    mgr.save(5, model, blocking=False)
    mgr.save(6, model)  # blocking: waits for 5 first
    assert [e["step"] for e in mgr.list()][-2:] == [5, 6]
    assert mgr.latest() == 6
    # steps 2 and 3 were written whole (only their indexing failed): the directory lists them, so
    # keep_last=3 keeps 3, 5 and 6 and has pruned 1 and 2
    assert [e["step"] for e in mgr.list()] == [3, 5, 6]
    assert not os.path.exists(mgr.path(1))
