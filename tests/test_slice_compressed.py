"""get_slice of a compressed row (format 1.1, spec §13): only the chunks the slice overlaps are decoded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt import _codec, _decode
from ckptfmt._atomic import atomic_write
from ckptfmt._plan import plan
from ckptfmt._writer11 import Writer11

pytest.importorskip("zstandard")

CHUNK = 4096  # small chunks, so that a tensor of a few hundred KiB has many


def _write(path: Path, obj: dict[str, Any], chunk: int = CHUNK) -> None:
    what = plan(obj)
    with atomic_write(os.fspath(path), durable=False) as fd:
        w = Writer11(fd, alignment=4096, compression="fast", chunk_bytes=chunk)
        w.write_blobs(what.rows)
        w.finish(what.tree, producer={}, created="", user={}, views=what.views)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The chunk indices decoded (wraps the one chunk decoder where the decoding functions look it up)."""
    seen: list[int] = []
    real = _decode.decode_chunk

    def counting(row: Any, chunk: int, *args: Any, **kw: Any) -> None:
        seen.append(chunk)
        real(row, chunk, *args, **kw)

    monkeypatch.setattr(_decode, "decode_chunk", counting)
    monkeypatch.setattr(_codec, "decode_chunk", counting)
    yield seen


def test_a_row_slice_decodes_only_its_chunks(tmp_path: Path, decoded: list[int]) -> None:
    a = (np.random.default_rng(0).standard_normal((256, 64)) * 0.02).astype(np.float32)  # 256 B rows, 16 a chunk
    _write(tmp_path / "c.ckpt", {"a": a})
    with ckptfmt.open(tmp_path / "c.ckpt") as c:
        assert c.info("a").nbytes // CHUNK == 16
        got = c.get_slice("a")[40:50]
        assert np.array_equal(got, a[40:50])
        assert sorted(decoded) == [2, 3]  # rows 40..49 are bytes 10240..12799: chunks 2 and 3, once each
        decoded.clear()
        assert np.array_equal(c.get_slice("a")[200], a[200]) and decoded == [12]
        decoded.clear()
        assert np.array_equal(c.get_slice("a")[::64, 3], a[::64, 3]) and sorted(decoded) == [0, 4, 8, 12]
        decoded.clear()
        assert np.array_equal(c.get_slice("a")[:, 0], a[:, 0]) and sorted(decoded) == list(range(16))  # each once


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_slices_equal_the_full_decode(tmp_path: Path, data: st.DataObject) -> None:
    shape = tuple(data.draw(st.lists(st.integers(1, 24), min_size=1, max_size=3), label="shape"))
    dtype = data.draw(st.sampled_from([np.float32, np.int16, np.uint8, np.float64]), label="dtype")
    arr = (np.random.default_rng(len(shape)).standard_normal(shape) * 30).astype(dtype)
    chunk = data.draw(st.sampled_from([64, 256, 4096]), label="chunk")
    path = tmp_path / "h.ckpt"
    _write(path, {"a": arr}, chunk)
    index = []
    for n in shape:
        if data.draw(st.booleans(), label="int"):
            index.append(data.draw(st.integers(-n, n - 1), label="i"))
        else:
            start = data.draw(st.none() | st.integers(-n - 2, n + 2), label="start")
            stop = data.draw(st.none() | st.integers(-n - 2, n + 2), label="stop")
            step = data.draw(st.none() | st.integers(1, 4) | st.integers(-4, -1), label="step")
            index.append(slice(start, stop, step))
    key = tuple(index[: data.draw(st.integers(1, len(index)), label="used")])
    with ckptfmt.open(path) as c:
        assert c.manifest.tensors.codec_of(0) != "raw" or arr.nbytes < 256  # small rows are stored raw
        got = c.get_slice("a")[key]
    want = ckptfmt.load(path)["a"][key]
    assert np.asarray(got).dtype == want.dtype and np.asarray(got).shape == want.shape
    assert np.asarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def test_iter_chunks_of_a_compressed_row_decodes_each_chunk_once_in_pieces(tmp_path: Path,
                                                                             decoded: list[int]) -> None:
    a = np.arange(50_000, dtype=np.int32)
    _write(tmp_path / "c.ckpt", {"a": a})
    with ckptfmt.open(tmp_path / "c.ckpt") as c:
        parts = [bytes(p) for p in c.iter_chunks("a", 2 * CHUNK)]
    assert b"".join(parts) == a.tobytes() and all(len(p) == 2 * CHUNK for p in parts[:-1])
    assert sorted(decoded) == list(range(-(-a.nbytes // CHUNK)))
