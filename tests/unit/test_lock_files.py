"""Shared lock files: taken without waiting or not at all, and errors that say what to do."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from globalcom2 import lock_files
from globalcom2.lock_files import lock_owner, try_lock_file, write_owner


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_held_lock_is_refused_at_once_leaving_nothing_open(tmp_path):
    path = tmp_path / "x.lock"
    held = try_lock_file(path, os.O_CREAT | os.O_RDWR, fcntl.LOCK_EX)
    assert held is not None
    write_owner(held)
    before = open_descriptors()
    assert try_lock_file(path, os.O_RDWR, fcntl.LOCK_EX) is None
    assert try_lock_file(path, os.O_RDONLY, fcntl.LOCK_SH) is None
    assert open_descriptors() == before
    assert lock_owner(path).startswith(f"pid {os.getpid()} on ")
    os.close(held)
    again = try_lock_file(path, os.O_RDWR, fcntl.LOCK_EX)
    assert again is not None
    os.close(again)


def test_a_file_system_without_flock_and_a_read_only_exclusive_lock_say_so(tmp_path, monkeypatch):
    path = tmp_path / "x.lock"
    for code, error, message in (
        (errno.ENOLCK, OSError, r"must be on a file system with flock support .*Lustre"),
        (errno.EBADF, PermissionError, r"this user may not write it \(.*mode .*\).*have its owner run"),
    ):

        def failing_flock(fd, operation, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(lock_files.fcntl, "flock", failing_flock)
        before = open_descriptors()
        with pytest.raises(error, match=message):
            try_lock_file(path, os.O_CREAT | os.O_RDWR, fcntl.LOCK_EX)
        assert open_descriptors() == before
