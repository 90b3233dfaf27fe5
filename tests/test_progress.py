"""The writer's ``progress`` callback: increments of tensor bytes, through save, convert and migrate."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt._migrate import migrate
from ckptfmt._writer import HASH_PIECE


def _totals(increments: list[int]) -> list[int]:
    """Running totals of the increments, checked to be positive (so the totals rise strictly)."""
    assert all(isinstance(n, int) and n > 0 for n in increments), increments
    return list(itertools.accumulate(increments))


def _state(sizes: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(sizes))
    return {f"t{i}": rng.integers(0, 4, n, dtype=np.int32) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("how", [{}, {"checksum": False}, {"compression": "fast"}, {"pack": True},
                                 {"compression": "balanced", "pack": True}],
                         ids=["1.0", "no-checksum", "compressed", "packed", "compressed-packed"])
def test_save_reports_every_tensor_byte(tmp_path: Path, how: dict) -> None:
    if "compression" in how:
        pytest.importorskip("zstandard")
    big = np.arange(3 * HASH_PIECE // 4 + 5, dtype=np.float32)  # several hash pieces, several 1.1 chunks
    state = {"big": big, "small": np.ones(7, np.float64), "empty": np.zeros(0, np.int8), "n": 3,
             "strided": big[::3], "swapped": np.arange(100, dtype=">i4")}
    seen: list[int] = []
    ckptfmt.save(tmp_path / "a.ckpt", state, progress=seen.append, durable=False, **how)
    totals = _totals(seen)
    stored = big.nbytes + 7 * 8 + 400  # the strided view is a view of big's bytes (spec §4.6): not stored again
    assert totals[-1] == stored
    assert len(seen) > 3  # large rows are reported piece by piece, not only at their end
    got = ckptfmt.load(tmp_path / "a.ckpt")
    assert np.array_equal(got["big"], big) and np.array_equal(got["swapped"], state["swapped"])


def test_shared_bytes_count_once(tmp_path: Path) -> None:
    base = np.arange(1000, dtype=np.int64)
    seen: list[int] = []
    ckptfmt.save(tmp_path / "a.ckpt", {"a": base, "b": base[10:20], "c": base}, progress=seen.append)
    assert _totals(seen)[-1] == base.nbytes


def test_background_save_reports_on_the_writing_thread(tmp_path: Path) -> None:
    state = _state([10, 300_000, 5])
    seen: list[int] = []
    handle = ckptfmt.save(tmp_path / "a.ckpt", state, background=True, progress=seen.append)
    assert handle is not None
    handle.wait()
    assert _totals(seen)[-1] == sum(a.nbytes for a in state.values())


_LEVELS = ["none", "fast"] if importlib.util.find_spec("zstandard") else ["none"]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 70_000), min_size=0, max_size=6),
       compression=st.sampled_from(_LEVELS), pack=st.booleans())
def test_totals_end_at_the_tensor_bytes(tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
                                        compression: str, pack: bool) -> None:
    path = tmp_path_factory.mktemp("p") / "a.ckpt"
    state = _state(sizes)
    seen: list[int] = []
    ckptfmt.save(path, state, progress=seen.append, durable=False, compression=compression, pack=pack)
    total = sum(a.nbytes for a in state.values())
    assert (_totals(seen)[-1] if seen else 0) == total


def test_migrate_reports_through_the_writer(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    state = _state([1000, 600_000, 0, 3])
    ckptfmt.save(tmp_path / "a.ckpt", state)
    total = sum(a.nbytes for a in state.values())
    for to, src in (("1.1", "a.ckpt"), ("1.0", "b.ckpt")):
        seen: list[int] = []
        dst = "b.ckpt" if to == "1.1" else "c.ckpt"
        migrate(tmp_path / src, tmp_path / dst, to=to, compression="fast" if to == "1.1" else None,
                progress=seen.append)
        assert _totals(seen)[-1] == total
        got = ckptfmt.load(tmp_path / dst)
        assert all(np.array_equal(got[k], v) for k, v in state.items())


def test_convert_reports_through_the_writer(tmp_path: Path) -> None:
    """A streamed source (an .npz member read lazily) reports piece by piece; shared bytes are topped up."""
    big = np.arange(HASH_PIECE, dtype=np.float32)  # 4 pieces
    np.savez(tmp_path / "a.npz", big=big, small=np.ones(3, np.int16))
    seen: list[int] = []
    report = ckptfmt.convert(tmp_path / "a.npz", tmp_path / "a.ckpt", progress=seen.append)
    assert _totals(seen)[-1] == report.bytes == big.nbytes + 6 and len(seen) >= 4
    got = ckptfmt.load(tmp_path / "a.ckpt")
    assert np.array_equal(got["big"], big)


def test_torch_save_passes_progress_on(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    state = {"w": torch.ones(1000, 300), "b": torch.zeros(7)}
    seen: list[int] = []
    ckptfmt.torch.save(tmp_path / "t.ckpt", state, progress=seen.append)
    assert seen and sum(seen) == 1000 * 300 * 4 + 7 * 4
