"""LazyArray leaves: bytes produced on demand, streamed into the file chunk by chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptfmt
from ckptfmt import _writer


def test_a_lazy_array_is_written_in_chunks_and_loads_as_the_array(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_writer, "CHUNK_SIZE", 1 << 16)
    src = np.arange(100_000, dtype=np.int32).reshape(100, 1000)
    raw = src.tobytes()
    reads: list[tuple[int, int]] = []

    def read(offset: int, n: int) -> bytes:
        reads.append((offset, n))
        return raw[offset : offset + n]

    lazy = ckptfmt.LazyArray.from_read(src.shape, ckptfmt.DTYPES["int32"], read)
    path = tmp_path / "l.ckpt"
    ckptfmt.save(path, {"x": lazy, "n": 3})
    assert len(reads) > 1 and max(n for _, n in reads) <= 1 << 16  # never the whole tensor at once
    assert [o for o, _ in reads] == sorted(o for o, _ in reads)
    got = ckptfmt.load(path)
    assert got["n"] == 3 and got["x"].dtype == np.int32 and np.array_equal(got["x"], src)
    assert ckptfmt.verify(path).ok


def test_a_short_read_fails_the_save_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "l.ckpt"
    ckptfmt.save(path, {"old": np.ones(2)})
    before = path.read_bytes()
    lazy = ckptfmt.LazyArray.from_read((10,), ckptfmt.DTYPES["float64"], lambda offset, n: b"\0" * (n - 1))
    with pytest.raises(ValueError, match="expected"):
        ckptfmt.save(path, {"x": lazy})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.ckpt"]


def test_nothing_loads_as_a_lazy_array(tmp_path: Path) -> None:
    path = tmp_path / "l.ckpt"
    ckptfmt.save(path, {"x": np.ones(2)})
    with pytest.raises(TypeError):
        ckptfmt.load(path, backend="lazy")


def test_one_lazy_array_class_for_the_core_and_the_converters(tmp_path: Path) -> None:
    from collections.abc import Iterator

    from ckptfmt import convert
    from ckptfmt._backend import backend_for
    from ckptfmt.convert._dcp import DcpTensor
    from ckptfmt.convert._numpy import ZipMemberArray

    assert convert.LazyArray is ckptfmt.LazyArray
    for cls in (convert.FileArray, DcpTensor, ZipMemberArray):
        assert issubclass(cls, ckptfmt.LazyArray)
    with pytest.raises(TypeError):
        ckptfmt.LazyArray()  # type: ignore[abstract]

    class Ramp(ckptfmt.LazyArray):
        dtype = ckptfmt.DTYPES["uint8"]
        shape = (300,)

        def chunks(self, limit: int) -> Iterator[np.ndarray]:
            data = np.arange(300, dtype=np.int64).astype(np.uint8)
            for i in range(0, 300, limit):
                yield data[i : i + limit]

    ramp = Ramp()
    assert backend_for(ramp) is backend_for(ckptfmt.LazyArray.from_read((1,), ramp.dtype, lambda o, n: b"\0"))
    ckptfmt.save(tmp_path / "r.ckpt", {"r": ramp})
    assert np.array_equal(ckptfmt.load(tmp_path / "r.ckpt")["r"], np.arange(300).astype(np.uint8))
