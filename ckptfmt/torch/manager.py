"""A directory of training checkpoints with retention and a human-readable index.

Layout: ``step-00000100.ckpt`` files and ``index.json``. The files are the truth: a checkpoint
exists once its file is renamed into place (complete and fsynced), whatever the index says; the
index is a cache of their step, time, size and user metadata, rebuilt from the directory on every
open and save. Index update and pruning run under a lock file, so managers in several processes
share a directory; pruning deletes only the manager's own ``step-*.ckpt`` names. A crash at any
moment leaves the latest good checkpoint loadable, and the next save removes whatever it orphaned.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from typing import Any

from .._atomic import fsync_directory, remove_stale_temps
from .._index import checkpoint_name, directory_lock, read_cache, scan, write_index
from .._staging import StagingPool
from ..errors import CheckpointError, CheckpointNotFoundError
from ._background import start_background, wait_background
from ._training import TrainingCheckpoint, load_checkpoint, restore_checkpoint, save_checkpoint

__all__ = ["CheckpointManager", "checkpoint_name"]


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
        with contextlib.suppress(OSError):  # a read-only run directory still lists and loads
            self._refresh()

    # -- index
    def list(self) -> builtins.list[dict[str, Any]]:
        """Every checkpoint in the directory, oldest first: step, file, time, size, metadata."""
        return scan(self.directory)[0]

    def _refresh(self) -> builtins.list[dict[str, Any]]:
        """Rebuild ``index.json`` from the directory (under the lock); return the entries."""
        with directory_lock(self.directory):
            cache = read_cache(self.directory)
            entries, _ = scan(self.directory, cache)
            if {e["file"]: e for e in entries} != cache:
                write_index(self.directory, entries)
        return entries

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be)."""
        return os.path.join(self.directory, checkpoint_name(int(step)))

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
        remove_stale_temps(self.directory)  # each step has its own name: sweep the killed saves' temporaries
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
        """List the complete checkpoint of ``step`` and prune, under the directory lock (the files are the truth)."""
        with directory_lock(self.directory):
            entries, bad = scan(self.directory, read_cache(self.directory))
            keep = self._keep(entries)
            kept = [e for e in entries if e["step"] in keep]
            oldest_kept = min(keep, default=step)
            doomed = [e["file"] for e in entries if e["step"] not in keep]
            doomed += [name for name in bad if int(name[5:-5]) < oldest_kept]  # unreadable leftovers
            write_index(self.directory, kept)  # unlist first, then delete
            for name in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
            if doomed:
                fsync_directory(self.directory)

    def _keep(self, entries: builtins.list[dict[str, Any]]) -> set[int]:
        steps = sorted(e["step"] for e in entries)
        if self.keep_last is None:
            return set(steps)
        keep = set(steps[-self.keep_last :])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        return keep

    # -- load
    def latest(self, *, verify: bool = True) -> int | None:
        """The step of the newest good checkpoint, or None.

        With ``verify`` (the default) every checksum of the candidate is checked, so a checkpoint
        with a damaged tensor is passed over for the one before it; ``verify=False`` only validates
        the structure and metadata (fast: O(metadata)).
        """
        from .. import _api

        for entry in reversed(self.list()):
            path = os.path.join(self.directory, entry["file"])
            try:
                if verify:
                    if not _api.verify(path).ok:
                        continue
                else:
                    _api.open(path).close()
            except (CheckpointError, OSError):
                continue
            return int(entry["step"])
        return None

    def load(self, step: int | None = None, *, map_location: str = "cpu", mmap: bool = True) -> TrainingCheckpoint:
        """The checkpoint of ``step``, or the newest one that loads and verifies (each byte hashed once)."""
        if step is not None:
            return load_checkpoint(self.path(step), map_location=map_location, mmap=mmap)
        for entry in reversed(self.list()):
            try:
                return load_checkpoint(os.path.join(self.directory, entry["file"]), map_location=map_location,
                                       mmap=mmap)
            except (CheckpointError, OSError):
                continue  # damaged: fall back to the one before it
        raise CheckpointNotFoundError(os.path.join(self.directory, "step-*.ckpt"))

    def restore(self, model: Any, optimizer: Any = None, *, step: int | None = None, map_location: str = "cpu",
                **kwargs: Any) -> TrainingCheckpoint | None:
        """Load (the latest, or ``step``) and restore into live objects; None when there is nothing to resume.

        The state is read into the process's own memory (no map of the file remains), so pruning or
        rewriting the file later cannot affect the run.
        """
        try:
            ckpt = self.load(step, map_location=map_location, mmap=False)
        except CheckpointNotFoundError:
            if step is not None:
                raise
            return None
        return restore_checkpoint(ckpt, model, optimizer, **kwargs)

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` from the disk and the index."""
        path = self.path(step)
        with directory_lock(self.directory):
            try:
                os.unlink(path)
            except FileNotFoundError:
                raise CheckpointNotFoundError(path) from None
            write_index(self.directory, scan(self.directory, read_cache(self.directory))[0])
        fsync_directory(self.directory)
