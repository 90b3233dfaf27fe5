"""Compressed sharded checkpoints (spec/DISTRIBUTED.md §3.1): round trips, chunk-level partial reads,
corruption caught per chunk, hostile compressed-extent fields refused with typed errors, a reshard."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.distributed import _index as I
from ckptfmt.errors import ChecksumMismatchError, InvalidMetadataError

torch = pytest.importorskip("torch")
pytest.importorskip("zstandard")
import ckptfmt.distributed as cd  # noqa: E402
from ckptfmt.distributed._read import open_index, read_range  # noqa: E402
from ckptfmt.distributed._store import Location  # noqa: E402

ROWS, COLS = 1200, 600  # float32: 2.88 MB, three 1 MiB chunks


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(ROWS, COLS, generator=g) * 0.02, "h": torch.randn(300, 200, generator=g).bfloat16(),
            "ids": torch.arange(5000, dtype=torch.int64), "small": torch.ones(3), "empty": torch.zeros(0, 4),
            "step": 3, "cfg": {"note": "x" * 2000, "betas": (0.9, 0.99)}}


def _target() -> dict:
    return {"w": torch.zeros(ROWS, COLS), "h": torch.zeros(300, 200), "ids": torch.zeros(5000, dtype=torch.int64),
            "small": torch.zeros(3), "empty": torch.zeros(0, 4), "step": 0, "cfg": {"note": None, "betas": None}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("comp") / "c")
    cd.save(_state(), p, options=cd.SaveOptions(compression="fast"))
    return p


def _copy(saved: str, tmp_path) -> str:
    import shutil

    p = str(tmp_path / "c")
    shutil.copytree(saved, p)
    return p


def _index_path(p: str) -> str:
    return os.path.join(p, I.INDEX_NAME)


def _rewrite(p: str, fn) -> None:
    with open(_index_path(p), "rb") as f:
        m = msgpack.unpackb(f.read(), raw=False)
    fn(m)
    with open(_index_path(p), "wb") as f:
        f.write(msgpack.packb(m, use_bin_type=True))


def _w(m: dict) -> dict:
    return next(t for t in m["tensors"] if t["key"] == "w")["chunks"][0]


@pytest.mark.parametrize("level", ["fast", "maximum"])
def test_round_trip(tmp_path, level):
    p = str(tmp_path / level)
    st = _state()
    cd.save(st, p, options=cd.SaveOptions(compression=level))
    t = cd.load(_target(), p)
    for k in ("w", "ids", "small", "empty"):
        assert torch.equal(t[k], st[k]), k
    assert torch.equal(t["h"], st["h"].float())  # saved dtype's bytes, then converted
    assert t["step"] == 3 and t["cfg"] == {"note": "x" * 2000, "betas": (0.9, 0.99)}
    rep = cd.verify(p)
    assert rep.ok, rep.errors
    full = ckptfmt.load(p)  # consolidated, outside a process group
    assert np.array_equal(full["w"], st["w"].numpy())
    idx = open_index(Location(p))
    assert idx.tensors["w"].chunks[0].extent.coding is not None
    assert idx.tensors["small"].chunks[0].extent.coding is None  # too small to compress: raw, block checksums
    # a container is a valid ckptfmt (format 1.1) file on its own
    assert ckptfmt.verify(os.path.join(p, idx.files[0].name)).ok
    with open(_index_path(p), "rb") as f:
        assert msgpack.unpackb(f.read())["version"] == I.CODED_INDEX_VERSION


def test_uncompressed_index_stays_version_1(tmp_path):
    p = str(tmp_path / "raw")
    cd.save({"w": torch.ones(10)}, p)
    with open(_index_path(p), "rb") as f:
        assert msgpack.unpackb(f.read())["version"] == I.INDEX_VERSION


def test_unknown_level_refused(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        cd.save({"w": torch.ones(10)}, str(tmp_path / "x"), options=cd.SaveOptions(compression="ultra"))
    with pytest.raises(ValueError, match="compression"):
        cd.Writer(str(tmp_path / "x"), compression=3)  # type: ignore[arg-type]


def test_partial_read_touches_only_its_chunks(saved):
    """A range inside chunk 1 reads exactly chunk 1's stored bytes; the decoded bytes are the saved ones."""
    loc = Location(saved)
    idx = open_index(loc)
    ext = idx.tensors["w"].chunks[0].extent
    c = ext.coding
    assert c is not None and ext.length == ROWS * COLS * 4 and c.stored < ext.length
    k = c.planes
    per_chunk = c.piece_sizes().reshape(-1, k).sum(axis=1)
    assert len(per_chunk) == 3
    want = _state()["w"].numpy().reshape(-1).view(np.uint8)
    cb = c.chunk_bytes
    got = read_range(loc, idx, ext, cb + 100, 2 * cb - 100, key="w")
    assert np.array_equal(got, want[cb + 100:2 * cb - 100])
    assert loc.bytes_read == int(per_chunk[1])
    got = read_range(loc, idx, ext, cb - 8, cb + 8, key="w")  # across a chunk boundary: two chunks
    assert np.array_equal(got, want[cb - 8:cb + 8])
    assert loc.bytes_read == int(per_chunk[1]) + int(per_chunk[0] + per_chunk[1])
    loc.close()


def test_corrupt_chunk_is_caught_by_its_checksum(saved, tmp_path):
    p = _copy(saved, tmp_path)
    loc = Location(p)
    idx = open_index(loc)
    ext = idx.tensors["w"].chunks[0].extent
    assert ext.coding is not None
    per_chunk = ext.coding.piece_sizes().reshape(-1, ext.coding.planes).sum(axis=1)
    f = os.path.join(p, idx.files[ext.file].name)
    at = ext.offset + int(per_chunk[0] + per_chunk[1]) + 5  # inside chunk 2's stored bytes
    with open(f, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0x40]))
    assert read_range(loc, idx, ext, 0, 100, key="w").size == 100  # chunk 0 is intact
    with pytest.raises(ChecksumMismatchError, match="chunk 2"):
        read_range(loc, idx, ext, ext.length - 4, ext.length, key="w")
    loc.close()
    assert not cd.verify(p).ok
    with pytest.raises(cd.DistributedCheckpointError, match="chunk 2"):
        cd.load(_target(), p)


def _set_pieces(m: dict, fn) -> None:
    c = _w(m)
    a = np.frombuffer(c["pieces"], "<u8").copy()
    fn(a)
    c["pieces"] = a.tobytes()


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.update(version=1), r"compressed extent in a version 1 index"),
    (lambda m: _w(m).update(codec="lz4"), "unknown codec"),
    (lambda m: _w(m).update(codec=7), r"codec: expected str"),
    (lambda m: _w(m).update(chunk_bytes=100), "chunk_bytes"),
    (lambda m: _w(m).update(chunk_bytes=0), "chunk_bytes"),
    (lambda m: _w(m).update(chunk_bytes=1 << 40), "chunk_bytes"),
    (lambda m: _w(m).update(stored=_w(m)["stored"] + 1), "do not add up"),
    (lambda m: _w(m).update(stored=1 << 62), "run past the end|do not add up"),
    (lambda m: _w(m).update(pieces=_w(m)["pieces"][:-8]), "pieces"),
    (lambda m: _w(m).update(pieces=b"\0" * 7), "pieces"),
    (lambda m: _w(m).pop("pieces"), "missing field 'pieces'"),
    (lambda m: _w(m).update(checksums=_w(m)["checksums"][:-8]), r"checksums.*per chunk"),
    (lambda m: _set_pieces(m, lambda a: (a.__setitem__(0, a[0] + 100), a.__setitem__(1, a[1] - 100))),
     r"pieces\[0\]: .* stored bytes for a plane"),
    (lambda m: _set_pieces(m, lambda a: (a.__setitem__(2, a[2] + a[3]), a.__setitem__(3, 0))), r"pieces\[\d\]"),
    (lambda m: _w(m).update(length=_w(m)["length"] + 4), "length"),
])
def test_hostile_compressed_fields_are_refused(saved, tmp_path, mutate, match):
    p = _copy(saved, tmp_path)
    _rewrite(p, mutate)
    with pytest.raises(InvalidMetadataError, match=match):
        cd.consolidate(p)
    with pytest.raises(cd.DistributedCheckpointError, match=match.split("|")[0] if "|" not in match else "index"):
        cd.load(_target(), p)
    assert not cd.verify(p).ok


def test_swapped_pieces_fail_decoding_typed(saved, tmp_path):
    """Pieces whose sizes are consistent but swapped: the chunk checksum or the frame check refuses them."""
    p = _copy(saved, tmp_path)

    def swap(a: np.ndarray) -> None:
        a[2], a[3] = a[3], a[2]

    _rewrite(p, lambda m: _set_pieces(m, swap))
    with pytest.raises(ckptfmt.CheckpointError):
        cd.consolidate(p)


def test_reshard_two_to_three_compressed(tmp_path):
    """Real ranks: save at W=2 compressed, load at W=3 (and into plain tensors in one process)."""
    import dist_ranks as R

    c = str(tmp_path / "c")
    out = str(tmp_path / "res")
    R.run(2, "save_dtensors_compressed", c, "fast", out=out)
    res = R.run(3, "load_dtensors", c, out=out)
    assert all(r["read"] > 0 for r in res)
    idx = open_index(Location(c))
    assert any(ch.extent.coding is not None for t in idx.tensors.values() for ch in t.chunks)
    t = R.empty_target(None, torch.float64)
    cd.load(t, c)
    R.check(t, torch.float64)
    assert cd.verify(c).ok


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=64), st.integers(0, 2))
def test_hostile_piece_sizes_raise_typed(saved, tmp_path_factory, sizes, which):
    """Arbitrary piece sizes (their sum recorded as `stored`): a typed CheckpointError, never a crash or
    an unbounded allocation; the bytes only load if they are the saved ones."""
    import shutil

    p = str(tmp_path_factory.mktemp("hp") / "c")
    shutil.copytree(saved, p)

    def mutate(m: dict) -> None:
        c = _w(m)
        n = len(c["pieces"]) // 8
        a = np.frombuffer(c["pieces"], "<u8").copy()
        for i, v in enumerate(sizes):
            a[(i * 7 + which) % n] = v
        c["pieces"] = a.tobytes()
        c["stored"] = int(a.sum())

    _rewrite(p, mutate)
    try:
        out = cd.consolidate(p)
    except ckptfmt.CheckpointError:
        return
    assert np.array_equal(out["w"], _state()["w"].numpy())
