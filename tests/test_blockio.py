"""Block I/O on Checkpoint: read_into, iter_chunks, get_slice (issue 10), and row lookups by number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt import _fileio, _slice
from ckptfmt.errors import CheckpointKeyError, ChecksumMismatchError


def _state() -> dict[str, Any]:
    w = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    return {"w": w, "b": np.arange(10, dtype=np.int64), "n": 3, "v": w[1:3],  # v: a view of w (§4.7)
            "s": np.float64(2.5), "e": np.zeros((0, 4), np.int16), "big": np.arange(300_000, dtype=np.int32)}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "b.ckpt"
    ckptfmt.save(p, _state())
    return p


def _corrupt(path: Path, key: str, at: int = -1) -> None:
    with ckptfmt.open(path) as c:
        info = c.info(key)
    data = bytearray(path.read_bytes())
    data[info.offset + (info.nbytes + at if at < 0 else at)] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- read_into


@pytest.mark.parametrize("kind", ["numpy", "bytearray", "memoryview", "torch", "row"])
def test_read_into_fills_any_writable_buffer(path: Path, kind: str) -> None:
    w = _state()["w"]
    with ckptfmt.open(path) as c:
        if kind == "numpy":
            out: Any = np.empty_like(w)
            assert c.read_into("w", out) == w.nbytes
            assert np.array_equal(out, w)
        elif kind in ("bytearray", "memoryview"):
            buf = bytearray(w.nbytes)
            c.read_into("w", buf if kind == "bytearray" else memoryview(buf))
            assert bytes(buf) == w.tobytes()
        elif kind == "torch":
            torch = pytest.importorskip("torch")
            t = torch.empty(w.shape, dtype=torch.float32)
            c.read_into("w", t)
            assert torch.equal(t, torch.from_numpy(w))
        else:
            row = c.manifest.tree["w"]  # a tensor leaf of the decoded tree is its row number
            out = np.empty(w.nbytes, np.uint8)
            c.read_into(row, out)
            assert out.tobytes() == w.tobytes()


def test_read_into_refuses_wrong_buffers_and_non_tensors(path: Path) -> None:
    with ckptfmt.open(path) as c:
        with pytest.raises(ValueError, match="bytes"):
            c.read_into("w", np.empty(3, np.float32))
        ro = np.empty((6, 7, 5), np.float32)
        ro.flags.writeable = False
        with pytest.raises(TypeError, match="read-only"):
            c.read_into("w", ro)
        with pytest.raises(TypeError, match="read-only"):
            c.read_into("w", bytes(6 * 7 * 5 * 4))
        with pytest.raises(ValueError, match="contiguous"):
            c.read_into("w", np.empty((6, 7, 10), np.float32)[:, :, ::2])
        with pytest.raises(CheckpointKeyError, match="view"):
            c.read_into("v", np.empty(2 * 7 * 5, np.float32))
        with pytest.raises(CheckpointKeyError, match="not a tensor"):
            c.read_into("n", bytearray(8))
        with pytest.raises(CheckpointKeyError, match="row"):
            c.read_into(10_000, bytearray(8))


def test_read_into_verifies_unless_told_not_to(path: Path) -> None:
    _corrupt(path, "big")
    out = np.empty(300_000, np.int32)
    with ckptfmt.open(path) as c:
        with pytest.raises(ChecksumMismatchError, match="'big'") as e:
            c.read_into("big", out)
        assert e.value.key == "big"
        c.read_into("big", out, verify=False)  # the caller's choice: bytes as stored
    assert out[-1] != 299_999 and np.array_equal(out[:-1], np.arange(299_999))


def test_read_into_splits_large_blobs_across_threads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptfmt import _reader

    monkeypatch.setattr(_reader, "_PARALLEL_MIN", 1 << 10)
    monkeypatch.setattr(_reader, "_WORKERS", 3)
    out = np.empty(300_000, np.int32)
    with ckptfmt.open(path) as c:
        c.read_into("big", out)
    assert np.array_equal(out, np.arange(300_000))


@pytest.mark.parametrize("mmap", [False, True])
def test_a_load_reads_and_hashes_medium_blobs_on_threads_and_reports_the_damaged_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mmap: bool) -> None:
    import threading

    from ckptfmt import _reader

    monkeypatch.setattr(_reader, "_WORKERS", 3)
    state = {f"m{i}": np.full(70_000 + i, i, np.float32) for i in range(12)}  # >= _THREAD_MIN each
    state["small"] = np.arange(10)
    p = tmp_path / "m.ckpt"
    ckptfmt.save(p, state)
    ran: set[str] = set()
    real = _reader.checksum

    def recording(data: Any) -> int:
        ran.add(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(_reader, "checksum", recording)
    back = ckptfmt.load(p, mmap=mmap)
    assert all(np.array_equal(back[k], v) for k, v in state.items())
    assert any(name.startswith("ckptfmt-read") for name in ran)
    _corrupt(p, "m7", at=1000)
    with pytest.raises(ChecksumMismatchError, match="'m7'"):
        ckptfmt.load(p, mmap=mmap)
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptfmt-read")]


# ---------------------------------------------------------------- iter_chunks


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20, 1 << 30])
def test_iter_chunks_yields_the_blob_in_bounded_pieces(path: Path, size: int) -> None:
    expect = np.arange(300_000, dtype=np.int32).tobytes()
    if size == 1:
        expect = np.arange(10, dtype=np.int64).tobytes()
    key = "b" if size == 1 else "big"
    with ckptfmt.open(path) as c:
        chunks = [bytes(ch) for ch in c.iter_chunks(key, size)]
    assert b"".join(chunks) == expect
    assert all(len(ch) <= size for ch in chunks) and all(len(ch) == size for ch in chunks[:-1])


def test_iter_chunks_into_rotating_buffers(path: Path) -> None:
    bufs = [np.empty(5000, np.uint8), np.empty(5000, np.uint8)]
    got = bytearray()
    with ckptfmt.open(path) as c:
        for k, ch in enumerate(c.iter_chunks("big", 4096, buffers=bufs)):
            assert np.shares_memory(np.frombuffer(ch, np.uint8), bufs[k % 2])
            got += ch
        with pytest.raises(ValueError, match="buffer"):
            next(c.iter_chunks("big", 8192, buffers=bufs))
    assert bytes(got) == np.arange(300_000, dtype=np.int32).tobytes()


@pytest.mark.parametrize("at", [0, -1])
def test_iter_chunks_never_completes_a_corrupt_blob(path: Path, at: int) -> None:
    """The checksum covers the whole blob: it is checked before the last chunk is handed over."""
    _corrupt(path, "big", at)
    size = 1 << 16
    total = -(-300_000 * 4 // size)
    received = []
    with ckptfmt.open(path) as c:
        with pytest.raises(ChecksumMismatchError):
            for ch in c.iter_chunks("big", size):
                received.append(bytes(ch))
        assert len(received) == total - 1
        assert len(list(c.iter_chunks("big", size, verify=False))) == total
        with pytest.raises(ChecksumMismatchError):  # a one-chunk blob: nothing is yielded at all
            next(c.iter_chunks("big", 1 << 30))


def test_iter_chunks_of_an_empty_tensor_and_bad_sizes(path: Path) -> None:
    with ckptfmt.open(path) as c:
        assert list(c.iter_chunks("e", 16)) == []
        with pytest.raises(ValueError, match="positive"):
            c.iter_chunks("b", 0)


# ---------------------------------------------------------------- get_slice


def test_get_slice_matches_numpy_and_reads_only_what_it_needs(path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    w = _state()["w"]
    read: list[int] = []
    real = _fileio.SharedFile.readinto_held

    def counting(self: Any, fd: int, dest: memoryview, offset: int) -> int:
        read.append(len(dest))
        return real(self, fd, dest, offset)

    monkeypatch.setattr(_fileio.SharedFile, "readinto_held", counting)
    with ckptfmt.open(path) as c:
        sl = c.get_slice("w")
        assert sl.shape == (6, 7, 5) and sl.get_shape() == [6, 7, 5] and sl.dtype == "float32" and len(sl) == 6
        read.clear()  # what opening read
        got = sl[2:4]
        assert np.array_equal(got, w[2:4]) and got.flags.writeable and got.flags.c_contiguous
        assert sum(read) == 2 * 7 * 5 * 4 and len(read) == 1  # one contiguous run: the two rows
        read.clear()
        assert np.array_equal(sl[-1, 3], w[-1, 3]) and sum(read) == 5 * 4
        big = c.get_slice("big")
        read.clear()
        assert np.array_equal(big[1000:1010], np.arange(1000, 1010)) and sum(read) == 40
        assert big[5] == 5 and big[-1] == 299_999


def test_get_slice_reads_wide_columns_row_by_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.arange(64 * 40_000, dtype=np.float32).reshape(64, 40_000)
    ckptfmt.save(tmp_path / "m.ckpt", {"a": a})
    plan = _slice.plan_slice(a.shape, 4, (slice(None), 0))
    assert plan.nbytes == 64 * 4 and len(plan.starts) == 64  # not the 10 MB between them
    narrow = _slice.plan_slice((1000, 4), 4, (slice(None), 0))
    assert len(narrow.starts) == 1 and narrow.nbytes == 1000 * 16  # merged: one read of the whole thing
    with ckptfmt.open(tmp_path / "m.ckpt") as c:
        assert np.array_equal(c.get_slice("a")[:, 0], a[:, 0])
        assert np.array_equal(c.get_slice("a")[3:60:7, 100:-100:999], a[3:60:7, 100:-100:999])


def test_get_slice_whole_is_verified_parts_are_not(path: Path) -> None:
    _corrupt(path, "big")
    with ckptfmt.open(path) as c:
        sl = c.get_slice("big")
        with pytest.raises(ChecksumMismatchError):
            sl[:]
        with pytest.raises(ChecksumMismatchError):
            sl[...]
        assert np.array_equal(sl[:100], np.arange(100))  # documented: a partial read cannot be checked


def test_get_slice_refuses_what_numpy_would(path: Path) -> None:
    with ckptfmt.open(path) as c:
        sl = c.get_slice("w")
        with pytest.raises(IndexError):
            sl[6]
        with pytest.raises(IndexError):
            sl[0, 0, 0, 0]
        with pytest.raises(IndexError):
            sl[..., 0, ...]
        with pytest.raises(TypeError, match="ints, slices"):
            sl[[0, 1]]
        with pytest.raises(TypeError, match="ints, slices"):
            sl[None]
        with pytest.raises(TypeError, match="ints, slices"):
            sl[True]
        with pytest.raises(ValueError):
            sl[::0]
        assert c.get_slice("s")[()] == 2.5
        assert c.get_slice("e")[1:].shape == (0, 4)
        with pytest.raises(CheckpointKeyError):
            c.get_slice("v")


def _index_strategy(shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
    def one(n: int) -> st.SearchStrategy[Any]:
        ints = st.integers(-n, n - 1) if n else st.nothing()
        bound = st.one_of(st.none(), st.integers(-n - 2, n + 2))
        step = st.one_of(st.none(), st.integers(-4, 4).filter(lambda s: s != 0))
        return st.one_of(ints, st.builds(slice, bound, bound, step))

    def build(items: list[Any], cut: int, ell: bool) -> Any:
        if ell:  # leading items index the leading dims, trailing items the trailing ones
            front, back = cut // 2, cut - cut // 2
            return (*items[:front], Ellipsis, *items[len(items) - back :])
        items = items[:cut]
        return tuple(items) if len(items) != 1 else items[0]

    return st.tuples(*(one(n) for n in shape)).flatmap(
        lambda items: st.builds(build, st.just(list(items)), st.integers(0, len(shape)), st.booleans()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_get_slice_agrees_with_numpy_indexing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              data: st.DataObject) -> None:
    # small thresholds make tiny arrays take the merging (widen) and splitting branches of the planner
    min_run, split = data.draw(st.sampled_from([(64 << 10, 64 << 10), (16, 8), (1 << 20, 2)]), label="limits")
    monkeypatch.setattr(_slice, "_MIN_RUN", min_run)
    monkeypatch.setattr(_slice, "_SPLIT_BLOCK", split)
    shape = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple), label="shape")
    dtype = data.draw(st.sampled_from([np.uint8, np.int16, np.float32, np.complex128]), label="dtype")
    a = (np.arange(int(np.prod(shape)), dtype=np.int64) % 251).astype(dtype).reshape(shape)
    p = tmp_path / f"h{len(shape)}{np.dtype(dtype).char}.ckpt"
    if not p.exists():
        ckptfmt.save(p, {"a": a}, durable=False)
    with ckptfmt.open(p) as c:
        if tuple(c.info("a").shape) != shape:
            ckptfmt.save(p, {"a": a}, durable=False)
    index = data.draw(_index_strategy(shape), label="index")
    try:
        want = a[index]
    except IndexError:
        with ckptfmt.open(p) as c, pytest.raises(IndexError):
            c.get_slice("a")[index]
        return
    with ckptfmt.open(p) as c:
        got = c.get_slice("a")[index]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got, want)


def test_get_slice_plans_merge_small_runs_within_a_bound() -> None:
    for shape, index in [((100, 100), (slice(None), slice(0, 50))), ((8, 9, 10), (1, slice(2, 5), 3)),
                         ((1000,), slice(None, None, 3)), ((4, 5), (slice(None, None, -1), -1))]:
        plan = _slice.plan_slice(shape, 8, index)
        needed = 8 * int(np.prod(np.empty(shape)[index].shape))
        assert plan.nbytes <= 4 * needed + (1 << 20)


# ---------------------------------------------------------------- framework-native access


def test_torch_open_returns_tensors_from_get_and_get_slice(path: Path) -> None:
    torch = pytest.importorskip("torch")
    import ckptfmt.torch as ct

    w = torch.from_numpy(_state()["w"])
    with ct.open(path) as c:
        assert torch.equal(c.get("w"), w) and isinstance(c.get("b"), torch.Tensor)
        got = c.get_slice("w")[::-1, 2:5, ::2]  # negative steps work though torch has none
        assert isinstance(got, torch.Tensor) and torch.equal(got, w.flip(0)[:, 2:5, ::2])
        assert isinstance(c.load()["v"], torch.Tensor)
        assert isinstance(c.get("w", backend="numpy"), np.ndarray)  # per call, the numpy default comes back
    with ckptfmt.open(path, backend="torch") as c:
        assert isinstance(c.get_slice("big")[:10], torch.Tensor)


@pytest.mark.gpu
def test_torch_open_on_cuda_skips_cleanly_without_a_gpu(path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    import ckptfmt.torch as ct

    with ct.open(path, device="cuda") as c:
        assert c.get("w").device.type == "cuda"
        assert c.get_slice("w")[1:3].device.type == "cuda"


# ---------------------------------------------------------------- O(1) row lookups


def test_a_small_get_reads_only_its_rows_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy get must not touch whole table columns (it did: 40 ms at 400k tensors)."""
    p = tmp_path / "many.ckpt"
    ckptfmt.save(p, {f"t{i}": np.full(2, i, np.int32) for i in range(2000)}, durable=False)
    with ckptfmt.open(p) as c:
        tt = c.manifest.tensors
        calls: list[str] = []
        for name in ("offset", "nbytes", "dtype_code", "checksum"):
            col = getattr(tt, name)

            class Spy(np.ndarray):
                def tolist(self, _n: str = name) -> Any:  # type: ignore[override]
                    calls.append(_n)
                    return super().tolist()

            setattr(tt, name, col.view(Spy))
        assert np.array_equal(c.get("t1234"), [1234, 1234])
        assert calls == []
        assert len(c.load()) == 2000 and calls  # a whole load does use the fast whole-column path


def test_numpy_open_is_the_numpy_default(path: Path) -> None:
    import ckptfmt.numpy as cn

    with cn.open(path) as c:
        assert np.array_equal(c.get_slice("b")[2:5], [2, 3, 4]) and isinstance(c.get("w"), np.ndarray)


def test_lazy_streams_a_stored_tensor_into_a_new_checkpoint(path: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptfmt import _writer

    monkeypatch.setattr(_writer, "CHUNK_SIZE", 1 << 14)
    dst = tmp_path / "copy.ckpt"
    with ckptfmt.open(path) as c:
        lazy = c.lazy("big")
        assert isinstance(lazy, ckptfmt.LazyArray) and lazy.shape == (300_000,) and lazy.nbytes == 1_200_000
        ckptfmt.save(dst, {"big": lazy, "e": c.lazy("e"), "w": c.lazy("w")})
    got = ckptfmt.load(dst)
    assert np.array_equal(got["big"], np.arange(300_000)) and np.array_equal(got["w"], _state()["w"])
    assert got["e"].shape == (0, 4) and ckptfmt.verify(dst).ok
    before = dst.read_bytes()
    _corrupt(path, "big", 0)
    with ckptfmt.open(path) as c, pytest.raises(ChecksumMismatchError):
        ckptfmt.save(dst, {"big": c.lazy("big")})
    assert dst.read_bytes() == before  # the corrupt copy never replaced the previous file
