"""Atomic file commit: write a locked temporary beside the target, fsync, rename over it, fsync the directory.

A save that fails or is killed never touches the previous file at the target path. Liveness cannot
lie: the writer holds an advisory lock (``flock``) on its temporary for the whole save, and a sweep
deletes a temporary only after taking that lock itself, so a live writer's temporary survives
whatever its PID, PID namespace or host. The sweep probes only the target's own temporaries
(``.<name>.<hash>.ckptfmt-tmp.<slot>``, a few fixed slots), never a listing of the directory.

Where ``fcntl`` is missing (Windows) liveness is the platform's own: a file another process holds
open cannot be deleted there, so a failed unlink means a live writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from typing import Any

from ._writeback import EarlyWriteback
from .errors import DiskFullError

try:
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None  # type: ignore[assignment]

fcntl: Any = _fcntl

#: fixed temporary slots per target: the per-save sweep probes exactly these
SLOTS = 8
#: a name longer than this (bytes) is not created; POSIX's usual NAME_MAX
NAME_MAX = 255
_SUFFIX = ".ckptfmt-tmp."
_TEMP_RE = re.compile(r"^\..*\.[0-9a-f]{8}\.ckptfmt-tmp\.(?:[0-9]|r[0-9a-f]{16})$", re.DOTALL)
#: errno values meaning "out of space"
_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
#: errno values meaning "this filesystem cannot fsync a directory", the only ones ignored
_UNSUPPORTED = frozenset(e for e in (errno.EINVAL, getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None),
                                     errno.EBADF, getattr(errno, "ENOSYS", None)) if e is not None)


def _stem(target: str) -> str:
    """``.<name>.<hash>`` for ``target``, the name cut so that every temporary fits in NAME_MAX bytes."""
    base = os.path.basename(target)
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:8]
    room = NAME_MAX - len(f"..{digest}{_SUFFIX}r{'0' * 16}")
    while len(os.fsencode(base)) > room:
        base = base[:-1]
    return f".{base}.{digest}"


def temp_path(target: str, slot: int | None = None) -> str:
    """The temporary of ``target`` in ``slot`` (0..SLOTS-1), or a random overflow name when ``slot`` is None."""
    d = os.path.dirname(target)
    tail = str(slot) if slot is not None else "r" + secrets.token_hex(8)
    return os.path.join(d, f"{_stem(target)}{_SUFFIX}{tail}")


def is_temp_name(name: str) -> bool:
    """True for a file name that :func:`temp_path` could have made."""
    return _TEMP_RE.match(name) is not None


def try_flock(fd: int, *, wait: bool, unlockable: frozenset[int] = frozenset()) -> bool | None:
    """Take the exclusive advisory lock of ``fd``: True when taken, False when another open file holds it
    (and not ``wait``), None where it cannot be locked (no ``fcntl``, or an ``OSError`` whose errno is in
    ``unlockable``); other errors are raised."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in unlockable:
            return None
        raise
    return True


def _lock(fd: int, *, wait: bool) -> bool:
    """:func:`try_flock`, where a platform without ``fcntl`` counts as locked (there is nothing to hold)."""
    return try_flock(fd, wait=wait) is not False


def _reap(path: str) -> bool:
    """Delete the temporary at ``path`` if no writer holds it; True when the name is free afterwards."""
    if fcntl is None:  # Windows: an open file cannot be deleted, so a live writer's unlink fails
        try:
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if not _lock(fd, wait=False):
            return False  # a live writer, wherever it runs
        st = os.fstat(fd)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return True
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return False  # replaced meanwhile by a new writer's file: leave it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _create(tmp: str) -> int | None:
    """Create ``tmp`` exclusively and lock it; None when the name is taken (or was reaped under us)."""
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except FileExistsError:
        return None
    try:
        _lock(fd, wait=True)  # a sweeper that took it first holds it only while it unlinks
        st = os.fstat(fd)
        now = os.lstat(tmp)
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)  # a sweeper took our fresh file for a dead one's: try again
    return None


def open_temp(target: str) -> tuple[str, int]:
    """A fresh locked temporary for ``target``: its path and an fd open for reading and writing.

    Reaps the target's stale temporaries on the way (only its own slots); past SLOTS live writers a
    random name is used, which only :func:`remove_stale_temps` of the directory sweeps.
    """
    taken: tuple[str, int] | None = None
    for slot in range(SLOTS):
        tmp = temp_path(target, slot)
        if taken is None:
            for _ in range(3):
                fd = _create(tmp)
                if fd is not None:
                    taken = (tmp, fd)
                    break
                if not _reap(tmp):
                    break
        else:
            _reap(tmp)  # a stale slot above ours: sweep it too
    if taken is not None:
        return taken
    while True:
        tmp = temp_path(target)
        fd = _create(tmp)
        if fd is not None:
            return tmp, fd


def remove_stale_temps(directory: str) -> list[str]:
    """Delete every temporary in ``directory`` that no live writer holds; return their paths.

    Lists the whole directory: for maintenance (``ckptfmt`` saves sweep only their target's slots).
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return removed
    for name in names:
        if not is_temp_name(name):
            continue
        p = os.path.join(directory, name)
        if os.path.lexists(p) and _reap(p):
            removed.append(p)
    return removed


def fsync_file(fd: int) -> None:
    """Flush ``fd`` to stable storage: ``F_FULLFSYNC`` where the platform has it (macOS), else ``fsync``.

    On macOS ``fsync`` leaves data in the drive's cache; ``F_FULLFSYNC`` is refused by some
    filesystems (network, FUSE), and only then is plain ``fsync`` used instead.
    """
    full = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
    os.fsync(fd)


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable.

    Ignored only where the platform or filesystem cannot do it: Windows (directories cannot be
    opened; NTFS journals the rename) and errno EINVAL, ENOTSUP/EOPNOTSUPP, EBADF, ENOSYS (some
    network and FUSE filesystems). Any other failure (EIO, EACCES...) raises: durability unknown.
    """
    if os.name == "nt":
        return
    try:
        fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return
        raise
    try:
        fsync_file(fd)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _hold(path: str) -> int:
    """An fd on the file at ``path`` (or -1), so that replacing it does not free its blocks yet."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return -1


def _release_later(fd: int) -> None:
    """Close ``fd`` on a thread: the last close frees the replaced file's pages, slow for a large file."""
    if fd >= 0:
        threading.Thread(target=os.close, args=(fd,), name="ckptfmt-release", daemon=True).start()


def resolve_target(path: str | os.PathLike[str]) -> str:
    """Where a save to ``path`` lands: symlinks followed (as ``open(path, "wb")`` would), made absolute."""
    return os.path.realpath(os.fspath(path))


def _copy_mode(fd: int, target: str) -> None:
    """Give the temporary the existing target's permission bits (a new file keeps the umask's)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[int]:
    """Yield a file descriptor (read/write) on a locked temporary that replaces ``path`` when the block succeeds.

    ``path`` may be a symlink: the file it points to is replaced and the link kept. The existing
    file's mode is kept. ``durable``: fsync the file (F_FULLFSYNC on macOS) and its directory; the
    disk write of what the block writes is started while it writes (:class:`EarlyWriteback`).
    On any failure the temporary is removed and the previous file is untouched.
    """
    target = resolve_target(path)
    directory = os.path.dirname(target)
    tmp, fd = open_temp(target)
    early = EarlyWriteback(fd) if durable else None
    try:
        try:
            yield fd
        finally:
            if early is not None:
                early.stop()
        _copy_mode(fd, target)  # at the end: a sweeper must be able to open the temporary meanwhile
        if durable:
            fsync_file(fd)
        old = _hold(target)  # the replaced file's blocks are freed off the critical path
        try:
            os.replace(tmp, target)
        finally:
            _release_later(old)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # still ours: we hold its lock
        os.close(fd)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _FULL:
            raise DiskFullError(target, e) from e
        raise
    try:
        if durable:
            fsync_directory(directory)
    finally:
        os.close(fd)  # the lock is released only after the rename is durable


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[io.BufferedRandom]:
    """Like :func:`atomic_write`, yielding a buffered binary file object (``r+b``, seekable) instead of an fd.

    For libraries that write to file objects (``torch.save``, ``h5py.File(f, "w")``); flushed before the commit.
    """
    with atomic_write(path, durable=durable) as fd, open(fd, "r+b", closefd=False) as f:
        yield f
        f.flush()
