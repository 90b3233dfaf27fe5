"""MasterWeightOptimizer: fp32 master weights, dynamic loss scaling, fp32 fallback, checkpoints through ckptfmt."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402
from ckptfmt.errors import CheckpointError, UnsupportedVersionError  # noqa: E402
from ckptfmt.torch.amp import (  # noqa: E402
    STATE_VERSION,
    AmpOptions,
    InvalidOptimizerStateError,
    LossScalerState,
    MasterWeightOptimizer,
)

LOW = [torch.bfloat16, torch.float16]


def mlp(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def batches(n: int, dtype: torch.dtype, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g).to(dtype), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy computed in fp32 (as autocast would), from the model's low-precision logits."""
    param_dtype = next(model.parameters()).dtype
    return F.cross_entropy(model(x.to(param_dtype)).float(), y)


def backward(opt: MasterWeightOptimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = loss_of(model, x, y)
    opt.scale_loss(loss).backward()
    return loss.detach()


def poison(model: nn.Module, value: float = math.inf) -> None:
    """Put a non-finite value into one gradient (what an fp16 overflow leaves behind)."""
    with torch.no_grad():
        model[0].weight.grad[0, 0] = value


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def scalar_model(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """One parameter ``w`` (ones(4)); ``(w * c).sum()`` has gradient ``c`` exactly."""
    m = nn.Module()
    m.w = nn.Parameter(torch.ones(4, dtype=dtype))
    return m


def linear_step(opt: MasterWeightOptimizer, m: nn.Module, c: float = 1.0) -> bool:
    opt.zero_grad()
    opt.scale_loss((m.w * c).sum()).backward()
    return opt.step()


# ---------------------------------------------------------------- construction


def test_builds_fp32_masters_and_a_base_optimizer_over_them() -> None:
    model = mlp(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    masters = list(opt.master_params())
    assert [m.dtype for m in masters] == [torch.float32] * 4
    for p, m in zip(model.parameters(), masters, strict=True):
        assert torch.equal(m, p.detach().float()) and m.data_ptr() != p.data_ptr()
        assert m.is_leaf and not m.requires_grad
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.param_groups[0]["params"] == masters
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (1e-3, 0.05)
    assert opt.defaults is opt.optimizer.defaults and opt.state is opt.optimizer.state
    assert opt.options == AmpOptions() and opt.loss_scale == 2.0**16
    assert (opt.step_count, opt.skipped_steps, opt.total_overflows, opt.fallback) == (0, 0, 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.options.init_scale = 1.0  # type: ignore[misc]


def test_param_groups_keep_their_structure_and_options() -> None:
    model = mlp(torch.float16)
    opt = MasterWeightOptimizer(
        [{"params": model[0].parameters(), "lr": 0.5}, {"params": list(model[2].parameters())}],
        torch.optim.SGD, lr=0.1, momentum=0.9, init_scale=1024.0,
    )
    assert isinstance(opt.optimizer, torch.optim.SGD)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert [[tuple(m.shape) for m in g["params"]] for g in opt.param_groups] == [[(16, 8), (16,)], [(4, 16), (4,)]]
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    opt.add_param_group({"params": extra, "lr": 1.0})
    assert len(opt.param_groups) == 3 and opt.param_groups[2]["params"][0].dtype == torch.float32
    opt.zero_grad()
    extra.grad = torch.ones(3, dtype=torch.float16) * opt.loss_scale
    assert opt.step()
    assert torch.equal(extra.detach(), torch.full((3,), -1.0, dtype=torch.float16))  # lr 1.0, grad 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"backoff_factor": 1.0}, "backoff_factor"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"init_scale": math.inf}, "init_scale"),
        ({"min_scale": 4.0, "init_scale": 2.0}, "min_scale"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"max_consecutive_overflows": 0}, "max_consecutive_overflows"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MasterWeightOptimizer(mlp(torch.bfloat16).parameters(), **kwargs)


def test_bad_params_are_refused() -> None:
    model = mlp(torch.bfloat16)
    with pytest.raises(ValueError, match="empty"):
        MasterWeightOptimizer([])
    with pytest.raises(TypeError, match="not a Tensor"):
        MasterWeightOptimizer(model[0].weight)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        MasterWeightOptimizer([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="more than once"):
        MasterWeightOptimizer([{"params": [model[0].weight]}, {"params": [model[0].weight]}])
    opt = MasterWeightOptimizer(model.parameters())
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: 0.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_trains_a_small_mlp_and_keeps_params_equal_to_rounded_masters(dtype: torch.dtype) -> None:
    model = mlp(dtype)
    opt = MasterWeightOptimizer(model.parameters(), lr=3e-2)
    data = batches(4, dtype)
    first = [loss_of(model, x, y).item() for x, y in data]
    for _ in range(10):
        for x, y in data:
            backward(opt, model, x, y)
            assert opt.step()
            for p, m in zip(model.parameters(), opt.master_params(), strict=True):
                assert p.dtype == dtype
                assert bits_equal(p.detach(), m.to(dtype))
    last = [loss_of(model, x, y).item() for x, y in data]
    assert sum(last) < 0.8 * sum(first)
    assert (opt.step_count, opt.skipped_steps, opt.steps_since_overflow) == (40, 0, 40)
    assert all(m.grad is None for m in opt.master_params())  # freed after each step


def test_masters_accumulate_updates_below_the_bf16_resolution() -> None:
    m = scalar_model(torch.bfloat16)
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=1e-3)
    one = torch.ones(4, dtype=torch.bfloat16)
    assert bits_equal(one - 1e-3, one)  # the same update in pure bf16 would never move the weights
    for _ in range(10):
        assert linear_step(opt, m)
    master = next(opt.master_params())
    expected = torch.ones(4)
    for _ in range(10):
        expected = expected.add(torch.ones(4), alpha=-1e-3)
    assert torch.equal(master, expected)
    assert bits_equal(m.w.detach(), expected.to(torch.bfloat16))
    assert bool((m.w.detach() < 1).all())


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_an_overflow_skips_the_step_and_backs_off(value: float) -> None:
    model = mlp(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), init_scale=1024.0)
    (x, y), = batches(1, torch.float16)
    before, masters_before = params_of(model), [m.clone() for m in opt.master_params()]
    backward(opt, model, x, y)
    poison(model, value)
    assert opt.step() is False
    assert all(bits_equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert all(bits_equal(a, b) for a, b in zip(masters_before, opt.master_params(), strict=True))
    assert len(opt.state) == 0  # the base optimizer never ran
    assert opt.loss_scale == 512.0
    assert (opt.step_count, opt.skipped_steps, opt.consecutive_overflows, opt.total_overflows) == (1, 1, 1, 1)
    assert opt.steps_since_overflow == 0
    backward(opt, model, x, y)
    assert opt.step() is True
    assert (opt.step_count, opt.skipped_steps, opt.consecutive_overflows, opt.total_overflows) == (2, 1, 0, 1)
    assert opt.steps_since_overflow == 1 and opt.loss_scale == 512.0
    assert not all(bits_equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_a_real_fp16_overflow_from_a_huge_scale_is_skipped_until_the_scale_fits() -> None:
    model = mlp(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), init_scale=2.0**40)
    (x, y), = batches(1, torch.float16)
    applied = []
    for _ in range(40):
        backward(opt, model, x, y)
        applied.append(opt.step())
        if applied[-1]:
            break
    assert applied[-1] and not any(applied[:-1]) and len(applied) > 1
    assert opt.skipped_steps == opt.total_overflows == len(applied) - 1
    assert opt.loss_scale == 2.0 ** (40 - opt.skipped_steps)
    grads_at_scale = [p.grad for p in model.parameters()]
    assert all(bool(torch.isfinite(g).all()) for g in grads_at_scale)


def test_the_scale_grows_after_growth_interval_good_steps() -> None:
    m = scalar_model()
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=1e-3, init_scale=4.0, growth_interval=3)
    scales = []
    for _ in range(7):
        assert linear_step(opt, m)
        scales.append(opt.loss_scale)
    assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0]
    assert opt.steps_since_overflow == 7
    opt.zero_grad()
    opt.scale_loss((m.w * math.inf).sum()).backward()
    assert not opt.step()
    assert (opt.loss_scale, opt.steps_since_overflow) == (8.0, 0)
    for expected in (8.0, 8.0, 16.0):
        assert linear_step(opt, m)
        assert opt.loss_scale == expected


def test_the_scale_never_drops_below_min_scale() -> None:
    m = scalar_model()
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=1e-3, init_scale=8.0, min_scale=2.0)
    scales = []
    for _ in range(4):
        assert not linear_step(opt, m, math.inf)
        scales.append(opt.loss_scale)
    assert scales == [4.0, 2.0, 2.0, 2.0]
    assert (opt.consecutive_overflows, opt.total_overflows, opt.skipped_steps, opt.fallback) == (4, 4, 4, False)


def test_not_dynamic_means_no_scaling_but_still_skips_non_finite_steps() -> None:
    m = scalar_model()
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=1e-3, dynamic=False, growth_interval=1)
    loss = torch.tensor(3.0)
    assert opt.loss_scale == 1.0 and torch.equal(opt.scale_loss(loss), loss)
    assert linear_step(opt, m) and opt.loss_scale == 1.0
    assert not linear_step(opt, m, math.nan) and opt.loss_scale == 1.0
    assert (opt.skipped_steps, opt.total_overflows) == (1, 1)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fallback_to_fp32_after_max_consecutive_overflows(dtype: torch.dtype) -> None:
    model = mlp(dtype)
    weight = model[0].weight
    opt = MasterWeightOptimizer(model.parameters(), init_scale=256.0, max_consecutive_overflows=3, growth_interval=1)
    (x, y), = batches(1, dtype)
    for _ in range(2):  # two in a row, a good step, two more: no fallback (the run is broken)
        backward(opt, model, x, y)
        poison(model)
        assert not opt.step()
    backward(opt, model, x, y)
    assert opt.step() and opt.consecutive_overflows == 0
    assert opt.loss_scale == 128.0  # 256 -> 128 -> 64, then one good step with growth_interval 1
    for expected in (64.0, 32.0):
        backward(opt, model, x, y)
        poison(model)
        assert not opt.step() and opt.loss_scale == expected and not opt.fallback
    backward(opt, model, x, y)
    poison(model)
    assert not opt.step()
    assert opt.fallback and opt.consecutive_overflows == 3 and opt.total_overflows == 5
    assert model[0].weight is weight  # the same Parameter, converted in place
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 4
    assert all(p.grad is None for p in model.parameters())
    assert all(bits_equal(p.detach(), m) for p, m in zip(model.parameters(), opt.master_params(), strict=True))
    assert opt.loss_scale == 1.0
    loss = torch.tensor(2.5)
    assert torch.equal(opt.scale_loss(loss), loss)
    for _ in range(3):  # training goes on in fp32, unscaled, and the scale no longer grows
        backward(opt, model, x, y)
        assert opt.step()
        assert all(bits_equal(p.detach(), m) for p, m in zip(model.parameters(), opt.master_params(), strict=True))
    assert opt.loss_scale == 1.0 and opt.consecutive_overflows == 0


def test_zero_grad() -> None:
    model = mlp(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters())
    (x, y), = batches(1, torch.bfloat16)
    backward(opt, model, x, y)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_unscale_then_clip_the_master_grads() -> None:
    m = scalar_model(torch.float16)
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=0.5, init_scale=64.0)
    opt.zero_grad()
    opt.scale_loss((m.w * 3.0).sum()).backward()
    assert opt.unscale_()
    master = next(opt.master_params())
    assert master.grad is not None and torch.equal(master.grad, torch.full((4,), 3.0))
    with pytest.raises(RuntimeError, match="already"):
        opt.unscale_()
    torch.nn.utils.clip_grad_norm_(opt.master_params(), max_norm=1.0)
    clipped = master.grad.clone()
    assert math.isclose(clipped.norm().item(), 1.0, rel_tol=1e-5)
    expected = master.detach().clone().add_(clipped, alpha=-0.5)
    assert opt.step()
    assert torch.equal(master, expected)
    assert bits_equal(m.w.detach(), expected.to(torch.float16))


def test_step_hooks_run_on_applied_steps_only() -> None:
    m = scalar_model()
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=1e-3)
    seen: list[torch.optim.Optimizer] = []
    handle = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    assert linear_step(opt, m)
    assert not linear_step(opt, m, math.inf)
    assert seen == [opt.optimizer]
    handle.remove()
    assert linear_step(opt, m) and len(seen) == 1


# ---------------------------------------------------------------- LR schedulers


def test_lambda_lr_drives_the_base_optimizer() -> None:
    m = scalar_model(torch.float16)
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=0.25, init_scale=8.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)  # must not warn (warnings are errors)
    master = next(opt.master_params())
    for i in range(4):
        lr = 0.25 * 0.5**i
        assert opt.optimizer.param_groups[0]["lr"] == lr == sched.get_last_lr()[0]
        opt.zero_grad()
        opt.scale_loss((m.w * 2.0).sum()).backward()
        expected = master.detach().clone().add_(torch.full((4,), 2.0), alpha=-lr)
        assert opt.step()
        assert torch.equal(master, expected)
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 4 and state["lr_lambdas"] == [None]
    assert opt.param_groups[0]["initial_lr"] == 0.25


def test_deepcopy_with_a_scheduler_attached_copies_an_independent_optimizer() -> None:
    m = scalar_model()
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=0.5)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)  # wraps opt.step on the instance
    twin = copy.deepcopy(opt)
    w = next(twin.model_params())
    w.grad = torch.ones(4, dtype=torch.bfloat16) * twin.loss_scale
    assert twin.step()
    assert torch.equal(next(twin.master_params()), torch.full((4,), 0.5))
    assert torch.equal(next(opt.master_params()), torch.ones(4)) and opt.step_count == 0
    assert bits_equal(m.w.detach(), torch.ones(4, dtype=torch.bfloat16))


def test_a_scheduler_counts_skipped_steps_too() -> None:
    m = scalar_model()
    opt = MasterWeightOptimizer(m.parameters(), torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert not linear_step(opt, m, math.inf)
    sched.step()  # no "lr_scheduler.step() before optimizer.step()" warning: step() was called
    assert opt.param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------- checkpoints


def is_plain_tree(node: Any) -> bool:
    if isinstance(node, dict):
        return all(isinstance(k, (str, int)) and is_plain_tree(v) for k, v in node.items())
    if isinstance(node, (list, tuple)):
        return all(is_plain_tree(v) for v in node)
    return node is None or isinstance(node, (torch.Tensor, bool, int, float, str, bytes))


def test_state_dict_layout_is_plain() -> None:
    model = mlp(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), max_consecutive_overflows=5)
    (x, y), = batches(1, torch.bfloat16)
    backward(opt, model, x, y)
    opt.step()
    state = opt.state_dict()
    assert is_plain_tree(state)
    assert state["version"] == STATE_VERSION == 1
    assert state["options"] == {"init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "min_scale": 1.0, "max_consecutive_overflows": 5,
                                "dynamic": True}
    assert state["optimizer_class"] == "AdamW"
    assert state["training_weights_dtype"] == ["bfloat16"] * 4
    assert [w.dtype for w in state["master_weights"]] == [torch.float32] * 4
    assert state["scaler"] == {"scale": 65536.0, "steps_since_overflow": 1, "consecutive_overflows": 0,
                               "total_overflows": 0}
    assert (state["step_count"], state["skipped_steps"], state["fallback"]) == (1, 0, False)
    assert set(state["base"]) == {"state", "param_groups"} and len(state["base"]["state"]) == 4
    assert LossScalerState.from_dict(state["scaler"]) == opt.scaler
    assert AmpOptions.from_dict(state["options"]) == opt.options


def run(model: nn.Module, opt: MasterWeightOptimizer, sched: Any, data: list[Any], start: int,
        poison_at: set[int]) -> list[torch.Tensor]:
    losses = []
    for i, (x, y) in enumerate(data, start):
        losses.append(backward(opt, model, x, y))
        if i in poison_at:
            poison(model)
        opt.step()
        sched.step()
    return losses


def fresh(dtype: torch.dtype, seed: int) -> tuple[nn.Module, MasterWeightOptimizer, Any]:
    model = mlp(dtype, seed)
    opt = MasterWeightOptimizer(model.parameters(), lr=5e-3, weight_decay=0.01, init_scale=2.0**10,
                                growth_interval=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, opt, sched


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_resume_from_a_ckptfmt_file_is_bitwise_identical(dtype: torch.dtype, tmp_path: Path) -> None:
    data, poison_at = batches(12, dtype), {2, 7}
    model_a, opt_a, sched_a = fresh(dtype, seed=0)
    losses_a = run(model_a, opt_a, sched_a, data, 0, poison_at)

    model_b, opt_b, sched_b = fresh(dtype, seed=0)
    losses_b = run(model_b, opt_b, sched_b, data[:6], 0, poison_at)
    path = tmp_path / "train.ckpt"
    ckptfmt.torch.save(path, {"model": model_b.state_dict(), "optim": opt_b.state_dict(),
                              "sched": sched_b.state_dict()})
    del model_b, opt_b, sched_b

    model_c, opt_c, sched_c = fresh(dtype, seed=123)  # different initial weights: all must come from the file
    state = ckptfmt.torch.load(path)
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["optim"])
    sched_c.load_state_dict(state["sched"])
    assert (opt_c.step_count, opt_c.skipped_steps, opt_c.total_overflows) == (6, 1, 1)
    losses_c = run(model_c, opt_c, sched_c, data[6:], 6, poison_at)

    assert all(bits_equal(a, b) for a, b in zip(losses_a, losses_b + losses_c, strict=True))
    assert all(bits_equal(a.detach(), c.detach())
               for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True))
    assert all(bits_equal(a, c) for a, c in zip(opt_a.master_params(), opt_c.master_params(), strict=True))
    assert opt_c.scaler == opt_a.scaler == LossScalerState(256.0, 4, 0, 2)
    assert (opt_c.step_count, opt_c.skipped_steps) == (opt_a.step_count, opt_a.skipped_steps) == (12, 2)
    assert opt_c.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_the_file_holds_fp32_masters_bit_for_bit_and_the_model_in_its_dtype(dtype: torch.dtype,
                                                                            tmp_path: Path) -> None:
    model = mlp(dtype)
    opt = MasterWeightOptimizer(model.parameters(), lr=1e-2)
    for x, y in batches(3, dtype):
        backward(opt, model, x, y)
        assert opt.step()
    path = tmp_path / "ckpt"
    ckptfmt.torch.save(path, {"model": model.state_dict(), "optim": opt.state_dict()})
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    with ckptfmt.open(path) as ckpt:
        for i in range(4):
            assert ckpt.info(f"optim/master_weights/{i}").dtype == "float32"
        for key in model.state_dict():
            assert ckpt.info(f"model/{key}").dtype == name
    loaded = ckptfmt.torch.load(path)
    assert loaded["optim"]["training_weights_dtype"] == [name] * 4
    assert all(bits_equal(saved, m) for saved, m in zip(loaded["optim"]["master_weights"], opt.master_params(),
                                                        strict=True))
    # the masters carry information the low-precision weights lost
    assert any(not torch.equal(m, p.detach().float()) for m, p in zip(opt.master_params(), model.parameters(),
                                                                     strict=True))


def test_a_fallen_back_state_makes_a_fresh_model_fp32(tmp_path: Path) -> None:
    model = mlp(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), max_consecutive_overflows=1)
    (x, y), = batches(1, torch.float16)
    backward(opt, model, x, y)
    poison(model)
    assert not opt.step() and opt.fallback
    path = tmp_path / "ckpt"
    ckptfmt.torch.save(path, opt.state_dict())

    model2 = mlp(torch.float16, seed=5)
    opt2 = MasterWeightOptimizer(model2.parameters(), max_consecutive_overflows=1)
    opt2.load_state_dict(ckptfmt.torch.load(path))
    assert opt2.fallback and opt2.loss_scale == 1.0
    assert [p.dtype for p in model2.parameters()] == [torch.float32] * 4
    assert all(bits_equal(p.detach(), m) for p, m in zip(model2.parameters(), model.parameters(), strict=True))
    backward(opt2, model2, x.float(), y)
    assert opt2.step()

    # and a state from before the fallback turns the fp32 parameters back into fp16
    model3 = mlp(torch.float16, seed=6)
    opt3 = MasterWeightOptimizer(model3.parameters())
    opt2.load_state_dict(opt3.state_dict())
    assert not opt2.fallback and opt2.loss_scale == 2.0**16
    assert all(bits_equal(p.detach(), q.detach()) for p, q in zip(model2.parameters(), model3.parameters(),
                                                                  strict=True))


# ---------------------------------------------------------------- bad states


def trained() -> tuple[nn.Module, MasterWeightOptimizer, dict[str, Any]]:
    model = mlp(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters())
    (x, y), = batches(1, torch.bfloat16)
    backward(opt, model, x, y)
    opt.step()
    return model, opt, copy.deepcopy(opt.state_dict())


def test_an_unknown_version_is_refused() -> None:
    _, opt, state = trained()
    with pytest.raises(UnsupportedVersionError, match="version 2 is not supported") as info:
        opt.load_state_dict(state | {"version": 2})
    assert isinstance(info.value, ValueError) and isinstance(info.value, CheckpointError)
    with pytest.raises(InvalidOptimizerStateError, match="'version'"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "version"})
    with pytest.raises(TypeError, match="mapping"):
        opt.load_state_dict([1, 2])  # type: ignore[arg-type]


def _shapes(state: dict[str, Any]) -> None:
    state["master_weights"][0] = torch.zeros(8, 16)
    state["master_weights"][3] = torch.zeros(5)


def _dtype(state: dict[str, Any]) -> None:
    state["master_weights"][1] = state["master_weights"][1].to(torch.bfloat16)


def _trained_in(state: dict[str, Any]) -> None:
    state["training_weights_dtype"][2] = "float16"


BAD: list[tuple[str, Callable[[dict[str, Any]], Any], list[str]]] = [
    ("count", lambda s: s["master_weights"].pop(), ["the state has 3 master weights, the optimizer has 4 parameters"]),
    ("shapes", _shapes, [r"master_weights\[0\] has shape \(8, 16\), the parameter \(16, 8\)",
                         r"master_weights\[3\] has shape \(5,\), the parameter \(4,\)"]),
    ("dtype", _dtype, [r"master_weights\[1\] is bfloat16, master weights are float32"]),
    ("training dtype", _trained_in, ["parameter 2 was trained in float16, this one is bfloat16"]),
    ("unknown dtype name", lambda s: s["training_weights_dtype"].__setitem__(0, "int8"), ["'int8' is not"]),
    ("missing key", lambda s: s.pop("scaler"), ["lacks 'scaler'"]),
    ("bad scale", lambda s: s["scaler"].__setitem__("scale", -1.0), ["scale must be a finite number > 0"]),
    ("bad counter", lambda s: s["scaler"].__setitem__("total_overflows", -3), ["total_overflows=-3"]),
    ("bad option", lambda s: s["options"].__setitem__("backoff_factor", 2.0), ["backoff_factor must be < 1"]),
    ("unknown option", lambda s: s["options"].__setitem__("loss_scale_window", 5), ["unknown.*loss_scale_window"]),
    ("step count", lambda s: s.__setitem__("step_count", "7"), ["step_count must be an int"]),
    ("fallback", lambda s: s.__setitem__("fallback", 1), ["fallback must be a bool"]),
    ("optimizer class", lambda s: s.__setitem__("optimizer_class", "SGD"),
     ["'SGD' base optimizer, this one is a AdamW"]),
]


@pytest.mark.parametrize(("mutate", "patterns"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_state_is_refused_with_every_problem_named_and_nothing_changed(
        mutate: Callable[[dict[str, Any]], Any], patterns: list[str]) -> None:
    model, opt, state = trained()
    mutate(state)
    before, masters, counters = params_of(model), [m.clone() for m in opt.master_params()], opt.scaler
    base_before = copy.deepcopy(opt.optimizer.state_dict())
    with pytest.raises(InvalidOptimizerStateError) as info:
        opt.load_state_dict(state)
    assert isinstance(info.value, ValueError)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert all(bits_equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert all(bits_equal(a, b) for a, b in zip(masters, opt.master_params(), strict=True))
    assert opt.scaler == counters and opt.step_count == 1
    assert torch.equal(opt.optimizer.state_dict()["state"][0]["exp_avg"], base_before["state"][0]["exp_avg"])


def test_a_base_state_for_other_groups_is_refused_by_torch() -> None:
    _, _, state = trained()
    other = mlp(torch.bfloat16)
    opt2 = MasterWeightOptimizer([{"params": other[0].parameters()}, {"params": other[2].parameters()}])
    with pytest.raises(ValueError, match="parameter groups"):
        opt2.load_state_dict(state)
