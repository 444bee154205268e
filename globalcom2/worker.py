"""Evaluate one cell: load the model with its method, run lmms-eval, write the outputs (rank 0).

Runs in the Hydra process for single-process cells, or under ``torchrun``/``accelerate launch`` for
data-parallel ones (``python -m globalcom2.worker <spec.json> <out_dir>``), so Hydra itself never runs
inside a process group. Every rank evaluates its share of the documents; rank 0 gathers, saves lmms-eval's
files with ``EvaluationTracker``, the per-sample records, and ``outcome.json``, which the parent turns
into the cell's ``record.json``.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from globalcom2.cells import CellSpec
from globalcom2.records import CellOutcome, write_outcome
from globalcom2.sample_records import RECORDS_FILE
from globalcom2.store import hold_worker_lock

OUTCOME_FILE = "outcome.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def numeric_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``results[task]["metric,filter"]`` -> ``{task: {metric: value}}``, numbers only (no stderr, no alias)."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        clean = {}
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if "stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            clean[name if filter_name in ("", "none") else f"{name},{filter_name}"] = float(value)
        metrics[task] = clean
    return metrics


def paper_metrics(results: dict[str, Any], columns: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each paper column this benchmark fills: value in the paper's unit, or why it has none yet."""
    from globalcom2.data.benchmarks import PAPER_METRICS, paper_metric_value

    out = {}
    for column in columns:
        spec = PAPER_METRICS[column]
        entry: dict[str, Any] = {"metric": spec.metric, "comparable": spec.comparable, "note": spec.note}
        if spec.source == "results":
            entry["value"] = paper_metric_value(column, results)
        else:
            entry["value"] = None
            entry["pending"] = f"needs the separate judging step ({spec.source}); see the MM-Vet note"
        out[column] = entry
    return out


def evaluate_cell(spec: CellSpec, out_dir: Path, answers_dir: Path | None = None) -> CellOutcome | None:
    """Evaluate ``spec``; returns the outcome on rank 0 (``None`` on other ranks). ``answers_dir``: the
    answers journal to keep each finished batch in and to resume from (``globalcom2/answer_journal.py``)."""
    try:
        return _evaluate(spec, out_dir, answers_dir)
    finally:
        if spec.launcher.num_processes == 1:
            reset_accelerator_state()


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide state after a cell run in this process.

    The first ``Accelerator()`` fixes it for the process (``accelerate/state.py``, ``AcceleratorState``), so in
    one Hydra multirun a CPU cell after a CUDA one was refused ("AcceleratorState has already been
    initialized"), and a CUDA cell after a CPU one ran with the CPU's state. accelerate has no public reset;
    ``_reset_state`` is what its own tests call between configurations. Not under a process group (a
    multi-process cell's ranks end with the cell)."""
    import torch.distributed
    from accelerate.state import AcceleratorState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    AcceleratorState._reset_state(reset_partial_state=True)


def _evaluate(spec: CellSpec, out_dir: Path, answers_dir: Path | None) -> CellOutcome | None:
    from globalcom2.efficiency.summary import efficiency_summary
    from globalcom2.lmms import api
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext
    from globalcom2.sample_records import summarize, write_jsonl

    seed_everything(spec.seed)
    started = time.time()
    multi_process = spec.launcher.num_processes > 1
    run = spec.run_spec()
    if multi_process and run.model.device != "cpu":
        # each rank takes its own GPU (the process's accelerator); a CPU cell stays on the CPU, as its
        # identity and record say, on a machine with GPUs too
        run = replace(run, model=replace(run.model, device=None))
    if answers_dir is not None:
        # the cell's own folder: answers journaled under other settings (a code change since the interruption)
        # are deleted and run again, not a reason to stop the sweep
        options = replace(run.options, answers_journal=str(answers_dir), discard_stale_answers=True)
        run = replace(run, options=options)
    lm = GlobalCom2LlavaNext(
        run
    )  # validated by CellSpec.from_config and the pre-flight: nothing is re-parsed
    try:
        loaded = time.time()
        results = api.evaluate(
            lm,
            list(spec.benchmark.tasks),
            output_path=out_dir,
            limit=spec.benchmark.limit,
            gen_kwargs=spec.benchmark.lmms_gen_kwargs(),
            random_seed=spec.seed,
            numpy_random_seed=spec.seed,
            torch_random_seed=spec.seed,
            fewshot_random_seed=spec.seed,
            dataset_commits=dict(spec.benchmark.dataset_commits),
        )
        evaluated = time.time()
        records = lm.gather_records()  # collective: every rank takes part
        if results is None:  # not rank 0
            return None
        results_file = api.save(results, out_dir, model_name=spec.model.name)
        write_jsonl(out_dir / RECORDS_FILE, records)
        outcome = CellOutcome(
            run={
                **lm.run_info,
                "seed": spec.seed,
                "limit": spec.benchmark.limit,
                "tasks": list(spec.benchmark.tasks),
            },
            timings={
                "model_load_s": loaded - started,
                "evaluate_s": evaluated - loaded,
                "generate_until_s": lm.generate_until_s,  # this process's; the rest of evaluate_s is lmms-eval's
                "total_s": time.time() - started,
            },
            metrics=numeric_metrics(results),
            paper_metrics=paper_metrics(results, spec.benchmark.columns),
            n_samples={task: v.get("effective") for task, v in results.get("n-samples", {}).items()},
            samples=summarize(records),
            efficiency=efficiency_summary(
                records, lm.model.config, lm.method, torch.finfo(lm.model.dtype).bits // 8
            ),
            files={
                "results": str(results_file.relative_to(out_dir)),
                "samples": sorted(
                    str(p.relative_to(out_dir)) for p in results_file.parent.glob("*_samples_*.jsonl")
                ),
                "records": RECORDS_FILE,
            },
        )
        write_outcome(out_dir / OUTCOME_FILE, outcome)
        return outcome
    finally:  # one Hydra process may run many cells: free this one's model now
        try:
            lm.release(failed=sys.exc_info()[0] is not None)
        finally:
            del lm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def death_signal_setter() -> Callable[[], None]:
    """A function that makes the kernel SIGTERM the calling process when its parent dies (Linux ``prctl``;
    elsewhere a no-op). Resolve it before ``fork``, so the child only calls it."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def die_with_parent(parent: int, set_death_signal: Callable[[], None]) -> None:
    """SIGTERM this process when ``parent`` dies; exit at once if it already has (the race before prctl)."""
    set_death_signal()
    if os.getppid() != parent:
        os._exit(1)


#: Set by ``globalcom2.run`` in its launcher's environment, which every rank inherits: its own pid, the
#: ranks' grandparent.
RUN_PID_ENV = "GLOBALCOM2_RUN_PID"


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from ``/proc`` (Linux), ``None`` where it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


#: This rank's parent when its module was imported: the launcher, unless it died during the interpreter's
#: start (what ``launcher_is_alive`` falls back on outside ``globalcom2.run``).
PARENT_AT_IMPORT = os.getppid()


def launcher_is_alive(run_pid: int | None, parent_at_start: int | None = None) -> bool:
    """Whether this rank's launcher still runs. A dead one's ranks are adopted (by init or a subreaper), so
    under ``globalcom2.run`` (``run_pid``) the parent must be a process that ``run_pid`` started. Without it
    (a launcher started by hand) the parent must still be ``parent_at_start`` (default
    :data:`PARENT_AT_IMPORT`): a launcher that is itself pid 1, a container's entrypoint, is alive, and an
    adoption after the import is seen; one during the interpreter's start is not (the death signal and the
    launcher's own end still stop the rank then). Where ``/proc`` cannot be read, assume alive.
    """
    parent = os.getppid()
    if run_pid is None:
        return parent == (PARENT_AT_IMPORT if parent_at_start is None else parent_at_start)
    grandparent = parent_of(parent)  # 0 when the parent is init: never a run's pid
    return grandparent is None or grandparent == run_pid


def die_with_launcher(set_death_signal: Callable[[], None]) -> None:
    """SIGTERM this rank when its launcher dies, and exit at once, saying why, if it died already.

    The rank's parent cannot be read at the start of ``main``: by then the launcher may have died and the
    rank been adopted, after the seconds its imports take (under load, more), and a death signal set on the
    adopter never comes. That race left two ranks running after their ``globalcom2.run`` was killed.
    """
    set_death_signal()
    run_pid = os.environ.get(RUN_PID_ENV)
    if not launcher_is_alive(int(run_pid) if run_pid else None):
        print(
            f"globalcom2.worker: the launcher of this rank (pid {os.getpid()}) has exited "
            f"({RUN_PID_ENV}={run_pid or 'unset'}, parent now {os.getppid()}); exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """``python -m globalcom2.worker <spec.json> <out_dir> [<answers_dir>]`` (under torchrun / accelerate
    launch)."""
    spec_path, out_dir, *rest = (argv if argv is not None else sys.argv[1:])[:3]
    # The cell stays locked while this rank lives (its runner may be gone: globalcom2.store.Cell.lock) ...
    hold_worker_lock(Path(out_dir))
    # ... and a rank outlives neither its launcher nor, through the launcher's own death signal,
    # ``globalcom2.run``.
    die_with_launcher(death_signal_setter())
    spec = CellSpec.from_dict(json.loads(Path(spec_path).read_text()))
    check_world_size(spec.launcher.num_processes, os.environ.get("WORLD_SIZE"))
    from globalcom2.redaction import redacted_console

    with redacted_console():
        try:
            evaluate_cell(spec, Path(out_dir), Path(rest[0]) if rest else None)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # no rank exits while rank 0 still writes the cell
        finally:
            shutdown_process_group()


def check_world_size(expected: int, world_size: str | None) -> None:
    """Refuse to run a share of a cell in a group of another size than ``launcher.num_processes``: a
    launcher that read other settings (an ``accelerate`` config file, a ``--num_processes`` lost on the way)
    would otherwise evaluate the cell on fewer processes than its record says, or split it differently.

    Raises:
        RuntimeError: ``WORLD_SIZE`` is unset or differs from ``expected``.
    """
    if world_size != str(expected):
        raise RuntimeError(
            f"this worker runs in a process group of WORLD_SIZE={world_size!r}, but the cell asks for "
            f"launcher.num_processes={expected}; the launcher did not start the group it was asked for"
        )


def shutdown_process_group() -> None:
    """Destroy the process group before the interpreter exits.

    A rank that exits with the group still alive can abort in C++ teardown ("terminate called without an
    active exception", SIGABRT), which fails the whole worker group after the cell is done.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
