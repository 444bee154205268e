"""Atomic writes: the one home for every record, sidecar and result file, and for every folder built in
one go (a checkpoint, a dataset).

Readers (a resumed sweep, ``aggregate``, a second runner) must see either the old file or the whole new
one, never a part: a temporary file in the same folder, fsynced, then ``os.replace``. A folder is built in
a temporary sibling and renamed into place (:func:`staged_folder`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 would hide results from a shared group
        except BaseException:
            os.close(fd)  # fdopen has not taken it over yet
            raise
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power loss
    return path


def process_umask() -> int:
    """This process's umask, read without changing it where the kernel reports it (``/proc/self/status``,
    Linux >= 4.7); elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """Flush every file under ``folder``, and the folders themselves, to disk (files written by others,
    such as lmms-eval's results, which are not fsynced when written)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(parent, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` as UTF-8, written atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any, **dumps: Any) -> Path:
    """``payload`` as indented JSON with sorted keys (non-JSON values as ``str``), written atomically."""
    options = {"indent": 2, "sort_keys": True, "default": str, **dumps}
    return atomic_write_text(path, json.dumps(payload, **options) + "\n")


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], *, complete_marker: str | None = None) -> Iterator[Path]:
    """An empty sibling folder to build ``target`` in; when the block succeeds it is renamed into place.

    The staging folder gets the permissions a plain ``mkdir`` would (umask applied), and its files are
    fsynced before the rename, so a power loss cannot leave a marker beside empty files.

    Readers see no ``target``, the old one, or the whole new one, never a part; an interrupted or failed
    build leaves ``target`` as it was and no staging folder behind. A rebuild moves the old folder aside
    (one rename), renames the new one in, and only then deletes the old one: the old data is never deleted
    before the new is in place (POSIX has no portable atomic swap of two folders, so between the two
    renames ``target`` is briefly absent; an interruption exactly there leaves the old folder in a hidden
    ``.<name>.old.*`` sibling, not deleted).

    Args:
        target: the folder to build.
        complete_marker: ``None`` replaces an existing ``target`` (a rebuild). A file name: ``target`` is
            built once, and if another process renamed its own copy into place first (the rename fails on a
            non-empty folder) and that copy holds ``complete_marker``, it is kept and this one dropped;
            both are the same build.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o777 & ~process_umask())  # mkdtemp's 0700 would hide data from a shared group
        yield staging
        fsync_tree(staging)  # the files are on disk before the rename makes them visible
        if complete_marker is None and target.exists():
            _replace_folder(staging, target)
            return
        try:
            staging.rename(target)
        except OSError:
            if complete_marker is None or not (target / complete_marker).exists():
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target`` in place of the folder there, then delete the old one."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    target.rename(aside)  # onto an empty folder: allowed by rename(2)
    try:
        new.rename(target)
    except BaseException:
        aside.rename(target)  # put the old one back
        raise
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
