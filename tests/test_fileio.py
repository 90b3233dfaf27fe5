"""Descriptor and map lifetime (issue 9), and the portability fallbacks, simulated."""

from __future__ import annotations

import gc
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt import _fileio
from ckptfmt.errors import CheckpointClosedError


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")


def test_a_read_after_close_raises_a_typed_error(tmp_path: Path) -> None:
    p = tmp_path / "a.ckpt"
    ckptfmt.save(p, {"x": np.arange(10)})
    c = ckptfmt.open(p)
    kept = c.get("x")
    c.close()
    c.close()  # idempotent
    assert c.closed and np.array_equal(kept, np.arange(10))  # mapped arrays outlive the checkpoint
    for read in (lambda: c.get("x"), lambda: c.get("x", mmap=False), lambda: c.read_into("x", np.empty(10, int)),
                 lambda: c.get_slice("x")[:3], lambda: list(c.iter_chunks("x", 4))):
        with pytest.raises(CheckpointClosedError, match="closed"):
            read()
    assert issubclass(CheckpointClosedError, ValueError)


def test_close_during_reads_never_returns_another_files_bytes(tmp_path: Path) -> None:
    """Readers race a close; meanwhile other files are opened and may reuse the descriptor number."""
    n = 1 << 14
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    ckptfmt.save(a, {"x": np.full(n, 1, np.uint8)}, durable=False)
    ckptfmt.save(b, {"x": np.full(n, 2, np.uint8)}, durable=False)
    bad: list[Any] = []
    for _ in range(30):
        ca = ckptfmt.open(a)
        stop = threading.Event()

        def reader(c: ckptfmt.Checkpoint = ca, stop: threading.Event = stop) -> None:
            out = np.empty(n, np.uint8)
            while not stop.is_set():
                try:
                    c.read_into("x", out, verify=False)
                    if not (out == 1).all():
                        bad.append(np.unique(out))
                    got = c.get("x", mmap=False, verify=False)
                    if not (got == 1).all():
                        bad.append(np.unique(got))
                except CheckpointClosedError:
                    return
                except Exception as e:
                    bad.append(e)
                    return

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        ca.close()
        others = [ckptfmt.open(b) for _ in range(3)]  # descriptor numbers get reused here
        stop.set()
        for t in threads:
            t.join()
        for o in others:
            o.close()
    assert bad == []


@needs_proc
def test_live_loads_of_one_file_share_one_descriptor(tmp_path: Path) -> None:
    p = tmp_path / "m.ckpt"
    ckptfmt.save(p, {"x": np.arange(1000), "y": np.ones(5)})
    gc.collect()
    before = _fds()
    kept = [ckptfmt.load(p) for _ in range(50)]
    assert _fds() - before <= 1  # was 50: one duplicated descriptor per load
    assert all(np.array_equal(k["x"], np.arange(1000)) for k in kept)
    del kept
    gc.collect()
    assert _fds() <= before


def _map_of(arr: np.ndarray) -> Any:
    base: Any = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def test_numpy_loads_map_read_only_and_torch_loads_copy_on_write(tmp_path: Path) -> None:
    p = tmp_path / "m.ckpt"
    ckptfmt.save(p, {"x": np.arange(1000, dtype=np.int64)})
    arr = ckptfmt.load(p)["x"]
    mm = _map_of(arr)
    assert isinstance(mm, mmap.mmap)
    with pytest.raises(TypeError):
        mm[0] = 1  # ACCESS_READ: no private copy-on-write commitment for a read-only load
    torch = pytest.importorskip("torch")
    import ckptfmt.torch as ct

    before = p.read_bytes()
    t = ct.load(p)["x"]
    t += 1  # writable: private pages
    assert torch.equal(t, torch.arange(1, 1001)) and p.read_bytes() == before
    assert np.array_equal(ckptfmt.load(p)["x"], np.arange(1000))  # the shared read-only map never saw it


@pytest.mark.parametrize("method", ["pread", "seek"])
def test_reads_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Windows has neither os.preadv nor os.pread: seek + readinto under a lock."""
    monkeypatch.setattr(_fileio, "READ_METHOD", method)
    if method == "seek":
        monkeypatch.delattr(os, "pread", raising=False)
        monkeypatch.delattr(os, "preadv", raising=False)
    else:
        monkeypatch.delattr(os, "preadv", raising=False)
    p = tmp_path / "w.ckpt"
    state = {f"t{i}": np.arange(i * 1000, (i + 1) * 1000, dtype=np.int64) for i in range(8)}
    ckptfmt.save(p, state)
    with ckptfmt.open(p) as c:
        got = c.load(mmap=False)
        assert all(np.array_equal(got[k], v) for k, v in state.items())
        errors: list[BaseException] = []

        def worker(k: str) -> None:
            out = np.empty(1000, np.int64)
            try:
                for _ in range(50):
                    c.read_into(k, out)
                    assert np.array_equal(out, state[k])
                    assert np.array_equal(c.get_slice(k)[10:20], state[k][10:20])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in state]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_populate_read_only_where_defined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(mmap, "MADV_POPULATE_READ", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _fileio._populate_read_advice() is None  # never a Linux number on another kernel
    monkeypatch.setattr(sys, "platform", "linux")
    assert _fileio._populate_read_advice() == 22
    monkeypatch.setattr(mmap, "MADV_POPULATE_READ", 99, raising=False)
    assert _fileio._populate_read_advice() == 99

    calls: list[int] = []

    class FakeMap:
        def madvise(self, advice: int, start: int, length: int) -> None:
            calls.append(advice)
            if advice != getattr(mmap, "MADV_WILLNEED", None):
                raise OSError(22, "EINVAL")  # an older kernel

    monkeypatch.setattr(_fileio, "POPULATE_READ", None)
    _fileio.madvise_populate(FakeMap(), 0, 10)  # type: ignore[arg-type]
    assert calls == [x for x in [getattr(mmap, "MADV_WILLNEED", None)] if x is not None]
    calls.clear()
    monkeypatch.setattr(_fileio, "POPULATE_READ", 22)
    _fileio.madvise_populate(FakeMap(), 0, 10)  # type: ignore[arg-type]
    assert calls[0] == 22  # tried first, then the fallback


def test_torch_loads_byteswap_on_a_big_endian_host() -> None:
    """We cannot run big-endian; the decision and the swap are tested on their own."""
    pytest.importorskip("torch")
    from ckptfmt.backends.torch import native_bytes

    from ckptfmt import DTYPES

    a = np.arange(6, dtype="<f4")
    assert np.shares_memory(native_bytes(a, DTYPES["float32"], "little"), a)  # no copy on little-endian
    swapped = native_bytes(a, DTYPES["float32"], "big")
    assert swapped.tobytes() == a.astype(">f4").tobytes()
    c = np.array([1 + 2j, 3 - 4j], dtype="<c8")
    assert native_bytes(c, DTYPES["complex64"], "big").tobytes() == c.astype(">c8").tobytes()  # each half
    u = np.arange(4, dtype=np.uint8)
    assert native_bytes(u, DTYPES["uint8"], "big").tobytes() == u.tobytes()
    bf = np.array([0x3F80, 0x4000], dtype="<u2").view("V2")  # bfloat16 bits without ml_dtypes
    assert native_bytes(bf, DTYPES["bfloat16"], "big").tobytes() == np.array([0x3F80, 0x4000], ">u2").tobytes()
