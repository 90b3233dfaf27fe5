"""HDF5 import of hostile files (issue 9): no other file opened, no plugin loaded, work and memory bounded."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

import ckptfmt  # noqa: E402
import ckptfmt.convert  # noqa: E402
from ckptfmt.convert._errors import CorruptSourceError, UnsupportedSourceError  # noqa: E402
from ckptfmt.convert._hdf5 import DEFAULT_MAX_FILL, export_hdf5, read_hdf5  # noqa: E402

SECRET = b"top-secret-bytes-0123456789abcdef"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    p = tmp_path / "secret.bin"
    p.write_bytes(SECRET)
    return p


def assert_refused(path: Path, where: str, exc: type[Exception] = UnsupportedSourceError, match: str = "") -> None:
    """read_hdf5 and convert both refuse ``path``, naming the file and the HDF5 object; no output is written."""
    with pytest.raises(exc, match=match) as e:
        read_hdf5(path)
    assert isinstance(e.value, ckptfmt.CheckpointError) and str(path) in str(e.value) and where in str(e.value)
    dst = path.with_name(path.stem + "-converted.ckpt")
    with pytest.raises(exc, match=match):
        ckptfmt.convert(path, dst)
    assert not dst.exists()


def test_a_dataset_stored_in_an_external_file_is_refused(tmp_path: Path, secret: Path) -> None:
    p = tmp_path / "ext.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("stolen", shape=(len(SECRET),), dtype="u1", external=[(str(secret), 0, len(SECRET))])
    with h5py.File(p, "r") as f:  # the attack works with plain h5py: the bytes come from the other file
        assert f["stolen"][()].tobytes() == SECRET
    assert_refused(p, "/stolen", match="external file")


def test_an_external_link_is_refused_in_a_foreign_file(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(4)
    p = tmp_path / "link.h5"
    with h5py.File(p, "w") as f:
        f["w"] = np.ones(3)
        f["g/elsewhere"] = h5py.ExternalLink(str(other), "/x")
    assert_refused(p, "/g/elsewhere", match="external link")


def test_a_soft_link_through_an_external_link_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["g/x"] = np.arange(4)
    p = tmp_path / "soft.h5"
    with h5py.File(p, "w") as f:
        f["a"] = np.ones(2)
        f["ext"] = h5py.ExternalLink(str(other), "/g")
    with h5py.File(p, "r+") as f:  # created after, so that the walk reaches the soft link first
        f.move("ext", "zz_ext")
        f["b_soft"] = h5py.SoftLink("/zz_ext/x")
    assert_refused(p, "/b_soft", match="external link")


def export_with(tmp_path: Path, change: str) -> Path:
    """An export whose dataset ``/m/w`` or metadata group is replaced by an external link to a valid one."""
    src, h5, other = tmp_path / "a.ckpt", tmp_path / "a.h5", tmp_path / "other.h5"
    ckptfmt.save(src, {"m": {"w": np.ones(3, np.float32)}}, metadata={"run": "x"})
    export_hdf5(src, h5)
    export_hdf5(src, other)
    with h5py.File(h5, "r+") as f:
        if change == "dataset":
            del f["m/w"]
            f["m/w"] = h5py.ExternalLink(str(other), "/m/w")
        else:
            del f["ckptfmt.metadata"]
            f["ckptfmt.metadata"] = h5py.ExternalLink(str(other), "/ckptfmt.metadata")
    return h5


@pytest.mark.parametrize("change, where", [("dataset", "/m/w"), ("metadata", "/ckptfmt.metadata")])
def test_an_export_whose_member_is_an_external_link_is_refused(tmp_path: Path, change: str, where: str) -> None:
    h5 = export_with(tmp_path, change)
    with h5py.File(h5, "r") as f:  # plain h5py follows the link into the other file
        assert f[where] is not None
    assert_refused(h5, where, match="external link")


def test_a_virtual_dataset_is_refused(tmp_path: Path, secret: Path) -> None:
    src = tmp_path / "source.h5"
    with h5py.File(src, "w") as f:
        f["data"] = np.frombuffer(SECRET, np.uint8)
    p = tmp_path / "vds.h5"
    layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype="u1")
    layout[:] = h5py.VirtualSource(str(src), "data", shape=(len(SECRET),))
    with h5py.File(p, "w") as f:
        f.create_virtual_dataset("v", layout)
    with h5py.File(p, "r") as f:
        assert f["v"][()].tobytes() == SECRET
    assert_refused(p, "/v", match="virtual dataset")


def test_a_filter_that_needs_a_plugin_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "plugin.h5"
    with h5py.File(p, "w") as f:  # 32001 is blosc: not built into HDF5; reading it would dlopen a plugin
        f.create_dataset("z", shape=(100,), dtype="f4", chunks=(10,), compression=32001, allow_unknown_filter=True)
    assert_refused(p, "/z", match="filter 32001")


def make_link_bomb(path: Path, depth: int) -> None:
    """Group k hard-links group k+1 under two names: 2^depth paths over depth+1 groups (22 KB at depth 18)."""
    with h5py.File(path, "w") as f:
        groups = [f.create_group(f"g{k}") for k in range(depth + 1)]
        groups[-1]["leaf"] = np.arange(4, dtype=np.int32)
        for k in range(depth):
            groups[k]["a"] = groups[k + 1]
            groups[k]["b"] = groups[k + 1]


def test_a_hard_link_bomb_is_refused_in_linear_time(tmp_path: Path) -> None:
    p = tmp_path / "bomb.h5"
    make_link_bomb(p, 18)
    assert p.stat().st_size < 64 << 10
    t = time.perf_counter()
    with pytest.raises(UnsupportedSourceError, match="also linked at") as e:
        read_hdf5(p)
    assert time.perf_counter() - t < 5  # was 104 s: every one of the 2^18 paths walked
    assert str(p) in str(e.value)


def test_a_group_reached_twice_is_refused_and_a_dataset_reached_twice_is_one_object(tmp_path: Path) -> None:
    p = tmp_path / "twice.h5"
    with h5py.File(p, "w") as f:
        f["a/w"] = np.arange(3)
        f["b"] = f["a/w"]
        f["c"] = h5py.SoftLink("/a/w")
    tree, _ = read_hdf5(p)
    assert tree["a"]["w"] is tree["b"] is tree["c"]
    del tree  # its lazy arrays hold the file open
    with h5py.File(p, "r+") as f:
        f["z"] = h5py.SoftLink("/a")
    assert_refused(p, "/z", match="also linked at /a")


def test_a_loop_of_soft_links_is_a_corrupt_source(tmp_path: Path) -> None:
    p = tmp_path / "loop.h5"
    with h5py.File(p, "w") as f:
        f["x"] = h5py.SoftLink("/y")
        f["y"] = h5py.SoftLink("/x")
    assert_refused(p, "/x", CorruptSourceError, match="soft links")


def test_an_exponential_chain_of_soft_links_is_cut_short(tmp_path: Path) -> None:
    p = tmp_path / "softbomb.h5"
    with h5py.File(p, "w") as f:  # l_k = "/l_{k-1}/l_{k-1}": resolving l_29 naively is 2^29 lookups
        name = {k: f"n{99 - k:02d}" for k in range(30)}  # the deepest first in h5py's (name) order
        f[name[0]] = h5py.SoftLink("/")
        for k in range(1, 30):
            f[name[k]] = h5py.SoftLink(f"/{name[k - 1]}/{name[k - 1]}")
    t = time.perf_counter()
    assert_refused(p, "/n70", CorruptSourceError, match="soft links")
    assert time.perf_counter() - t < 5


def test_an_unwritten_compound_dataset_is_refused_before_any_allocation(tmp_path: Path) -> None:
    p = tmp_path / "compound.h5"
    rec = np.dtype([("a", "<f8"), ("b", "<i8"), ("c", "S16")])
    with h5py.File(p, "w") as f:
        f.create_dataset("table", shape=(100_000_000,), dtype=rec)  # 3.2 GB of fill value, never written
    assert p.stat().st_size < 8 << 10
    assert_refused(p, "/table", match="never written")


def test_an_unallocated_chunked_dataset_of_terabytes_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "huge.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("t", shape=(1 << 40,), dtype="f4", chunks=(1 << 20,), fillvalue=1.5)
        ds[:4] = np.arange(4)  # one chunk written, the rest fill
    assert_refused(p, "/t", match="never written")


def test_small_fill_is_read_as_h5py_reads_it_and_the_cap_can_be_raised(tmp_path: Path) -> None:
    p = tmp_path / "fill.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("c", shape=(1000,), dtype="f4", fillvalue=2.5)
        f.create_dataset("k", shape=(100, 10), dtype="i2", chunks=(10, 10), fillvalue=-3)
        f["k"][:10] = 7
    tree, _ = read_hdf5(p)
    with h5py.File(p, "r") as f:
        for name in ("c", "k"):
            assert np.array_equal(tree[name].numpy(), f[name][()])
    with pytest.raises(UnsupportedSourceError, match="max_fill_bytes"):
        read_hdf5(p, max_fill_bytes=1000)
    tree, _ = read_hdf5(p, max_fill_bytes=4000 + 1800)  # c: 4000 bytes; k: 9 of 10 chunks of 200
    assert tree["c"].numpy()[0] == 2.5
    assert DEFAULT_MAX_FILL >= 1 << 20


def test_a_truncated_file_is_a_corrupt_source(tmp_path: Path) -> None:
    p = tmp_path / "t.h5"
    with h5py.File(p, "w") as f:
        for i in range(20):
            f[f"g{i}/d"] = np.arange(100 + i)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ckptfmt.CheckpointError):
        read_hdf5(p, lazy=False)


def test_numpy_scalar_attributes_become_plain_values(tmp_path: Path) -> None:
    """Found by fuzzing: h5py gives float attributes as numpy.float64, a float subclass the metadata refused."""
    p = tmp_path / "attrs.h5"
    with h5py.File(p, "w") as f:
        f["w"] = np.ones(2)
        f["w"].attrs["lr"] = 2.5
        f["w"].attrs["name"] = "adam"
    ckptfmt.convert(p, tmp_path / "attrs.ckpt")
    meta = ckptfmt.open(tmp_path / "attrs.ckpt").metadata["/w"]
    assert meta == {"lr": 2.5, "name": "adam"} and type(meta["lr"]) is float
