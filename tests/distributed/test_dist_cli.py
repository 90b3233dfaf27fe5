"""``ckptfmt inspect/verify/consolidate`` on a sharded directory, and ``ckptfmt.load`` of one."""

from __future__ import annotations

import json
import os

import pytest

import ckptfmt
from ckptfmt._cli import main

torch = pytest.importorskip("torch")
import ckptfmt.distributed as cd  # noqa: E402


@pytest.fixture()
def sharded(tmp_path):
    p = str(tmp_path / "s")
    cd.save({"model": {"w": torch.ones(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}, "step": 9}, p,
            options=cd.SaveOptions(metadata={"run": "x"}))
    return p


def test_consolidate_cli(sharded, tmp_path, capsys):
    out = str(tmp_path / "one.ckpt")
    assert main(["consolidate", sharded, out]) == 0
    state = ckptfmt.load(out)
    assert state["step"] == 9 and state["model"]["w"].shape == (3, 4) and float(state["model"]["w"].sum()) == 12
    assert ckptfmt.verify(out).ok


def test_inspect_and_verify_cli(sharded, capsys):
    assert main(["inspect", sharded, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kind"] == "sharded" and s["world_size"] == 1 and s["metadata"] == {"run": "x"}
    assert {t["key"] for t in s["tensors"]} == {"model.w", "model.b"}
    assert main(["verify", sharded]) == 0
    assert "OK" in capsys.readouterr().out
    rank_file = next(n for n in os.listdir(sharded) if n.endswith(".ckpt"))
    with open(os.path.join(sharded, rank_file), "r+b") as f:
        f.seek(4096)
        f.write(b"\xff\xff")
    assert main(["verify", sharded]) == 1


def test_load_of_a_sharded_dir_needs_no_torch_import(sharded):
    """consolidate is numpy-only: the torch-free part of ckptfmt.distributed imports without torch."""
    import subprocess
    import sys

    code = ("import sys, ckptfmt; s = ckptfmt.load(sys.argv[1]); assert s['step'] == 9; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, sharded], check=True)
