"""Atomic file commit: write a temporary beside the target, fsync, rename over it, fsync the directory.

A save that fails or is killed never touches the previous file at the target path; what it leaves
behind is a temporary whose name says what it is, removed by the next save into that directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator

_TEMP_RE = re.compile(r"^\..*\.ckptfmt-tmp\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"


def temp_path(target: str) -> str:
    """A fresh temporary name in ``target``'s directory: ``.<name>.ckptfmt-tmp.<host>.<pid>.<random>``."""
    d, base = os.path.split(target)
    return os.path.join(d, f".{base}.ckptfmt-tmp.{_host()}.{os.getpid()}.{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """True for a file name that :func:`temp_path` could have made."""
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str) -> list[str]:
    """Delete temporaries left in ``directory`` by dead processes of this host; return their paths."""
    removed: list[str] = []
    host = _host()
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        p = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            os.unlink(p)
            removed.append(p)
    return removed


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
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


@contextlib.contextmanager
def atomic_write(path: str, *, durable: bool = True) -> Iterator[int]:
    """Yield a file descriptor open on a temporary that replaces ``path`` when the block succeeds."""
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    remove_stale_temps(directory)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        yield fd
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        old = _hold(target)
        try:
            os.replace(tmp, target)
        finally:
            _release_later(old)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(directory)
