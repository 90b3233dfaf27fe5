"""Early writeback: while a durable save writes, the pages it has written already go to the disk.

Without it the final fsync starts writing the whole file only at the end, so a durable save costs
the write *plus* the whole disk write. During a durable save a thread asks the kernel to begin
writing back each stretch the save has appended (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``:
asynchronous, it neither waits for the disk nor makes anything durable); the final fsync, which is
still made and is still the only durability guarantee, then waits only for the tail. Where the call
is missing (other systems) or refused (some filesystems), nothing is done and fsync does it all.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

#: Bytes appended before a writeback is started for them.
WINDOW = 8 << 20
#: How often the thread looks at how far the save has got.
POLL = 0.005
_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn: Any = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()


class EarlyWriteback:
    """Starts the disk write of what is appended to ``fd`` while the save goes on; :meth:`stop` before fsync."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if _sync_file_range is not None:
            self._thread = threading.Thread(target=self._run, name="ckptfmt-writeback", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        done = 0
        while not self._stop.wait(POLL):
            try:
                size = os.fstat(self._fd).st_size
            except OSError:
                return
            if size - done >= WINDOW:
                if _sync_file_range(self._fd, done, size - done, _SYNC_FILE_RANGE_WRITE) != 0:  # type: ignore[misc]
                    return  # refused here (e.g. ESPIPE, EINVAL): the fsync writes everything
                done = size

    def stop(self) -> None:
        """End the thread (idempotent); the caller's fsync follows."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
