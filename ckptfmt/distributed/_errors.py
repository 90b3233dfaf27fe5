"""The distributed checkpoint's error: one per failed save or load, naming each rank's cause."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError


class DistributedCheckpointError(CheckpointError, RuntimeError):
    """A distributed save or load failed on one or more ranks; ``failures`` maps rank -> cause.

    Picklable (DCP sends exceptions between ranks; one that cannot be unpickled leaves the other
    ranks waiting until the process-group timeout).
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None, path: str | None = None) -> None:
        self.failures = dict(failures or {})
        self.path = path
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0] if self.args else "", self.failures, self.path))


def describe(e: BaseException) -> str:
    """``Type: message`` of an exception, for a failure list."""
    return f"{type(e).__name__}: {e}"


def rank_error(rank: int, path: str, e: BaseException) -> DistributedCheckpointError:
    """A picklable error for one rank's failure (the original may not survive pickling)."""
    return DistributedCheckpointError(f"{path}: rank {rank}: {describe(e)}", {rank: describe(e)}, path)


def from_dcp(e: BaseException, path: str, what: str) -> DistributedCheckpointError:
    """One :class:`DistributedCheckpointError` from DCP's ``CheckpointException`` (or any error), listing ranks."""
    failures: dict[int, str] = {}
    raw = getattr(e, "failures", None)
    if isinstance(raw, dict):
        for rank, cause in raw.items():
            inner = cause[0] if isinstance(cause, tuple) and cause else cause  # DCP sends (exception, traceback)
            if isinstance(inner, DistributedCheckpointError) and inner.failures:
                failures.update({int(k): v for k, v in inner.failures.items()})
            else:
                failures[int(rank)] = describe(inner) if isinstance(inner, BaseException) else str(inner)
    else:
        failures[-1] = describe(e)
    lines = "; ".join(f"rank {r}: {c}" if r >= 0 else c for r, c in sorted(failures.items()))
    return DistributedCheckpointError(f"{path}: {what} failed: {lines}", failures, path)
