"""DCP directories with hostile metadata (issue 9): every entry checked before anything is allocated."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from torch.distributed.checkpoint.metadata import ChunkStorageMetadata  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402
from ckptfmt.convert import CorruptSourceError, UnsafePickleError, convert  # noqa: E402
from ckptfmt.convert._dcp import read_dcp  # noqa: E402


def state() -> dict[str, Any]:
    return {"w": torch.arange(12.0).reshape(3, 4), "l": [torch.ones(2), 5], "n": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DCP checkpoint written by ``torch.distributed.checkpoint.save`` in one process (no process group)."""
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state(), checkpoint_id=str(path))
    return path


def edited(saved: Path, tmp_path: Path, change: Callable[[Any], None]) -> Path:
    """A copy of ``saved`` whose metadata (unpickled here: it is ours) went through ``change``."""
    out = tmp_path / "edited"
    shutil.copytree(saved, out)
    with open(out / ".metadata", "rb") as f:
        meta = pickle.load(f)
    change(meta)
    with open(out / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    return out


def assert_refused(path: Path, tmp_path: Path, match: str, *, peak: int = 16 << 20) -> None:
    """convert refuses ``path`` with a CorruptSourceError naming the metadata, allocating under ``peak``."""
    tracemalloc.start()
    try:
        with pytest.raises(CorruptSourceError, match=match) as e:
            convert(path, tmp_path / "out.ckpt")
        _, used = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(e.value) and used < peak
    assert not (tmp_path / "out.ckpt").exists()


def test_the_unedited_checkpoint_converts_exactly(saved: Path, tmp_path: Path) -> None:
    convert(saved, tmp_path / "ok.ckpt")
    got = ckptfmt.torch.load(tmp_path / "ok.ckpt")
    assert torch.equal(got["w"], state()["w"]) and torch.equal(got["l"][0], torch.ones(2)) and got["l"][1] == 5


@pytest.mark.parametrize("index", [10**8, -1, 4])
def test_a_planner_list_index_out_of_range_is_refused_without_allocating(saved: Path, tmp_path: Path,
                                                                          index: int) -> None:
    path = edited(saved, tmp_path, lambda m: m.planner_data.__setitem__("l.1", ("l", index)))
    assert (path / ".metadata").stat().st_size < 2000  # 10**8 made a list of 10**8 Nones: 1.8 GB
    assert_refused(path, tmp_path, "list index")


def set_chunks(fqn: str, shape: list[int], chunks: list[tuple[list[int], list[int]]]) -> Callable[[Any], None]:
    def change(meta: Any) -> None:
        md = meta.state_dict_metadata[fqn]
        md.size = torch.Size(shape)
        md.chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks]
        infos = {i.offset: v for i, v in meta.storage_data.items() if i.fqn == fqn}
        first = next(iter(infos.values()))
        for i in [i for i in meta.storage_data if i.fqn == fqn]:
            del meta.storage_data[i]
        for k, (o, _) in enumerate(chunks):
            index = dataclasses.replace(next(iter(meta.storage_data)), fqn=fqn, offset=torch.Size(o), index=k)
            meta.storage_data[index] = first
    return change


def test_a_shape_larger_than_the_data_files_is_refused_before_allocating(saved: Path, tmp_path: Path) -> None:
    path = edited(saved, tmp_path, set_chunks("w", [10**6, 10**6], [([0, 0], [10**6, 10**6])]))
    assert_refused(path, tmp_path, "bytes of elements stored in")


def test_overlapping_chunks_that_leave_a_hole_are_refused(saved: Path, tmp_path: Path) -> None:
    # 2 + 2 rows of 4 = the volume of 4 x 4, but rows 1-2 twice and row 3 never: torch.empty's garbage
    path = edited(saved, tmp_path, set_chunks("w", [4, 4], [([0, 0], [2, 4]), ([1, 0], [2, 4])]))
    assert_refused(path, tmp_path, "overlap")


def test_a_chunk_outside_its_tensor_is_refused(saved: Path, tmp_path: Path) -> None:
    path = edited(saved, tmp_path, set_chunks("w", [3, 4], [([-1, 0], [3, 4])]))
    assert_refused(path, tmp_path, "does not fit")


def test_a_storage_range_past_the_end_of_the_file_is_refused_before_reading(saved: Path, tmp_path: Path) -> None:
    def change(meta: Any) -> None:
        for index, info in list(meta.storage_data.items()):
            if index.fqn == "w":
                meta.storage_data[index] = dataclasses.replace(info, length=1 << 40)
    path = edited(saved, tmp_path, change)
    assert_refused(path, tmp_path, "past the end")


def test_a_malformed_entry_is_a_corrupt_source_naming_it(saved: Path, tmp_path: Path) -> None:
    def change(meta: Any) -> None:
        meta.state_dict_metadata["w"].size = None
    path = edited(saved, tmp_path, change)
    assert_refused(path, tmp_path, "'w'")


def test_a_metadata_pickle_calling_bytes_with_a_size_is_refused(saved: Path, tmp_path: Path) -> None:
    path = tmp_path / "bytesbomb"
    shutil.copytree(saved, path)
    # GLOBAL builtins.bytes, (10**12,), REDUCE: a terabyte from 30 bytes of pickle
    (path / ".metadata").write_bytes(b"\x80\x04cbuiltins\nbytes\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R.")
    tracemalloc.start()
    try:
        with pytest.raises((CorruptSourceError, UnsafePickleError)):
            read_dcp(str(path), allow_pickle=False)
        _, used = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used < 16 << 20


@pytest.mark.parametrize("pickled", [
    b"\x80\x04Nr\xff\xff\xff\x7f.",  # LONG_BINPUT 2**31 - 1: the C unpickler sizes its memo table by it (16 GB)
    b"\x80\x05\x96\x00\x00\x00\x00\x01\x00\x00\x00.",  # BYTEARRAY8 of 2**32 bytes: allocated before it is read
], ids=["memo-index", "length-field"])
def test_metadata_pickle_fields_that_allocate_are_checked_first(saved: Path, tmp_path: Path, pickled: bytes) -> None:
    """Found by fuzzing: a few bytes of .metadata made the unpickler allocate gigabytes (MemoryError)."""
    path = tmp_path / "pickle-bomb"
    shutil.copytree(saved, path)
    (path / ".metadata").write_bytes(pickled)
    assert_refused(path, tmp_path, "not a well-formed pickle")


def test_a_damaged_value_pickle_is_a_corrupt_source(saved: Path, tmp_path: Path) -> None:
    """Found by fuzzing: torch's weights-only unpickler raised IndexError ("pop from empty list")."""
    path = tmp_path / "damaged"
    shutil.copytree(saved, path)
    with open(path / ".metadata", "rb") as f:
        meta = pickle.load(f)
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "n")
    data = bytearray((path / info.relative_path).read_bytes())
    start = data.index(b"\x80\x02", info.offset)  # the value's pickle inside the torch.save record
    data[start + 2 : start + 3] = b"a"  # APPEND with an empty stack
    (path / info.relative_path).write_bytes(bytes(data))
    with pytest.raises(CorruptSourceError, match="'n'"):
        convert(path, tmp_path / "out.ckpt")
