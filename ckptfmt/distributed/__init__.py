"""Distributed checkpoints: ckptfmt as the storage layer of ``torch.distributed.checkpoint`` (spec/DISTRIBUTED.md).

    >>> import ckptfmt.distributed as cd
    >>> cd.save({"model": model, "optim": optim}, "ckpt/step-100")        # every rank
    >>> cd.load({"model": model, "optim": optim}, "ckpt/step-100")        # any world size
    >>> dcp.save(state, storage_writer=cd.Writer("ckpt/step-100"))          # or plain DCP

The torch-free parts (``consolidate``, ``verify``, ``inspect``, ``list_checkpoints``, ``delete``)
import without torch; the rest imports torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .. import _api as _core_api
from ._consolidate import ShardedVerifyReport, consolidate, delete, inspect, list_checkpoints, verify
from ._errors import DistributedCheckpointError
from ._index import INDEX_NAME
from ._read import is_sharded_dir


def _read_sharded(path: str) -> Any:
    """``ckptfmt.load`` of a directory: the consolidated state if it is a sharded checkpoint."""
    return consolidate(path) if is_sharded_dir(path) else NotImplemented


_core_api.DIRECTORY_READERS.append(_read_sharded)

_LAZY = {
    "Writer": "._storage", "Reader": "._storage",
    "SavePlanner": "._planner", "LoadPlanner": "._planner",
    "SaveOptions": "._api", "LoadOptions": "._api", "ReusingStager": "._api",
    "save": "._api", "load": "._api", "async_save": "._api",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ckptfmt.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(mod, __name__), name)


__all__ = [
    "INDEX_NAME",
    "DistributedCheckpointError",
    "LoadOptions",
    "LoadPlanner",
    "Reader",
    "ReusingStager",
    "SaveOptions",
    "SavePlanner",
    "ShardedVerifyReport",
    "Writer",
    "async_save",
    "consolidate",
    "delete",
    "inspect",
    "is_sharded_dir",
    "list_checkpoints",
    "load",
    "save",
    "verify",
]
