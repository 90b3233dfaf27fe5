"""CheckpointManager: a directory of step checkpoints with retention, index.json, crash safety and ``ckptfmt ls``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ckptfmt  # noqa: E402
from ckptfmt import _cli  # noqa: E402
from ckptfmt._atomic import is_temp_name  # noqa: E402
from ckptfmt.errors import CheckpointNotFoundError  # noqa: E402
from ckptfmt.torch import CheckpointManager, TrainingCheckpoint  # noqa: E402


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def fill(manager: CheckpointManager, steps: list[int], **what: Any) -> dict[int, nn.Module]:
    models = {}
    for s in steps:
        models[s] = net(s)
        manager.save(s, models[s], epoch=s // 10, loss=1.0 / s, **what)
    return models


def ckpt_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".ckpt"))


def index_of(directory: Path) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(f"index.json holds {name}, which is not JSON")

    return json.loads((directory / "index.json").read_text(encoding="utf-8"), parse_constant=no_constants)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def same_params(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- save, index, retention


def test_keep_last_retention(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    fill(manager, [1, 2, 3, 4, 5, 6])
    assert ckpt_files(tmp_path) == ["step-00000004.ckpt", "step-00000005.ckpt", "step-00000006.ckpt"]
    assert [e["step"] for e in manager.list()] == [4, 5, 6]
    assert manager.latest() == 6


def test_keep_every_keeps_milestones(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=4)
    fill(manager, list(range(1, 11)))
    assert [e["step"] for e in manager.list()] == [4, 8, 9, 10]
    assert ckpt_files(tmp_path) == [f"step-{s:08d}.ckpt" for s in (4, 8, 9, 10)]


def test_keep_last_none_keeps_everything_and_bad_keep_last_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "all", keep_last=None)
    fill(manager, [1, 2, 3, 4])
    assert [e["step"] for e in manager.list()] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path / "bad", keep_last=0)


def test_index_json_lists_step_file_time_size_metadata(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    fill(manager, [30, 10, 20], metadata={"run": "r1"})
    doc = index_of(tmp_path)
    assert doc["format"] == "ckptfmt.checkpoint-index" and doc["version"] == 1
    entries = doc["checkpoints"]
    assert [e["step"] for e in entries] == [10, 20, 30]  # sorted by step, whatever the save order
    for e in entries:
        assert set(e) == {"step", "file", "time", "size", "metadata"}
        assert e["file"] == f"step-{e['step']:08d}.ckpt"
        assert e["size"] == os.path.getsize(tmp_path / e["file"])
        assert isinstance(e["time"], float) and e["time"] > 1.6e9
        assert e["metadata"] == {"kind": "ckptfmt.training", "epoch": e["step"] // 10, "step": e["step"],
                                 "loss": 1.0 / e["step"], "run": "r1"}
    assert manager.list() == entries


def test_saving_a_step_again_replaces_its_entry(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(1, net(1))
    m = net(2)
    manager.save(1, m, loss=0.5)
    assert [(e["step"], e["metadata"]["loss"]) for e in manager.list()] == [(1, 0.5)]
    assert same_params(m, manager.load(1).model_state)


def test_nan_loss_is_null_in_the_index(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, net(), loss=float("nan"))
    assert index_of(tmp_path)["checkpoints"][0]["metadata"]["loss"] is None


def test_infinite_loss_keeps_the_index_valid_json(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, net(), loss=float("inf"))
    index_of(tmp_path)


def test_index_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    fill(manager, [1])
    index = tmp_path / "index.json"
    inode = index.stat().st_ino
    fill(manager, [2])
    assert index.stat().st_ino != inode  # a new file renamed over the old one, never rewritten in place
    before = index.read_bytes()

    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if os.fspath(dst).endswith("index.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        manager.save(3, net(3))
    monkeypatch.undo()
    assert index.read_bytes() == before  # the old index, whole
    assert not [n for n in os.listdir(tmp_path) if is_temp_name(n)]
    # step-3 was complete and renamed before the index failed: the directory, not the index, is the truth
    assert manager.latest() == 3 and [e["step"] for e in manager.list()] == [1, 2, 3]
    CheckpointManager(tmp_path, keep_last=5)  # opening rebuilds the index
    assert [e["step"] for e in index_of(tmp_path)["checkpoints"]] == [1, 2, 3]


# ---------------------------------------------------------------- load, restore, delete


def test_latest_list_and_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    assert (manager.latest(), manager.list()) == (None, [])
    models = fill(manager, [5, 10, 15])
    assert manager.latest() == 15
    assert [e["step"] for e in manager.list()] == [5, 10, 15]
    latest = manager.load()
    assert isinstance(latest, TrainingCheckpoint) and latest.step == 15 and latest.epoch == 1
    assert same_params(models[15], latest.model_state)
    assert os.path.samefile(latest.path, manager.path(15))
    ten = manager.load(10)
    assert ten.step == 10 and same_params(models[10], ten.model_state)


def test_load_from_an_empty_directory(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "new")
    assert (tmp_path / "new").is_dir()
    with pytest.raises(CheckpointNotFoundError):
        manager.load()
    with pytest.raises(CheckpointNotFoundError, match=r"step-00000007\.ckpt"):
        manager.load(7)


def test_restore(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    model = net(99)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert manager.restore(model, opt) is None  # nothing to resume: a fresh run
    assert same_params(model, net(99).state_dict())

    src = net(1)
    src_opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src(torch.ones(2, 4)).sum().backward()
    src_opt.step()
    manager.save(1, src, src_opt, epoch=0)
    manager.save(2, net(2), torch.optim.SGD(net(2).parameters(), lr=0.1), epoch=0)
    ckpt = manager.restore(model, opt, step=1)
    assert ckpt is not None and ckpt.step == 1
    assert same_params(model, src.state_dict())
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], src_opt.state_dict()["state"][0]
                       ["momentum_buffer"])
    ckpt = manager.restore(model)
    assert ckpt is not None and ckpt.step == 2 and same_params(model, net(2).state_dict())
    with pytest.raises(CheckpointNotFoundError, match=r"step-00000099\.ckpt"):
        manager.restore(model, step=99)


def test_delete(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    fill(manager, [1, 2, 3])
    manager.delete(3)
    assert [e["step"] for e in manager.list()] == [1, 2] and manager.latest() == 2
    assert ckpt_files(tmp_path) == ["step-00000001.ckpt", "step-00000002.ckpt"]
    assert [e["step"] for e in index_of(tmp_path)["checkpoints"]] == [1, 2]
    with pytest.raises(CheckpointNotFoundError, match=r"step-00000003\.ckpt") as info:
        manager.delete(3)
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------- half-written checkpoints


KILLED_SAVE = textwrap.dedent("""
    # What CheckpointManager.save does first: write step-00000003.ckpt atomically. Killed halfway through
    # (blobs written, metadata and footer never), before anything is indexed. Core ckptfmt only: no torch
    # import, so the subprocess starts fast.
    import os, signal, sys
    import numpy as np
    import ckptfmt
    from ckptfmt import _writer

    def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    _writer.Writer.finish = die
    ckptfmt.save(os.path.join(sys.argv[1], "step-00000003.ckpt"),
                 {"kind": "ckptfmt.training", "version": 1, "model": {"weight": np.ones((3, 4), np.float32),
                                                                   "big": np.ones(2 << 20, np.float32)}})
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_save_killed_midway_is_never_the_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    models = fill(manager, [1, 2])
    index_before = (tmp_path / "index.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, os.fspath(tmp_path)], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [n for n in os.listdir(tmp_path) if is_temp_name(n)]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step-00000003.ckpt.")
    assert os.path.getsize(tmp_path / leftovers[0]) >= 8 << 20  # a real half-written file: blobs, no footer
    assert ckpt_files(tmp_path) == ["step-00000001.ckpt", "step-00000002.ckpt"]
    assert (tmp_path / "index.json").read_bytes() == index_before

    assert manager.latest() == 2
    assert [e["step"] for e in manager.list()] == [1, 2]
    assert same_params(models[2], manager.load().model_state)
    assert _cli.main(["ls", os.fspath(tmp_path), "--json"]) == 0  # still a readable directory

    manager.save(3, net(3))  # the next save clears the dead process's temporary
    assert not [n for n in os.listdir(tmp_path) if is_temp_name(n)]
    assert manager.latest() == 3


def test_an_unlisted_truncated_step_file_is_ignored(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    fill(manager, [1, 2])
    data = (tmp_path / "step-00000002.ckpt").read_bytes()
    (tmp_path / "step-00000003.ckpt").write_bytes(data[: len(data) // 2])
    assert manager.latest() == 2
    assert [e["step"] for e in manager.list()] == [1, 2]
    assert manager.load().step == 2


@pytest.mark.parametrize("damage", ["truncated", "emptied", "removed", "footer", "header"])
def test_latest_falls_back_past_a_broken_newest_file(tmp_path: Path, damage: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    models = fill(manager, [1, 2, 3])
    path = tmp_path / "step-00000003.ckpt"
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    elif damage == "emptied":
        path.write_bytes(b"")
    elif damage == "removed":
        path.unlink()
    elif damage == "footer":
        flip_byte(path, os.path.getsize(path) - 20)
    else:
        flip_byte(path, 3)
    assert manager.latest() == 2
    ckpt = manager.load()
    assert ckpt.step == 2 and same_params(models[2], ckpt.model_state)
    restored = net(50)
    assert manager.restore(restored).step == 2  # type: ignore[union-attr]
    assert same_params(restored, models[2].state_dict())


def test_latest_falls_back_past_a_corrupt_tensor(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    fill(manager, [1, 2, 3])
    path = tmp_path / "step-00000003.ckpt"
    offset = next(leaf["offset"] for leaf in ckptfmt.inspect(path)["leaves"] if leaf["key"] == "model/weight")
    flip_byte(path, offset)
    assert manager.latest() == 2
    assert manager.load().step == 2


def test_every_listed_file_broken_means_nothing_to_resume(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    fill(manager, [1, 2])
    for name in ckpt_files(tmp_path):
        (tmp_path / name).write_bytes(b"\0" * 10)
    assert manager.latest() is None
    assert manager.restore(net()) is None
    with pytest.raises(CheckpointNotFoundError):
        manager.load()


def test_an_unreadable_index_is_ignored_and_rebuilt(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    fill(manager, [1])
    (tmp_path / "index.json").write_text("{not json")
    assert manager.latest() == 1
    CheckpointManager(tmp_path)
    assert [e["step"] for e in index_of(tmp_path)["checkpoints"]] == [1]


# ---------------------------------------------------------------- ckptfmt ls


def test_ls_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    fill(manager, [10, 20], metadata={"run": "r1"})
    assert _cli.main(["ls", os.fspath(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "time", "(UTC)", "size", "file", "metadata"]
    assert len(lines) == 3
    for line, step in zip(lines[1:], (10, 20), strict=True):
        fields = line.split()
        assert fields[0] == str(step) and f"step-{step:08d}.ckpt" in fields
        meta = json.loads(line[line.index("{"):])
        assert meta == {"epoch": step // 10, "loss": 1.0 / step, "run": "r1"}  # kind and step left out


def test_ls_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    fill(manager, [1, 2])
    assert _cli.main(["ls", os.fspath(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == manager.list() == index_of(tmp_path)["checkpoints"]
    assert [e["step"] for e in listed] == [1, 2]


def test_ls_skips_entries_whose_file_is_gone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manager = CheckpointManager(tmp_path, keep_last=None)
    fill(manager, [1, 2])
    os.unlink(tmp_path / "step-00000002.ckpt")
    assert _cli.main(["ls", os.fspath(tmp_path), "--json"]) == 0
    assert [e["step"] for e in json.loads(capsys.readouterr().out)] == [1]


def test_ls_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["ls", os.fspath(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}: no checkpoints"
    assert _cli.main(["ls", os.fspath(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_ls_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert _cli.main(["ls", os.fspath(missing)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "not found" in out.err and os.fspath(missing) in out.err
    assert _cli.main(["ls", os.fspath(missing), "--json"]) == 2


def test_ls_corrupt_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(CheckpointManager(tmp_path), [1])
    (tmp_path / "index.json").write_text("[1, 2")
    assert _cli.main(["ls", os.fspath(tmp_path), "--json"]) == 0  # the directory is listed all the same
    assert [e["step"] for e in json.loads(capsys.readouterr().out)] == [1]


def test_ls_of_a_copied_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The index names files relative to the directory: a moved run still lists and loads."""
    fill(CheckpointManager(tmp_path / "a", keep_last=None), [1, 2])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert _cli.main(["ls", os.fspath(tmp_path / "b"), "--json"]) == 0
    assert [e["step"] for e in json.loads(capsys.readouterr().out)] == [1, 2]
    assert CheckpointManager(tmp_path / "b").load().step == 2
