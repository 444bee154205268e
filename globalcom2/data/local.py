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
    """The folder of ``local_data`` (relative to :func:`data_dir`) after checking it holds ``split``.

    Raises:
        MissingDataError: the folder, its ``dataset_dict.json`` or the split is missing.
    """
    path = data_dir() / local_data
    who = f"task {task!r}" if task else "this task"
    if not (path / "dataset_dict.json").is_file():
        raise MissingDataError(
            f"offline data for {who} is missing: {path} (expected a datasets.DatasetDict written by "
            f"save_to_disk, with split {split!r}). {fix_hint(local_data)}"
        )
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if split not in splits:
        raise MissingDataError(
            f"offline data for {who} at {path} has splits {splits}, not {split!r}. {fix_hint(local_data)}"
        )
    return path


def data_source(local_data: str) -> dict[str, Any]:
    """The ``globalcom2_source.json`` of the benchmark folder holding ``local_data`` ({} if absent)."""
    source = data_dir() / local_data.split("/")[0] / SOURCE_FILE
    return json.loads(source.read_text()) if source.is_file() else {}


def data_fingerprint(local_data: str) -> dict[str, Any]:
    """What the benchmark folder holding ``local_data`` holds, cheaply: per saved split (its path relative
    to the folder), the ``_fingerprint`` that ``datasets`` wrote into its ``state.json`` and the size of
    each data file. Two builds of a folder (another download, fixtures rewritten by hand, a folder copied
    from elsewhere without its ``globalcom2_source.json``) thus differ, without reading gigabytes of images.
    """
    folder = data_dir() / local_data.split("/")[0]
    splits: dict[str, Any] = {}
    for state_path in sorted(folder.rglob("state.json")):
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        files = {
            entry.get("filename", ""): _size(state_path.parent / entry.get("filename", ""))
            for entry in state.get("_data_files", [])
            if isinstance(entry, dict)
        }
        splits[str(state_path.parent.relative_to(folder))] = {
            "fingerprint": state.get("_fingerprint"),
            "files": files,
        }
    return splits


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
