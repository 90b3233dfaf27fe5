"""The pooled ranks of dist_ranks.run: one spawn per world size, each scenario's failure reported alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_ranks as R  # noqa: E402


def test_scenarios_share_ranks_and_a_failure_retires_only_its_pool():
    spawned = len(R.SPAWNED)
    assert R.run(1, "echo", "a") == [[0, "a"]]
    assert R.run(1, "echo", {"b": 2}) == [[0, {"b": 2}]]
    assert len(R.SPAWNED) == spawned + 1  # the second scenario ran in the same ranks
    with pytest.raises(AssertionError, match=r"fail_on: rank 0 failed:(.|\n)*ValueError: boom on rank 0"):
        R.run(1, "fail_on", 0)
    assert R.run(1, "echo", 3) == [[0, 3]]  # fresh ranks: the failure did not leak
    assert len(R.SPAWNED) == spawned + 2
