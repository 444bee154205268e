"""The answers journal: each finished batch's answers, on disk as soon as they exist, so that an interrupted
evaluation resumes where it stopped instead of starting again.

Why not lmms-eval's response cache (``--use_cache``): lmms-eval hands a simple model every request of a
process in one ``generate_until`` call (``lmms_eval/evaluator.py``, ``evaluate``: ``resps =
response_cache.execute(lm, reqtype, cloned_reqs)``, 0.7.3), and the cache stores the responses only after
that call has returned (``lmms_eval/caching/response_cache.py``, ``ResponseCache.execute``). A run killed
during the call, a Slurm time limit at 95 % of VQAv2, keeps nothing. The cache also keeps only the answer
text, not the per-sample records a cell's efficiency block is computed from, and drops empty answers.

What a resumed run reproduces. A batch is replayed only whole, and only where the batch the run forms now
holds exactly the rows it held, in the same order, planned from the same window of requests (:class:`Replay`);
the settings that decide how batches form and what a row answers (``settings.json``: the code, the weights,
the method, the device, the batch size …) must equal the earlier run's. So every batch a resumed run
generates has the neighbours it would have had in an uninterrupted run, and in bf16 on a GPU, where a row's
answer depends on its batch (``make bench-batch-effect``), the answers are the uninterrupted run's wherever
that run is itself reproducible. A ``generate_until`` call that samples anywhere is neither journaled nor
replayed (the plugin's rule): its answers depend on the random state, which the work before a batch (a
warm-up, the batches before it) moves, so a resumed call would draw another stream.

Files, in one folder:

* ``settings.json``: what decides the answers and the batches (:func:`check_settings`); a folder written
  under other settings is refused, naming the keys that differ, or emptied where the caller owns it (a cell's).
* ``rank<r>.jsonl``: one line per batch of process ``r``, ``{"rows": [row key, ...], "window": digest,
  "records": [sample record, ...]}`` (``window``: a digest of the keys of the requests the batch was planned
  among), handed to the kernel in one write before the next batch starts, so a killed process (a Slurm time
  limit, SIGKILL, an out-of-memory kill) loses no finished batch. It is fsynced at most every
  :data:`FSYNC_INTERVAL_S` seconds, which bounds what a machine crash loses without an fsync per batch (a
  network filesystem's fsync can cost a fast batch's time). A kill can cut only the last line of a file, which
  then lacks its newline: that line is ignored (and cut off its own rank's file before that rank appends
  again). Any other line that cannot be read is an error naming file and line. Lines are split at ``\n``
  alone, so an answer holding U+2028 or U+0085 (which JSON leaves unescaped) stays one line.

* ``rank<r>.lock``: held (``flock``) by the process that reads or appends ``rank<r>.jsonl``, and naming it
  (pid, host and since when, ``globalcom2/lock_files.py``). One run writes a rank's file at a time: a
  cell's folder is already under the cell's lock, and a second run given the same ``model_args`` folder is
  refused (:class:`JournalInUseError`, naming the holder) when it opens the journal or starts to append,
  never left to interleave its batches with the first's or to cut the first's line in flight as a killed
  run's torn tail. The lock is held while a
  ``generate_until`` call appends (the plugin closes the journal when the call ends), not for the
  process's life, so one process may evaluate twice into one folder, one evaluation after the other.
  Between two calls another run may take the rank, so a run that takes it again checks that the file is as
  it left it, and is refused where another run wrote (or a kill left half a line) in between: it never
  appends after lines it did not read. A stale folder is emptied rank by rank under the same locks.

A row key (:func:`row_key`) is the request's task, split, document id and index, and a digest of its prompt
and generation settings, so a request whose prompt changed is never answered from the journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_text, fsync_dir
from globalcom2.lock_files import lock_owner, open_lock_file, take_lock, try_lock_file, write_owner
from globalcom2.sample_records import SampleRecord

PACKAGE_DIR = Path(__file__).parent

SETTINGS_FILE = "settings.json"
LOCK_FILE = ".lock"  # held while a process checks (and may empty) the folder's settings (AnswerJournal)
#: Longest time between two fsyncs of a rank's file while it is appended to.
FSYNC_INTERVAL_S = 10.0
RANK_FILE = re.compile(r"rank(\d+)\.jsonl")

#: (task, split, doc id, request index, prompt digest)
RowKey = tuple[str, str, Any, int, str]
#: (window digest, row keys): one planned batch
BatchKey = tuple[str, tuple[RowKey, ...]]


def row_key(task: str, split: str, doc_id: Any, index: int, context: Any, gen_kwargs: Any) -> RowKey:
    """The journal's key of one request: where its document is, and a digest of what the model is asked."""
    asked = json.dumps([context, gen_kwargs], sort_keys=True, ensure_ascii=False, default=repr)
    return task, split, doc_id, int(index), hashlib.sha256(asked.encode("utf-8")).hexdigest()[:16]


def window_digest(keys: Sequence[RowKey]) -> str:
    """A digest of the keys of a batch feeder window (``globalcom2/lmms/batch_pipeline.py``), in order: the
    requests a batch was planned among, which decide its rows as much as its own keys do."""
    text = json.dumps([list(key) for key in keys], ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def code_digest(package: Path = PACKAGE_DIR) -> str:
    """A digest of the package's Python sources: a code change between an interrupted run and its resumption
    (a fixed method, prompt or answer reading) must not mix two versions' answers in one result."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        # an editor's lock file (Emacs' .#plugin.py, a dangling link) or another hidden file is not source
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.jsonl"


def rank_lock_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.lock"


@dataclass(frozen=True)
class JournaledBatch:
    """One generated batch as the journal holds it: its rows' keys and records, in batch order."""

    rows: tuple[RowKey, ...]
    window: str  # window_digest of the requests the batch was planned among
    records: tuple[SampleRecord, ...]  # parsed once, when the journal is read (or as appended)

    @property
    def key(self) -> BatchKey:
        return self.window, self.rows

    def sample_records(self) -> list[SampleRecord]:
        """The records, marked as read back from the journal (``SampleRecord.replayed``)."""
        return [dataclasses.replace(record, replayed=True) for record in self.records]


class StaleJournalError(ValueError):
    """A journal folder whose answers were computed under other settings than this run's."""


class JournalInUseError(RuntimeError):
    """A rank of a journal folder that another live process reads or appends to."""


def check_settings(folder: Path, settings: Mapping[str, Any], discard_stale: bool = False) -> str | None:
    """Write ``settings`` as the folder's, or check them against those already there.

    Args:
        discard_stale: a folder of other settings is emptied (its batches deleted) instead of refused: for a
            folder the caller owns, such as a cell's, where a code change since the interruption must cost a
            re-run, not a stopped sweep.

    Returns:
        Why the folder's batches were discarded, or ``None``.

    Raises:
        StaleJournalError: the folder holds answers computed under other settings (the keys that differ
            named), or batches without settings; unless ``discard_stale``.
    """
    current = json.loads(json.dumps(settings, sort_keys=True, default=repr))  # as they read back
    path = folder / SETTINGS_FILE
    batches = [p for p in folder.iterdir() if RANK_FILE.fullmatch(p.name)]
    problem = None
    if not path.exists():
        if batches:
            problem = f"answers without their {SETTINGS_FILE}"
    else:
        try:
            written = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            written, problem = None, f"unreadable {SETTINGS_FILE} ({err})"
        if problem is None and written != current:
            keys = sorted(k for k in written.keys() | current.keys() if written.get(k) != current.get(k))
            changes = "; ".join(f"{k}: {written.get(k)!r} -> {current.get(k)!r}" for k in keys)
            problem = f"answers computed under other settings ({changes})"
    if problem is not None and not discard_stale:
        raise StaleJournalError(
            f"{folder} holds {problem}; delete the folder, or give this run another one (a cell's own journal "
            "is replaced by itself, and deleted by force=true)"
        )
    if problem is not None:
        for stale in batches:  # each under its rank's lock: never a file another live run is writing
            rank = int(RANK_FILE.fullmatch(stale.name).group(1))  # type: ignore[union-attr]
            claim = _claim(rank_lock_file(folder, rank), stale)
            try:
                stale.unlink()
            finally:
                os.close(claim)
    if problem is not None or not path.exists():
        atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return problem


def read_rank_file(path: Path, cut_torn_tail: bool = False) -> list[JournaledBatch]:
    """The batches of one ``rank<r>.jsonl``, in the order written. A last line without its newline (a write
    cut by a kill) is ignored, and with ``cut_torn_tail`` removed from the file.

    Raises:
        ValueError: any other line that is not a journaled batch, named by file and line number.
    """
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # up to the last newline: whole lines only
    if cut_torn_tail and len(complete) < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
            handle.flush()
            os.fsync(handle.fileno())
    batches = []
    for number, raw in enumerate(complete.split(b"\n")[:-1], start=1):  # at \n alone: not str.splitlines
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))  # a UnicodeDecodeError is a ValueError
            rows = tuple(tuple(row) for row in entry["rows"])
            window = entry["window"]
            if not isinstance(window, str):
                raise TypeError(f"window must be a digest string, got {window!r}")
            if len(rows) != len(entry["records"]) or not rows or any(len(row) != 5 for row in rows):
                raise ValueError(
                    f"{len(rows)} rows of 5 fields each and {len(entry['records'])} records expected"
                )
            # a record this checkout cannot read fails here, not mid-run
            records = tuple(SampleRecord.from_dict(record) for record in entry["records"])
        except (TypeError, ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"{path}:{number}: not a journaled batch ({type(err).__name__}: {err}); if the machine crashed "
                "while it was written, delete this line and those after it, or the whole folder"
            ) from err
        batches.append(JournaledBatch(rows, window, records))  # type: ignore[arg-type]
    return batches


class AnswerJournal:
    """One process's view of a journal folder: the batches its rank wrote before (read once, when opened), and
    appends of its new batches. A rank reads its own file only: the process count is in the settings, so a
    rank gets the requests it had before, and no other rank's.

    Args:
        folder: the journal's folder (created if missing).
        rank: this process's rank; it appends to ``rank<rank>.jsonl`` only.
        settings: what decides the answers and the batches (:func:`check_settings`).
        discard_stale: empty a folder of other settings instead of refusing it (:func:`check_settings`);
            ``discarded`` then says why it was emptied.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        rank: int,
        settings: Mapping[str, Any],
        discard_stale: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.path = rank_file(self.folder, rank)
        self._handle: Any = None  # opened at the first append, kept open: one write per batch, no reopen
        # rank<r>.lock, held while the handle is open; a file object, so a journal dropped unclosed lets go too
        self._owner_lock: io.FileIO | None = None
        self._synced = time.monotonic()
        # the file's size as this journal last read or wrote it: checked whenever it takes the rank again, so
        # a run that wrote in between (or a write of this run's that failed half-way) is never written after
        self._size = 0
        self.batches: dict[BatchKey, JournaledBatch] = {}
        # one rank at a time: a rank emptying a stale folder must finish before another reads its file
        with _locked(self.folder / LOCK_FILE):
            self.discarded = check_settings(self.folder, settings, discard_stale)
        if not self.path.exists():
            return
        # a live writer's line in flight would look like a killed one's torn tail, and be cut
        claim = _claim(rank_lock_file(self.folder, rank), self.path)
        try:
            batches = read_rank_file(self.path, cut_torn_tail=True)
            self._size = self.path.stat().st_size
        except ValueError as err:  # an unreadable line inside the file (a machine crash mid-write)
            if not discard_stale:
                raise
            self.path.unlink()
            self.discarded = str(err)
            return
        finally:
            os.close(claim)
        for batch in batches:
            self.batches[batch.key] = batch  # a batch written twice: the later one

    @property
    def next_batch_id(self) -> int:
        """A batch id that no journaled record uses, so that this run's calls stay apart from the earlier
        run's (``SampleRecord.batch_id``; records count calls by rank and batch id)."""
        ids = [record.batch_id for batch in self.batches.values() for record in batch.records]
        return max(ids, default=-1) + 1

    def append(self, rows: Sequence[RowKey], window: str, records: Sequence[SampleRecord]) -> None:
        """Add one generated batch: one write to the kernel (it outlives this process), and an fsync when the
        last is :data:`FSYNC_INTERVAL_S` old (it outlives the machine)."""
        if len(rows) != len(records) or not rows:
            raise ValueError(f"one record per row expected, got {len(rows)} rows and {len(records)} records")
        entry = {
            "rows": [list(row) for row in rows],
            "window": window,
            "records": [record.to_dict() for record in records],
        }
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        if self._handle is None:
            self._take_rank()
        written = 0
        while written < len(line):  # an unbuffered write may take part of the line
            written += self._handle.write(line[written:])
        self._size += len(line)
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            self.sync()
        batch = JournaledBatch(tuple(tuple(row) for row in rows), window, tuple(records))
        self.batches[batch.key] = batch

    def _take_rank(self) -> None:
        """Claim this rank's file and open it for appending, where it is as this journal left it.

        Raises:
            JournalInUseError: another live run holds the rank, or the file changed since this journal read
                or wrote it (another run wrote in between, or deleted it; or a write of this run failed
                half-way): its batches would follow lines this run never read.
        """
        owner_lock = io.FileIO(_claim(rank_lock_file(self.folder, self.rank), self.path), "r+")
        try:
            exists = self.path.exists()
            size = self.path.stat().st_size if exists else 0
            if size != self._size:
                raise JournalInUseError(
                    f"{self.path} holds {size} bytes where this run left {self._size}: another run wrote into "
                    "it since this one read it, or a write of this run failed half-way. One run writes an "
                    "answers journal folder at a time; start this run again to resume from what the file holds"
                )
            self._handle = open(self.path, "ab", buffering=0)  # noqa: SIM115  (kept open across appends)
            if not exists:
                fsync_dir(self.folder)  # the new file's name outlives a crash
        except BaseException:
            owner_lock.close()
            raise
        self._owner_lock = owner_lock

    def sync(self) -> None:
        """Flush what this rank appended to the disk."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        """Sync and close this rank's file, and let go of its lock (appending again takes both again), an
        fsync that fails included."""
        try:
            self.sync()
        finally:
            try:
                if self._handle is not None:
                    self._handle.close()
            finally:
                if self._owner_lock is not None:
                    self._owner_lock.close()  # releases the flock
                self._handle = self._owner_lock = None

    def replay(self, keys: Sequence[RowKey]) -> Replay:
        """What can be replayed of one ``generate_until`` call whose request ``i`` has key ``keys[i]``."""
        return Replay(self.batches, keys)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """``flock`` on ``path`` (created if missing) for the block; the kernel drops it if the process dies."""
    fd = open_lock_file(path, os.O_RDWR | os.O_CREAT)
    try:
        take_lock(fd, path, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _claim(path: Path, guarded: Path) -> int:
    """A descriptor of ``path`` (created if missing) holding its ``flock``, taken without waiting, with this
    process written into it; closing it (or the process ending, however it ends) lets go.

    Raises:
        JournalInUseError: another live process holds it; the message names ``guarded``, the file the lock
            guards, and the holder as it wrote itself.
    """
    # read-write: it writes the owner
    fd = try_lock_file(path, os.O_RDWR | os.O_CREAT, fcntl.LOCK_EX, read_only_fallback=False)
    if fd is None:
        raise JournalInUseError(
            f"{guarded} is being written by another run ({lock_owner(path)}): one run writes an answers journal "
            "folder at a time. Give this run another folder (answers_journal=...), or wait for that run to end"
        )
    try:
        write_owner(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Replay:
    """Journaled batches looked up by request positions (the positions of one ``generate_until`` call).

    Both lookups return batches only where they would form exactly as they did: the same rows, in the same
    order, planned among the same window of requests (the batch feeder plans a window's batches from its
    requests' images and prompts, ``globalcom2/lmms/batch_pipeline.py``, under settings the journal's hold).
    :meth:`batch` looks up one planned batch; :meth:`window` a whole window before it is read.
    """

    def __init__(self, batches: Mapping[BatchKey, JournaledBatch], keys: Sequence[RowKey]) -> None:
        self._batches = dict(batches)  # as journaled when the call began: its own appends are never replayed
        self._keys = list(keys)
        self._by_window: dict[str, list[JournaledBatch]] = {}
        for batch in self._batches.values():
            self._by_window.setdefault(batch.window, []).append(batch)

    def _window_digest(self, window: Sequence[int]) -> str:
        return window_digest([self._keys[p] for p in window])

    def batch(self, positions: Sequence[int], window: Sequence[int]) -> JournaledBatch | None:
        """The journaled batch of exactly these requests, in this order, planned among the requests of
        ``window``, or ``None``."""
        rows = tuple(self._keys[p] for p in positions)
        return self._batches.get((self._window_digest(window), rows))

    def window(self, window: Sequence[int]) -> list[tuple[list[int], JournaledBatch]] | None:
        """Every request of the window, as the journaled batches planned among exactly its requests, each
        request in one of them (``(positions, batch)`` each, in the window's order), or ``None``."""
        position_of = {self._keys[p]: p for p in window}
        batches = self._by_window.get(self._window_digest(window), [])
        rows = [row for batch in batches for row in batch.rows]
        if len(position_of) != len(window) or len(rows) != len(window) or set(rows) != set(position_of):
            return None  # a request not journaled, or journaled twice: take nothing on trust
        placed = [([position_of[row] for row in batch.rows], batch) for batch in batches]
        return sorted(placed, key=lambda entry: min(entry[0]))
