"""Lightning .ckpt files (the dict Trainer.save_checkpoint writes, built here with torch.save) resume through
ckptfmt.torch.restore_checkpoint.

The structure follows Lightning's ``_CheckpointConnector.dump_checkpoint``
(src/lightning/pytorch/trainer/connectors/checkpoint_connector.py); Lightning itself is not needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import UnsafePickleError, convert, detect

torch = pytest.importorskip("torch")
from ckptfmt.torch import load_checkpoint, restore_checkpoint  # noqa: E402


class LitModel(torch.nn.Module):
    """What a LightningModule's state_dict looks like: the network under an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


class Config:
    """A user class in hyper-parameters (as some LightningModules store): not allowed."""


def train(steps: int) -> tuple[Any, Any, Any, Any]:
    torch.manual_seed(0)
    model = LitModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(steps):
        loss = model.model(torch.full((3, 4), float(i))).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, scaler


def lightning_checkpoint(model: Any, opt: Any, sched: Any, scaler: Any, *, epoch: int, step: int) -> dict[str, Any]:
    loop_progress = {"total": {"ready": step, "started": step, "processed": step, "completed": step},
                     "current": {"ready": 1, "started": 1, "processed": 1, "completed": 1}}
    return {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": step},
                               "epoch_progress": loop_progress},
                  "validate_loop": {"state_dict": {}}, "test_loop": {"state_dict": {}}, "predict_loop": {}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}": {
            "monitor": "val_loss", "best_model_score": torch.tensor(0.25), "best_model_path": "/ckpts/a.ckpt",
            "current_score": torch.tensor(0.3), "dirpath": "/ckpts",
            "best_k_models": {"/ckpts/a.ckpt": torch.tensor(0.25)},
            "kth_best_model_path": "/ckpts/a.ckpt", "kth_value": torch.tensor(0.25), "last_model_path": ""}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "MixedPrecision": scaler.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-2, "hidden": 8, "layers": [4, 8, 2], "dropout": np.float64(0.1)},
    }


def test_a_lightning_checkpoint_resumes_through_restore_checkpoint(tmp_path: Path) -> None:
    model, opt, sched, scaler = train(3)
    src = tmp_path / "epoch=1-step=3.ckpt"
    torch.save(lightning_checkpoint(model, opt, sched, scaler, epoch=1, step=3), src)
    assert detect(src) == "lightning"
    report = convert(src, tmp_path / "out.ckpt")
    assert report.source_format == "lightning"

    ckpt = load_checkpoint(tmp_path / "out.ckpt")
    assert (ckpt.epoch, ckpt.step) == (1, 3)
    assert ckpt.config == {"lr": 1e-2, "hidden": 8, "layers": [4, 8, 2], "dropout": np.float64(0.1)}
    lightning = ckpt.extra["lightning"]
    assert lightning["pytorch-lightning_version"] == "2.4.0" and lightning["hparams_name"] == "kwargs"
    assert lightning["loops"]["fit_loop"]["epoch_loop.state_dict"] == {"_batches_that_stepped": 3}
    (cb,) = lightning["callbacks"].values()
    assert float(cb["best_model_score"]) == 0.25 and cb["best_model_path"] == "/ckpts/a.ckpt"
    assert len(lightning["optimizer_states"]) == 1 and len(lightning["lr_schedulers"]) == 1
    assert ckpt.metadata["kind"] == "ckptfmt.training" and ckpt.metadata["lightning_version"] == "2.4.0"

    torch.manual_seed(123)  # a fresh model, optimizer, scheduler and scaler, then resume
    model2 = LitModel()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    scaler2 = torch.amp.GradScaler("cpu")
    restore_checkpoint(ckpt, model2, opt2, scheduler=sched2, scaler=scaler2)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert sched2.state_dict() == sched.state_dict() and scaler2.get_scale() == 1024.0
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):  # one more step: bit-identical
        m.model(torch.ones(3, 4)).square().mean().backward()
        o.step()
        s.step()
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_a_weights_only_lightning_checkpoint(tmp_path: Path) -> None:
    model, *_ = train(1)
    src = tmp_path / "w.ckpt"
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.4.0",
                "state_dict": model.state_dict(), "loops": {}}, src)
    convert(src, tmp_path / "out.ckpt")
    ckpt = load_checkpoint(tmp_path / "out.ckpt")
    assert ckpt.optimizer_state is None and ckpt.scheduler_state is None and ckpt.scaler_state is None
    fresh = LitModel()
    restore_checkpoint(ckpt, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_lightning_hyper_parameters_with_foreign_objects_are_refused(tmp_path: Path) -> None:
    model, *_ = train(1)
    src = tmp_path / "h.ckpt"
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.4.0",
                "state_dict": model.state_dict(), "hyper_parameters": {"cfg": Config(), "ns": argparse.Namespace()}},
               src)
    with pytest.raises(UnsafePickleError, match=r"Config.*hyper_parameters/cfg"):
        convert(src, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()
    assert ckptfmt.convert.detect(src) == "lightning"
