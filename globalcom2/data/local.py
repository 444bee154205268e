"""Where offline benchmark data lives, and the checks that it is there.

**Mechanism.** The data directory is ``$GLOBALCOM2_DATA_DIR``, or ``<checkout>/data`` when unset. Each
benchmark is a folder there holding ``datasets.DatasetDict.save_to_disk`` output in the hub dataset's
own schema (GQA has two: ``gqa/instructions`` and ``gqa/images``) plus ``globalcom2_source.json``
(where it came from: the hub with its revision, or synthetic fixtures).

A task names its folder relative to the data directory (the ``local_data`` key of our task YAMLs, read
by ``globalcom2.lmms.tasks.LocalDataTask``), and the folder is resolved when the task is loaded, not when
the YAML is written. Hence an environment variable and not a path in the YAML: YAML paths are fixed per
machine (absolute) or per file location (relative), and generated YAMLs go stale and need a render step
before every run, whereas an environment variable is inherited by ``torchrun`` workers, Slurm jobs and the
Python API alike.

A missing folder raises :class:`MissingDataError`, whose message names the path and the fixes;
``globalcom2.lmms.preflight`` runs the same check before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from globalcom2.data.benchmarks import BENCHMARKS
from globalcom2.file_digest import file_sha256
from globalcom2.paths import DATA_DIR_ENV, data_dir

SOURCE_FILE = "globalcom2_source.json"


class MissingDataError(FileNotFoundError):
    """Offline data a task needs is not on disk."""


def fix_hint(local_data: str) -> str:
    benchmark = local_data.split("/")[0]
    return (
        f"Fix: `make data BENCHMARKS={benchmark}` (needs network access and HF_TOKEN), or set {DATA_DIR_ENV} "
        f"to a folder that has it (now: {data_dir()}), or for a dry run with synthetic rows: "
        f"`python -m globalcom2.data.fixtures --out DIR` and {DATA_DIR_ENV}=DIR."
    )


def require_local_dataset(local_data: str, split: str, task: str = "") -> Path:
    """The folder of ``local_data`` (relative to :func:`data_dir`) after checking it holds ``split``: its
    ``dataset_dict.json`` lists the split, and the split's ``state.json`` and every data file it lists are
    there (``save_to_disk`` writes ``dataset_dict.json`` first, so a folder written in place and cut off
    would otherwise pass).

    Raises:
        MissingDataError: the folder, its ``dataset_dict.json``, the split or one of its files is missing
            or unreadable.
    """
    path = data_dir() / local_data
    check_saved_split(path, split, f"task {task!r}" if task else "this task", local_data)
    return path


def check_saved_split(path: Path, split: str, who: str, local_data: str) -> None:
    """That the ``save_to_disk`` folder ``path`` holds ``split`` whole (:func:`require_local_dataset`'s
    check, for any folder; ``who`` and ``local_data`` name it in messages).

    Raises:
        MissingDataError: see :func:`require_local_dataset`.
    """
    if not (path / "dataset_dict.json").is_file():
        raise MissingDataError(
            f"offline data for {who} is missing: {path} (expected a datasets.DatasetDict written by "
            f"save_to_disk, with split {split!r}). {fix_hint(local_data)}"
        )
    splits = _read_json(path / "dataset_dict.json", local_data).get("splits", [])
    if split not in splits:
        raise MissingDataError(
            f"offline data for {who} at {path} has splits {splits}, not {split!r}. {fix_hint(local_data)}"
        )
    state_path = path / split / "state.json"
    if not state_path.is_file():
        raise MissingDataError(
            f"offline data for {who} at {path} lists split {split!r} but has no {state_path.name} for it "
            f"(an interrupted write?). {fix_hint(local_data)}"
        )
    files = [e.get("filename") for e in _read_json(state_path, local_data).get("_data_files", [])]
    missing = [name for name in files if not isinstance(name, str) or not (path / split / name).is_file()]
    if not files or missing:
        raise MissingDataError(
            f"offline data for {who} at {path / split} is incomplete: "
            f"{'no data files listed' if not files else f'missing {missing}'} (an interrupted write?). "
            f"{fix_hint(local_data)}"
        )


def require_benchmark_data(local_data: str, split: str, task: str = "") -> Path:
    """:func:`require_local_dataset` for ``local_data``, and for every other part of its benchmark
    (``BENCHMARKS[...].parts``: GQA's questions read ``gqa/images`` too), so that what a task reads while it
    loads is checked before a model is."""
    path = require_local_dataset(local_data, split, task)
    key = local_data.split("/")[0]
    benchmark = BENCHMARKS.get(key)
    for part in benchmark.parts if benchmark is not None else ():
        folder = f"{key}/{part.subdir}" if part.subdir else key
        if folder != local_data:
            require_local_dataset(folder, part.split, task)
    return path


def read_source_file(folder: Path) -> dict[str, Any]:
    """A benchmark folder's ``globalcom2_source.json`` ({} if absent).

    Raises:
        MissingDataError: the file exists but is not a JSON object.
    """
    source = folder / SOURCE_FILE
    return _read_json(source, folder.name) if source.is_file() else {}


def data_source(local_data: str) -> dict[str, Any]:
    """The ``globalcom2_source.json`` of the benchmark folder holding ``local_data`` ({} if absent)."""
    return read_source_file(data_dir() / local_data.split("/")[0])


def _read_json(path: Path, local_data: str) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MissingDataError(
            f"cannot read {path} ({type(err).__name__}: {err}); the data folder is damaged. "
            f"{fix_hint(local_data)}"
        ) from err
    if not isinstance(payload, dict):
        raise MissingDataError(
            f"{path} holds {type(payload).__name__}, not a JSON object. {fix_hint(local_data)}"
        )
    return payload


def data_fingerprint(local_data: str) -> dict[str, Any]:
    """What the benchmark folder holding ``local_data`` holds: per saved split (its path relative to the
    folder), the SHA-256 of each data file its ``state.json`` lists (``globalcom2.file_digest``: hashed once
    per machine, then read from the digest cache). The same rows are the same identity wherever and
    whenever they were written (``datasets``' own ``_fingerprint`` is not used: it hashes the download's
    paths and times); other rows, in a folder rebuilt, edited or copied from elsewhere without its
    ``globalcom2_source.json``, are another. ``None`` for a listed file that is missing."""
    return folder_fingerprint(data_dir() / local_data.split("/")[0])


def folder_fingerprint(folder: Path) -> dict[str, Any]:
    """Per ``save_to_disk`` split under ``folder`` (its path relative to it), the SHA-256 of each data file
    its ``state.json`` lists; ``None`` for a listed file that is missing (see :func:`data_fingerprint`)."""
    splits: dict[str, Any] = {}
    for state_path in sorted(folder.rglob("state.json")):
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        names = [e.get("filename", "") for e in state.get("_data_files", []) if isinstance(e, dict)]
        splits[str(state_path.parent.relative_to(folder))] = {
            name: _digest(state_path.parent / name) for name in names
        }
    return splits


def _digest(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None
