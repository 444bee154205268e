"""The answers journal: each finished batch's answers, on disk as soon as they exist, so that an interrupted
evaluation resumes where it stopped instead of starting again.

Why not lmms-eval's response cache (``--use_cache``): lmms-eval hands a simple model every request of a
process in one ``generate_until`` call (``lmms_eval/evaluator.py``, ``evaluate``: ``resps =
response_cache.execute(lm, reqtype, cloned_reqs)``, 0.7.3), and the cache stores the responses only after
that call has returned (``lmms_eval/caching/response_cache.py``, ``ResponseCache.execute``). A run killed
during the call, a Slurm time limit at 95 % of VQAv2, keeps nothing. The cache also keeps only the answer
text, not the per-sample records a cell's efficiency block is computed from, and drops empty answers.

What a resumed run reproduces. A batch is replayed only whole, and only where the batch the run forms now
holds exactly the rows it held (the same requests, in the same order, :class:`Replay`); the settings that
decide how batches form and what a row answers (``settings.json``) must equal the earlier run's. So every
batch a resumed run generates has the neighbours it would have had in an uninterrupted run, and in bf16 on
a GPU, where a row's answer depends on its batch (``make bench-batch-effect``), the answers are the
uninterrupted run's wherever that run is itself reproducible. Batches that sample are never journaled: their
answers depend on the random state, so they are generated again. Greedy batches draw no random numbers (the
random method draws from its own generator, seeded per image: ``globalcom2/methods/random_keep.py``), so the
generated ones draw the stream an uninterrupted run draws.

Files, in one folder:

* ``settings.json``: what decides the answers and the batches (:func:`check_settings`); a folder written
  under other settings is refused, naming the keys that differ.
* ``rank<r>.jsonl``: one line per batch of process ``r``, ``{"rows": [row key, ...], "records": [sample
  record, ...]}``, handed to the kernel in one write before the next batch starts, so a killed process (a
  Slurm time limit, SIGKILL, an out-of-memory kill) loses no finished batch. It is fsynced at most every
  :data:`FSYNC_INTERVAL_S` seconds, which bounds what a machine crash loses without an fsync per batch (a
  network filesystem's fsync can cost a fast batch's time). A kill can cut only the last line of a file, which
  then lacks its newline: that line is ignored (and cut off its own rank's file before that rank appends
  again). Any other line that cannot be read is an error naming file and line.

A row key (:func:`row_key`) is the request's task, split, document id and index, and a digest of its prompt
and generation settings, so a request whose prompt changed is never answered from the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_text, fsync_dir
from globalcom2.sample_records import SampleRecord

SETTINGS_FILE = "settings.json"
#: Longest time between two fsyncs of a rank's file while it is appended to.
FSYNC_INTERVAL_S = 10.0
RANK_FILE = re.compile(r"rank(\d+)\.jsonl")

#: (task, split, doc id, request index, prompt digest)
RowKey = tuple[str, str, Any, int, str]


def row_key(task: str, split: str, doc_id: Any, index: int, context: Any, gen_kwargs: Any) -> RowKey:
    """The journal's key of one request: where its document is, and a digest of what the model is asked."""
    asked = json.dumps([context, gen_kwargs], sort_keys=True, ensure_ascii=False, default=repr)
    return task, split, doc_id, int(index), hashlib.sha256(asked.encode("utf-8")).hexdigest()[:16]


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.jsonl"


@dataclass(frozen=True)
class JournaledBatch:
    """One generated batch as the journal holds it: its rows' keys and records, in batch order."""

    rows: tuple[RowKey, ...]
    records: tuple[dict[str, Any], ...]

    def sample_records(self) -> list[SampleRecord]:
        """The records, marked as answered by an earlier run (``SampleRecord.replayed``)."""
        return [SampleRecord.from_dict({**record, "replayed": True}) for record in self.records]


def check_settings(folder: Path, settings: Mapping[str, Any]) -> None:
    """Write ``settings`` as the folder's, or check them against those already there.

    Raises:
        ValueError: the folder holds answers computed under other settings (the keys that differ named).
    """
    current = json.loads(json.dumps(settings, sort_keys=True, default=repr))  # as they read back
    path = folder / SETTINGS_FILE
    if not path.exists():
        atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
        return
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the answers journal's settings ({err})") from err
    if written != current:
        keys = sorted(k for k in written.keys() | current.keys() if written.get(k) != current.get(k))
        changes = "; ".join(f"{k}: {written.get(k)!r} -> {current.get(k)!r}" for k in keys)
        raise ValueError(
            f"{folder} holds answers computed under other settings ({changes}); delete the folder, or give "
            "this run another one (a cell's own journal is deleted by force=true)"
        )


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
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rows = tuple(tuple(row) for row in entry["rows"])
            records = tuple(entry["records"])
            if len(rows) != len(records) or not rows or any(len(row) != 5 for row in rows):
                raise ValueError(f"{len(rows)} rows of 5 fields each and {len(records)} records expected")
            for record in records:
                SampleRecord.from_dict(record)  # a record this checkout cannot read fails here, not mid-run
        except (TypeError, ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"{path}:{number}: not a journaled batch ({type(err).__name__}: {err}); if the machine crashed "
                "while it was written, delete this line and those after it, or the whole folder"
            ) from err
        batches.append(JournaledBatch(rows, records))  # type: ignore[arg-type]
    return batches


class AnswerJournal:
    """One process's view of a journal folder: the batches every rank wrote before (read once, when opened),
    and appends of this rank's new batches.

    Args:
        folder: the journal's folder (created if missing).
        rank: this process's rank; it appends to ``rank<rank>.jsonl`` only.
        settings: what decides the answers and the batches (:func:`check_settings`).
    """

    def __init__(self, folder: str | os.PathLike[str], rank: int, settings: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        check_settings(self.folder, settings)
        self.path = rank_file(self.folder, rank)
        self._handle: Any = None  # opened at the first append, kept open: one write per batch, no reopen
        self._synced = time.monotonic()
        self.batches: dict[tuple[RowKey, ...], JournaledBatch] = {}
        for path in sorted(self.folder.iterdir()):
            if RANK_FILE.fullmatch(path.name):
                for batch in read_rank_file(path, cut_torn_tail=path == self.path):
                    self.batches[batch.rows] = batch  # a batch written twice: the later one

    @property
    def next_batch_id(self) -> int:
        """A batch id that no journaled record uses, so that this run's calls stay apart from the earlier
        run's (``SampleRecord.batch_id``; records count calls by rank and batch id)."""
        ids = [record["batch_id"] for batch in self.batches.values() for record in batch.records]
        return max(ids, default=-1) + 1

    def append(self, rows: Sequence[RowKey], records: Sequence[SampleRecord]) -> None:
        """Add one generated batch: one write to the kernel (it outlives this process), and an fsync when the
        last is :data:`FSYNC_INTERVAL_S` old (it outlives the machine)."""
        if len(rows) != len(records) or not rows:
            raise ValueError(f"one record per row expected, got {len(rows)} rows and {len(records)} records")
        entry = {"rows": [list(row) for row in rows], "records": [record.to_dict() for record in records]}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        if self._handle is None:
            created = not self.path.exists()
            self._handle = open(self.path, "ab", buffering=0)  # noqa: SIM115  (kept open across appends)
            if created:
                fsync_dir(self.folder)
        written = 0
        while written < len(line):  # an unbuffered write may take part of the line
            written += self._handle.write(line[written:])
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            self.sync()
        batch = JournaledBatch(tuple(tuple(row) for row in rows), tuple(entry["records"]))  # type: ignore[arg-type]
        self.batches[batch.rows] = batch

    def sync(self) -> None:
        """Flush what this rank appended to the disk."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        """Sync and close this rank's file (appending again reopens it)."""
        if self._handle is not None:
            self.sync()
            self._handle.close()
            self._handle = None

    def replay(self, keys: Sequence[RowKey]) -> Replay:
        """What can be replayed of one ``generate_until`` call whose request ``i`` has key ``keys[i]``."""
        return Replay(self.batches, keys)


class Replay:
    """Journaled batches looked up by request positions (the positions of one ``generate_until`` call).

    Both lookups return a batch only where the batch would form exactly as it did: :meth:`batch` for a
    planned batch, :meth:`window` for a whole window of the batch feeder before it is read (its batches are
    planned from the documents' images, ``globalcom2/lmms/batch_pipeline.py``; the journal's settings hold
    what decides that plan, so a window whose rows the journal holds in batches lying wholly inside it is
    the window the earlier run planned).
    """

    def __init__(self, batches: Mapping[tuple[RowKey, ...], JournaledBatch], keys: Sequence[RowKey]) -> None:
        self._batches = dict(batches)  # as journaled when the call began: its own appends are never replayed
        self._keys = list(keys)
        self._batch_of: dict[RowKey, tuple[RowKey, ...]] = {}
        for rows in batches:  # in the order written: a row journaled twice points at its later batch
            for row in rows:
                self._batch_of[row] = rows

    def batch(self, positions: Sequence[int]) -> JournaledBatch | None:
        """The journaled batch of exactly these requests, in this order, or ``None``."""
        return self._batches.get(tuple(self._keys[p] for p in positions))

    def window(self, positions: Sequence[int]) -> list[tuple[list[int], JournaledBatch]] | None:
        """Every request of the window, as journaled batches lying wholly inside it (``(positions, batch)``
        each, in the window's order), or ``None`` where any request is not journaled that way."""
        position_of = {self._keys[p]: p for p in positions}
        if len(position_of) != len(positions):  # two requests with one key: take nothing on trust
            return None
        found: dict[tuple[RowKey, ...], list[int]] = {}
        for key in position_of:
            rows = self._batch_of.get(key)
            if rows is None or any(row not in position_of for row in rows):
                return None
            found.setdefault(rows, [position_of[row] for row in rows])
        return [(found[rows], self._batches[rows]) for rows in sorted(found, key=lambda r: min(found[r]))]
