"""A directory of training checkpoints with retention and a human-readable index.

Layout: ``step-00000100.ckpt`` files and ``index.json`` (written atomically) listing, for each
durable checkpoint, its step, file, time, size and user metadata. A checkpoint enters the index only
after its file is complete and fsynced, and old ones are removed only after that, so a crash at any
moment leaves the latest good checkpoint listed.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import time
from typing import Any

from .. import _api
from .._atomic import atomic_write, fsync_directory
from .._index import INDEX, read_index
from .._staging import StagingPool
from ..errors import CheckpointError, CheckpointNotFoundError
from ._background import start_background, wait_background
from ._training import TrainingCheckpoint, load_checkpoint, restore_checkpoint, save_checkpoint


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of ``step``."""
    return f"step-{step:08d}.ckpt"


class CheckpointManager:
    """Save, list, load and prune the training checkpoints of one run.

    ``keep_last``: how many of the newest checkpoints to keep; ``keep_every``: also keep every
    checkpoint whose step is a multiple of it (milestones).
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int | None = 3,
                 keep_every: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be at least 1 (or None to keep everything)")
        self.directory = os.fspath(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every
        os.makedirs(self.directory, exist_ok=True)

    # -- index
    def list(self) -> builtins.list[dict[str, Any]]:
        """Every checkpoint in the index, oldest first: step, file, time, size, metadata."""
        return [e for e in read_index(self.directory) if os.path.exists(os.path.join(self.directory, e["file"]))]

    def _write_index(self, entries: builtins.list[dict[str, Any]]) -> None:
        doc = {"format": "ckptfmt.checkpoint-index", "version": 1,
               "checkpoints": sorted(entries, key=lambda e: e["step"])}
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        with atomic_write(os.path.join(self.directory, INDEX)) as fd:
            os.write(fd, data)

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be)."""
        return os.path.join(self.directory, checkpoint_name(step))

    # -- save
    def save(self, step: int, model: Any, optimizer: Any = None, *, blocking: bool = True,
             staging: StagingPool | None = None, **what: Any) -> Any:
        """Write the checkpoint of ``step`` (arguments as :func:`save_checkpoint`), index it, then prune.

        Returns the path; with ``blocking=False``, a :class:`ckptfmt.SaveHandle` as soon as the
        tensors are staged (in ``staging``, a pool kept by the manager by default): the file is written,
        indexed and pruned on a thread. One save is in flight at a time: the next waits for it, and
        raises its error if no ``wait()`` did.
        """
        step = int(step)
        path = self.path(step)
        if not blocking:
            return start_background(self, step, path, model, optimizer, staging=staging, **what)
        self.wait()
        save_checkpoint(path, model, optimizer, step=step, **what)  # atomic and durable
        self._commit(step, path)
        return path

    def wait(self) -> None:
        """Wait for the background save in flight, if any; raise its error if nobody has seen it."""
        wait_background(self)

    def _commit(self, step: int, path: str) -> None:
        """Index the complete checkpoint of ``step``, then prune."""
        with _api.open(path) as ckpt:
            meta = dict(ckpt.metadata)
        entries = [e for e in self.list() if e["step"] != step]
        entries.append({"step": step, "file": os.path.basename(path), "time": time.time(),
                        "size": os.path.getsize(path), "metadata": _json_safe(meta)})
        self._write_index(entries)
        self._prune(entries)

    def _prune(self, entries: builtins.list[dict[str, Any]]) -> None:
        if self.keep_last is None:
            return
        steps = sorted(e["step"] for e in entries)
        keep = set(steps[-self.keep_last :])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        doomed = [e for e in entries if e["step"] not in keep]
        if not doomed:
            return
        self._write_index([e for e in entries if e["step"] in keep])  # unlist first, then delete
        for e in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, e["file"]))
        fsync_directory(self.directory)

    # -- load
    def latest(self, *, verify: bool = True) -> int | None:
        """The step of the newest good checkpoint, or None.

        With ``verify`` (the default) every checksum of the candidate is checked, so a checkpoint
        with a damaged tensor is passed over for the one before it; ``verify=False`` only validates
        the structure and metadata (fast: O(metadata)).
        """
        for entry in reversed(self.list()):
            path = os.path.join(self.directory, entry["file"])
            try:
                if verify:
                    if not _api.verify(path).ok:
                        continue
                else:
                    _api.open(path).close()
            except CheckpointError:
                continue
            return int(entry["step"])
        return None

    def load(self, step: int | None = None, *, map_location: str = "cpu") -> TrainingCheckpoint:
        """The checkpoint of ``step``, or the latest one."""
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(os.path.join(self.directory, "step-*.ckpt"))
        return load_checkpoint(self.path(step), map_location=map_location)

    def restore(self, model: Any, optimizer: Any = None, *, step: int | None = None, map_location: str = "cpu",
                **kwargs: Any) -> TrainingCheckpoint | None:
        """Load (the latest, or ``step``) and restore into live objects; None when there is nothing to resume."""
        if step is None and self.latest() is None:
            return None
        ckpt = self.load(step, map_location=map_location)
        return restore_checkpoint(ckpt, model, optimizer, **kwargs)

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` from the index and the disk."""
        entries = self.list()
        if not any(e["step"] == step for e in entries):
            raise CheckpointNotFoundError(self.path(step))
        self._write_index([e for e in entries if e["step"] != step])
        os.unlink(self.path(step))
        fsync_directory(self.directory)


def _json_safe(value: Any) -> Any:
    """Metadata as strict JSON: bytes by their length, nan as null, infinities as the strings "inf"/"-inf"."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return None if value != value else str(value)
    return value
