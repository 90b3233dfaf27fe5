"""Sharded checkpoints in a local directory: which are committed, deleting one, and sweeping dead attempts.

One implementation for ``ckptfmt.distributed.list_checkpoints``/``delete`` and for
``CheckpointManager`` (spec/DISTRIBUTED.md §2, §8). Liveness cannot lie: a save's coordinator holds
an advisory ``flock`` on its staging directory from its creation until the commit's last rename
(:func:`hold_staging`); the lock travels with the directory's inode, so a sweep that takes it
(:func:`remove_dead_attempt`) knows that no live writer can commit that attempt any more. Where a
filesystem cannot lock directories, or there is no ``fcntl``, nothing is provably dead and nothing
is swept. Torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from typing import Any

from .._atomic import fsync_directory, try_flock
from ..errors import CheckpointNotFoundError
from ._index import INDEX_NAME, MAX_INDEX_BYTES, parse_index

#: suffixes of the hidden siblings of a checkpoint ``<name>``: ``.<name><suffix>``
STAGING = ".ckptfmt-staging"
OLD = ".ckptfmt-old"
DEAD = ".ckptfmt-dead-"
_NOT_LOCKABLE = frozenset(e for e in (errno.EBADF, errno.EINVAL, errno.ENOLCK, getattr(errno, "ENOTSUP", None),
                                      getattr(errno, "EOPNOTSUPP", None)) if e is not None)
_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def staging_path(path: str) -> str:
    """Where the attempt of a save to local checkpoint ``path`` is written before its commit."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}{STAGING}")


def old_path(path: str) -> str:
    """Where a commit parks the previous checkpoint at ``path`` between its two renames."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}{OLD}")


def is_committed(path: str | os.PathLike[str]) -> bool:
    """True for a local directory (not a link) holding a committed sharded checkpoint's index."""
    p = os.fspath(path)
    return not os.path.islink(p) and os.path.isdir(p) and os.path.isfile(os.path.join(p, INDEX_NAME))


def list_checkpoints(root: str | os.PathLike[str]) -> list[str]:
    """The committed sharded checkpoints directly under local directory ``root``, by name; attempts never show."""
    r = os.fspath(root)
    try:
        names = sorted(os.listdir(r))
    except FileNotFoundError:
        return []
    return [os.path.join(r, n) for n in names if not n.startswith(".") and is_committed(os.path.join(r, n))]


def delete(path: str | os.PathLike[str], *, durable: bool = True) -> None:
    """Delete a local sharded checkpoint: the index (its commit record) first, then its files."""
    p = os.fspath(path)
    idx = os.path.join(p, INDEX_NAME)
    if not is_committed(p):
        raise CheckpointNotFoundError(idx)
    os.unlink(idx)
    if durable:
        fsync_directory(p)  # un-committed for good before any container goes
    shutil.rmtree(p, ignore_errors=True)


def remove_uncommitted(path: str) -> bool:
    """Remove a directory left by an interrupted :func:`delete` (no index: no writer ever owns that name)."""
    if os.path.islink(path) or not os.path.isdir(path) or os.path.exists(os.path.join(path, INDEX_NAME)):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _lock(fd: int, *, wait: bool) -> bool | None:
    """Lock ``fd``: True when taken, False when another holder has it, None when it cannot be locked here."""
    return try_flock(fd, wait=wait, unlockable=_NOT_LOCKABLE)


def _same(fd: int, path: str) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def hold_staging(staging: str) -> int | None:
    """Create (if needed) and lock the staging directory ``staging``; the fd holding the lock, or None.

    The writer keeps the fd open until its commit or abort is complete (:func:`release`). A sweep
    that moved the directory away between its creation and the lock is noticed and a new one made.
    None where directories cannot be locked (such attempts are never swept).
    """
    for _ in range(8):
        os.makedirs(staging, exist_ok=True)
        try:
            fd = os.open(staging, _FLAGS)
        except FileNotFoundError:
            continue
        try:
            got = _lock(fd, wait=True)  # a sweeper holds it only while it checks and moves a dead one
            if got is None:
                os.close(fd)
                return None
            if _same(fd, staging):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EBUSY, "the staging directory keeps being removed under the writer", staging)


def release(fd: int | None) -> None:
    """Drop a writer's hold on its attempt (after the commit's last rename, or the abort's removal)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _probe(path: str) -> bool | None:
    """Try the lock of the directory at ``path`` without waiting (see :func:`_lock`); OSError if it cannot be opened."""
    fd = os.open(path, _FLAGS)
    try:
        return _lock(fd, wait=False)
    finally:
        os.close(fd)


def is_live(path: str) -> bool:
    """True when a writer may still hold the directory at ``path`` (locked, or not lockable here)."""
    try:
        return _probe(path) is not True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def is_held(path: str) -> bool:
    """True only when another open file provably holds the lock of the directory at ``path`` (a live writer)."""
    try:
        return _probe(path) is False
    except OSError:
        return False


def remove_dead_attempt(staging: str) -> bool:
    """Remove the staging directory ``staging`` if its writer is provably dead; True when it was removed.

    Under the writer's lock: the directory is renamed to a unique ``.<name>.ckptfmt-dead-<hex>``
    (so a new writer of the same checkpoint is never confused with it) and then deleted.
    """
    try:
        fd = os.open(staging, _FLAGS)
    except OSError:
        return False
    try:
        if _lock(fd, wait=False) is not True or not _same(fd, staging):
            return False
        parent, base = os.path.split(staging)
        trash = os.path.join(parent, base[: -len(STAGING)] + DEAD + secrets.token_hex(8))
        os.rename(staging, trash)
        if _same(fd, trash):
            shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def sweep(directory: str, owns: Any) -> list[str]:
    """Remove the dead attempts and leftovers of the checkpoints named ``n`` with ``owns(n)`` in ``directory``.

    Dead staging directories go (except a committed one whose checkpoint is missing: a crash between
    the commit's two renames, kept for recovery by hand, as is its ``-old`` twin); an ``-old``
    directory goes once its checkpoint is committed and nobody is committing it; ``-dead-`` ones go.
    Returns the removed paths.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for n in names:
        if not n.startswith("."):
            continue
        p = os.path.join(directory, n)
        if n.endswith(STAGING) and owns(n[1: -len(STAGING)]):
            final = os.path.join(directory, n[1: -len(STAGING)])
            if os.path.exists(os.path.join(p, INDEX_NAME)) and not os.path.lexists(final):
                continue
            if remove_dead_attempt(p):
                removed.append(p)
        elif n.endswith(OLD) and owns(n[1: -len(OLD)]):
            final = os.path.join(directory, n[1: -len(OLD)])
            if (is_committed(final) and not is_live(final) and not is_live(staging_path(final))
                    and not os.path.islink(p)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif DEAD in n and owns(n[1: n.rindex(DEAD)]) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        fsync_directory(directory)
    return removed


def describe(path: str) -> dict[str, Any]:
    """What a manager's index records of the committed checkpoint at ``path``: size, world size, user metadata.

    Raises :class:`CheckpointError` when its index is missing or invalid (hostile bytes: capped, checked).
    """
    p = os.path.join(path, INDEX_NAME)
    try:  # never through a link: no file outside the checkpoint directory is opened
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(p) from None
    with open(fd, "rb") as f:
        data = f.read(MAX_INDEX_BYTES + 1)
    idx = parse_index(data, path=p, max_bytes=MAX_INDEX_BYTES)
    return {"size": len(data) + sum(f.size for f in idx.files), "world_size": idx.world_size,
            "metadata": dict(idx.metadata)}
