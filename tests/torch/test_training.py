"""Training checkpoints: save_checkpoint / load_checkpoint / restore_checkpoint, RNG state, errors, file size."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402
from ckptfmt import _cli  # noqa: E402
from ckptfmt.errors import (  # noqa: E402
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    UnsupportedVersionError,
)
from ckptfmt.torch import (  # noqa: E402
    ResumableSampler,
    StateDictMismatchError,
    TrainingCheckpoint,
    capture_rng_state,
    load_checkpoint,
    restore_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

ALIGNMENT = 4096
HEADER_SIZE = FOOTER_SIZE = 64


# ---------------------------------------------------------------- helpers


def net(seed: int = 0) -> nn.Sequential:
    """A tiny model with parameters and buffers (running stats, an int64 counter)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: Any, data: list[tuple[torch.Tensor, torch.Tensor]], *, scheduler: Any = None,
          scaler: Any = None) -> list[float]:
    losses = []
    model.train()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, where: str = "") -> None:
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
    assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), where
    ua = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    ub = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(ua, ub), f"{where}: tensors differ"


def assert_same(a: Any, b: Any, where: str = "$") -> None:
    """Recursive exact equality: same container types (tuple stays tuple), same key types, bitwise tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert_bits_equal(a, b, where)
        return
    if isinstance(a, dict) and isinstance(b, dict):  # a state_dict's OrderedDict loads as a dict
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), f"{where}: key {k!r} changed type"
            assert_same(a[k], b[k], f"{where}/{k}")
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def flip_byte(path: Path | str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def first_blob_offset(path: Path | str, key_suffix: str = "") -> int:
    leaves = [leaf for leaf in ckptfmt.inspect(path)["leaves"] if leaf["kind"] == "tensor" and leaf["nbytes"] > 0
              and leaf["key"].endswith(key_suffix)]
    return int(leaves[0]["offset"])


OPTIMIZERS: dict[str, Callable[[Any], Any]] = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=0.05),
}


# ---------------------------------------------------------------- round trip


@pytest.fixture
def trained(tmp_path: Path) -> dict[str, Any]:
    """A model, AdamW, a scheduler and a GradScaler after a few real steps, saved with everything."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    train(model, opt, batches(3), scheduler=sched, scaler=scaler)
    sampler = ResumableSampler(10, seed=3)
    it = iter(sampler)
    next(it), next(it)
    path = tmp_path / "run" / "epoch3.ckpt"
    path.parent.mkdir()
    what = dict(epoch=3, step=42, loss=torch.tensor(1.25), config={"lr": 1e-2, "layers": [6, 8, 3], "name": "tiny",
                                                                    "betas": (0.9, 0.99), "flag": True, "none": None},
                vocab=["<pad>", "a", "b", "ü"], extra={"sampler": sampler.state_dict(), "ids": torch.arange(4)})
    save_checkpoint(path, model, opt, scheduler=sched, scaler=scaler, **what)
    return {"path": path, "model": model, "opt": opt, "sched": sched, "scaler": scaler, "sampler": sampler,
            "what": what}


def test_round_trip_of_everything(trained: dict[str, Any]) -> None:
    ckpt = load_checkpoint(trained["path"])  # no model needed
    assert isinstance(ckpt, TrainingCheckpoint)
    assert_same(ckpt.model_state, trained["model"].state_dict())
    assert ckpt.model_state["1.num_batches_tracked"].dtype == torch.int64
    assert_same(ckpt.optimizer_state, trained["opt"].state_dict())
    assert_same(ckpt.scheduler_state, trained["sched"].state_dict())
    assert_same(ckpt.scaler_state, trained["scaler"].state_dict())
    assert (ckpt.epoch, ckpt.step) == (3, 42)
    assert ckpt.loss == 1.25 and type(ckpt.loss) is float  # a tensor loss is stored as a float
    assert_same(ckpt.config, trained["what"]["config"])
    assert ckpt.vocab == ["<pad>", "a", "b", "ü"]
    assert_same(ckpt.extra, trained["what"]["extra"])
    assert ckpt.path is not None and os.path.samefile(ckpt.path, trained["path"])
    assert {"python", "numpy", "torch"} <= set(ckpt.rng_state)


def test_loading_needs_no_model_and_returns_plain_tensors(trained: dict[str, Any]) -> None:
    ckpt = load_checkpoint(os.fspath(trained["path"]))
    assert isinstance(ckpt.model_state, dict)  # an OrderedDict with _metadata, as state_dict() gave
    assert all(type(k) is str for k in ckpt.model_state)
    assert all(type(v) is torch.Tensor for v in ckpt.model_state.values())  # not nn.Parameter
    assert all(v.device.type == "cpu" for v in ckpt.model_state.values())
    # the loaded tensors are the caller's: writing one changes neither the file nor a second load
    ckpt.model_state["0.weight"].add_(1.0)
    assert_bits_equal(load_checkpoint(trained["path"]).model_state["0.weight"], trained["model"][0].weight)


def test_training_checkpoint_fields() -> None:
    names = [f.name for f in dataclasses.fields(TrainingCheckpoint)]
    assert names == ["model_state", "optimizer_state", "scheduler_state", "scaler_state", "rng_state", "epoch",
                     "step", "loss", "config", "vocab", "extra", "metadata", "path", "mapped"]
    empty = TrainingCheckpoint(model_state={})
    assert (empty.optimizer_state, empty.epoch, empty.step, empty.loss, empty.path) == (None,) * 5
    assert empty.metadata == {} and empty.metadata is not TrainingCheckpoint(model_state={}).metadata


def test_model_only_checkpoint_and_state_dict_input(tmp_path: Path) -> None:
    model = net()
    save_checkpoint(tmp_path / "a.ckpt", model, rng=False)
    save_checkpoint(tmp_path / "b.ckpt", model.state_dict(), rng=False)
    for name in ("a.ckpt", "b.ckpt"):
        ckpt = load_checkpoint(tmp_path / name)
        assert_same(ckpt.model_state, model.state_dict())
        assert (ckpt.optimizer_state, ckpt.scheduler_state, ckpt.scaler_state, ckpt.rng_state) == (None,) * 4
        assert (ckpt.epoch, ckpt.step, ckpt.loss, ckpt.config, ckpt.vocab, ckpt.extra) == (None,) * 6


def test_ckpt_extension_and_format_conventions(tmp_path: Path) -> None:
    """The path is used as given (the .ckpt convention is the caller's); the file is a versioned ckptfmt file."""
    model = net()
    save_checkpoint(tmp_path / "model.ckpt", model, step=1)
    save_checkpoint(tmp_path / "noext", model, step=1)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt", "noext"]  # no extension added, no temporaries left
    assert (tmp_path / "model.ckpt").read_bytes()[:8] == b"\x89CKPT\r\n\x1a"
    info = ckptfmt.inspect(tmp_path / "model.ckpt")
    assert info["format_version"] == "1.0" and info["checksummed"] and info["alignment"] == ALIGNMENT
    assert info["producer"]["name"] == "ckptfmt" and info["created"].endswith("Z")  # who wrote it, and when
    values = {leaf["key"]: leaf["value"] for leaf in info["leaves"] if leaf["kind"] == "value"}
    assert values["kind"] == "ckptfmt.training" and values["version"] == 1
    assert load_checkpoint(tmp_path / "noext").step == 1


def test_metadata_visible_to_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, net(), epoch=2, step=300, loss=0.75, metadata={"run": "abc", "tokens": 12345})
    meta = ckptfmt.inspect(path)["metadata"]
    assert meta == {"kind": "ckptfmt.training", "epoch": 2, "step": 300, "loss": 0.75, "run": "abc", "tokens": 12345}
    assert load_checkpoint(path).metadata == meta
    with ckptfmt.open(path) as ckpt:
        assert ckpt.metadata["step"] == 300
    assert _cli.main(["inspect", os.fspath(path)]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("metadata: ")]
    assert len(shown) == 1 and json.loads(shown[0].removeprefix("metadata: ")) == meta


def test_metadata_of_an_unset_progress_is_none(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, net())
    assert ckptfmt.inspect(path)["metadata"] == {"kind": "ckptfmt.training", "epoch": None, "step": None,
                                                 "loss": None}


# ---------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_exact_and_training_continues_bitwise(tmp_path: Path, name: str) -> None:
    data = batches(6)
    model = net()
    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, data[:3], scheduler=sched)
    save_checkpoint(tmp_path / "c.ckpt", model, opt, scheduler=sched, step=3)
    straight = train(model, opt, data[3:], scheduler=sched)

    ckpt = load_checkpoint(tmp_path / "c.ckpt")
    state = ckpt.optimizer_state
    assert state is not None
    assert set(state) == {"state", "param_groups"}
    assert all(type(k) is int for k in state["state"])
    group = state["param_groups"][0]
    assert group["params"] == list(range(len(list(model.parameters()))))
    if name == "sgd-momentum":
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-4)
        assert all(isinstance(s["momentum_buffer"], torch.Tensor) for s in state["state"].values())
    else:
        assert type(group["betas"]) is tuple
        assert group["betas"] == ((0.8, 0.95) if name == "adam" else (0.9, 0.999))
        for s in state["state"].values():
            assert isinstance(s["step"], torch.Tensor) and s["step"].dtype == torch.float32
            assert s["step"].shape == () and float(s["step"]) == 3.0
            assert {"exp_avg", "exp_avg_sq"} <= set(s)
        if name == "adamw-amsgrad":
            assert group["amsgrad"] is True and all("max_exp_avg_sq" in s for s in state["state"].values())
    assert group["lr"] == group["initial_lr"] * 0.5  # as the schedule left it after 3 steps
    assert group["initial_lr"] == OPTIMIZERS[name](net().parameters()).param_groups[0]["lr"]

    # a fresh process-like setup: other initial weights, new optimizer and scheduler, restored from the file
    model2 = net(seed=99)
    opt2 = OPTIMIZERS[name](model2.parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    restore_checkpoint(ckpt, model2, opt2, scheduler=sched2)
    resumed = train(model2, opt2, data[3:], scheduler=sched2)
    assert resumed == straight
    assert_same(params_of(model2), params_of(model))
    assert_same(opt2.state_dict(), opt.state_dict())
    assert_same(sched2.state_dict(), sched.state_dict())


def test_loaded_optimizer_state_feeds_load_state_dict_directly(tmp_path: Path) -> None:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, batches(2))
    save_checkpoint(tmp_path / "c.ckpt", model, opt)
    ckpt = load_checkpoint(tmp_path / "c.ckpt")
    model2 = net(seed=5)
    model2.load_state_dict(ckpt.model_state)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert_same(opt2.state_dict(), opt.state_dict())
    more = batches(2, seed=8)
    assert train(model2, opt2, more) == train(model, opt, more)
    assert_same(params_of(model2), params_of(model))


def test_grad_scaler_state_after_an_overflow(tmp_path: Path) -> None:
    """Loss scale and growth tracker (the mixed-precision counters) survive exactly."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    train(model, opt, batches(2), scaler=scaler)
    opt.zero_grad()
    scaler.scale(model(batches(1)[0][0]).sum() * math.inf).backward()  # overflow: the step is skipped
    before = params_of(model)
    scaler.step(opt)
    scaler.update()
    assert_same(params_of(model), before)
    assert scaler.get_scale() == 2.0**9
    save_checkpoint(tmp_path / "s.ckpt", model, opt, scaler=scaler)
    ckpt = load_checkpoint(tmp_path / "s.ckpt")
    assert ckpt.scaler_state == {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                                 "_growth_tracker": 0}
    scaler2 = torch.amp.GradScaler("cpu")
    restore_checkpoint(ckpt, net(1), torch.optim.SGD(net(1).parameters(), lr=0.1), scaler=scaler2)
    assert scaler2.get_scale() == 512.0 and scaler2.get_growth_interval() == 3


def test_restoring_an_absent_state_is_an_error(tmp_path: Path) -> None:
    model = net()
    save_checkpoint(tmp_path / "m.ckpt", model)
    ckpt = load_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore_checkpoint(ckpt, net(), torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------- strict / partial restore


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)


class Other(nn.Module):
    """``a.weight`` of another shape, ``b`` gone (unexpected in the checkpoint), ``c`` new (missing)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.c = nn.Linear(3, 2)


@pytest.fixture
def wide_ckpt(tmp_path: Path) -> TrainingCheckpoint:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "w.ckpt", Wide(), rng=False)
    return load_checkpoint(tmp_path / "w.ckpt")


def test_strict_restore_reports_every_kind_of_mismatch_at_once(wide_ckpt: TrainingCheckpoint) -> None:
    torch.manual_seed(1)
    model = Other()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = params_of(model)
    with pytest.raises(StateDictMismatchError) as info:
        restore_checkpoint(wide_ckpt, model, opt)
    err = info.value
    assert isinstance(err, CheckpointError) and isinstance(err, ValueError)
    assert err.missing == ["c.weight", "c.bias"]
    assert err.unexpected == ["b.weight", "b.bias"]
    assert err.mismatched == {"a.weight": ((3, 4), (3, 5))}
    msg = str(err)
    for key in ("c.weight", "c.bias", "b.weight", "b.bias", "a.weight", "(3, 4)", "(3, 5)", "strict=False"):
        assert key in msg
    # nothing was written: a.bias (same shape in both) keeps the model's value
    assert_same(params_of(model), before)
    assert not torch.equal(model.a.bias, wide_ckpt.model_state["a.bias"])


def test_strict_restore_checks_shapes_before_writing_anything(wide_ckpt: TrainingCheckpoint) -> None:
    state = dict(wide_ckpt.model_state)
    state["b.bias"] = torch.zeros(7)  # the last key is the bad one
    ckpt = dataclasses.replace(wide_ckpt, model_state=state)
    torch.manual_seed(3)
    model = Wide()
    before = params_of(model)
    with pytest.raises(StateDictMismatchError) as info:
        restore_checkpoint(ckpt, model)
    assert (info.value.missing, info.value.unexpected) == ([], [])
    assert info.value.mismatched == {"b.bias": ((7,), (2,))}
    assert_same(params_of(model), before)


def test_partial_restore_warns_naming_the_keys_and_restores_the_rest(wide_ckpt: TrainingCheckpoint) -> None:
    torch.manual_seed(1)
    model = Other()
    before = params_of(model)
    with pytest.warns(UserWarning) as record:
        restore_checkpoint(wide_ckpt, model, strict=False)
    text = "\n".join(str(w.message) for w in record)
    for key in ("c.weight", "c.bias", "b.weight", "b.bias", "a.weight"):
        assert key in text
    assert_bits_equal(model.a.bias, wide_ckpt.model_state["a.bias"])  # restored
    assert_bits_equal(model.a.weight, before["a.weight"])  # mis-shaped: skipped
    assert_bits_equal(model.c.weight, before["c.weight"])  # missing: kept
    assert_bits_equal(model.c.bias, before["c.bias"])


def test_partial_restore_of_a_partial_state_dict(tmp_path: Path) -> None:
    """The seed's ``missing_key`` case: a checkpoint holding only part of the model: warning + skip."""
    torch.manual_seed(0)
    full = Wide()
    save_checkpoint(tmp_path / "p.ckpt", {"a.weight": full.a.weight, "a.bias": full.a.bias})
    torch.manual_seed(9)
    model = Wide()
    b_before = model.b.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"b\.weight"):
        restore_checkpoint(load_checkpoint(tmp_path / "p.ckpt"), model, strict=False)
    assert_bits_equal(model.a.weight, full.a.weight)
    assert_bits_equal(model.b.weight, b_before)


def test_matching_restore_emits_no_warning(wide_ckpt: TrainingCheckpoint) -> None:
    model = Wide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert restore_checkpoint(wide_ckpt, model, strict=False) is wide_ckpt
    assert_same(params_of(model), wide_ckpt.model_state)


# ---------------------------------------------------------------- RNG


def draws() -> tuple[Any, ...]:
    return (random.random(), random.gauss(0, 1), random.getrandbits(64), np.random.normal(), np.random.rand(3).tolist(),
            torch.rand(4).tolist(), torch.randn(2).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_state_is_restored(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # leave a cached second gaussian in each generator that has one
    np.random.normal()
    model = net()
    save_checkpoint(tmp_path / "r.ckpt", model)
    after_save = draws()
    draws()
    ckpt = load_checkpoint(tmp_path / "r.ckpt")
    assert ckpt.rng_state is not None
    if not torch.cuda.is_available():
        assert "cuda" not in ckpt.rng_state
    restore_checkpoint(ckpt, model)
    assert draws() == after_save


def test_restore_rng_false_leaves_generators_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    save_checkpoint(tmp_path / "r.ckpt", model)
    after_save = draws()
    now = capture_rng_state()
    restore_checkpoint(load_checkpoint(tmp_path / "r.ckpt"), model, restore_rng=False)
    got = draws()
    assert got != after_save
    restore_rng_state(now)
    assert draws() == got


def test_capture_and_restore_rng_state_directly() -> None:
    state = capture_rng_state()
    assert set(state) >= {"python", "numpy", "torch"}
    first = draws()
    restore_rng_state(state)
    assert draws() == first
    restore_rng_state({})  # nothing to restore is fine


def test_rng_false_stores_no_rng_state(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "n.ckpt", net(), rng=False)
    assert load_checkpoint(tmp_path / "n.ckpt").rng_state is None


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "step-1.ckpt"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(path)
    assert isinstance(info.value, FileNotFoundError)
    assert os.fspath(path) in str(info.value) and "not found" in str(info.value)


def test_corrupted_blob(trained: dict[str, Any]) -> None:
    path = trained["path"]
    flip_byte(path, first_blob_offset(path, "weight") + 1)
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(path)
    assert isinstance(info.value, ChecksumMismatchError) and isinstance(info.value, ValueError)
    assert os.fspath(path) in str(info.value) and "corrupt" in str(info.value)


def test_truncated_file(trained: dict[str, Any]) -> None:
    path = trained["path"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptCheckpointError, match=re.escape(os.path.basename(path))):
        load_checkpoint(path)


def test_garbage_and_pickled_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(300))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled.ckpt")
    for name in ("garbage.ckpt", "pickled.ckpt"):
        with pytest.raises(CorruptCheckpointError, match=re.escape(name)):
            load_checkpoint(tmp_path / name)


def test_plain_ckptfmt_file_is_not_a_training_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.ckpt"
    ckptfmt.torch.save(path, net().state_dict())
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert os.fspath(path) in msg and "not a training checkpoint" in msg and "ckptfmt.torch.load" in msg


def test_newer_training_checkpoint_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.ckpt"
    ckptfmt.torch.save(path, {"kind": "ckptfmt.training", "version": 2, "model": {}})
    with pytest.raises(UnsupportedVersionError, match="version 2"):
        load_checkpoint(path)


def test_pickle_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    scaler = torch.amp.GradScaler("cpu")
    train(model, opt, batches(1), scheduler=sched, scaler=scaler)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    with monkeypatch.context() as m:
        for name in ("load", "loads", "dump", "dumps"):
            m.setattr(pickle, name, boom)
        m.setattr(torch, "load", boom)
        m.setattr(torch, "save", boom)
        save_checkpoint(tmp_path / "p.ckpt", model, opt, scheduler=sched, scaler=scaler, config={"a": (1, 2)})
        ckpt = load_checkpoint(tmp_path / "p.ckpt")
        restore_checkpoint(ckpt, model, opt, scheduler=sched, scaler=scaler)
    assert_same(ckpt.optimizer_state, opt.state_dict())


# ---------------------------------------------------------------- atomic writes


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptfmt import _writer

    path = tmp_path / "model.ckpt"
    model = net()
    save_checkpoint(path, model, step=1)
    good = path.read_bytes()

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(_writer.Writer, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, net(seed=4), step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.ckpt"]  # the temporary is gone
    assert load_checkpoint(path).step == 1


# ---------------------------------------------------------------- file size


def file_layout(path: Path) -> tuple[int, int, int]:
    """(file size, tensor bytes, alignment padding), the padding measured from the file itself."""
    data = path.read_bytes()
    meta_offset, meta_len, _ = struct.unpack_from("<QQQ", data, len(data) - FOOTER_SIZE)
    assert meta_offset + meta_len + FOOTER_SIZE == len(data)
    info = ckptfmt.inspect(path)
    assert info["alignment"] == ALIGNMENT
    blobs = sorted({(leaf["offset"], leaf["nbytes"]) for leaf in info["leaves"]
                    if leaf["kind"] in ("tensor", "scalar") and leaf["nbytes"] > 0})
    assert sum(n for _, n in blobs) == info["tensor_bytes"]
    pos, padding = HEADER_SIZE, 0
    for offset, nbytes in blobs:
        assert offset % ALIGNMENT == 0 and offset >= pos
        assert offset - pos < ALIGNMENT  # no gap larger than one alignment unit
        padding += offset - pos
        pos = offset + nbytes
    assert meta_offset % ALIGNMENT == 0 and meta_offset - pos < ALIGNMENT
    padding += meta_offset - pos
    return len(data), info["tensor_bytes"], padding


def tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def test_file_size_is_model_plus_optimizer_plus_padding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    model_bytes = tensor_bytes(model.state_dict())
    opt_bytes = tensor_bytes(opt.state_dict())
    assert opt_bytes >= 2 * model_bytes  # two moments (plus the step counters)
    path = tmp_path / "big.ckpt"
    save_checkpoint(path, model, opt, epoch=1, step=1, loss=0.5, rng=False)
    size, stored, padding = file_layout(path)
    assert stored == model_bytes + opt_bytes  # every tensor stored once, nothing else
    assert model_bytes + opt_bytes + padding <= size <= 1.01 * (model_bytes + opt_bytes) + padding


def test_sgd_momentum_checkpoint_is_about_twice_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    model_bytes = tensor_bytes(model.state_dict())
    path = tmp_path / "sgd.ckpt"
    save_checkpoint(path, model, opt)  # RNG state included: small next to the model
    size, stored, padding = file_layout(path)
    assert 2 * model_bytes <= stored <= 2 * model_bytes + 16 * 1024
    assert size - padding <= 1.01 * 2 * model_bytes + 16 * 1024
