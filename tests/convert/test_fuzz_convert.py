"""Structure-aware mutation of each converter's input (issue 9): identical data or a CheckpointError, nothing else.

Seeds are written by the real libraries (safetensors, numpy, h5py, torch.distributed.checkpoint); the
mutators and the oracle (the format's own library reads the same data) live in ``fuzz/convert_targets.py``,
which ``fuzz/run_convert.py`` runs for hours where this runs for seconds.
"""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import convert_targets as ct

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_SEEDS: dict[str, bytes] = {}


def seed(fmt: str) -> bytes:
    if fmt not in _SEEDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
            _SEEDS[fmt] = ct.SEEDS[fmt]()
    return _SEEDS[fmt]


def check(fmt: str, rng: random.Random, edits: int, tmp_path: Path) -> None:
    data = seed(fmt)
    for _ in range(edits):
        data = ct.mutate(fmt, data, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # torch.load of a damaged zip may leave a file to the GC
        ct.run_one(fmt, data, str(tmp_path))  # raises ct.Finding on anything but identical data or a typed error


@FUZZ
@given(rng=st.randoms(use_true_random=False), edits=st.integers(1, 4))
def test_safetensors_mutations(rng: random.Random, edits: int, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    check("safetensors", rng, edits, tmp_path)


@FUZZ
@given(rng=st.randoms(use_true_random=False), edits=st.integers(1, 4))
def test_npz_mutations(rng: random.Random, edits: int, tmp_path: Path) -> None:
    check("npz", rng, edits, tmp_path)


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_hdf5_structures(rng: random.Random, tmp_path: Path) -> None:
    """Files of random hostile structure written by h5py (links, external storage, fill, compounds)."""
    pytest.importorskip("h5py")
    ct.run_one("hdf5", ct.build_hdf5(rng), str(tmp_path))


@settings(FUZZ, max_examples=100)
@given(rng=st.randoms(use_true_random=False), edits=st.integers(1, 3))
def test_hdf5_byte_mutations(rng: random.Random, edits: int, tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    data = seed("hdf5")
    for _ in range(edits):
        data = ct.mutate_bytes(data, rng)
    ct.run_one("hdf5", data, str(tmp_path))


@settings(FUZZ, max_examples=60)
@given(rng=st.randoms(use_true_random=False), edits=st.integers(1, 3))
def test_dcp_mutations(rng: random.Random, edits: int, tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.checkpoint")
    check("dcp", rng, edits, tmp_path)
