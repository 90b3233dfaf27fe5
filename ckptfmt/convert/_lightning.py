"""PyTorch Lightning ``.ckpt`` files, converted into the training-checkpoint shape of ``ckptfmt.torch``.

Lightning's ``Trainer.save_checkpoint`` writes ``torch.save`` of a dict (reference: Lightning's
``_CheckpointConnector.dump_checkpoint``, src/lightning/pytorch/trainer/connectors/checkpoint_connector.py)::

    {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops": {"fit_loop", ...},
     "callbacks": {state key: state}, "optimizer_states": [...], "lr_schedulers": [...],
     "<PrecisionPlugin qualname>": {...}, "hparams_name", "hyper_parameters": {...}, <hooks' own keys>}

It is loaded with the same allowlist as any torch file (:mod:`._torch`); Lightning need not be
installed. The result is the tree ``ckptfmt.torch.save_checkpoint`` writes, so ``load_checkpoint`` and
``restore_checkpoint`` resume from it: ``model`` is ``state_dict``, ``optimizer`` and ``scheduler`` the
first of ``optimizer_states`` and ``lr_schedulers`` (None when there are none), ``scaler`` the
``MixedPrecision`` plugin's state (or the older ``native_amp_scaling_state``), ``progress`` epoch and
global step, ``config`` the hyper-parameters, and ``extra["lightning"]`` every other key, the full
optimizer and scheduler lists included, so nothing is lost.
"""

from __future__ import annotations

import zipfile
from typing import Any

from ._errors import CorruptSourceError

__all__ = ["VERSION_KEY", "is_lightning", "read_lightning"]

#: the key whose presence in a torch.save dict marks a Lightning checkpoint
VERSION_KEY = "pytorch-lightning_version"
_MARK = VERSION_KEY.encode()
_SNIFF = 1 << 16
_SCALER_KEYS = ("MixedPrecision", "MixedPrecisionPlugin", "native_amp_scaling_state")
_MAPPED = ("state_dict", "epoch", "global_step", "hyper_parameters")


def is_lightning(path: str, zf: zipfile.ZipFile) -> bool:
    """True if the torch zip's pickle names :data:`VERSION_KEY` near its start (Lightning writes it third)."""
    member = next((i for i in zf.infolist() if i.filename.endswith("data.pkl")), None)
    if member is None:
        return False
    try:
        with zf.open(member) as f:
            return _MARK in f.read(_SNIFF)
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def read_lightning(path: str, fmt: str, *, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training-checkpoint tree, user metadata) of a Lightning checkpoint."""
    from ..torch._training import KIND, VERSION
    from ._torch import load_torch

    ckpt, meta = load_torch(path, fmt, allow_pickle=allow_pickle)
    if not isinstance(ckpt, dict) or VERSION_KEY not in ckpt:
        raise CorruptSourceError(path, f"lightning: the pickle holds no dict with {VERSION_KEY!r}")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CorruptSourceError(path, "lightning: \"state_dict\" is missing or not a dict")
    optimizers = ckpt.get("optimizer_states") or []
    schedulers = ckpt.get("lr_schedulers") or []
    if not isinstance(optimizers, list) or not isinstance(schedulers, list):
        raise CorruptSourceError(path, "lightning: optimizer_states and lr_schedulers must be lists")
    scaler = next((ckpt[k] for k in _SCALER_KEYS if isinstance(ckpt.get(k), dict)), None)
    epoch, step = ckpt.get("epoch"), ckpt.get("global_step")
    tree = {
        "kind": KIND,
        "version": VERSION,
        "model": state,
        "optimizer": optimizers[0] if optimizers else None,
        "scheduler": schedulers[0] if schedulers else None,
        "scaler": scaler,
        "rng": None,  # Lightning does not save RNG states
        "progress": {"epoch": epoch, "step": step, "loss": None},
        "config": ckpt.get("hyper_parameters"),
        "vocab": None,
        "extra": {"lightning": {k: v for k, v in ckpt.items() if k not in _MAPPED}},
    }
    summary = {"kind": KIND, "epoch": epoch, "step": step, "loss": None,
               "lightning_version": ckpt.get(VERSION_KEY), **meta}
    return tree, summary
