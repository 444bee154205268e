"""Tasks that read their data from the hub themselves (lmms-eval's LMMs-Eval-Lite tasks): which commit a
cell's identity names, loading exactly that commit, and checking afterwards that it was loaded.

Our own tasks read folders on disk, named by their content. A lite task's YAML names a hub dataset
(``dataset_path``, ``dataset_name``) and ``datasets.load_dataset`` fetches it when the task is built, at
``main`` unless the YAML's ``dataset_kwargs`` say otherwise. Three things keep a cell honest about it:

* :func:`hub_data_identity`: the commit ``datasets`` will load (:func:`globalcom2.hub.hub_dataset_commit`),
  in lmms-eval's own datasets cache (:func:`datasets_cache_dir`), for the cell's identity;
* :func:`pinned_task`: the task as lmms-eval builds it, with ``dataset_kwargs.revision`` set to that commit,
  so a ``main`` that moves after the identity was computed cannot put other rows under it;
* :func:`loaded_commit_problems`: after the evaluation, every split of the task's dataset must lie in that
  commit's cache folder. Offline, ``datasets`` ignores ``revision`` and loads its newest cached copy
  (``datasets/load.py``, ``CachedDatasetModuleFactory``), which another process may have replaced between
  the identity and the load: this is what catches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from globalcom2.hub import hub_dataset_commit, is_full_commit

#: Hub datasets a task's own code loads besides the one its YAML names, as (repo, configuration): GQA-lite's
#: ``process_docs`` fetches GQA's testdev-balanced images at ``main`` and joins them by ``imageId``
#: (``lmms_eval/tasks/gqa/utils.py``, ``gqa_process_docs``). Their commit joins the identity; they cannot be
#: pinned (the call is lmms-eval's) nor checked once loaded (the rows become images in memory). That call
#: names no ``cache_dir``, so ``datasets``' own cache holds them, not lmms-eval's.
SIDE_DATASETS: dict[str, tuple[tuple[str, str], ...]] = {
    "gqa_lite": (("lmms-lab-encoder/GQA", "testdev_balanced_images"),),
}


class LoadedDataMismatch(RuntimeError):
    """A task's data, once loaded, is not the commit the cell's identity names."""


def datasets_cache_dir() -> str:
    """The datasets cache lmms-eval loads a task's data with (``LMMS_EVAL_DATASETS_CACHE``, else
    ``HF_DATASETS_CACHE``, else a node-local copy when that is on a remote filesystem:
    ``lmms_eval/api/task.py``, ``_resolve_hf_datasets_cache_dir``), asked of lmms-eval itself."""
    from lmms_eval.api import task

    return task._resolve_hf_datasets_cache_dir()


def hub_data_identity(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"hub", "config", "commit"}`` of the dataset task ``name`` loads from the hub (``config``: its YAML,
    whose ``dataset_path``, ``dataset_name`` and ``dataset_kwargs.revision`` say which), plus ``side``, the
    same for each of its :data:`SIDE_DATASETS`; or ``{"unresolved", "reason"}`` when a commit cannot be
    told, which ``globalcom2.run`` refuses as it refuses unnamed weights."""
    repo = config.get("dataset_path")
    if not isinstance(repo, str) or not repo:
        return {"unresolved": name, "reason": "its YAML names no dataset_path or local_data"}
    kwargs = config.get("dataset_kwargs") or {}
    revision = kwargs.get("revision") if isinstance(kwargs, Mapping) else None
    wanted = [
        (repo, config.get("dataset_name"), revision, datasets_cache_dir()),
        *((r, c, None, None) for r, c in SIDE_DATASETS.get(name, ())),  # None: datasets' default cache
    ]
    named = []
    for hub, subset, at, cache_dir in wanted:
        try:
            commit = hub_dataset_commit(hub, subset, at, cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            return {"unresolved": hub, "reason": f"{type(err).__name__}: {err}"}
        named.append({"hub": hub, "config": subset, "commit": commit})
    main, *side = named
    return {**main, "side": side} if side else main


def pinned_task(name: str, config: Mapping[str, Any], commit: str) -> dict[str, Any]:
    """Task ``name`` as an lmms-eval task config that loads ``commit``: ``{"task", "dataset_kwargs"}``, its
    YAML's ``dataset_kwargs`` (``config``) with ``revision`` set. lmms-eval merges a dict entry of the task
    list over the task's own YAML, key by key (``lmms_eval/tasks/__init__.py``,
    ``TaskManager._load_individual_task_or_group``), so the other kwargs are carried over here."""
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"task {name!r}: dataset_kwargs is {kwargs!r}, not a mapping")
    return {"task": name, "dataset_kwargs": {**kwargs, "revision": commit}}


def loaded_commit_problems(task_datasets: Mapping[str, Any], commits: Mapping[str, str]) -> list[str]:
    """One line per task of ``commits`` whose loaded data (``task_datasets``: lmms-eval's ``lm.task_dict``,
    task name to its ``DatasetDict``) does not lie wholly in the cache folder of the commit named: every
    split's Arrow files must be in a folder named by that commit (``datasets`` caches a hub dataset in
    ``…/<config>/<version>/<commit>/``, and a ``map`` or ``filter`` of it beside them)."""
    problems = []
    for task, commit in commits.items():
        dataset = task_datasets.get(task)
        if dataset is None:
            problems.append(
                f"task {task!r}: lmms-eval holds no dataset for it, so its commit cannot be checked"
            )
            continue
        splits = dataset.values() if isinstance(dataset, Mapping) else [dataset]
        files = [Path(entry["filename"]) for split in splits for entry in getattr(split, "cache_files", [])]
        if not files:
            problems.append(
                f"task {task!r}: its dataset is held in memory, with no cache file to say which commit it is"
            )
            continue
        strays = sorted({f.parent for f in files if f.parent.name != commit})
        if strays:
            legacy = [f for f in strays if not is_full_commit(f.name)]
            problems.append(
                f"task {task!r} read {', '.join(map(str, strays))}, not commit {commit}"
                + (
                    " (a folder not named by a commit is a cache written by datasets < 3, which datasets still "
                    "reuses: delete it)"
                    if legacy
                    else ""
                )
            )
    return problems
