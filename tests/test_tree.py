"""The one tree module: walks, maps, rebuilds and key-path lookups (spec §4.2, §4.4)."""

from __future__ import annotations

import numpy as np
import pytest

import ckptfmt
from ckptfmt import _tree
from ckptfmt._tables import PlainInt, TensorRef, ViewRef
from ckptfmt.errors import CheckpointKeyError

# a decoded tree: int = tensor row, TensorRef = array scalar, ViewRef = view row, PlainInt = a plain int
TREE = {"a": 0, "b": [1, {"c": TensorRef(2)}, ()], "d": PlainInt(7), "e": {}, "f": (ViewRef(0), "s"), 3: 4}


def test_walk_is_in_tree_order_with_or_without_empty_containers() -> None:
    assert [p for p, _ in _tree.walk(TREE)] == [("a",), ("b", 0), ("b", 1, "c"), ("d",), ("f", 0), ("f", 1), (3,)]
    with_empty = [p for p, _ in _tree.walk(TREE, empty_leaves=True)]
    assert ("b", 2) in with_empty and ("e",) in with_empty
    assert [k for k, _ in _tree.walk_leaves(TREE)][:3] == ["a", "b/0", "b/1/c"]


def test_walk_nodes_lists_parents_first() -> None:
    paths = [p for p, _ in _tree.walk_nodes(TREE)]
    assert paths[:5] == [(), ("a",), ("b",), ("b", 0), ("b", 1)]
    assert len(paths) == 13


def test_walks_are_iterative() -> None:
    deep: object = 1
    for _ in range(3000):  # deeper than the recursion limit
        deep = [deep]
    assert [leaf for _, leaf in _tree.walk(deep)] == [1]


def test_map_and_rebuild() -> None:
    seen = []

    def leaf(row: int, scalar: object, key: str) -> str:
        seen.append((row, scalar, key))
        return key

    out = _tree.map_tree(TREE, leaf)
    assert out["d"] == 7 and type(out["d"]) is int and out["f"] == ("f/0", "s")
    assert (2, True, "b/1/c") in seen and (0, None, "f/0") in seen
    rebuilt = _tree.rebuild(TREE, lambda row, scalar: (row, scalar))
    assert rebuilt["b"][1]["c"] == (2, True) and rebuilt[3] == (4, False) and rebuilt["f"][0] == (0, None)


def test_resolve_and_tensor_rows() -> None:
    assert _tree.resolve(TREE, "b/1/c") == TensorRef(2)
    assert _tree.resolve(TREE, "3") == 4 and _tree.resolve(TREE, "") is TREE
    for bad in ("x", "b/9", "b/01", "a/b", "9" * 5000):  # 5000 digits: no plain ValueError from int()
        with pytest.raises(CheckpointKeyError):
            _tree.resolve(TREE, bad, where="f.ckpt")
    assert list(_tree.tensor_rows(TREE["b"], lambda v: 10 + v)) == [1, 2]
    assert list(_tree.tensor_rows(TREE, lambda v: 10 + v)) == [0, 1, 2, 10, 4]


def test_a_checkpoint_answers_huge_decimal_keys_with_its_own_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "k.ckpt"
    ckptfmt.save(p, {"x": [np.ones(1)]})
    with ckptfmt.open(p) as c:
        assert ("x/" + "1" * 5000) not in c
        with pytest.raises(CheckpointKeyError):
            c.get("x/" + "1" * 5000)
