"""The checkpoints of a CheckpointManager directory, readable without torch (``ckptfmt ls``).

The directory is the truth: a checkpoint is a ``step-<8+ digits>.ckpt`` file there that opens as a
ckptfmt checkpoint, or a ``step-<8+ digits>`` directory holding a committed sharded checkpoint
(spec/DISTRIBUTED.md §8). ``index.json`` is only a cache of what those hold (step, time, size,
metadata), rebuilt from them: an entry is used only when its name is the one its step gives and
the file's (a sharded one's index file's) size and time still match; anything else in it is
ignored. It is untrusted input: read with a size cap, and a damaged one is ignored, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from ._atomic import atomic_write
from .errors import CheckpointError, CorruptCheckpointError

INDEX = "index.json"
#: where directories cannot be locked: the file concurrent managers serialise index updates and pruning on
LOCK = ".ckptfmt-manager.lock"
#: an index larger than this is not read (a directory of 100,000 checkpoints needs about 20 MB)
MAX_INDEX_BYTES = 64 << 20
FORMAT = "ckptfmt.checkpoint-index"
_STEP_FILE = re.compile(r"^step-(\d{8,19})\.ckpt$")
_STEP_DIR = re.compile(r"^step-(\d{8,19})$")


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of ``step`` (a non-negative int)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or step >= 10**19:
        raise ValueError(f"a checkpoint step must be an int in [0, 10**19), not {step!r}")
    return f"step-{step:08d}.ckpt"


def sharded_name(step: int) -> str:
    """The directory name of the sharded checkpoint of ``step`` (``checkpoint_name`` without ``.ckpt``)."""
    return checkpoint_name(step)[: -len(".ckpt")]


def step_of(name: str) -> int | None:
    """The step a manager's file or sharded directory name stands for, or None for any other name."""
    m = _STEP_FILE.match(name) or _STEP_DIR.match(name)
    if m is None:
        return None
    step = int(m[1])
    return step if name in (checkpoint_name(step), sharded_name(step)) else None  # no leading-zero aliases


def is_sharded_name(name: str) -> bool:
    """True for the name of a manager's sharded checkpoint directory (``step-<8+ digits>``)."""
    return step_of(name) is not None and not name.endswith(".ckpt")


def read_cache(directory: str) -> dict[str, dict[str, Any]]:
    """The usable entries of ``index.json`` by file name; {} when it is missing or damaged."""
    path = os.path.join(directory, INDEX)
    try:
        return parse_index(path)
    except CheckpointError:
        return {}


def parse_index(path: str) -> dict[str, dict[str, Any]]:
    """The well-formed entries of the index file at ``path`` by file name (malformed entries are skipped).

    Raises :class:`CorruptCheckpointError` when the file is unreadable, too large or not an index.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CorruptCheckpointError(path, f"checkpoint index is unreadable: {e}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(path, f"checkpoint index is larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(path, f"checkpoint index is not JSON: {e}") from None
    entries = doc.get("checkpoints") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise CorruptCheckpointError(path, "checkpoint index has no 'checkpoints' list")
    out: dict[str, dict[str, Any]] = {}
    for item in entries:
        if not isinstance(item, dict):
            continue
        step, name, size, when, meta = (item.get(k) for k in ("step", "file", "size", "time", "metadata"))
        if (isinstance(step, int) and not isinstance(step, bool) and isinstance(name, str) and step_of(name) == step
                and isinstance(size, int) and isinstance(when, (int, float)) and isinstance(meta, dict)):
            entry = {"step": step, "file": name, "time": when, "size": size, "metadata": meta}
            if is_sharded_name(name):
                extra = {k: item.get(k) for k in ("index_size", "world_size")}
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in extra.values()):
                    continue
                entry.update(extra, sharded=True)
            out[name] = entry
    return out


def _describe_sharded(directory: str, name: str, st: os.stat_result) -> dict[str, Any] | None:
    """The index entry of the sharded directory ``name`` (``st``: its index file's), read from its index."""
    from .distributed._directory import describe

    try:
        d = describe(os.path.join(directory, name))
    except (CheckpointError, OSError):
        return None
    return {"step": step_of(name), "file": name, "time": st.st_mtime, "size": d["size"],
            "metadata": json_safe(d["metadata"]), "sharded": True, "index_size": st.st_size,
            "world_size": d["world_size"]}


def _stat(directory: str, de: os.DirEntry[str]) -> tuple[os.stat_result, bool] | None:
    """The stat that dates a step entry (a sharded one's: its index file's) and whether it is sharded."""
    from .distributed._index import INDEX_NAME as SHARDED_INDEX

    if de.name.endswith(".ckpt"):
        if not de.is_file(follow_symlinks=False):
            return None
        return de.stat(follow_symlinks=False), False
    if not de.is_dir(follow_symlinks=False):
        return None
    return os.lstat(os.path.join(directory, de.name, SHARDED_INDEX)), True


def _describe(directory: str, name: str, st: os.stat_result) -> dict[str, Any] | None:
    """The index entry of the step file ``name``, read from the file; None when it is not a checkpoint."""
    from . import _api

    try:
        with _api.open(os.path.join(directory, name)) as ckpt:
            meta = dict(ckpt.metadata)
    except (CheckpointError, OSError):
        return None
    step = step_of(name)
    return {"step": step, "file": name, "time": st.st_mtime, "size": st.st_size, "metadata": json_safe(meta)}


def scan(directory: str | os.PathLike[str], cache: dict[str, dict[str, Any]] | None = None,
         ) -> tuple[list[dict[str, Any]], list[str]]:
    """Every checkpoint in ``directory`` (oldest step first) and the step names that are not checkpoints.

    Entries come from ``cache`` (see :func:`read_cache`) when the file's (a sharded directory's index
    file's) size and time match it, else from the checkpoint itself. A step directory without a
    committed index, and the older of a step saved both as a file and sharded, count as not checkpoints.
    """
    directory = os.fspath(directory)
    if cache is None:
        cache = read_cache(directory)
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    try:
        listing = list(os.scandir(directory))
    except FileNotFoundError:
        return good, bad
    by_step: dict[int, dict[str, Any]] = {}
    for de in listing:
        if step_of(de.name) is None:
            continue
        try:
            found = _stat(directory, de)
        except FileNotFoundError:  # a step directory without an index: not (or no longer) committed
            bad.append(de.name)
            continue
        except OSError:
            continue
        if found is None:
            continue
        st, sharded = found
        hit = cache.get(de.name)
        if sharded:
            fresh = hit is not None and hit.get("index_size") == st.st_size and hit["time"] == st.st_mtime
            entry = hit if fresh else _describe_sharded(directory, de.name, st)
        else:
            fresh = hit is not None and hit["size"] == st.st_size and hit["time"] == st.st_mtime
            entry = hit if fresh else _describe(directory, de.name, st)
        if entry is None:
            bad.append(de.name)
            continue
        other = by_step.get(entry["step"])
        if other is not None and (other["time"], other["file"]) > (entry["time"], entry["file"]):
            entry, other = other, entry
        if other is not None:
            bad.append(other["file"])  # the same step saved twice: the newer one is the checkpoint
        by_step[entry["step"]] = entry
    good = sorted(by_step.values(), key=lambda e: e["step"])
    return good, bad


def read_index(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The checkpoints of a manager's directory, oldest first ([] if there are none): see :func:`scan`."""
    return scan(directory)[0]


def write_index(directory: str, entries: list[dict[str, Any]]) -> None:
    """Replace ``index.json`` (atomically; a cache, so not fsynced) with ``entries``."""
    doc = {"format": FORMAT, "version": 1, "checkpoints": sorted(entries, key=lambda e: e["step"])}
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    with atomic_write(os.path.join(directory, INDEX), durable=False) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Hold the directory's manager lock: an advisory ``flock`` on the directory itself.

    Where a directory cannot be locked (NFS emulates flock with POSIX locks, which need a file open
    for writing) the lock is taken on the file :data:`LOCK` in it instead. A no-op without fcntl.
    """
    from . import _atomic

    fcntl = _atomic.fcntl
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.EINVAL, errno.ENOLCK, getattr(errno, "ENOTSUP", errno.EINVAL)):
                raise
            os.close(fd)
            fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """Metadata as strict JSON: bytes by their length, nan as null, infinities as the strings "inf"/"-inf"."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return None if value != value else str(value)
    return value
