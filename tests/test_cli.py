"""The ``ckptfmt`` command: inspect, verify, diff and demo, through ``main()`` and as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckptfmt
from ckptfmt._cli import main


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "a.ckpt"
    ckptfmt.save(path, {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": 5, "tag": "x"},
                 metadata={"run": "r1"})
    return path


def test_inspect_text(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "ckptfmt 1.0" in out and "1 tensors" in out
    assert "model/w" in out and "float32" in out and "2x3" in out
    assert "step" in out and '"run": "r1"' in out


def test_inspect_json(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(saved)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format_version"] == "1.0"
    assert doc["tensor_count"] == 1
    assert doc["metadata"] == {"run": "r1"}
    leaves = {leaf["key"]: leaf for leaf in doc["leaves"]}
    assert leaves["model/w"]["shape"] == [2, 3] and leaves["model/w"]["dtype"] == "float32"
    assert leaves["step"] == {"key": "step", "kind": "value", "type": "int", "value": 5}


def test_verify_ok_and_json(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(saved)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert main(["verify", "--json", str(saved)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["tensors_checked"] == 1 and report["bytes_checked"] == 24


def test_verify_names_the_corrupted_tensor(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ckptfmt.open(saved) as ckpt:
        offset = ckpt.info("model/w").offset
    data = bytearray(saved.read_bytes())
    data[offset + 3] ^= 0x40
    saved.write_bytes(bytes(data))
    assert main(["verify", str(saved)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and "model/w" in out and "checksum" in out
    assert main(["verify", "--json", str(saved)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and any("model/w" in e for e in report["errors"])


def test_verify_structural_corruption_exits_1(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(saved.read_bytes())
    data[20] ^= 1  # inside the header: header checksum mismatch
    saved.write_bytes(bytes(data))
    assert main(["verify", str(saved)]) == 1
    assert "header checksum" in capsys.readouterr().out


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope.ckpt")]) == 2


def test_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    w = np.ones(4, np.float32)
    ckptfmt.save(a, {"w": w, "same": np.zeros(2), "gone": 1, "n": 1})
    ckptfmt.save(b, {"w": w + 1, "same": np.zeros(2), "new": 2, "n": 1})
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == ["+ new", "- gone", "~ w"]
    assert main(["diff", "--json", str(a), str(b)]) == 1
    assert json.loads(capsys.readouterr().out) == {"only_a": ["gone"], "only_b": ["new"], "changed": ["w"]}
    assert main(["diff", str(a), str(a)]) == 0
    assert "no differences" in capsys.readouterr().out


def test_demo_runs_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo: all steps OK" in out and "detected" in out
    assert (tmp_path / "step100.ckpt").exists()


def test_console_entry_point_as_module(saved: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ckptfmt", "verify", "--json", str(saved)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True


def test_inspect_times_a_load_onto_a_device(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", "--device", "cpu", str(saved)]) == 0
    timing = json.loads(capsys.readouterr().out)["device_load"]
    assert timing["device"] == "cpu" and timing["bytes"] == 24 and timing["seconds"] > 0
    assert timing["backend"] in ("torch", "numpy")
    assert main(["inspect", "--device", "cpu", str(saved)]) == 0
    assert "load onto cpu" in capsys.readouterr().out


def test_convert_and_export_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "a.npz"
    np.savez(src, w=np.arange(6, dtype=np.float32), b=np.ones(2))
    dst = tmp_path / "a.ckpt"
    assert main(["convert", "--json", str(src), str(dst)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_format"] == "npz" and report["tensors"] == 2
    assert sorted(ckptfmt.load(dst)) == ["b", "w"]
    pytest.importorskip("h5py")
    h5 = tmp_path / "a.h5"
    assert main(["export", str(dst), str(h5), "--to", "hdf5", "--compression", "gzip"]) == 0
    back = tmp_path / "b.ckpt"
    assert main(["convert", "--quiet", str(h5), str(back)]) == 0
    capsys.readouterr()
    assert main(["diff", "--json", str(dst), str(back)]) == 0
    assert main(["export", str(dst), str(tmp_path / "x.st"), "--to", "safetensors", "--chunks"]) == 2
    assert "hdf5 only" in capsys.readouterr().err


def test_convert_refuses_unknown_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"definitely not a checkpoint" * 10)
    assert main(["convert", "--quiet", str(junk), str(tmp_path / "o.ckpt")]) == 2
    assert "ckptfmt: error" in capsys.readouterr().err
    assert not (tmp_path / "o.ckpt").exists()
