"""Hostile metadata meets bounded memory and typed errors (issue 9 `.ckpt` items, issue 11 §1).

Each file is crafted with conformance/make_corrupt.py's builder (checksums right, so the attack
reaches validation); memory is measured with tracemalloc, which sees msgpack's objects too.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tracemalloc
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import ckptfmt
from ckptfmt import _cli
from ckptfmt._header import Header

_spec = importlib.util.spec_from_file_location("make_corrupt", Path(__file__).parent.parent / "conformance" /
                                               "make_corrupt.py")
assert _spec is not None and _spec.loader is not None
mc = importlib.util.module_from_spec(_spec)
sys.modules["make_corrupt"] = mc
_spec.loader.exec_module(mc)


def traced_peak(call: Any) -> tuple[int, Any]:
    """(peak bytes allocated during ``call()``, its result or the exception it raised)."""
    tracemalloc.start()
    try:
        try:
            out: Any = call()
        except Exception as e:
            out = e
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def _open(path: Path, **kw: Any) -> str:
    ckptfmt.open(path, **kw).close()
    return "opened"


# ---------------------------------------------------------------- decoding memory (§8.1)


def test_nested_tuples_decode_in_a_small_multiple_of_the_metadata(tmp_ckpt: Path) -> None:
    """64 nested tuples around 4 MiB: each level used to copy the bytes below it (64 x L)."""
    node = msgpack.packb(b"x" * (4 << 20), use_bin_type=True)
    for _ in range(63):
        node = msgpack.packb(msgpack.ExtType(2, b"\x91" + node))
    tmp_ckpt.write_bytes(mc.build_file(tree_raw=node))
    peak, out = traced_peak(lambda: _open(tmp_ckpt))
    assert out == "opened"
    assert peak < 5 * (4 << 20), peak  # was about 64 x 4 MiB
    tree = ckptfmt.load(tmp_ckpt)
    for _ in range(63):
        assert type(tree) is tuple and len(tree) == 1
        tree = tree[0]
    assert tree == b"x" * (4 << 20)


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
def test_deep_dicts_lists_and_tuples_stay_bounded(tmp_ckpt: Path, kind: str) -> None:
    obj: Any = np.arange(3)
    for _ in range(63):
        obj = {"k": obj} if kind == "dict" else [obj] if kind == "list" else (obj,)
    ckptfmt.save(tmp_ckpt, obj)
    got = ckptfmt.load(tmp_ckpt)
    for _ in range(63):
        got = got["k"] if kind == "dict" else got[0]
    np.testing.assert_array_equal(got, np.arange(3))


def test_empty_arrays_hit_the_container_cap_in_bounded_memory(tmp_ckpt: Path) -> None:
    n = 1_000_000
    tmp_ckpt.write_bytes(mc.build_file(tree_raw=b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n))
    peak, out = traced_peak(lambda: _open(tmp_ckpt))
    assert type(out) is ckptfmt.MetadataLimitError and "containers" in str(out)
    assert peak < 40 * n, peak  # 10**6 empty lists alone would be 64 MB; the cap stops at n / 4
    assert _open(tmp_ckpt, limits=ckptfmt.Limits(bytes_per_container=0)) == "opened"  # a cap the caller can lift


def test_empty_dicts_in_a_list_are_within_the_container_cap(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"x": [{} for _ in range(20_000)], "w": np.ones(2)})
    assert len(ckptfmt.load(tmp_ckpt)["x"]) == 20_000


def test_running_out_of_memory_is_not_reported_as_corruption(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    ckptfmt.save(tmp_ckpt, {"w": np.ones(2), "meta": [1, 2]})

    def no_memory(*args: Any, **kw: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr("ckptfmt._parse.msgpack.unpackb", no_memory)
    with pytest.raises(MemoryError) as info:
        ckptfmt.open(tmp_ckpt)
    assert not isinstance(info.value, ckptfmt.CheckpointError)


# ---------------------------------------------------------------- header padding (§3.3 step 8)


def _aligned_2_30(path: Path, poke: int | None = None) -> None:
    """A valid file with alignment 2**30 and no tensors: 1 GiB of (sparse) zero padding."""
    a = 1 << 30
    meta = mc.pack_map([("tree", []), ("tensors", mc.tensor_table([], a)[0])])
    from ckptfmt._checksum import checksum
    from ckptfmt._footer import Footer

    with open(path, "wb") as f:
        f.write(Header(alignment=a).pack())
        f.truncate(a)
        if poke is not None:
            f.seek(poke)
            f.write(b"\x01")
        f.seek(a)
        f.write(meta + Footer(a, len(meta), checksum(meta)).pack())


def test_alignment_2_30_checks_its_padding_in_constant_memory(tmp_ckpt: Path) -> None:
    _aligned_2_30(tmp_ckpt)
    peak, out = traced_peak(lambda: _open(tmp_ckpt))
    assert out == "opened" and peak < 4 << 20, peak  # was 1.25 GB
    assert ckptfmt.load(tmp_ckpt) == []


def test_alignment_2_30_with_a_nonzero_padding_byte(tmp_ckpt: Path) -> None:
    _aligned_2_30(tmp_ckpt, poke=(1 << 30) - 1)
    with pytest.raises(ckptfmt.CorruptCheckpointError, match="padding"):
        ckptfmt.open(tmp_ckpt)


# ---------------------------------------------------------------- views (§4.7)


@pytest.mark.parametrize(("elements", "error"), [(1 << 62, ckptfmt.InvalidMetadataError),
                                                 (1 << 40, ckptfmt.MetadataLimitError)])
def test_stride_zero_views_over_a_tiny_base(tmp_ckpt: Path, elements: int, error: type[Exception]) -> None:
    tmp_ckpt.write_bytes(mc.one_view(("float32", (elements,), (0,), 0, 0)))
    with pytest.raises(error) as info:
        ckptfmt.open(tmp_ckpt)
    assert type(info.value) is error


def test_a_broadcast_view_within_the_cap_loads(tmp_ckpt: Path) -> None:
    x = np.arange(4, dtype=np.float32)
    ckptfmt.save(tmp_ckpt, {"x": x, "b": np.broadcast_to(x, (1000, 4))})
    got = ckptfmt.load(tmp_ckpt)
    np.testing.assert_array_equal(got["b"], np.broadcast_to(x, (1000, 4)))


def test_views_torch_cannot_represent_load_as_copies(tmp_ckpt: Path) -> None:
    torch = pytest.importorskip("torch")
    import ckptfmt.torch

    y = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = np.arange(64, dtype=np.uint8)
    state = {"y": y, "r": y[::-1], "t": y[:, ::-1].T, "buf": buf,
             "odd": np.ndarray((5,), np.float32, buffer=buf, offset=1, strides=(6,)),
             "neg": np.ndarray((2, 3), np.int16, buffer=buf, offset=21, strides=(-5, 2))}
    ckptfmt.save(tmp_ckpt, state)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert len(ckpt.manifest.views) >= 4  # they are stored as views, not copies
    got = ckptfmt.torch.load(tmp_ckpt)
    for k, v in state.items():
        np.testing.assert_array_equal(got[k].numpy(), v)
    assert got["r"].untyped_storage().data_ptr() != got["y"].untyped_storage().data_ptr()  # a copy
    got["r"][0, 0] = 100  # writable, and shares nothing with y
    assert got["y"][2, 0] == 8
    assert isinstance(got["odd"], torch.Tensor)


# ---------------------------------------------------------------- key paths (§4.4)


def test_a_key_path_element_of_thousands_of_digits(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"l": [np.ones(2)], 5: "five"})
    long = "1" * 5000
    with ckptfmt.open(tmp_ckpt) as ckpt:
        for key in (long, f"l/{long}", f"-{long}"):
            assert key not in ckpt
            with pytest.raises(ckptfmt.CheckpointKeyError) as info:
                ckpt.get(key)
            assert len(str(info.value)) < 400 + len(str(tmp_ckpt))  # the message does not echo 5000 digits
        assert ckpt.get("5") == "five"
    with pytest.raises(ckptfmt.CheckpointKeyError):
        ckptfmt.load(tmp_ckpt, keys=[f"l/{long}"])


def test_int_keys_span_the_plain_int_range(tmp_ckpt: Path) -> None:
    obj = {(1 << 64) - 1: np.ones(1), -(1 << 63): "low"}
    ckptfmt.save(tmp_ckpt, obj)
    got = ckptfmt.load(tmp_ckpt)
    assert got[-(1 << 63)] == "low" and got[(1 << 64) - 1].shape == (1,)
    assert ckptfmt.load(tmp_ckpt, keys=[str((1 << 64) - 1)])


# ---------------------------------------------------------------- what save writes, load reads


def test_save_refuses_metadata_over_the_readers_cap_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "m.ckpt"
    small = ckptfmt.Limits(max_metadata_bytes=4096)
    with pytest.raises(ckptfmt.ObjectLimitError, match="max_metadata_bytes") as info:
        ckptfmt.save(target, {"w": np.ones(2)}, metadata={"blob": b"x" * 5000}, limits=small)
    assert "numpy" in str(info.value) and "limits=" in str(info.value)  # says what to do
    with pytest.raises(ckptfmt.ObjectLimitError):
        ckptfmt.save(target, {"w": np.ones(2), "blob": b"x" * 5000}, limits=small)
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary
    ckptfmt.save(target, {"w": np.ones(2), "blob": b"x" * 3000}, limits=small)
    assert ckptfmt.load(target, limits=small)["blob"] == b"x" * 3000


def test_save_refuses_what_the_container_cap_would_refuse(tmp_path: Path) -> None:
    target = tmp_path / "c.ckpt"
    many = {"x": [[] for _ in range(50_000)]}
    with pytest.raises(ckptfmt.ObjectLimitError, match="bytes_per_container"):
        ckptfmt.save(target, many)
    assert not target.exists()
    lifted = ckptfmt.Limits(bytes_per_container=0)
    ckptfmt.save(target, many, limits=lifted)
    assert len(ckptfmt.load(target, limits=lifted)["x"]) == 50_000
    with pytest.raises(ckptfmt.MetadataLimitError):
        ckptfmt.load(target)


def test_save_refuses_more_tensors_than_the_cap(tmp_path: Path) -> None:
    with pytest.raises(ckptfmt.ObjectLimitError, match="max_tensors"):
        ckptfmt.save(tmp_path / "t.ckpt", [np.ones(1) for _ in range(5)], limits=ckptfmt.Limits(max_tensors=4))


def test_user_metadata_nesting_matches_the_reader(tmp_ckpt: Path) -> None:
    deep: Any = 1
    for _ in range(64):
        deep = {"k": deep}
    ckptfmt.save(tmp_ckpt, {"w": np.ones(1)}, metadata=deep)
    assert ckptfmt.load(tmp_ckpt)["w"].shape == (1,)
    with pytest.raises(ckptfmt.ObjectLimitError, match="deeper"):
        ckptfmt.save(tmp_ckpt, {"w": np.ones(1)}, metadata={"k": deep})


def test_save_refuses_an_empty_array_no_reader_can_represent(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ckptfmt.UnsupportedObjectError, match=r"'e'.*shape"):
        ckptfmt.save(tmp_path / "e.ckpt", {"e": torch.empty(0, 2**62)})
    assert not (tmp_path / "e.ckpt").exists()
    ckptfmt.save(tmp_path / "ok.ckpt", {"e": torch.empty(0, 2**60)})
    assert ckptfmt.load(tmp_path / "ok.ckpt")["e"].shape == (0, 2**60)


def test_the_default_caps_are_consistent() -> None:
    limits = ckptfmt.Limits()
    assert limits.max_tensors * 27 < limits.max_metadata_bytes  # the tensor cap can trigger on its own


# ---------------------------------------------------------------- inspect of a huge tree


def test_inspect_of_a_million_leaves_is_bounded(tmp_ckpt: Path) -> None:
    n = 1_000_000
    tmp_ckpt.write_bytes(mc.build_file(tree_raw=b"\xdd" + n.to_bytes(4, "big") + b"\xc0" * n))

    def run(*args: str) -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            assert _cli.main(["inspect", *args, str(tmp_ckpt)]) == 0
        return out.getvalue()

    peak, text = traced_peak(lambda: run())
    assert f"{n - 40} more leaves" in text and len(text) < 10_000
    assert peak < 60 << 20, peak  # the tree itself is 8 MB of pointers
    doc = json.loads(run("--json"))
    assert doc["leaf_count"] == n and len(doc["leaves"]) == doc["leaves_shown"] == 1000
    summary = ckptfmt.inspect(tmp_ckpt, max_leaves=3)
    assert summary["leaf_count"] == n and [leaf["key"] for leaf in summary["leaves"]] == ["0", "1", "2"]


def test_inspect_json_all_streams_every_leaf(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"a": np.ones(2), "b": [None, "x", {"c": 1.5}]})
    out = io.StringIO()
    with redirect_stdout(out):
        assert _cli.main(["inspect", "--json", "--all", str(tmp_ckpt)]) == 0
    doc = json.loads(out.getvalue())
    assert [leaf["key"] for leaf in doc["leaves"]] == ["a", "b/0", "b/1", "b/2/c"] and doc["leaf_count"] == 4
