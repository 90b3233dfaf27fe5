"""A directory of training checkpoints with retention and a human-readable index.

Layout: ``step-00000100.ckpt`` files, ``step-00000100/`` sharded checkpoint directories (saved by
every rank of a process group, spec/DISTRIBUTED.md §8) and ``index.json``. The checkpoints are the
truth: one exists once its file is renamed into place (complete and fsynced), or its sharded
directory is committed, whatever the index says; the index is a cache of their step, time, size
and user metadata, rebuilt from the directory on every open and save. Index update and pruning run
under a lock file, so managers in several processes share a directory; pruning deletes only the
manager's own ``step-*`` names. A crash at any moment leaves the latest good checkpoint loadable,
and the next save removes whatever it orphaned (a sharded attempt only once its writer is
provably dead).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import os
from typing import Any

from .._atomic import fsync_directory, remove_stale_temps
from .._index import (
    checkpoint_name,
    directory_lock,
    is_sharded_name,
    read_cache,
    scan,
    sharded_name,
    step_of,
    write_index,
)
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
        self._sharded_inflight: concurrent.futures.Future[str] | None = None
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

    def path(self, step: int, *, sharded: bool | None = False) -> str:
        """Where the checkpoint of ``step`` is or would be: its file, or with ``sharded`` its directory.

        ``sharded=None``: whichever of the two is listed (the file name when neither is).
        """
        if sharded is None:
            entry = self._entry(int(step))
            if entry is not None:
                return os.path.join(self.directory, entry["file"])
        name = sharded_name(int(step)) if sharded else checkpoint_name(int(step))
        return os.path.join(self.directory, name)

    def _entry(self, step: int) -> dict[str, Any] | None:
        return next((e for e in self.list() if e["step"] == step), None)

    # -- save
    def save(self, step: int, model: Any, optimizer: Any = None, *, blocking: bool = True,
             staging: StagingPool | None = None, sharded: bool | None = None, process_group: Any = None,
             **what: Any) -> Any:
        """Write the checkpoint of ``step`` (arguments as :func:`save_checkpoint`), index it, then prune.

        Returns the path; with ``blocking=False``, a :class:`ckptfmt.SaveHandle` as soon as the
        tensors are staged (in ``staging``, a pool kept by the manager by default): the file is written,
        indexed and pruned on a thread. One save is in flight at a time: the next waits for it, and
        raises its error if no ``wait()`` did.

        ``sharded``: save ``step-N/`` through ckptfmt.distributed, called on every rank of
        ``process_group`` (the default group if None); each rank writes its own shards, rank 0 indexes
        and prunes after the commit. ``None`` (the default) means: sharded when a process group is
        initialised and the model has DTensor parameters (FSDP2, tensor parallel). A sharded save with
        ``blocking=False`` returns a future (the path) once the state is staged; rank 0 indexes and
        prunes when the commit is done, and ``wait()`` or the next save waits for it.
        """
        step = int(step)
        if sharded is None:
            from ._sharded import has_dtensors, in_process_group

            sharded = in_process_group() and has_dtensors(model)
        if sharded:
            if not blocking:
                return self._save_sharded_async(step, model, optimizer, process_group, what)
            return self._save_sharded(step, model, optimizer, process_group, what)
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
        sharded = self._sharded_inflight
        if sharded is not None:
            self._sharded_inflight = None
            sharded.result()
        wait_background(self)

    def _save_sharded(self, step: int, model: Any, optimizer: Any, process_group: Any, what: dict[str, Any]) -> str:
        """Every rank saves its shards of ``step-N/``; after the commit rank 0 indexes and prunes, then all return."""
        import torch.distributed as dist

        from ._sharded import in_process_group, save_sharded

        grouped = in_process_group()
        rank0 = not grouped or dist.get_rank(process_group) == 0
        path = self.path(step, sharded=True)
        self.wait()
        save_sharded(path, step, model, optimizer, process_group=process_group, **what)  # committed on return
        failure: builtins.list[str | None] = [None]
        error: BaseException | None = None
        if rank0:
            try:
                self._commit(step, path)
            except Exception as e:
                error, failure[0] = e, f"{type(e).__name__}: {e}"
        if grouped:
            src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
            dist.broadcast_object_list(failure, src=src, group=process_group)  # every rank learns rank 0's outcome
        if error is not None:
            raise error
        if failure[0] is not None:
            raise CheckpointError(f"{path}: rank 0 could not index and prune the saved step: {failure[0]}")
        return path

    def _save_sharded_async(self, step: int, model: Any, optimizer: Any, process_group: Any,
                            what: dict[str, Any]) -> concurrent.futures.Future[str]:
        """Stage the step on every rank and return; rank 0 indexes and prunes once the commit is done."""
        import torch.distributed as dist

        from ._sharded import in_process_group, save_sharded

        rank0 = not in_process_group() or dist.get_rank(process_group) == 0
        path = self.path(step, sharded=True)
        self.wait()
        inner = save_sharded(path, step, model, optimizer, process_group=process_group, blocking=False, **what)
        out: concurrent.futures.Future[str] = concurrent.futures.Future()

        def done(f: concurrent.futures.Future[str]) -> None:
            try:
                f.result()
                if rank0:
                    self._commit(step, path)
            except BaseException as e:  # reported at result(), wait() or the next save
                out.set_exception(e)
                return
            out.set_result(path)

        self._sharded_inflight = out
        inner.add_done_callback(done)
        return out

    def _commit(self, step: int, path: str) -> None:
        """List the complete checkpoint of ``step`` and prune, under the directory lock (the files are the truth).

        Also removes the other form of ``step`` (a file replaced by a sharded save or the reverse) and
        the sharded attempts whose writers are provably dead.
        """
        from ..distributed._directory import sweep

        with directory_lock(self.directory):
            entries, bad = scan(self.directory, read_cache(self.directory))
            keep = self._keep(entries)
            kept = [e for e in entries if e["step"] in keep]
            oldest_kept = min(keep, default=step)
            doomed = [e["file"] for e in entries if e["step"] not in keep]
            doomed += [name for name in bad if (step_of(name) or 0) < oldest_kept  # unreadable leftovers
                       or (name != os.path.basename(path) and step_of(name) == step)]  # the replaced form
            write_index(self.directory, kept)  # unlist first, then delete
            for name in doomed:
                self._remove(name)
            swept = sweep(self.directory, is_sharded_name)
            if doomed and not swept:
                fsync_directory(self.directory)

    def _remove(self, name: str) -> None:
        """Delete the manager's checkpoint (or leftover) ``name``: a file, or a sharded directory index first."""
        from ..distributed._directory import delete, is_committed, remove_uncommitted

        p = os.path.join(self.directory, name)
        if not is_sharded_name(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        elif is_committed(p):
            delete(p)
        else:
            remove_uncommitted(p)

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
        from ..distributed import _consolidate, _directory

        for entry in reversed(self.list()):
            path = os.path.join(self.directory, entry["file"])
            try:
                if entry.get("sharded"):
                    if verify:  # every chunk covered exactly once, every block checksum
                        if not _consolidate.verify(path).ok:
                            continue
                    else:
                        _directory.describe(path)
                elif verify:
                    if not _api.verify(path).ok:
                        continue
                else:
                    _api.open(path).close()
            except (CheckpointError, OSError):
                continue
            return int(entry["step"])
        return None

    def load(self, step: int | None = None, *, map_location: str = "cpu", mmap: bool = True) -> TrainingCheckpoint:
        """The checkpoint of ``step``, or the newest one that loads and verifies (each byte hashed once).

        A sharded step loads consolidated (its full state, whatever the world size that saved it).
        """
        if step is not None:
            return self._load(self.path(int(step), sharded=None), map_location=map_location, mmap=mmap)
        for entry in reversed(self.list()):
            try:
                return self._load(os.path.join(self.directory, entry["file"]), map_location=map_location, mmap=mmap)
            except (CheckpointError, OSError):
                continue  # damaged: fall back to the one before it
        raise CheckpointNotFoundError(os.path.join(self.directory, "step-*"))

    @staticmethod
    def _load(path: str, *, map_location: str, mmap: bool) -> TrainingCheckpoint:
        if is_sharded_name(os.path.basename(path)):
            from ._sharded import load_sharded

            return load_sharded(path, map_location=map_location)
        return load_checkpoint(path, map_location=map_location, mmap=mmap)

    def restore(self, model: Any, optimizer: Any = None, *, step: int | None = None, map_location: str = "cpu",
                process_group: Any = None, **kwargs: Any) -> TrainingCheckpoint | None:
        """Load (the latest, or ``step``) and restore into live objects; None when there is nothing to resume.

        The state is read into the process's own memory (no map of the file remains), so pruning or
        rewriting the file later cannot affect the run. In a process group, call it on every rank:
        rank 0's listing decides the candidates, a sharded step loads through ckptfmt.distributed
        (each rank reads only its shards, resharding to the current layout) and a damaged one is passed
        over on every rank for the one before it. Outside a process group a sharded step restores
        into plain modules from its consolidated state.
        """
        for path in self._candidates(step, process_group):
            try:
                if is_sharded_name(os.path.basename(path)):
                    from ._sharded import restore_sharded

                    return restore_sharded(path, model, optimizer, process_group=process_group, **kwargs)
                ckpt = load_checkpoint(path, map_location=map_location, mmap=False)
            except (CheckpointError, OSError):
                if step is not None:
                    raise
                continue  # damaged: fall back to the one before it
            return restore_checkpoint(ckpt, model, optimizer, **kwargs)
        if step is not None:
            raise CheckpointNotFoundError(self.path(int(step)))
        return None

    def _candidates(self, step: int | None, process_group: Any) -> builtins.list[str]:
        """The paths to try, newest first (rank 0's view, the same on every rank of a process group)."""
        from ._sharded import in_process_group

        if step is not None:
            names = [os.path.basename(self.path(int(step), sharded=None))]
        else:
            names = [e["file"] for e in reversed(self.list())]
        if in_process_group():
            import torch.distributed as dist

            box: builtins.list[Any] = [names]
            src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
            dist.broadcast_object_list(box, src=src, group=process_group)
            names = [n for n in box[0] if isinstance(n, str) and step_of(n) is not None]
        return [os.path.join(self.directory, n) for n in names]

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` (its file and its sharded directory) from the disk and the index."""
        step = int(step)
        names = [checkpoint_name(step), sharded_name(step)]
        with directory_lock(self.directory):
            present = [n for n in names if os.path.lexists(os.path.join(self.directory, n))]
            if not present:
                raise CheckpointNotFoundError(self.path(step))
            entries = scan(self.directory, read_cache(self.directory))[0]
            write_index(self.directory, [e for e in entries if e["step"] != step])  # unlist first
            for n in present:
                self._remove(n)
        fsync_directory(self.directory)
