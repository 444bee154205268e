"""A cell's names and ``record.json``, typed: the one module that writes and reads a cell's record (and the
worker's outcome).

A cell is named by its :class:`CellKey` (experiment, model, method label, ratio, benchmark: its folder in the
results store). A finished cell's record is a :class:`CellRecord`: which cell it is (:class:`CellRef`, the
key plus the identity the results store keys it on), what produced it (spec, resolved config, provenance),
and what came out of it
(:class:`CellOutcome`, written by rank 0 of the evaluation as ``outcome.json`` and folded into the record
by ``globalcom2.run``). Writers build these classes, readers get them back from :func:`read_record`, so a
renamed or missing field fails here, with the file named, rather than as a ``KeyError`` in a report.

Whether a cell is *finished* is decided in one place, :meth:`globalcom2.store.Cell.finished_record`,
which reads through this module.

Versions (``schema``): 1 predates cell identities and cannot be verified (refused with "re-run the
cell"); 2 is current. Bump :data:`RECORD_SCHEMA` when a field changes meaning, and say here what
an older record needs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_json

RECORD_SCHEMA = 2  # 2: cells carry their identity and id (schema 1 records predate it)
COMPLETE = "complete"


class RecordError(ValueError):
    """A ``record.json`` or ``outcome.json`` that cannot be used; the message says why and what to do."""


def ratio_label(retention_ratio: float) -> str:
    """``r0.25``, ``r0.1``, ``r1.0``: the folder name of a retention ratio."""
    return f"r{float(retention_ratio)!r}"


@dataclass(frozen=True)
class CellKey:
    """What a cell is, in words; with the identity's id it names the cell's folder."""

    experiment: str
    model: str
    method: str  # the method's label (results folder name), not necessarily its registry name
    retention_ratio: float
    benchmark: str

    def relative_path(self) -> Path:
        parts = (self.experiment, self.model, self.method, ratio_label(self.retention_ratio), self.benchmark)
        for part in parts:
            if not part or "/" in part or part.startswith("."):
                raise ValueError(f"invalid cell path component {part!r} in {self}")
        return Path(*parts)


@dataclass(frozen=True)
class CellRef(CellKey):
    """Which cell a record belongs to: its key, its id (hash of ``identity``) and its folder."""

    id: str
    identity: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def key(self) -> CellKey:
        return CellKey(self.experiment, self.model, self.method, self.retention_ratio, self.benchmark)


@dataclass(frozen=True)
class CellOutcome:
    """What one evaluation produced (``globalcom2.worker``): everything of the record but the bookkeeping.

    The blocks stay mappings because their keys are data (task and metric names, paper columns), not
    a schema; ``efficiency`` is :func:`globalcom2.efficiency.summary.efficiency_summary`'s output.
    """

    run: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_samples: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    efficiency: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "outcome") -> CellOutcome:
        try:
            return cls(**data)
        except TypeError as err:  # an unknown or missing field
            raise RecordError(f"malformed {source} ({err})") from err


@dataclass(frozen=True, kw_only=True)
class CellRecord(CellOutcome):
    """The content of a finished cell's ``record.json``: the outcome's blocks plus which cell produced them,
    how, and when (see the module docstring for the versions)."""

    cell: CellRef
    spec: dict[str, Any]  # globalcom2.cells.CellSpec.to_dict()
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    wall_s: float | None = None
    status: str = COMPLETE
    schema: int = RECORD_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "record.json") -> CellRecord:
        """Parse a record; :class:`RecordError` says what is wrong and what to do about it."""
        if not isinstance(data, dict) or data.get("status") != COMPLETE:
            raise RecordError(f"{source} is not complete")
        cell = data.get("cell")
        if not isinstance(cell, dict) or not cell.get("id"):
            raise RecordError(
                f"{source} predates cell identities (schema 1), so its settings cannot be verified; "
                "re-run the cell"
            )
        schema = data.get("schema")
        if schema != RECORD_SCHEMA:
            raise RecordError(
                f"{source} has schema {schema!r}; this code reads schema {RECORD_SCHEMA}: re-run the cell "
                "with this version (or aggregate it with the version that wrote it)"
            )
        try:
            for key in ("experiment", "model", "method", "benchmark"):
                if not isinstance(cell.get(key), str):
                    raise TypeError(f"cell.{key} is {cell.get(key)!r}, not a string")
            ratio = cell["retention_ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise TypeError(f"cell.retention_ratio is {ratio!r}, not a number")
            if not isinstance(cell.get("identity"), dict) or not cell["identity"]:
                raise TypeError(f"cell.identity is {cell.get('identity')!r}, not a non-empty mapping")
            ref = CellRef(**{**cell, "retention_ratio": float(ratio)})
            # every field is written (``to_dict``), so one that is absent is a damaged or hand-made record,
            # whose defaults would show as empty cells in a report without a word
            missing = sorted(set(cls.__dataclass_fields__) - set(data))
            if missing:
                raise TypeError(f"it lacks {', '.join(missing)}")
            blocks = set(CellOutcome.__dataclass_fields__) | {"spec", "config", "provenance"}
            for name in sorted(blocks):
                if not isinstance(data[name], dict):
                    raise TypeError(f"{name} is {data[name]!r}, not a mapping")
            _check_metrics(data["metrics"])
            return cls(**{**data, "cell": ref})  # an unknown field is a TypeError
        except (KeyError, TypeError, ValueError) as err:
            raise RecordError(f"malformed {source} ({type(err).__name__}: {err})") from err


def _check_metrics(metrics: dict[str, Any]) -> None:
    """``metrics`` is ``{task: {metric: number}}`` (``globalcom2.worker.numeric_metrics``); a string or a
    flag in it would be tabled as a score."""
    for task, values in metrics.items():
        if not isinstance(values, dict):
            raise TypeError(f"metrics.{task} is {values!r}, not a mapping")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metrics.{task}.{name} is {value!r}, not a number")


def write_record(path: str | Path, record: CellRecord) -> None:
    """Write ``record`` atomically: readers see the old file or the whole new one."""
    atomic_write_json(path, record.to_dict())


def read_record(path: str | Path) -> CellRecord:
    """The record at ``path``; :class:`RecordError` when it is unreadable, corrupt, unfinished or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # a folder, unreadable, truncated, not UTF-8, not JSON
        raise RecordError(f"unreadable or corrupt record.json ({type(err).__name__}: {err})") from err
    return CellRecord.from_dict(data)


def write_outcome(path: str | Path, outcome: CellOutcome) -> None:
    atomic_write_json(path, outcome.to_dict())


def read_outcome(path: str | Path) -> CellOutcome:
    """The worker's outcome at ``path``; :class:`RecordError` when it is unreadable, corrupt or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecordError(f"unreadable or corrupt {path} ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise RecordError(f"malformed {path} (not a JSON object)")
    return CellOutcome.from_dict(data, str(path))
