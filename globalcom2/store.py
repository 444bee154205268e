"""The results store: one folder per cell, written so that an interrupted sweep loses nothing.

A cell is one evaluation: everything that can change its result, its **identity** (the resolved config
less the keys that cannot, ``globalcom2/cells.py``). It lives in
``results/<experiment>/<model>/<method>/r<ratio>/<benchmark>/<cell id>/``: the readable part says what
the cell is, the id (a hash of the identity) says exactly how it was run. A changed config is a different
folder, so a finished cell is never served for settings it was not run with. Several identities of one
readable key can sit side by side (e.g. ``limit=20`` and the full set); the key folder's ``current``
file names the one most recently run or reused, and that is the one the tables show.

Lifecycle, and why it is safe:

* A run writes only into ``<cell>/.partial/``. On success the outputs are moved into the cell and
  ``record.json`` is written **last**, atomically (temporary file + ``os.replace``). A cell is finished
  if and only if ``record.json`` is a complete :class:`~globalcom2.records.CellRecord` that carries this
  cell's id and key (:meth:`Cell.finished_record`, the one place this rule lives; ``report/aggregate`` uses
  it). A ``record.json`` that is not (a newer checkout's schema, a damaged or copied file) stops the run
  instead of being taken for "not run yet" (``globalcom2.run``); ``force=true`` replaces it at commit.
* A killed run leaves ``.partial/`` and no record: the cell is not finished, and the next run deletes
  every leftover before starting, so partial files are never read as results. One thing is kept: the
  answers journal in ``<cell>/.answers/`` (``globalcom2/answer_journal.py``), where the plugin keeps each
  finished batch's answers as it finishes, under this cell's identity (the folder is the identity's). The
  next run replays those batches instead of generating them again, and ``force=true`` deletes it first.
* A ``force=true`` re-run of a finished cell keeps its files until the new run's are ready; its commit
  sets them aside (``.previous/``) and deletes them only after the new record is written, and a commit
  killed half-way is undone by the next run (:meth:`Cell.commit`).
* ``<cell>/.lock`` is held with ``flock`` for the whole run. The kernel drops it when its process dies
  (SIGKILL included), so there are no stale locks to guess about. Whoever holds the lock decides: a
  runner takes it, then checks again whether the cell is finished (another runner may have finished it
  meanwhile), and only then deletes leftovers and runs. The ranks of a worker group, which inherit
  neither the descriptor nor the process group, each hold ``<cell>/.workers.lock`` shared while they live,
  and a runner takes the cell only when that one is free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_text, fsync_dir, fsync_tree
from globalcom2.lock_files import lock_owner, try_lock_file, write_owner
from globalcom2.records import COMPLETE, CellKey, CellRecord, RecordError, read_record, write_record

RECORD_FILE = "record.json"
PARTIAL_DIR = ".partial"
#: The answers journal of an unfinished run (globalcom2/answer_journal.py): kept by a failed or killed run for
#: the next to resume from, deleted by ``force=true`` and by the commit that finishes the cell.
ANSWERS_DIR = ".answers"
PREVIOUS_DIR = ".previous"  # a finished run's files while a force=true re-run commits (Cell.commit)
MOVING_DIR = ".previous-moving"  # the same, while they are being moved aside
LOCK_FILE = ".lock"
#: Held shared by every rank of a cell's worker group while it lives (:func:`hold_worker_lock`); a runner
#: that takes the cell's lock checks it is free. Never deleted: a holder must always see the same inode.
WORKERS_LOCK_FILE = ".workers.lock"
STORE_FILES = (LOCK_FILE, WORKERS_LOCK_FILE)  # the store's own files in a cell folder, never outputs
CURRENT_FILE = "current"
CELL_ID_LENGTH = 12


def cell_id(identity: Mapping[str, Any]) -> str:
    """The first 12 hex digits of the SHA-256 of the identity's canonical JSON (sorted keys)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:CELL_ID_LENGTH]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["benchmark.limit: 20 -> 120", ...]``: the settings in which two identities differ."""
    a, b = flatten(old), flatten(new)
    return [
        f"{key}: {_show(a.get(key, _ABSENT))} -> {_show(b.get(key, _ABSENT))}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, _ABSENT) != b.get(key, _ABSENT)
    ]


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


class CellBusy(RuntimeError):
    """Another live process holds the cell's lock."""


class WorkersAlive(CellBusy):
    """A rank of an earlier run's worker group still lives (``.workers.lock``): nobody runs the cell, yet it
    must not be taken."""


@dataclass(frozen=True)
class LoadedCell:
    """A finished cell as read back: its folder and its record (:meth:`Cell.finished_record`)."""

    path: Path  # the cell folder
    record: CellRecord


class Cell:
    """One cell folder under a results root: ``<root>/<key path>/<cell id>/``."""

    def __init__(self, root: str | Path, key: CellKey, identity: Mapping[str, Any]) -> None:
        self.key = key
        self.identity = dict(identity)
        self.id = cell_id(identity)
        self.key_dir = Path(root) / key.relative_path()
        self.dir = self.key_dir / self.id

    @property
    def record_path(self) -> Path:
        return self.dir / RECORD_FILE

    @property
    def partial_dir(self) -> Path:
        return self.dir / PARTIAL_DIR

    @property
    def answers_dir(self) -> Path:
        return self.dir / ANSWERS_DIR

    @staticmethod
    def finished_record(folder: Path) -> CellRecord:
        """The record of the finished cell in ``folder``: the only rule for "this cell is finished".

        Finished means ``record.json`` is a complete :class:`CellRecord` whose cell id is the folder's
        name and the hash of its identity (:func:`cell_id`), and whose key is the folder's key path (``<experiment>/<model>/<method>/<ratio>/<benchmark>``
        above it): a record copied from, or written for, another identity does not count, nor a cell folder
        copied or moved to another key (``cp -r results/exp results/exp_old``), which the report could not
        table under either key. A whole results root copied elsewhere keeps its cells finished.

        Raises:
            RecordError: why the cell is not finished (missing, partial, corrupt, old schema, another id,
                an identity edited since, another key).
        """
        record = read_record(folder / RECORD_FILE)
        if record.cell.id != folder.name:
            raise RecordError(
                f"record.json was written for cell {record.cell.id}, not for this folder ({folder.name}); "
                "re-run the cell"
            )
        try:
            hashed = cell_id(record.cell.identity)
        except (TypeError, ValueError) as err:  # a value JSON cannot hold canonically (NaN, an object)
            raise RecordError(f"malformed record.json (cell.identity: {err})") from err
        if hashed != record.cell.id:
            raise RecordError(
                f"record.json's cell.identity hashes to {hashed}, not to its cell id {record.cell.id}: it was "
                "edited or damaged, so the settings it claims are not the ones the cell ran with; re-run the cell"
            )
        try:
            home = record.cell.key.relative_path()
        except ValueError as err:
            raise RecordError(f"malformed record.json ({err})") from err
        if folder.parent.parts[-len(home.parts) :] != home.parts:
            raise RecordError(
                f"record.json belongs to {home}, not to this folder: a copied or moved cell counts under "
                "neither key (copy a whole results root instead, or re-run the cell here)"
            )
        return record

    def read_record(self) -> CellRecord | None:
        """The finished record, or ``None`` when the folder holds no ``record.json`` (never run, a run that
        did not finish, or a forced commit that has just moved it aside).

        Raises:
            RecordError: a ``record.json`` is there but is not this cell's finished record
                (:meth:`finished_record`), or cannot be read: written by a newer checkout sharing the results
                folder, damaged, copied from another cell, unreadable. It is never taken for "not run yet",
                which would delete it.
        """
        try:
            os.lstat(self.record_path)
        except FileNotFoundError:
            return None
        try:
            return self.finished_record(self.dir)
        except RecordError as err:
            if isinstance(err.__cause__, FileNotFoundError):  # moved aside between the two reads
                return None
            raise

    def is_complete(self) -> bool:
        """Whether the cell is finished (:meth:`read_record`, which raises for a rejected record)."""
        return self.read_record() is not None

    def siblings(self) -> list[tuple[Path, CellRecord]]:
        """Finished cells of the same key with another identity: ``(folder, record)``."""
        found = []
        if self.key_dir.is_dir():
            for entry in sorted(self.key_dir.iterdir()):
                if entry.name == self.id or not entry.is_dir():
                    continue
                with contextlib.suppress(RecordError):
                    found.append((entry, self.finished_record(entry)))
        return found

    @contextlib.contextmanager
    def lock(self) -> Iterator[int]:
        """Hold the cell's lock while running it; raise :class:`CellBusy` at once if a live process has it.

        ``flock`` on ``.lock``: released by the kernel when every holder of the open file has exited,
        however it exits (yields the descriptor, which a worker group's launcher inherits). The file is
        unlinked on release; a runner that locked the unlinked inode sees that and tries again.

        The ranks of a worker group do not inherit it (torchrun and accelerate start each in a session of its
        own, closing other descriptors), so each holds ``.workers.lock`` shared (:func:`hold_worker_lock`)
        and the lock is granted only when nothing holds that one: a rank that outlived its runner (stuck in
        a device call past the grace period) keeps the cell busy until it is gone, instead of writing into
        the next run's ``.partial/``.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK_FILE
        while True:
            # read-write: it writes the owner
            fd = try_lock_file(path, os.O_CREAT | os.O_RDWR, fcntl.LOCK_EX, read_only_fallback=False)
            if fd is None:
                raise CellBusy(f"{self.dir} is being run by another process ({lock_owner(path)})")
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # the previous holder unlinked this inode on release: lock the new file
        try:
            self._check_no_workers()
            write_owner(fd)
            yield fd
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)

    def _check_no_workers(self) -> None:
        """Raise :class:`WorkersAlive` if a rank of an earlier worker group of this cell is alive."""
        path = self.dir / WORKERS_LOCK_FILE
        if not path.exists():
            return
        # writable where it may be: NFS's emulated exclusive lock needs it
        fd = try_lock_file(path, os.O_RDWR, fcntl.LOCK_EX)
        if fd is None:
            raise WorkersAlive(
                f"{self.dir}: a worker process of an earlier run of this cell is still alive (it holds {path}); "
                "it stops with its launcher, or end it by hand"
            )
        os.close(fd)  # releases the test lock at once: this run's own ranks take it shared

    def prepare(self, keep_answers: bool = True) -> Path:
        """Delete what an unfinished run left and return an empty ``.partial/``. A finished cell's files
        (a ``force=true`` re-run) stay until :meth:`commit` replaces them, and a commit killed half-way is
        undone here (:meth:`recover`), so a killed re-run loses nothing. The answers journal (``.answers/``)
        stays for the run to resume from, unless ``keep_answers`` is false (``force=true``: run it all again).

        Only call it while holding :meth:`lock`.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.recover()
        # a record.json, finished or (under force=true only: run() refuses it otherwise) rejected, and the
        # files beside it stay until commit() sets them aside, so a killed forced run loses neither
        keep_finished = os.path.lexists(self.record_path)
        for entry in self.dir.iterdir():
            if entry.name == ANSWERS_DIR:
                if not keep_answers:
                    _remove(entry)
                continue
            if entry.name in STORE_FILES or (keep_finished and entry.name != PARTIAL_DIR):
                continue
            _remove(entry)
        self.partial_dir.mkdir()
        return self.partial_dir

    def commit(self, record: CellRecord) -> None:
        """Replace the cell's files by the run's outputs from ``.partial/``, then write ``record.json`` last.

        A previous finished run's files (``force=true``), and the answers journal this run resumed from and
        wrote (:data:`ANSWERS_DIR`, whose answers are all in the outputs now), are first moved, record first, into
        ``.previous-moving/``, which is renamed ``.previous/`` once they are all there; they are deleted
        only after the new record is written. No moment shows the old record beside the new outputs; a
        commit that fails puts the old files back at once, and one killed at any point leaves what
        :meth:`recover` puts back. The new outputs are fsynced before they are moved in and the folder after,
        so that after a power loss a finished record never sits beside empty files.
        """
        self.recover()  # nothing, unless an earlier commit was killed and nothing recovered it since
        old = [e for e in self.dir.iterdir() if e.name not in (*STORE_FILES, PARTIAL_DIR, RECORD_FILE)]
        previous = self.dir / PREVIOUS_DIR
        try:
            if self.record_path.exists() or old:
                moving = self.dir / MOVING_DIR
                moving.mkdir()
                if self.record_path.exists():
                    os.replace(self.record_path, moving / RECORD_FILE)  # first: unfinished from here
                for entry in old:
                    os.replace(entry, moving / entry.name)
                os.replace(moving, previous)  # every old file is kept aside
            fsync_tree(self.partial_dir)
            for entry in self.partial_dir.iterdir():
                os.replace(entry, self.dir / entry.name)
            self.partial_dir.rmdir()
            fsync_dir(self.dir)
            write_record(self.record_path, replace(record, status=COMPLETE))
        except Exception:
            self.recover()  # a full disk, an unreadable output: the finished cell stays as it was
            raise
        if previous.exists():
            shutil.rmtree(previous)
        self.mark_current()

    def recover(self) -> None:
        """Undo a commit killed half-way (:meth:`commit`); safe to repeat, and to kill at any point.

        ``.previous/`` and no record: the new outputs moved in so far are deleted, then ``.previous/`` is
        renamed ``.previous-moving/``. ``.previous-moving/``: nothing new is in the folder, and the old files
        go back, the record last. ``.previous/`` beside a record: the commit had finished, and the old files
        are deleted. Called under the lock before a run decides whether the cell is finished
        (``globalcom2.run``), by :meth:`prepare` and by :meth:`commit`.
        """
        moving, previous = self.dir / MOVING_DIR, self.dir / PREVIOUS_DIR
        if previous.exists():
            if self.record_path.exists():
                shutil.rmtree(previous)
                return
            for entry in self.dir.iterdir():
                if entry.name not in (*STORE_FILES, PREVIOUS_DIR, PARTIAL_DIR):
                    _remove(entry)  # a new output moved in before the kill
            os.replace(previous, moving)  # from here only old files are in flight: repeatable
        if not moving.exists():
            return
        for entry in moving.iterdir():
            if entry.name != RECORD_FILE:
                os.replace(entry, self.dir / entry.name)
        if (moving / RECORD_FILE).exists():
            os.replace(moving / RECORD_FILE, self.record_path)
        moving.rmdir()

    def discard_partial(self) -> None:
        """Remove what a failed run left in ``.partial/`` (only while holding :meth:`lock`)."""
        if self.partial_dir.exists():
            shutil.rmtree(self.partial_dir)

    def mark_current(self) -> None:
        """Make this identity the one the tables show for its key (it was just run or reused)."""
        atomic_write_text(self.key_dir / CURRENT_FILE, self.id + "\n")


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def writable_problem(root: Path) -> str | None:
    """Why cells cannot be written under ``root``, or ``None``: its nearest existing folder must take a new
    file (tried, then removed; nothing else is created). Checked before a cell runs, so that it fails in one
    line rather than after loading."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    verb = "written" if existing == root else "created"
    if not existing.is_dir():
        return f"{root} cannot be {verb} ({existing} is not a folder)"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"{root} cannot be {verb} ({existing}: {err.strerror or err})"
    return None


def current_cell_id(key_dir: Path) -> str | None:
    """The id named by a key folder's ``current`` file; ``None`` when it has none.

    Raises:
        RecordError: the file exists but names no cell (unreadable, not text, not an id): then nobody can
            tell which identity of the key is current, and no other may be shown in its place.
    """
    path = key_dir / CURRENT_FILE
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RecordError(f"{path} is unreadable ({err})") from err
    try:
        named = content.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RecordError(f"{path} is not text, so it names no cell") from None
    if not re.fullmatch(f"[0-9a-f]{{{CELL_ID_LENGTH}}}", named):
        raise RecordError(f"{path} names no cell id ({named[:40]!r})")
    return named


#: The descriptor of this process's :func:`hold_worker_lock`, open until the process exits.
_worker_lock_fd: int | None = None


def hold_worker_lock(partial: Path) -> None:
    """Hold the cell's ``.workers.lock`` shared until this process exits (a rank of a worker group writing
    into ``partial``, the cell's ``.partial/``), so that no runner takes the cell while the rank lives
    (:meth:`Cell.lock`). Call it before checking that the launcher is alive: a rank either holds it while its
    runner holds the cell, or finds its launcher gone and exits.

    Raises:
        CellBusy: a new runner is checking the cell, so this rank's runner has released it already.
    """
    global _worker_lock_fd
    path = Path(partial).parent / WORKERS_LOCK_FILE
    fd = try_lock_file(path, os.O_CREAT | os.O_RDONLY, fcntl.LOCK_SH)  # a shared lock needs read access only
    if fd is None:
        raise CellBusy(f"{path} is locked by a new runner of the cell: this rank's run has ended")
    _worker_lock_fd = fd
