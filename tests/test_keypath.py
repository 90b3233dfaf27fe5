"""Key paths (spec §4.4): escaping, splitting, joining, and resolving them in a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt import _keypath

elements = st.one_of(st.text(), st.sampled_from(["", "/", "~", "~0", "~1", "~01", "/~", "a/b", "~/~/"]))


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(elements, min_size=1, max_size=6))
def test_split_inverts_join(parts: list[str]) -> None:
    path = _keypath.join(parts)
    assert _keypath.split(path) == parts
    assert path.count("/") == len(parts) - 1  # separators are never ambiguous with escaped slashes


@settings(max_examples=100, deadline=None, database=None)
@given(elements)
def test_escape_is_the_json_pointer_escape(element: str) -> None:
    escaped = _keypath.escape(element)
    assert "/" not in escaped
    assert escaped == element.replace("~", "~0").replace("/", "~1")
    assert _keypath.split(escaped) == [element]


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.one_of(elements, st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=5))
def test_ints_are_written_in_decimal(parts: list[str | int]) -> None:
    assert _keypath.split(_keypath.join(parts)) == [str(p) if isinstance(p, int) else p for p in parts]


@pytest.mark.parametrize("elements, path", [
    (["model", "layer1.weight"], "model/layer1.weight"),
    (["optimizer", "state", 0, "exp_avg"], "optimizer/state/0/exp_avg"),
    (["a/b"], "a~1b"),
    (["~"], "~0"),
    (["~1"], "~01"),
    (["/~"], "~1~0"),
    (["", ""], "/"),
    ([-1, 12], "-1/12"),
    ([], ""),
])
def test_known_paths(elements: list[str | int], path: str) -> None:
    assert _keypath.join(elements) == path


@pytest.mark.parametrize("path, parts", [("a~1b/c~0d", ["a/b", "c~d"]), ("~01", ["~1"]), ("~10", ["/0"]),
                                         ("", [""]), ("a//b", ["a", "", "b"]), ("~0~1", ["~/"])])
def test_known_splits(path: str, parts: list[str]) -> None:
    assert _keypath.split(path) == parts


@pytest.mark.parametrize("path", ["~", "a~", "a~2", "~a", "x/~/y", "~~", "~~1", "a/b~"])
def test_malformed_escapes(path: str) -> None:
    with pytest.raises(ckptfmt.InvalidKeyError, match="~"):
        _keypath.split(path)


@pytest.mark.parametrize("path", [None, 1, b"a", ["a"]])
def test_split_wants_a_str(path: object) -> None:
    with pytest.raises(ckptfmt.InvalidKeyError):
        _keypath.split(path)  # type: ignore[arg-type]


# ---------------------------------------------------------------- resolving in a checkpoint

ODD_KEYS = ["a/b", "~", "~1", "x~/y", " ", "é/ü", "1", "-0", "01", "/", "//"]


@pytest.fixture
def odd(tmp_ckpt: Path) -> Path:
    state = {k: np.full(2, i) for i, k in enumerate(ODD_KEYS)}
    state["ints"] = {1: "one", -2: "minus two", 0: {"": "empty under zero"}}
    state["list"] = [["deep"]]
    ckptfmt.save(tmp_ckpt, state)
    return tmp_ckpt


def test_keys_with_slashes_and_tildes_are_addressable(odd: Path) -> None:
    with ckptfmt.open(odd) as ckpt:
        for i, key in enumerate(ODD_KEYS):
            path = _keypath.escape(key)
            assert ckpt.keys().count(path) == 1
            assert ckpt.get(path).tolist() == [i, i], key
            assert ckpt.info(path).key == path
        assert ckpt.get("a~1b").tolist() == [0, 0]
        assert ckpt.get("x~0~1y").tolist() == [3, 3]
        assert "a/b" not in ckpt  # unescaped: "a" then "b"
    got = ckptfmt.load(odd, keys=["a~1b", "~0", "~01"])
    assert [v[0] for v in got.values()] == [0, 1, 2]


def test_int_keys_and_list_indices(odd: Path) -> None:
    with ckptfmt.open(odd) as ckpt:
        assert ckpt.get("ints/1") == "one"
        assert ckpt.get("ints/-2") == "minus two"
        assert ckpt.get("ints/0/") == "empty under zero"
        assert ckpt.get("list/0/0") == "deep"
        assert ckpt.get("1").tolist() == [6, 6]  # the str key "1"
        assert ckpt.get("01").tolist() == [8, 8]  # a str key, not the int 1
        for missing in ("ints/01", "ints/+1", "ints/-02", "list/00", "list/-0", "list/0/1"):
            assert missing not in ckpt
            with pytest.raises(ckptfmt.CheckpointKeyError):
                ckpt.get(missing)


def test_top_level_empty_key_is_addressable(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"": np.arange(3), "b": 1})
    with ckptfmt.open(tmp_ckpt) as ckpt:
        keys = ckpt.keys()
        assert keys == ["", "b"]
        assert ckpt.get("").tolist() == [0, 1, 2]
        assert ckpt.info("").shape == (3,)
    assert ckptfmt.load(tmp_ckpt, keys=[""])[""].tolist() == [0, 1, 2]


@pytest.mark.parametrize("root", [np.arange(3), 7, "text", np.float32(1.5)])
def test_a_root_leaf_is_addressable_by_its_listed_key(tmp_ckpt: Path, root: object) -> None:
    ckptfmt.save(tmp_ckpt, root)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.keys() == [""]
        assert "" in ckpt
        got = ckpt.get("")
    assert type(got) is type(root) and np.array_equal(got, root)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1), st.integers(-5, 5), min_size=1, max_size=5))
def test_any_str_key_round_trips_through_its_path(tmp_path: Path, d: dict[str, int]) -> None:
    path = tmp_path / "k.ckpt"
    ckptfmt.save(path, {"d": d}, durable=False)
    with ckptfmt.open(path) as ckpt:
        assert ckpt.keys() == [f"d/{_keypath.escape(k)}" for k in d]
        for k, v in d.items():
            assert ckpt.get("d/" + _keypath.escape(k)) == v
