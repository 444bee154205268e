"""Running lmms-eval from Python on a model instance, with the same checks as the CLI.

::

    from globalcom2.lmms import api
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext
    from globalcom2.lmms.preflight import check_tasks

    tasks = ["pope_adv_local", "globalcom2_demo"]
    check_tasks(tasks)                                      # before loading the model (lmms.preflight)
    lm = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.25)
    results = api.evaluate(lm, tasks, output_path="results/x")
    api.save(results, "results/x", model_name="tiny")      # lmms-eval's own file layout
    records = lm.gather_records()                           # per-sample records (all ranks)

``simple_evaluate`` itself writes nothing and, unlike the CLI, raises on failure; :func:`evaluate` adds
the task checks and verifies that every task produced results.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from globalcom2.data.benchmarks import EVALAI_TASKS
from globalcom2.lmms.hub_data import LoadedDataMismatch, loaded_commit_problems, pinned_task
from globalcom2.lmms.preflight import PreflightError, check_tasks, llava_unused_options, task_yaml
from globalcom2.paths import tasks_dir
from globalcom2.protocol.rules import check_tasks_covered


def task_manager(include_path: str | list[str] | None = None, include_defaults: bool = False) -> Any:
    """A ``TaskManager`` over our ``tasks/`` (built-ins only on request: indexing them takes seconds)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(
        "WARNING", include_path=include_path or str(tasks_dir()), include_defaults=include_defaults
    )


#: Why lmms-eval's response cache (``use_cache`` / ``--use_cache``) is refused for our model.
RESPONSE_CACHE_REFUSAL = (
    "use_cache (lmms-eval's response cache) is not supported with globalcom2_llava_next: an answer served "
    "from the cache has no sample record (tokens, timings, what the method kept), and in a multi-process run "
    "a rank whose answers were all cached never reaches the records' gather, so the others wait forever; "
    "run without it (the results store already reuses finished cells)"
)


def evaluate(
    lm: Any,
    tasks: list[str],
    *,
    output_path: str | Path | None = None,
    limit: int | float | None = None,
    gen_kwargs: str | None = None,
    log_samples: bool = True,
    include_path: str | list[str] | None = None,
    dataset_commits: Mapping[str, str] | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any] | None:
    """``simple_evaluate`` on ``lm`` (an ``lmms`` instance) with checks; ``None`` on ranks other than 0.

    ``output_path`` is where tasks with submission-style outputs write them (``<output_path>/submissions``;
    lmms-eval otherwise uses ``./submissions``). Before anything runs, as the CLI does, it refuses a task
    the plugin's protocol has no rule for, and ``gen_kwargs``, ``system_instruction`` or ``num_fewshot``
    under ``protocol=llava`` (which would be ignored). Raises if a task is missing from the results.

    ``dataset_commits``: task name to the hub commit a task that reads the hub loads (a cell's identity,
    ``data.<task>.commit``): the task is built at that revision, and its loaded data checked to be that
    commit (:mod:`globalcom2.lmms.hub_data`); a mismatch raises rather than return results of other data.
    """
    from lmms_eval.evaluator import simple_evaluate

    if simple_evaluate_kwargs.get("use_cache") is not None and getattr(lm, "protocol", None) is not None:
        raise PreflightError(RESPONSE_CACHE_REFUSAL)
    checks = check_tasks(tasks, include_path)
    protocol = getattr(lm, "protocol", None)  # our plugin's; another lmms model has none
    if protocol is not None:
        try:
            check_tasks_covered(protocol, tasks)
        except ValueError as err:
            raise PreflightError(str(err)) from None
    if protocol == "llava":
        unused = llava_unused_options(
            gen_kwargs,
            simple_evaluate_kwargs.get("system_instruction"),
            simple_evaluate_kwargs.get("num_fewshot"),
        )
        if unused:
            raise PreflightError(unused)
    submitting = sorted(set(tasks) & set(EVALAI_TASKS))
    if submitting and not output_path:
        raise PreflightError(
            f"tasks {submitting} write EvalAI submission files next to the results; give an output_path "
            "(checked now rather than after the whole split has been generated)"
        )
    include_defaults = any(check.origin == "lmms-eval" for check in checks)
    cli_args = argparse.Namespace(
        output_path=str(output_path) if output_path else None, process_with_media=False
    )
    # As lmms-eval's own CLI: with a process group (torchrun / accelerate launch) use raw torch.distributed
    # collectives. Its "accelerate" path gathers a 0-d tensor and fails on multi-process CPU runs.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    simple_evaluate_kwargs.setdefault(
        "distributed_executor_backend", "torchrun" if distributed else "accelerate"
    )
    commits = dict(dataset_commits or {})
    unknown = sorted(set(commits) - set(tasks))
    if unknown:
        raise PreflightError(f"dataset_commits names tasks {unknown} that are not among the tasks {tasks}")
    if commits and not getattr(lm, "is_simple", True):
        # lmms-eval builds a task given as a dict as a simple task whatever the model's kind
        # (TaskManager.load_config ignores task_type): a chat model would get the wrong task class
        raise PreflightError(f"pinned hub tasks {sorted(commits)} need a simple (non-chat) lmms model")
    # lmms-eval builds the named tasks first and the dict ones after: a list mixing both runs in that order
    yaml_of = {check.name: check.yaml_path for check in checks}  # as the pre-flight found them
    entries: list[str | dict[str, Any]] = [
        pinned_task(t, task_yaml(yaml_of[t]) if yaml_of.get(t) else {}, commits[t]) if t in commits else t
        for t in tasks
    ]
    results = simple_evaluate(
        model=lm,
        tasks=entries,
        task_manager=task_manager(include_path, include_defaults),
        limit=limit,
        gen_kwargs=gen_kwargs,
        log_samples=log_samples,
        cli_args=cli_args,
        **{"bootstrap_iters": 0, **simple_evaluate_kwargs},
    )
    # each rank loaded its own copy; every rank has the same commits, so all take part in the collective or none
    problems = _on_every_rank(loaded_commit_problems(lm.task_dict, commits)) if commits else []
    if problems:
        raise LoadedDataMismatch(
            "the data loaded is not the data the cell's identity names (another process may have changed the "
            "datasets cache meanwhile); nothing is kept, run it again:\n"
            + "\n".join(f"- {p}" for p in problems)
        )
    if results is None:
        return None
    missing = [
        t for t in tasks if t not in results.get("results", {}) and t not in results.get("group_subtasks", {})
    ]
    if missing:
        raise PreflightError(f"tasks {missing} produced no results")
    return results


def _on_every_rank(problems: list[str]) -> list[str]:
    """The problems every rank of a process group found, joined, on every rank (``problems`` as they are
    without one): a rank that raised alone would leave the others waiting in the next collective, and the
    cell would end with a kill signal rather than the reason."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return problems
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, problems)
    return [f"rank {rank}: {p}" for rank, found in enumerate(gathered) for p in found or []]


def save(results: dict[str, Any], output_path: str | Path, model_name: str = "") -> Path:
    """Write results (and samples, if logged) with lmms-eval's ``EvaluationTracker``, as the CLI does.

    Files land in ``<output_path>/<model_name with / -> __>/``. The tracker only logs a warning when a
    write fails, and writes in place (the samples a line at a time), so the files are checked afterwards:
    each present, the results a whole JSON document, each samples file one whole JSON line per sample
    (:func:`written_problems`). The tracker edits the samples it writes in place, so it is given a copy:
    ``results`` is the caller's as it was. Returns the results file.
    """
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    tracker = EvaluationTracker(output_path=str(output_path))
    folder = model_name.replace("/", "__")
    tracker.general_config_tracker.model_name = model_name or None
    tracker.general_config_tracker.model_name_sanitized = folder
    results = dict(results)
    samples = copy.deepcopy(results.pop("samples", None))  # save_results_samples pops keys of each sample
    stamp = get_datetime_str(timezone="UTC")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=stamp)
    written = Path(output_path) / folder / f"{stamp.replace(':', '-')}_results.json"
    date_id = getattr(tracker, "date_id", None)  # set only once the results file was written
    if date_id is None:
        raise OSError(
            f"lmms-eval's EvaluationTracker could not write the results under {Path(output_path) / folder} "
            "(see its warnings above)"
        )
    lines: dict[Path, int] = {}
    for task in results.get("configs", {}) if samples else []:
        tracker.save_results_samples(task_name=task, samples=samples[task])
        lines[written.with_name(f"{date_id}_samples_{task}.jsonl")] = len(samples[task])
    problems = written_problems(written, lines)
    if problems:
        raise OSError(
            "lmms-eval's EvaluationTracker did not write its files whole (see its warnings above): "
            + "; ".join(problems)
        )
    return written


def written_problems(results_file: Path, samples_lines: dict[Path, int]) -> list[str]:
    """What is missing or cut short: ``results_file`` must hold one JSON document, and each samples file
    exactly its number of lines, each a JSON document (``\n``-separated: a JSON text escapes newlines)."""
    problems = []
    for path in (results_file, *samples_lines):
        if not path.is_file():
            problems.append(f"{path} is missing")
    if problems:
        return problems
    try:
        json.loads(results_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{results_file} is not whole JSON ({err})")
    for path, expected in samples_lines.items():
        text = path.read_bytes()
        rows = text.split(b"\n")
        if rows[-1] != b"" or len(rows) - 1 != expected:
            problems.append(f"{path} has {len(rows) - 1} complete lines for {expected} samples")
            continue
        for number, row in enumerate(rows[:-1], 1):
            try:
                json.loads(row)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(f"{path} line {number} is not whole JSON ({err})")
                break
    return problems
