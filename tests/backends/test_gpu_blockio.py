"""CUDA through the public block I/O: ckptfmt.torch.open(device="cuda"), slices and chunked device loads.

Marked ``gpu``; skips where torch or a CUDA device is missing (CI has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.errors import ChecksumMismatchError

pytestmark = pytest.mark.gpu


@pytest.fixture
def torch_cuda() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch


def test_torch_open_on_cuda_gets_and_slices_on_the_device(torch_cuda: Any, tmp_path: Path) -> None:
    torch = torch_cuda
    import ckptfmt.torch as ct

    w = torch.randn(64, 33, dtype=torch.float32)
    p = tmp_path / "g.ckpt"
    ct.save(p, {"w": w, "h": w.to(torch.bfloat16), "i": torch.arange(10)})
    with ct.open(p, device="cuda") as c:
        got = c.get("w")
        assert got.device.type == "cuda" and torch.equal(got.cpu(), w)
        part = c.get_slice("w")[5:40:3, ::-2]
        assert part.device.type == "cuda" and torch.equal(part.cpu(), w[5:40:3].flip(1)[:, ::2])
        assert torch.equal(c.get_slice("h")[:].cpu(), w.to(torch.bfloat16))
        assert all(t.device.type == "cuda" for t in c.load().values())
        assert c.get("i", device="cpu").device.type == "cpu"


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_cuda_loads_rotate_pinned_buffers_and_verify_at_the_end(torch_cuda: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    torch = torch_cuda
    from ckptfmt.backends import _cuda

    monkeypatch.setattr(_cuda, "CHUNK", chunk)
    _cuda._LOCAL.__dict__.clear()  # fresh staging buffers of the patched size
    state = {f"t{i}": torch.randn(3000 + i, dtype=torch.float64) for i in range(5)}
    p = tmp_path / "c.ckpt"
    ckptfmt.save(p, state)
    got = ckptfmt.load(p, backend="torch", device="cuda")
    assert all(torch.equal(got[k].cpu(), v) for k, v in state.items())
    with ckptfmt.open(p) as c:
        info = c.info("t3")
    data = bytearray(p.read_bytes())
    data[info.offset + info.nbytes // 2] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="t3"):
        ckptfmt.load(p, backend="torch", device="cuda")
    ok = ckptfmt.load(p, backend="torch", device="cuda", verify=False)
    assert not torch.equal(ok["t3"].cpu(), state["t3"]) and torch.equal(ok["t4"].cpu(), state["t4"])


def test_read_into_pinned_memory(torch_cuda: Any, tmp_path: Path) -> None:
    torch = torch_cuda
    a = np.arange(1 << 20, dtype=np.float32)
    p = tmp_path / "p.ckpt"
    ckptfmt.save(p, {"a": a})
    out = torch.empty(a.size, dtype=torch.float32, pin_memory=True)
    with ckptfmt.open(p) as c:
        c.read_into("a", out)
    assert out.is_pinned() and torch.equal(out, torch.from_numpy(a))
    with ckptfmt.open(p) as c, pytest.raises(TypeError, match="cuda"):
        c.read_into("a", out.cuda())


def test_cupy_open_gets_and_slices_on_the_device(tmp_path: Path) -> None:
    cupy = pytest.importorskip("cupy")
    try:
        if not cupy.cuda.runtime.getDeviceCount():
            pytest.skip("needs a CUDA device for cupy")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("needs a CUDA device for cupy")
    import ckptfmt.cupy as cc

    a = np.arange(60, dtype=np.float32).reshape(6, 10)
    p = tmp_path / "c.ckpt"
    ckptfmt.save(p, {"a": a})
    with cc.open(p) as c:
        assert isinstance(c.get("a"), cupy.ndarray) and np.array_equal(c.get("a").get(), a)
        assert np.array_equal(c.get_slice("a")[1:4, ::-3].get(), a[1:4, ::-3])
