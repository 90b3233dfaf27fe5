"""The reader's metadata decoder (ckptfmt/_parse.py): its fast paths agree with its careful ones.

Small tuple and dict payloads are decoded inside their parent's decode (``_EAGER_BYTES``), large
ones deferred: both must accept and refuse the same files, within the same caps. Hostile files are
crafted with conformance/make_corrupt.py's builder.
"""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt import _parse

_spec = importlib.util.spec_from_file_location("make_corrupt", Path(__file__).parent.parent / "conformance" /
                                               "make_corrupt.py")
assert _spec is not None and _spec.loader is not None
mc = importlib.util.module_from_spec(_spec)
sys.modules["make_corrupt"] = mc
_spec.loader.exec_module(mc)

#: the two ways a tuple or dict payload is decoded: all deferred, or small ones at once (the default)
PATHS = {"deferred": 0, "eager": _parse._EAGER_BYTES}


@pytest.fixture(params=sorted(PATHS))
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(_parse, "_EAGER_BYTES", PATHS[request.param])
    return str(request.param)


def _layer(i: int) -> dict[str, Any]:
    return {"attn": {"q": np.full(2, i, np.float32), "k": (np.arange(i % 3), 5)}, "n": i, "ok": i % 2 == 0,
            "l": [np.int64(i), {"x": None}], 7: "int key"}


def test_a_nested_state_loads_the_same_either_way(tmp_ckpt: Path, decode_path: str) -> None:
    state = {"model": {str(i): _layer(i) for i in range(300)}, "step": 3}
    ckptfmt.save(tmp_ckpt, state)
    got = ckptfmt.load(tmp_ckpt)
    assert got["step"] == 3 and list(got["model"]) == [str(i) for i in range(300)]
    for i in (0, 1, 299):
        layer = got["model"][str(i)]
        np.testing.assert_array_equal(layer["attn"]["q"], np.full(2, i, np.float32))
        assert type(layer["attn"]["k"]) is tuple and layer["attn"]["k"][1] == 5
        assert layer["n"] == i and layer["ok"] == (i % 2 == 0) and layer[7] == "int key"
        assert layer["l"][0] == i and layer["l"][1] == {"x": None}


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=5),
                  st.binary(max_size=5), st.floats(allow_nan=False),
                  st.integers(0, 3).map(lambda n: np.arange(n, dtype=np.int16)))
_trees = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.lists(kids, max_size=4).map(tuple),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 9)).map(str), kids, max_size=4)),
    max_leaves=30)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_any_tree_decodes_to_the_same_object_either_way(tmp_path: Path, tree: Any) -> None:
    path = tmp_path / "t.ckpt"
    ckptfmt.save(path, {"t": tree})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_parse, "_EAGER_BYTES", 0)
        deferred = ckptfmt.load(path)
    eager = ckptfmt.load(path)
    assert _same(deferred, eager) and _same(eager, {"t": tree})


def test_small_dicts_nested_past_the_depth_cap(tmp_ckpt: Path, decode_path: str) -> None:
    node: Any = 0
    for _ in range(70):
        node = mc.t_map(["k"], [node])
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A], tree=node))
    with pytest.raises(ckptfmt.MetadataLimitError, match="deeper"):
        ckptfmt.open(tmp_ckpt)


def test_a_small_dict_with_a_repeated_key_inside_a_large_one(tmp_ckpt: Path, decode_path: str) -> None:
    bad = mc.t_map(["x", "x"], [0, None])
    big = mc.t_map([f"p{i}" for i in range(2000)] + ["bad"], [None] * 2000 + [bad])
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A], tree=big))
    with pytest.raises(ckptfmt.InvalidMetadataError, match="duplicate keys"):
        ckptfmt.open(tmp_ckpt)


def test_a_tuple_payload_that_is_not_an_array(tmp_ckpt: Path, decode_path: str) -> None:
    tree = mc.t_map(["a", "t"], [0, msgpack.ExtType(2, msgpack.packb(1))])
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A], tree=tree))
    with pytest.raises(ckptfmt.InvalidMetadataError, match="not a msgpack array"):
        ckptfmt.open(tmp_ckpt)


def test_empty_lists_in_small_dicts_hit_the_container_cap_in_bounded_memory(tmp_ckpt: Path, decode_path: str
                                                                            ) -> None:
    """The lists of a payload decoded at once are counted as it is built, not after its parent (§8.1)."""
    small = mc.t_map(["e"], [[[] for _ in range(1000)]])
    tmp_ckpt.write_bytes(mc.build_file(blobs=[mc.A], tree_raw=msgpack.packb([0, *([small] * 1000)])))
    size = tmp_ckpt.stat().st_size  # about 1 MB: a million empty lists, 64 MB decoded uncounted
    tracemalloc.start()
    try:
        with pytest.raises(ckptfmt.MetadataLimitError, match="containers"):
            ckptfmt.open(tmp_ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * size, (peak, size)
    ckptfmt.open(tmp_ckpt, limits=ckptfmt.Limits(bytes_per_container=0)).close()


def test_a_view_and_a_scalar_inside_a_small_dict(tmp_ckpt: Path, decode_path: str) -> None:
    base = np.arange(6, dtype=np.float32)
    ckptfmt.save(tmp_ckpt, {"m": {"v": base[1:4], "b": base, "s": np.float32(2.5)}})
    got = ckptfmt.load(tmp_ckpt)
    np.testing.assert_array_equal(got["m"]["v"], base[1:4])
    assert got["m"]["s"] == np.float32(2.5) and np.ndim(got["m"]["s"]) == 0


def _held_bytes(column: np.ndarray) -> int:
    """Size of the bytes object a column keeps alive."""
    holder = column.base
    return len(holder.obj if isinstance(holder, memoryview) else holder)


@pytest.mark.parametrize("big_user", [False, True])
def test_columns_are_read_in_place_unless_they_are_a_small_part(tmp_ckpt: Path, big_user: bool) -> None:
    """In place, the table keeps the metadata alive: worth it only when the table is most of it."""
    state = {f"t{i}": np.full(2, i, np.float32) for i in range(500)}
    ckptfmt.save(tmp_ckpt, state, metadata={"blob": b"u" * 200_000} if big_user else None)
    with ckptfmt.open(tmp_ckpt) as c:
        held = _held_bytes(c.manifest.tensors.offset)
        assert held == 8 * 500 if big_user else held == c.footer.metadata_length
        np.testing.assert_array_equal(c.get("t499"), np.full(2, 499, np.float32))
