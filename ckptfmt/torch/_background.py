"""``CheckpointManager.save(blocking=False)``: one background save per manager, indexed when complete.

The tensors are staged into the manager's pool before the call returns; a thread then waits for the
file (written and renamed into place by :func:`ckptfmt.save`'s writer thread) and only then indexes
and prunes, so the index never lists an incomplete checkpoint and a crash at any moment leaves the
previous checkpoint listed and intact.
"""

from __future__ import annotations

import threading
from typing import Any

from .._staging import SaveHandle, StagingPool
from ._training import save_checkpoint


def wait_background(manager: Any) -> None:
    """Wait for ``manager``'s save in flight; raise its error if no ``wait()`` has reported it."""
    handle: SaveHandle | None = getattr(manager, "_inflight", None)
    if handle is None:
        return
    handle.join()
    manager._inflight = None
    error = handle.unseen_error
    if error is not None:
        handle.seen = True
        raise error


def start_background(manager: Any, step: int, path: str, model: Any, optimizer: Any, *,
                     staging: StagingPool | None, **what: Any) -> SaveHandle:
    """Stage the checkpoint of ``step`` now; write, index and prune it on a thread."""
    wait_background(manager)
    if staging is None:
        staging = getattr(manager, "_staging", None)
        if staging is None:
            staging = manager._staging = StagingPool()
    written = save_checkpoint(path, model, optimizer, step=step, background=True, staging=staging, **what)
    handle = SaveHandle(path)

    def run() -> None:
        error: BaseException | None = None
        try:
            written.wait()
            manager._commit(step, path)
        except BaseException as e:  # reported at handle.wait(), manager.wait() or the next save
            error = e
        finally:
            handle._finish(error)

    manager._inflight = handle
    threading.Thread(target=run, name="ckptfmt-manager-save", daemon=False).start()
    return handle
