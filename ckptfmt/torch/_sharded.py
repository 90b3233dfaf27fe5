"""Sharded training checkpoints: a ``CheckpointManager`` step saved by every rank through ckptfmt.distributed.

The step directory is a sharded checkpoint (spec/DISTRIBUTED.md §8) whose state is::

    {"model": <model state dict>, "optim": <optimizer state dict>,       # torch.distributed.checkpoint.state_dict
     "scheduler": ..., "scaler": ..., "progress": {"epoch", "step", "loss"},
     "config": ..., "vocab": ..., "extra": ..., "rng_state": {"rank<N>": ...}}

Model and optimizer go through DCP's ``get_state_dict``/``set_state_dict``, so FSDP2 (``fully_shard``),
tensor-parallel and plain modules all save their own shards and load at any world size.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._training import KIND, TrainingCheckpoint


def in_process_group() -> bool:
    """True when torch.distributed has an initialised default process group."""
    return dist.is_available() and dist.is_initialized()


def has_dtensors(model: Any) -> bool:
    """True when the model holds DTensor parameters (FSDP2, tensor parallel): one file cannot hold them."""
    from torch.distributed.tensor import DTensor

    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return any(isinstance(p, DTensor) for p in params)


def _summary(step: int, epoch: Any, loss: Any, metadata: dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(loss, torch.Tensor):
        loss = float(loss.detach())
    if isinstance(loss, np.generic):
        loss = loss.item()
    return {"kind": KIND, "epoch": epoch, "step": step, "loss": loss, **(metadata or {})}


def _live_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The model's (and optimizer's) DCP state dicts: each rank's own shards, FQN-keyed."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(path: str, step: int, model: Any, optimizer: Any = None, *, scheduler: Any = None,
                 scaler: Any = None, epoch: int | None = None, loss: float | None = None, config: Any = None,
                 vocab: Any = None, rng: bool = True, extra: Any = None, metadata: dict[str, Any] | None = None,
                 durable: bool = True, process_group: Any = None, blocking: bool = True) -> Any:
    """Save one training step as a sharded checkpoint at ``path``; called on every rank of the group.

    Returns the path; with ``blocking=False`` the future of :func:`ckptfmt.distributed.async_save`.
    """
    import ckptfmt.distributed as cd

    summary = _summary(step, epoch, loss, metadata)
    state = _live_state(model, optimizer)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state["progress"] = {"epoch": epoch, "step": step, "loss": summary["loss"]}
    for k, v in (("config", config), ("vocab", vocab), ("extra", extra)):
        if v is not None:
            state[k] = v
    opts = cd.SaveOptions(name=os.path.basename(path), rng_state=rng, metadata=summary, sync=durable)
    if not blocking:
        return cd.async_save(state, path, process_group=process_group, options=opts)
    return cd.save(state, path, process_group=process_group, options=opts)


#: the small parts of a step every rank reads whole (plain values and replicated states)
SMALL = ("scheduler", "scaler", "progress", "config", "vocab", "extra")


def _small_parts(path: str) -> dict[str, Any]:
    """The scheduler, scaler, progress, config, vocab and extra of a sharded step (read whole, as torch tensors)."""
    import ckptfmt.distributed as cd

    return dict(_to_torch(cd.consolidate(path, only=SMALL)))


def restore_sharded(path: str, model: Any, optimizer: Any = None, *, scheduler: Any = None, scaler: Any = None,
                    strict: bool = True, restore_rng: bool = True, process_group: Any = None) -> TrainingCheckpoint:
    """Load a sharded step into live objects: model and optimizer reshard to this group's layout (or to plain
    tensors without one); the small parts are read whole. Each rank's RNG state is restored only when
    the world size is the one that saved it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    import ckptfmt.distributed as cd

    from ..distributed._directory import describe

    info = describe(path)
    world = dist.get_world_size(process_group) if in_process_group() else 1
    rng = restore_rng and info["world_size"] == world
    state = _live_state(model, optimizer)
    cd.load(state, path, process_group=process_group, options=cd.LoadOptions(strict=strict, rng_state=rng))
    small = _small_parts(path)
    sdo = StateDictOptions(strict=strict)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=sdo)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=sdo)
    if scheduler is not None and small.get("scheduler") is not None:
        scheduler.load_state_dict(small["scheduler"])
    if scaler is not None and small.get("scaler") is not None:
        scaler.load_state_dict(small["scaler"])
    return _checkpoint(path, {**small, "model": state["model"], "optim": state.get("optim")}, info)


def _checkpoint(path: str, state: dict[str, Any], info: dict[str, Any]) -> TrainingCheckpoint:
    progress = state.get("progress") or {}
    return TrainingCheckpoint(
        model_state=state.get("model") or {}, optimizer_state=state.get("optim"),
        scheduler_state=state.get("scheduler"), scaler_state=state.get("scaler"),
        rng_state=(state.get("rng_state") or {}).get("rank0"),
        epoch=progress.get("epoch"), step=progress.get("step"), loss=progress.get("loss"),
        config=state.get("config"), vocab=state.get("vocab"), extra=state.get("extra"),
        metadata=dict(info["metadata"]), path=path)


def _to_torch(value: Any, device: str = "cpu") -> Any:
    """A consolidated state (numpy arrays) with every array as a torch tensor (bfloat16 and float8 included)."""
    if isinstance(value, np.ndarray):
        from ..distributed._storage import _torch_dtype

        dtype = _torch_dtype(value.dtype.name)
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        t = torch.from_numpy(raw.copy()).view(dtype).reshape(value.shape)
        return t if str(device) == "cpu" else t.to(device)
    if isinstance(value, dict):
        return {k: _to_torch(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_torch(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_torch(v, device) for v in value)
    return value


def load_sharded(path: str, *, map_location: str = "cpu") -> TrainingCheckpoint:
    """A sharded step's consolidated state as a :class:`TrainingCheckpoint` (torch tensors, no process group)."""
    import ckptfmt.distributed as cd

    from ..distributed._directory import describe

    return _checkpoint(path, _to_torch(cd.consolidate(path), map_location), describe(path))
