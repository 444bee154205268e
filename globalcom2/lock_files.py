"""Lock files that processes share: a results cell's, a worker group's, an answers journal's.

``flock`` throughout: the kernel releases a lock when the last holder of its open file exits, however it
exits (SIGKILL, an out-of-memory kill, a Slurm time limit), so no lock is ever stale and no timeout is
needed. A file is created readable and writable by whoever the umask lets in, so the members of a group that
shares a results folder can lock each other's files; a held lock names its holder, who wrote itself into the
file when it took it (:func:`write_owner`, :func:`lock_owner`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path

#: What ``flock(..., LOCK_NB)`` fails with when another holder has the lock (EACCES: NFS's emulated locks).
HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def open_lock_file(path: Path, flags: int, read_only_fallback: bool = True) -> int:
    """``os.open`` of a lock file, which another user may have created: 0o666 less the umask when created,
    so a group sharing results can lock it; where it may not be written, opened read-only if
    ``read_only_fallback`` (a local ``flock`` works on any descriptor), else a clear error naming its owner.
    """
    try:
        return os.open(path, flags, 0o666)
    except PermissionError as err:
        if read_only_fallback and flags & os.O_RDWR:
            with contextlib.suppress(PermissionError):
                return os.open(path, (flags & ~os.O_RDWR) | os.O_RDONLY)
        raise PermissionError(
            f"cannot open the lock file {path} ({err.strerror}; it belongs to {_file_owner(path)}): run as a "
            "user who may use it, or have its owner run the cell"
        ) from err


def take_lock(fd: int, path: Path, operation: int) -> bool:
    """``flock(fd, operation)``: ``True`` once taken; ``False`` where ``operation`` holds ``LOCK_NB`` and
    another process has the lock.

    Raises:
        OSError: the file system has no ``flock``, said as such (a shared cluster file system may need a
            mount option), instead of the bare error, which reads like a bug.
    """
    try:
        fcntl.flock(fd, operation)
    except OSError as err:
        if operation & fcntl.LOCK_NB and err.errno in HELD_ERRNOS:
            return False
        # NFS emulates flock with POSIX locks, whose exclusive kind needs a descriptor open for writing
        if err.errno == errno.EBADF and operation & fcntl.LOCK_EX:
            raise PermissionError(
                f"cannot lock {path}: this user may not write it ({_file_owner(path)}), and this file system "
                "gives an exclusive lock only to a writer: run as a user who may write it, or have its owner run"
            ) from err
        raise OSError(
            f"cannot lock {path}: {err}. Results and answers journals must be on a file system with flock "
            "support (local disks and NFS have it; on Lustre mount with -o flock)."
        ) from err
    return True


def try_lock_file(path: Path, flags: int, operation: int, read_only_fallback: bool = True) -> int | None:
    """A descriptor of ``path`` (:func:`open_lock_file` with ``flags``) holding its lock (``operation``, with
    ``LOCK_NB``), or ``None`` where another process holds it (then nothing stays open).

    Raises:
        OSError: as :func:`open_lock_file` and :func:`take_lock` do.
    """
    fd = open_lock_file(path, flags, read_only_fallback)
    try:
        taken = take_lock(fd, path, operation | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    if not taken:
        os.close(fd)
        return None
    return fd


def write_owner(fd: int) -> None:
    """Write this process (pid, host, time) into the lock file ``fd`` it holds, for :func:`lock_owner`."""
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)


def lock_owner(path: Path) -> str:
    """``pid <pid> on <host> since <time>``, as the holder of the lock file ``path`` wrote itself."""
    try:
        owner = json.loads(path.read_text())
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def _file_owner(path: Path) -> str:
    """``user:group, mode`` of ``path`` for an error message (ids where the names are unknown)."""
    try:
        info = os.stat(path)
    except OSError:
        return "an unknown owner"
    try:
        user, group = pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        user, group = str(info.st_uid), str(info.st_gid)
    return f"{user}:{group}, mode {stat.filemode(info.st_mode)}"
