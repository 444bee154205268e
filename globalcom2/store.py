"""The results store: one folder per cell, written so that an interrupted sweep loses nothing.

A cell is one (experiment, model, method, retention ratio, benchmark) evaluation and lives in
``results/<experiment>/<model>/<method>/r<ratio>/<benchmark>/`` (content-derived, no timestamp, so two
launches of the same cell meet in the same folder: lightning-hydra-template#511).

Lifecycle, and why it is safe:

* A run writes only into ``<cell>/.partial/``. On success the outputs are moved into the cell and
  ``record.json`` is written **last**, atomically (temporary file + ``os.replace``). A cell is finished
  if and only if ``record.json`` exists and says ``"status": "complete"``.
* A killed run leaves ``.partial/`` and no record: the cell is not finished, and the next run deletes
  every leftover before starting, so partial files are never read as results.
* ``<cell>/.lock`` (created with ``O_EXCL``) keeps two launches from running the same cell at once; a
  lock whose process no longer exists on this host is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_FILE = "record.json"
PARTIAL_DIR = ".partial"
LOCK_FILE = ".lock"
COMPLETE = "complete"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def ratio_label(retention_ratio: float) -> str:
    """``r0.25``, ``r0.1``, ``r1.0``: the folder name of a retention ratio."""
    return f"r{float(retention_ratio)!r}"


@dataclass(frozen=True)
class CellKey:
    """What identifies a cell; its folder is derived from it alone."""

    experiment: str
    model: str
    method: str
    retention_ratio: float
    benchmark: str

    def relative_path(self) -> Path:
        parts = (self.experiment, self.model, self.method, ratio_label(self.retention_ratio), self.benchmark)
        for part in parts:
            if not part or "/" in part or part.startswith("."):
                raise ValueError(f"invalid cell path component {part!r} in {self}")
        return Path(*parts)


class CellBusy(RuntimeError):
    """Another live process holds the cell's lock."""


class Cell:
    """One cell folder under a results root."""

    def __init__(self, root: str | Path, key: CellKey) -> None:
        self.key = key
        self.dir = Path(root) / key.relative_path()

    @property
    def record_path(self) -> Path:
        return self.dir / RECORD_FILE

    @property
    def partial_dir(self) -> Path:
        return self.dir / PARTIAL_DIR

    def read_record(self) -> dict[str, Any] | None:
        """The finished record, or ``None`` when the cell is not finished (missing, partial or corrupt)."""
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("status") == COMPLETE else None

    def is_complete(self) -> bool:
        return self.read_record() is not None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cell's lock for the duration of a run; raise :class:`CellBusy` if a live process has it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.dir / LOCK_FILE
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                if not _lock_is_stale(lock):
                    raise CellBusy(
                        f"{self.dir} is being run by another process ({lock.read_text().strip()})"
                    ) from None
                lock.unlink(missing_ok=True)
        else:  # pragma: no cover - the stale lock reappeared between unlink and open
            raise CellBusy(f"could not take the lock of {self.dir}")
        with os.fdopen(fd, "w") as handle:
            json.dump(owner, handle)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def prepare(self) -> Path:
        """Delete everything a previous (unfinished or forced) run left, and return an empty ``.partial/``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for entry in self.dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.partial_dir.mkdir()
        return self.partial_dir

    def commit(self, record: dict[str, Any]) -> None:
        """Move the run's outputs from ``.partial/`` into the cell, then write ``record.json`` last."""
        for entry in self.partial_dir.iterdir():
            os.replace(entry, self.dir / entry.name)
        self.partial_dir.rmdir()
        atomic_write_json(self.record_path, {**record, "status": COMPLETE})


def _lock_is_stale(lock: Path) -> bool:
    """A lock is stale when its process is gone (same host) or it is unreadable; other hosts' locks are
    trusted (a cluster job may still be running)."""
    try:
        owner = json.loads(lock.read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        # unreadable: stale unless it was just created (its owner may not have written it yet)
        with contextlib.suppress(OSError):
            return time.time() - lock.stat().st_mtime > 10
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
