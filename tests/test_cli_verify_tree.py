"""``ckptfmt verify DIR``: every .ckpt file below a directory, exit 1 if any is damaged, ``--json`` for cron."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import ckptfmt
from ckptfmt._atomic import temp_path
from ckptfmt._cli import main


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """runs/a/{1,2}.ckpt, runs/b/deep/3.ckpt, a non-checkpoint file and a leftover temporary."""
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    for rel in ("a/1.ckpt", "a/2.ckpt", "b/deep/3.ckpt"):
        ckptfmt.save(root / rel, {"w": np.arange(5000, dtype=np.float32), "name": rel})
    (root / "a" / "notes.txt").write_text("not a checkpoint")
    Path(temp_path(str(root / "a" / "4.ckpt"), 0)).write_bytes(b"half")
    return root


def test_a_healthy_tree_exits_0(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "3 checkpoint files" in out and "all OK" in out and "1 temporaries" in out


def test_every_damaged_file_is_reported_and_exits_1(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = next(leaf["offset"] for leaf in ckptfmt.inspect(tree / "a" / "2.ckpt")["leaves"] if leaf["key"] == "w")
    flip(tree / "a" / "2.ckpt", blob + 100)  # bit rot in a tensor
    with open(tree / "b" / "deep" / "3.ckpt", "r+b") as f:  # a cut copy
        f.truncate(os.path.getsize(tree / "b" / "deep" / "3.ckpt") // 2)
    (tree / "b" / "empty.ckpt").write_bytes(b"")
    assert main(["verify", str(tree)]) == 1
    out = capsys.readouterr().out
    failed = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("FAILED")]
    assert sorted(failed) == sorted(str(tree / p) for p in ("a/2.ckpt", "b/deep/3.ckpt", "b/empty.ckpt"))
    assert "4 checkpoint files" in out and "3 DAMAGED" in out


def test_json_lists_every_file(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip(tree / "a" / "1.ckpt", 3)
    assert main(["verify", "--json", str(tree)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["files"], doc["damaged"]) == (False, 3, 1)
    by_path = {r["path"]: r for r in doc["reports"]}
    assert set(by_path) == {str(tree / p) for p in ("a/1.ckpt", "a/2.ckpt", "b/deep/3.ckpt")}
    assert not by_path[str(tree / "a" / "1.ckpt")]["ok"] and by_path[str(tree / "a" / "1.ckpt")]["errors"]
    assert by_path[str(tree / "a" / "2.ckpt")]["ok"]
    assert [os.path.basename(t) for t in doc["temporaries"]] == [os.path.basename(temp_path(str(tree / "a" / "4.ckpt"),
                                                                                             0))]


def test_files_and_directories_together_and_a_missing_path(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--json", str(tree / "a"), str(tree / "b" / "deep" / "3.ckpt")]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 3
    assert main(["verify", str(tree / "missing")]) == 2
    assert main(["verify", str(tree), str(tree / "missing")]) == 2


def test_an_empty_tree_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--json", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 0


def test_symlinked_directories_are_not_followed(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "loop").symlink_to(tree)  # a cycle would never end if followed
    assert main(["verify", "--json", str(tree)]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 3


def test_progress_on_stderr_only_on_a_terminal(tree: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["verify", str(tree)]) == 0
    assert capsys.readouterr().err == ""  # not a tty, small: no bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(["verify", str(tree)]) == 0
    captured = capsys.readouterr()
    assert "verify" in captured.err and "all OK" in captured.out
    assert main(["verify", "--quiet", str(tree)]) == 0
    assert capsys.readouterr().err == ""
