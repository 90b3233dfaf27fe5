"""Structure-aware mutation of valid files (hypothesis): every outcome is the saved data or a CheckpointError.

The mutator is the one of ``fuzz/reader_target.py`` (which runs the same check for minutes, under
atheris or its own driver). A mutation whose checksums are not recomputed must never load as
different data (silent corruption); one whose checksums are recomputed may load as a different
valid file, and otherwise must be refused with a typed error.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("reader_target",
                                               Path(__file__).parent.parent / "fuzz" / "reader_target.py")
assert _spec is not None and _spec.loader is not None
target = importlib.util.module_from_spec(_spec)
sys.modules["reader_target"] = target
_spec.loader.exec_module(target)


@pytest.fixture(autouse=True, scope="module")
def _scratch(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The target's scratch file, in pytest's temporary directory."""
    target._SCRATCH = str(tmp_path_factory.mktemp("fuzz") / "input.ckpt")
    yield


@cache
def corpus() -> list[tuple[bytes, Any]]:
    out = []
    for data in target.seeds():
        outcome, value = target.run_one(data)
        assert outcome == "loaded"
        out.append((data, value))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 4), seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3), fixed=st.booleans())
def test_mutated_files_load_the_same_or_are_refused(which: int, seed: int, rounds: int, fixed: bool) -> None:
    data, original = corpus()[which]
    rng = random.Random(seed)
    for _ in range(rounds):
        data = target.mutate(data, rng)
    if fixed:
        data = target.fix_checksums(data)
    assert target.check(data, original, fixed) in ("refused", "same", "changed")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    assert target.run_one(data)[0] == "refused"


@settings(max_examples=100, deadline=None)
@given(which=st.integers(0, 4), at=st.integers(0, 10**6))
def test_every_truncation_is_refused(which: int, at: int) -> None:
    data, _ = corpus()[which]
    assert target.run_one(data[: at % len(data)])[0] == "refused"
