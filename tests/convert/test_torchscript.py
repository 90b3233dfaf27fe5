"""TorchScript archives written by torch.jit.save (scripted, traced): state dict and constants, code never run."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnsupportedSourceError, convert, detect

torch = pytest.importorskip("torch")


class Sub(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 3)
        self.register_buffer("running", torch.arange(3.0))
        self.register_buffer("tmp", torch.ones(1, dtype=torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.running


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sub = Sub()
        self.seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.BatchNorm1d(3))
        self.emb = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.seq(self.sub(x)) * self.scale)


class Traced(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.offset = torch.randn(3).to(torch.float64)  # a plain attribute: tracing makes it a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset.float()


def jit_save(module: Any, path: Path, trace: bool = False) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, and still in the wild
        scripted = torch.jit.trace(module, torch.randn(4, 3)) if trace else torch.jit.script(module)
        torch.jit.save(scripted, str(path))
        return torch.jit.load(str(path))


def test_scripted_module_converts_to_its_state_dict(tmp_path: Path) -> None:
    import ckptfmt.torch

    src = tmp_path / "net.pt"
    want = jit_save(Net(), src).state_dict()
    assert detect(src) == "torchscript"
    report = convert(src, tmp_path / "net.ckpt")
    assert report.source_format == "torchscript"
    got = ckptfmt.torch.load(tmp_path / "net.ckpt")
    assert list(got) == list(want)  # same keys, same order
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    assert got["head.weight"].untyped_storage().data_ptr() == got["emb.weight"].untyped_storage().data_ptr()
    model = Net()
    model.load_state_dict({k: v for k, v in got.items() if k != "sub.tmp"})


def test_traced_module_keeps_its_constants(tmp_path: Path) -> None:
    src = tmp_path / "traced.pt"
    module = Traced()
    loaded = jit_save(module, src, trace=True)
    convert(src, tmp_path / "traced.ckpt")
    got = ckptfmt.load(tmp_path / "traced.ckpt", backend="torch")
    for k, v in loaded.state_dict().items():
        assert torch.equal(got[k], v), k
    assert list(got) == [*loaded.state_dict(), "CONSTANTS.c0"]
    assert got["CONSTANTS.c0"].dtype == torch.float64 and torch.equal(got["CONSTANTS.c0"], module.offset)


def test_the_archive_code_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting works with torch.jit.load unavailable, and a code file that would run something is only text."""
    src = tmp_path / "net.pt"
    jit_save(Net(), src)

    def no_jit(*a: Any, **k: Any) -> Any:
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    monkeypatch.setattr(torch.serialization, "load", no_jit)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "net/code/__torch__.py":
                data = b"import os\nos.system('touch PWNED')\n" + data
            zout.writestr(info, data)
    convert(evil, tmp_path / "evil.ckpt")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def _rewrite(src: Path, dst: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == member else zin.read(info))


def test_foreign_globals_and_broken_archives_are_refused(tmp_path: Path) -> None:
    import pickle

    src = tmp_path / "net.pt"
    jit_save(Net(), src)

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, ("touch PWNED",))

    bad = tmp_path / "bad.pt"
    _rewrite(src, bad, "net/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsupportedSourceError, match="system"):
        convert(bad, tmp_path / "bad.ckpt")
    _rewrite(src, bad, "net/data.pkl", b"\x80\x02garbage")
    with pytest.raises(CorruptSourceError, match="pickle is broken"):
        convert(bad, tmp_path / "bad.ckpt")
    with zipfile.ZipFile(src) as zin:
        data = zin.read("net/data.pkl")
    # a storage claiming more elements than its member holds
    _rewrite(src, bad, "net/data.pkl", data.replace(b"K\x03t", b"M\x00\x10t", 1))
    with pytest.raises(CorruptSourceError):
        convert(bad, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
