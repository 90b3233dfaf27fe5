"""Restored training state lives in the process's own memory: truncating or pruning the file cannot touch it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

CHILD = textwrap.dedent("""
    import gc, os, sys
    import torch
    from torch import nn
    from ckptfmt.torch import CheckpointManager, load_checkpoint, restore_checkpoint, save_checkpoint

    path, how = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    sched.step()
    expected = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}

    fresh = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1)
    if how == "manager":
        manager = CheckpointManager(os.path.dirname(path), keep_last=1)
        manager.save(1, model, opt, scheduler=sched)
        path = manager.path(1)
        ckpt = manager.restore(fresh, fresh_opt, scheduler=fresh_sched)  # kept alive on purpose
    else:
        save_checkpoint(path, model, opt, scheduler=sched, step=1)
        ckpt = load_checkpoint(path)  # mapped (the default)
        restore_checkpoint(ckpt, fresh, fresh_opt, scheduler=fresh_sched)
        del ckpt
        gc.collect()
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        maps = [line for line in f if real in line]
    print("mapped:", len(maps), flush=True)
    with open(path, "r+b") as f:  # another tool truncates the file
        f.truncate(0)
    os.unlink(path)  # and the manager prunes it
    total = 0.0
    for state in fresh_opt.state.values():  # touch every byte of the restored state
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += float(v.double().sum())
    for k, v in expected.items():
        assert torch.equal(fresh_opt.state_dict()["state"][0][k], v), k
    for p in fresh.parameters():
        total += float(p.double().sum())
    for b in fresh.buffers():
        total += float(b.double().sum())
    fresh(torch.randn(8, 64)).sum().backward()
    fresh_opt.step()  # Adam updates its moments in place: they must be writable, own memory
    print("ok", total, flush=True)
""")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("how", ["restore_checkpoint", "manager"])
def test_restored_state_survives_truncation_and_pruning_of_its_file(tmp_path: Path, how: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ck.ckpt"), how], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)  # -7 would be SIGBUS
    lines = proc.stdout.splitlines()
    assert lines[0] == "mapped: 0"  # nothing of the file stays mapped once the restore is done
    assert lines[1].startswith("ok ")
