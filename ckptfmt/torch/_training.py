"""Training checkpoints: everything a run needs to continue exactly where it stopped, in one file.

The file is an ordinary ckptfmt checkpoint whose tree is::

    {"kind": "ckptfmt.training", "version": 1,
     "model": model.state_dict(), "optimizer": ..., "scheduler": ..., "scaler": ...,
     "rng": {"python": ..., "numpy": ..., "torch": ..., "cuda": [...]},
     "progress": {"epoch": ..., "step": ..., "loss": ...},
     "config": ..., "vocab": ..., "extra": ...}

Optimizer, scheduler and scaler states are stored as the tensors and plain values their
``state_dict()`` holds (int keys and tuples survive as such), never pickled; a human-readable
summary (kind, epoch, step, loss) is in the file's user metadata, shown by ``ckptfmt inspect``.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import _api
from ..errors import CheckpointError, CorruptCheckpointError

KIND = "ckptfmt.training"
VERSION = 1


class StateDictMismatchError(CheckpointError, ValueError):
    """A checkpoint's model state does not fit the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: dict[str, tuple[Any, Any]]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append("shape mismatches " + ", ".join(
                f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, (a, b) in mismatched.items()))
        super().__init__("model state does not match the model: " + "; ".join(parts)
                         + " (restore with strict=False to load the rest)")


@dataclass
class TrainingCheckpoint:
    """What :func:`load_checkpoint` returns; loading needs no model."""

    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None
    config: Any = None
    vocab: Any = None
    extra: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    #: whether the tensors are views of a memory map of the file (``load_checkpoint(mmap=True)``)
    mapped: bool = field(default=False, repr=False, compare=False)


# ---------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The state of every generator a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": np.asarray(internal, dtype=np.uint64), "gauss_next": gauss},
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"name": name, "keys": np.asarray(keys, dtype=np.uint32), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back as :func:`capture_rng_state` found it."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in np.asarray(py["state"]).tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(_cpu_uint8(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_cpu_uint8(s) for s in state["cuda"]]
        if len(states) != torch.cuda.device_count():
            warnings.warn(f"checkpoint holds RNG states for {len(states)} CUDA devices, this process sees "
                          f"{torch.cuda.device_count()}; restoring those that exist", stacklevel=3)
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


def _cpu_uint8(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).to(device="cpu", dtype=torch.uint8).clone()


# ---------------------------------------------------------------- save / load


def _state(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module | dict[str, Any], optimizer: Any = None, *,
                    scheduler: Any = None, scaler: Any = None, epoch: int | None = None, step: int | None = None,
                    loss: float | None = None, config: Any = None, vocab: Any = None, rng: bool = True,
                    extra: Any = None, metadata: dict[str, Any] | None = None, durable: bool = True,
                    background: bool = False, staging: Any = None, progress: Any = None) -> Any:
    """Write one atomic ``.ckpt`` file holding the whole training state.

    ``model`` may also be a state dict. ``optimizer``, ``scheduler`` and ``scaler`` are anything
    with ``state_dict()`` (torch optimizers, LR schedulers, ``torch.amp.GradScaler``,
    :class:`ckptfmt.torch.amp.MasterWeightOptimizer`, a resumable sampler). ``config``, ``vocab``
    and ``extra`` hold plain data (dicts, lists, str, numbers) and tensors. ``background``/``staging``/
    ``progress``: as :func:`ckptfmt.save` (with ``background`` a :class:`ckptfmt.SaveHandle` is returned).
    """
    if isinstance(loss, torch.Tensor):
        loss = float(loss.detach())
    if isinstance(loss, np.generic):  # numpy scalars, common for these, stored as plain numbers
        loss = loss.item()
    epoch = int(epoch) if isinstance(epoch, np.integer) else epoch
    step = int(step) if isinstance(step, np.integer) else step
    tree = {
        "kind": KIND,
        "version": VERSION,
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else dict(model),
        "optimizer": _state(optimizer),
        "scheduler": _state(scheduler),
        "scaler": _state(scaler),
        "rng": capture_rng_state() if rng else None,
        "progress": {"epoch": epoch, "step": step, "loss": loss},
        "config": config,
        "vocab": vocab,
        "extra": extra,
    }
    summary = {"kind": KIND, "epoch": epoch, "step": step, "loss": loss, **(metadata or {})}
    return _api.save(path, tree, metadata=summary, durable=durable, background=background, staging=staging,
                     progress=progress)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str = "cpu", verify: bool = True,
                    mmap: bool = True) -> TrainingCheckpoint:
    """Read a training checkpoint; tensors land on ``map_location``. The model is not needed.

    ``mmap=True`` (the default) makes CPU tensors views of a map of the file (fast, no copy);
    ``mmap=False`` reads them into the process's own memory. With ``verify`` each blob is checked
    as it is read: every byte hashed once.
    """
    with _api.open(path) as ckpt:
        tree = ckpt.load(backend="torch", device=map_location, verify=verify, mmap=mmap)
        metadata = dict(ckpt.metadata)
        where = ckpt.path
    if not isinstance(tree, dict) or tree.get("kind") != KIND:
        raise CorruptCheckpointError(where, "not a training checkpoint (its tree has no kind "
                                            f"{KIND!r}); load it with ckptfmt.torch.load instead")
    if tree.get("version") != VERSION:
        from ..errors import UnsupportedVersionError

        raise UnsupportedVersionError(where, f"training checkpoint version {tree.get('version')!r}; this "
                                             f"ckptfmt reads version {VERSION}")
    progress = tree.get("progress") or {}
    return TrainingCheckpoint(
        model_state=tree["model"], optimizer_state=tree.get("optimizer"), scheduler_state=tree.get("scheduler"),
        scaler_state=tree.get("scaler"), rng_state=tree.get("rng"), epoch=progress.get("epoch"),
        step=progress.get("step"), loss=progress.get("loss"), config=tree.get("config"), vocab=tree.get("vocab"),
        extra=tree.get("extra"), metadata=metadata, path=where, mapped=mmap and str(map_location) == "cpu")


def _owned(value: Any) -> Any:
    """``value`` with every tensor copied into fresh memory (a restored state must not stay mapped on the file)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_owned(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_owned(v) for v in value)
    return value


def restore_checkpoint(ckpt: TrainingCheckpoint, model: torch.nn.Module, optimizer: Any = None, *,
                       scheduler: Any = None, scaler: Any = None, strict: bool = True,
                       restore_rng: bool = True) -> TrainingCheckpoint:
    """Put a loaded checkpoint back into live objects; returns ``ckpt`` for chaining.

    Nothing restored stays mapped on the file: the model's parameters are copied into, and optimizer,
    scheduler and scaler states are copied before they are handed over when ``ckpt`` is mapped, so
    the file may then be pruned, replaced or truncated. Shapes are checked before anything is
    written into the model. ``strict``: any missing,
    unexpected or mis-shaped key raises :class:`StateDictMismatchError` listing them all;
    otherwise each kind is reported in one warning and skipped, and the rest is restored.
    """
    own = model.state_dict()
    saved = ckpt.model_state
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    mismatched = {k: (tuple(saved[k].shape), tuple(own[k].shape)) for k in own
                  if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != own[k].shape}
    if strict and (missing or unexpected or mismatched):
        raise StateDictMismatchError(missing, unexpected, mismatched)
    if missing:
        warnings.warn(f"checkpoint has no value for {missing}; they keep their current values", stacklevel=2)
    if unexpected:
        warnings.warn(f"checkpoint keys {unexpected} are not in the model; skipped", stacklevel=2)
    if mismatched:
        warnings.warn("shape mismatch, skipped: " + ", ".join(
            f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in mismatched.items()), stacklevel=2)
    usable = {k: v for k, v in saved.items() if k in own and k not in mismatched}
    model.load_state_dict(usable, strict=not (missing or unexpected or mismatched))
    for obj, state, name in ((optimizer, ckpt.optimizer_state, "optimizer"),
                             (scheduler, ckpt.scheduler_state, "scheduler"), (scaler, ckpt.scaler_state, "scaler")):
        if obj is None:
            continue
        if state is None:
            raise CheckpointError(f"{ckpt.path}: the checkpoint holds no {name} state to restore")
        obj.load_state_dict(_owned(state) if ckpt.mapped else state)
    if restore_rng and ckpt.rng_state is not None:
        restore_rng_state(ckpt.rng_state)
    return ckpt
