"""offload_saved_tensors never gives a silently wrong gradient when a saved tensor is changed in place.

Plain autograd raises "modified by an inplace operation"; under offload the same error is raised
(:class:`SavedTensorModifiedError`, a RuntimeError), or, once the tensor's spilled copy is
unaliased from it, backward uses the values autograd saved: the true gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.utils.checkpoint import checkpoint  # noqa: E402

from ckptfmt.errors import CheckpointError  # noqa: E402
from ckptfmt.torch.activations import (  # noqa: E402
    ActivationCheckpointManager,
    SavedTensorModifiedError,
    offload_saved_tensors,
)

PHRASE = "modified by an inplace operation"
N = 4096  # 16 KiB of float32


def exp_then_add(x: torch.Tensor) -> torch.Tensor:
    y = x.exp()  # exp saves its output for backward
    y.add_(1)  # ... which is then changed in place
    return y.sum()


def exp_then_add_inside_checkpoint(x: torch.Tensor) -> torch.Tensor:
    def region(a: torch.Tensor) -> torch.Tensor:
        return a.sin()

    y = x.exp()
    z = checkpoint(region, y, use_reentrant=False)
    y.mul_(2)
    return z.sum()


def checkpointed_then_add(x: torch.Tensor) -> torch.Tensor:
    def region(a: torch.Tensor) -> torch.Tensor:
        return a.exp().exp()

    y = checkpoint(region, x * 1.0, use_reentrant=False)
    w = y.exp()
    w.add_(1)
    return w.sum()


def unchanged(x: torch.Tensor) -> torch.Tensor:
    y = x.exp()
    z = y * 1.0
    z.add_(1)  # an in-place change of a tensor nobody saved: fine everywhere
    return (y + z).sum()


SCENARIOS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp-add": exp_then_add, "exp-add-checkpoint": exp_then_add_inside_checkpoint,
    "checkpointed-add": checkpointed_then_add, "unchanged": unchanged,
}


def run(fn: Callable[[torch.Tensor], torch.Tensor], ctx: Any) -> tuple[str, Any]:
    x = torch.linspace(-1, 1, N).requires_grad_(True)
    try:
        with ctx:
            loss = fn(x)
        loss.backward()
    except RuntimeError as e:
        return "raised", e
    return "grad", x.grad


def true_gradient(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The gradient at the values autograd saved: every in-place op made out of place."""
    x = torch.linspace(-1, 1, N).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        fn(x).backward()
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("budget", [None, 0], ids=["resident", "spilled-at-once"])
def test_offload_raises_like_autograd_or_is_exact(tmp_path: Path, scenario: str, budget: int | None) -> None:
    fn = SCENARIOS[scenario]
    plain, plain_out = run(fn, contextlib.nullcontext())
    with ActivationCheckpointManager(memory_budget=budget, spill_dir=tmp_path) as acts:
        got, got_out = run(fn, offload_saved_tensors(acts))
        if budget == 0 and scenario != "unchanged":
            assert acts.memory_stats().spill_count > 0
    if plain == "grad":
        assert got == "grad" and torch.equal(got_out, plain_out)
        return
    assert PHRASE in str(plain_out)
    if got == "raised":
        assert PHRASE in str(got_out)
        if isinstance(got_out, SavedTensorModifiedError):
            assert isinstance(got_out, CheckpointError)
    else:  # spilled before the change: backward used the saved values, never the changed ones
        assert budget == 0
        assert torch.equal(got_out, true_gradient(fn))
    if budget is None:
        assert got == "raised"  # resident: the tensor autograd saved is the one that changed


def test_a_change_before_the_spill_is_caught(tmp_path: Path) -> None:
    x = torch.linspace(-1, 1, N).requires_grad_(True)
    with ActivationCheckpointManager(memory_budget=N * 4, spill_dir=tmp_path) as acts:
        with offload_saved_tensors(acts):
            y = x.exp()  # resident: fits the budget
            y.add_(1)
            w = (x * 2).exp()  # the next saved tensor pushes y out to disk
        assert acts.memory_stats().spill_count > 0
        with pytest.raises(SavedTensorModifiedError, match=PHRASE):
            (y.sum() + w.sum()).backward()


def test_the_issue_example_never_gives_exp_plus_one(tmp_path: Path) -> None:
    for budget in (None, 0, N * 4):
        x = torch.linspace(-1, 1, N).requires_grad_(True)
        with ActivationCheckpointManager(memory_budget=budget, spill_dir=tmp_path) as acts:
            try:
                with offload_saved_tensors(acts):
                    loss = exp_then_add(x)
                loss.backward()
            except RuntimeError as e:
                assert PHRASE in str(e)
                continue
        assert x.grad is not None
        assert torch.equal(x.grad, x.detach().exp()), budget  # exp(x), never exp(x) + 1
