"""``python -m globalcom2.run``: evaluate one cell (model x method x ratio x benchmark); ``-m`` sweeps.

Reads like a recipe: compose -> validate -> lock -> skip if finished -> run (here, or as a data-parallel
worker group) -> commit ``record.json``. Examples::

    python -m globalcom2.run method=globalcom2 method.retention_ratio=0.25 benchmark=demo
    python -m globalcom2.run -m experiment=demo                 # the demo grid
    python -m globalcom2.run -m experiment=paper_table1_7b dry_run=true   # list the cells only

Cells land in ``results/<experiment>/<model>/<method>/r<ratio>/<benchmark>/<cell id>/``
(``globalcom2/store.py``); the id is a hash of the cell's identity (``CellSpec.identity``), so a changed
config never reuses a finished cell. Every cell prints one line saying what happened and why:
``[done]`` (finished with these exact settings), ``[run]``, ``[busy]`` (another process holds its lock:
the sweep goes on with the other cells, then exits non-zero), ``[same]`` or ``[dry-run]``; a cell that runs
then prints its outcome, ``[ok]`` or ``[failed]`` (and ``[wandb]`` with ``logger=wandb``).

Bad input (a value, a checkpoint, a device) is refused before any weight loads, with one line that names
the value and the valid choices; ``HYDRA_FULL_ERROR=1`` shows the traceback as well.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from globalcom2.cells import CellSpec
from globalcom2.methods import swept_methods
from globalcom2.paths import DATA_DIR_ENV, PROJECT_ROOT, TASKS_DIR_ENV
from globalcom2.provenance import note_code_state_at_start, provenance
from globalcom2.records import CellOutcome, CellRecord, CellRef, RecordError, read_outcome
from globalcom2.store import Cell, CellBusy, WorkersAlive, identity_diff, writable_problem
from globalcom2.tracking import check_logger
from globalcom2.worker import (
    OUTCOME_FILE,
    RUN_PID_ENV,
    death_signal_setter,
    die_with_parent,
    evaluate_cell,
)

log = logging.getLogger("globalcom2.run")
_SEEN_THIS_SWEEP: set[Path] = set()  # cells already handled by this process (vanilla: one cell per sweep)
#: Errors that mean "this input is wrong": reported in one line, without a traceback.
INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)
#: Seconds a worker group gets to exit after SIGTERM before it is killed.
WORKER_GRACE_S = 10.0

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
if not OmegaConf.has_resolver("registered_methods"):  # the method sweep, read from the registry
    OmegaConf.register_new_resolver("registered_methods", lambda: ",".join(swept_methods()))


class CellError(CompactHydraException):
    """A cell that was not run, with the reason in one line (Hydra prints it without a traceback)."""


def worker_command(spec: CellSpec, spec_path: Path, out_dir: Path, answers_dir: Path) -> list[str]:
    """The command that runs ``globalcom2.worker`` on ``launcher.num_processes`` processes."""
    n = spec.launcher.num_processes
    tool = spec.launcher.tool
    if tool == "auto":  # `accelerate launch --num_processes N` starts one process on a machine without GPUs
        tool = "accelerate" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "torchrun"
    worker = ["-m", "globalcom2.worker", str(spec_path), str(out_dir), str(answers_dir)]
    if tool not in ("torchrun", "accelerate"):
        raise ValueError(f"launcher.tool must be auto, torchrun or accelerate, got {tool!r}")
    with socket.socket() as probe:  # a free port, so concurrent cells on one node never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if tool == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            f"--master_port={port}",
            *worker,
        ]
    # Every setting that accelerate would otherwise take from the user's default config file
    # (``accelerate/commands/launch.py``, ``_validate_launch_command``): a config of distributed_type NO
    # would run one process, DeepSpeed/FSDP or mixed precision another computation, gpu_ids other GPUs.
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines=1",
        "--gpu_ids=all",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
        f"--num_processes={n}",
        *worker,
    ]


def execute(spec: CellSpec, partial: Path, answers_dir: Path, lock_fd: int | None = None) -> CellOutcome:
    """Run the cell's evaluation into ``partial`` and return the outcome rank 0 wrote. Each finished batch's
    answers are kept in ``answers_dir`` as it finishes, and those an interrupted run kept there are replayed
    (``globalcom2/answer_journal.py``).

    ``lock_fd``: the cell's lock, inherited by the worker group's launcher so that the cell stays locked
    until the group is gone, even if this process dies first.
    """
    if spec.launcher.num_processes == 1:
        outcome = evaluate_cell(spec, partial, answers_dir)
        assert outcome is not None  # a single process is rank 0
        return outcome
    spec_path = partial / "cell_spec.json"
    spec_path.write_text(json.dumps(spec.to_dict(), indent=2))
    command = worker_command(spec, spec_path, partial, answers_dir)
    log.info("launching %s", " ".join(command))
    returncode = run_worker_group(command, () if lock_fd is None else (lock_fd,))
    if returncode != 0:
        raise RuntimeError(f"the worker group exited with {returncode}: the cell is not finished")
    outcome_file = partial / OUTCOME_FILE
    if not outcome_file.exists():
        raise RuntimeError(f"the worker group exited 0 but wrote no {OUTCOME_FILE}: the cell is not finished")
    spec_path.unlink()
    return read_outcome(outcome_file)


def run_worker_group(command: list[str], keep_fds: tuple[int, ...] = ()) -> int:
    """Run the launcher as the leader of its own process group, and never leave it behind.

    * The launcher and every worker get ``SIGTERM`` from the kernel when their parent dies, SIGKILL
      included (``PR_SET_PDEATHSIG``, set here for the launcher and in ``globalcom2.worker`` for the ranks).
    * SIGTERM or SIGINT to this process, or any exception here, ends the launcher's process group:
      SIGTERM, then SIGKILL after :data:`WORKER_GRACE_S`. The ranks are not in that group (torchrun and
      accelerate start each in a session of its own): they get their death signal when the launcher dies.
    * A rank that outlives all this (stuck in a device call) keeps the cell busy until it is gone: each
      rank holds the cell's ``.workers.lock`` (``globalcom2.store.hold_worker_lock``).
    """
    parent = os.getpid()
    set_death_signal = death_signal_setter()  # resolved here: the forked child only calls it
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONUNBUFFERED": "1", RUN_PID_ENV: str(parent)},  # for die_with_launcher
        start_new_session=True,  # its own group: killpg reaches the launcher and its helpers
        preexec_fn=lambda: die_with_parent(parent, set_death_signal),
        pass_fds=keep_fds,
    )
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            _end_group(process)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _end_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=WORKER_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, even if the launcher exited
    process.wait()


def run(cfg: DictConfig) -> CellRecord | None:
    """Run the cell ``cfg`` describes; returns its record (``None`` for a dry run).

    Raises:
        CellError: bad input (before anything loads), or the cell is busy in another process.
    """
    export_paths(cfg)
    try:
        check_logger(cfg.logger)  # a bad tracker setting would otherwise fail after the cell has run
        # everything checkable without the disk: method, ratio, ints...; vanilla at r0.25 asked for alone is
        # a mistake, where in a methods x ratios sweep it is the one r1.0 cell
        spec = CellSpec.from_config(cfg, ratio_without_budget="refuse" if single_run() else "ignore")
        cell = Cell(Path(cfg.paths.results_dir), spec.key, spec.identity(cfg))
    except INPUT_ERRORS as err:
        raise CellError(f"invalid cell: {_message(err)}") from err
    spec = spec.pinned(cell.identity)  # check and load the very commits (weights, hub data) it names
    problem = writable_problem(Path(cfg.paths.results_dir))
    if problem:
        raise CellError(
            f"paths.results_dir: {problem}; set paths.results_dir (or GLOBALCOM2_RESULTS) to a writable folder"
        )
    label = (
        f"{spec.model.name} | {spec.method.label} r={spec.method.retention_ratio} | {spec.benchmark.name}"
        f" | protocol={spec.benchmark.protocol}"
    )
    if cell.dir in _SEEN_THIS_SWEEP:
        print(f"[same]    {label}  (another job of this sweep resolved to this cell)", flush=True)
        with contextlib.suppress(RecordError):  # a rejected record: the first job of the sweep said why
            return cell.read_record()
        return None
    _SEEN_THIS_SWEEP.add(cell.dir)
    if cfg.dry_run:
        print(f"[dry-run] {label}  -> {cell.dir}\n          {why(cell, bool(cfg.force))}", flush=True)
        with contextlib.suppress(CellError):
            _check_environment(spec, label, dry_run=True)
        return None
    finished = None if cfg.force else _finished(cell, label)  # fast path; re-checked under the lock below
    if finished is not None:
        return _reuse(cell, finished, label)
    _check_environment(spec, label)  # tasks, their data, the checkpoint's config, the device: still no weight
    weights = cell.identity.get("weights") or {}
    if "unresolved" in weights:  # a cell is never stored without naming the weights it was computed with
        raise CellError(
            f"{label}: cannot tell which weights model.pretrained={weights['unresolved']!r} names "
            f"({weights['reason']}); pass a local folder, or a hub id that is cached or reachable"
        )
    for task, data in (cell.identity.get("data") or {}).items():  # nor without naming the data it read
        if isinstance(data, dict) and "unresolved" in data:
            raise CellError(
                f"{label}: cannot tell which data task {task!r} would read from {data['unresolved']!r} "
                f"({data['reason']}); download it once online, or use the full benchmark (make data)"
            )
    try:
        with cell.lock() as lock_fd:
            cell.recover()  # a force=true commit killed half-way: its finished cell is put back first
            finished = None if cfg.force else _finished(cell, label)
            if finished is not None:  # finished by another runner while we prepared
                return _reuse(cell, finished, label, note="finished by another process meanwhile")
            print(f"[run]     {label}  ({why(cell, bool(cfg.force))})", flush=True)
            record = _evaluate(cfg, spec, cell, lock_fd)
    except CellBusy as err:
        if _resolved_duplicate(cfg, spec) and not isinstance(
            err, WorkersAlive
        ):  # WorkersAlive: nobody runs it
            # e.g. the four vanilla jobs of a methods x ratios sweep under a parallel launcher (Slurm):
            # they are one cell by construction, and the job that holds the lock runs it
            print(f"[same]    {label}  (another job resolved to this cell is running it: {err})", flush=True)
            return None
        print(f"[busy]    {label}: {err}", flush=True)
        raise CellError(
            f"cell not run: {err}. Run the same command again once it has finished: the finished cell will "
            "then be reused."
        ) from err
    print(f"[ok]      {label}  {summary_line(record)}", flush=True)
    track(cfg, record)
    return record


def export_paths(cfg: DictConfig) -> None:
    """Hand ``paths.data_dir`` and ``paths.tasks_dir`` to everything that reads them (the data identity,
    the pre-flight, lmms-eval's tasks, worker processes) through the environment: the one channel that
    also reaches a worker group."""
    os.environ[DATA_DIR_ENV] = str(cfg.paths.data_dir)
    os.environ[TASKS_DIR_ENV] = str(cfg.paths.tasks_dir)


def _check_environment(spec: CellSpec, label: str, dry_run: bool = False) -> None:
    try:
        spec.check_environment()
    except INPUT_ERRORS as err:
        if dry_run:  # report, do not stop the listing
            print(f"          !! would fail before loading: {_message(err)}", flush=True)
        raise CellError(f"{label}: {_message(err)}") from err


def _message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


def _finished(cell: Cell, label: str) -> CellRecord | None:
    """The cell's finished record, or ``None`` when it is not finished; a ``record.json`` that is not its
    finished record (a newer checkout's schema, a damaged or copied file) stops the run rather than being
    deleted as "not run yet". The record read here is the one reused: a second read could find it moved
    aside by a concurrent ``force=true`` commit."""
    try:
        return cell.read_record()
    except RecordError as err:
        raise CellError(
            f"{label}: {cell.record_path} is not this cell's finished record ({err}). It is left as it is: "
            "move the cell folder away, or re-run with force=true to replace it"
        ) from err


def _reuse(cell: Cell, record: CellRecord, label: str, note: str = "same settings") -> CellRecord:
    cell.mark_current()
    print(f"[done]    {label}  ({note}, cell {cell.id}: {cell.dir})", flush=True)
    return record


def why(cell: Cell, force: bool) -> str:
    """Why the cell would be skipped or run, in words (for ``[run]`` and ``dry_run``)."""
    try:
        finished = cell.is_complete()
    except RecordError as err:
        action = "force=true replaces it" if force else "refused: move it away, or force=true replaces it"
        return f"its record.json is not this cell's finished record ({err}); {action}"
    if finished:
        return "finished with these exact settings: force=true re-runs it" if force else "finished: skipped"
    reasons = ["force=true"] if force else []
    if cell.partial_dir.exists():
        reasons.append("an interrupted run left .partial/, deleted first")
    siblings = cell.siblings()
    if siblings:
        for path, record in siblings:
            changes = identity_diff(record.cell.identity, cell.identity)
            shown = "; ".join(changes[:4]) + (f"; +{len(changes) - 4} more" if len(changes) > 4 else "")
            reasons.append(f"new settings; finished cell {path.name} differs in {shown or 'its identity'}")
    elif not reasons:
        reasons.append("not run yet")
    return "; ".join(reasons)


def _resolved_duplicate(cfg: DictConfig, spec: CellSpec) -> bool:
    """Whether this job asked for another ratio than its cell has (vanilla: every ratio is r1.0)."""
    requested = cfg.method.get("retention_ratio")
    return requested is not None and float(requested) != spec.method.retention_ratio


#: ``config.yaml`` (and ``record.json``'s ``config``) hold the config as this job composed it; what ran is the
#: normalised ``spec`` (vanilla's ratio, the pinned commits), which is not always the same.
CONFIG_HEADER = (
    "# The config as this job composed it (the request). What ran is record.json's `spec` and its\n"
    "# `cell.identity`: e.g. vanilla runs at r1.0 whatever ratio was asked, and a branch is pinned to its commit.\n"
)


def _evaluate(cfg: DictConfig, spec: CellSpec, cell: Cell, lock_fd: int | None = None) -> CellRecord:
    """Run the cell (its lock held) and commit its record. A failed run removes its ``.partial/`` (an
    interrupted one, Ctrl-C or a kill, leaves it for the next run to delete, as the store expects); either
    keeps the answers journal for the next run to resume from, which ``force=true`` deletes."""
    partial = cell.prepare(keep_answers=not cfg.force)
    (partial / "config.yaml").write_text(CONFIG_HEADER + OmegaConf.to_yaml(cfg, resolve=True))
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    try:
        outcome = execute(spec, partial, cell.answers_dir, lock_fd)
    except Exception as err:
        try:
            cell.discard_partial()
        except OSError as cleanup:  # e.g. a stuck rank still writing there: the run's own error comes first
            print(
                f"[warn]    could not remove {cell.partial_dir} ({cleanup}); the next run deletes it",
                flush=True,
            )
        print(f"[failed]  {cell.key.relative_path()}: {type(err).__name__}: {_message(err)}", flush=True)
        raise
    record = CellRecord(
        **vars(outcome),
        cell=CellRef(**vars(spec.key), id=cell.id, identity=cell.identity, path=str(cell.dir)),
        spec=spec.to_dict(),
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        provenance=provenance(outcome.run.get("device") or spec.model.device),  # the device the cell ran on
        started=started.isoformat(),
        finished=datetime.now(timezone.utc).isoformat(),
        wall_s=time.perf_counter() - clock,
    )
    (partial / OUTCOME_FILE).unlink(missing_ok=True)  # everything in it is in record.json now
    cell.commit(record)
    return record


def track(cfg: DictConfig, record: CellRecord) -> None:
    """Log the committed cell to the configured tracker; a failure is reported loudly, the cell stays."""
    if cfg.logger.name != "wandb":
        return
    from globalcom2.tracking import log_cell

    try:
        print(f"[wandb]   {log_cell(record, OmegaConf.to_container(cfg.logger, resolve=True))}", flush=True)
    except Exception:  # the result is already safe on disk; never let the tracker undo that
        log.exception("wandb logging failed for %s (the cell itself is committed)", record.cell.path)
        print(
            "[wandb]   LOGGING FAILED (see the traceback above); the cell's record.json is intact",
            file=sys.stderr,
        )


def summary_line(record: CellRecord) -> str:
    """A one-line digest of a finished record for the console."""
    parts = [
        f"{col}={m['value']:.2f}" for col, m in record.paper_metrics.items() if m.get("value") is not None
    ]
    if not parts:
        parts = [
            f"{task}:{name}={value:.3f}"
            for task, values in record.metrics.items()
            for name, value in list(values.items())[:1]
        ]
    eff = record.efficiency
    prefill = eff["prefill_ms"]["median"] if eff.get("prefill_ms") else float("nan")
    line = f"{' '.join(parts)} | prefill {prefill:.1f} ms | TFLOPs(full) {eff['tflops']['full']:.4f} | {record.wall_s:.0f} s"
    unread = (record.samples or {}).get("unread_answers") or {}
    if unread:
        line += " | unread answers, scored as the protocol's default: " + ", ".join(
            f"{task} {count}" for task, count in unread.items()
        )
    return line


def single_run() -> bool:
    """Whether Hydra runs one cell (no ``-m``); ``False`` outside Hydra (``run`` called from Python)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


def check_launch_mode(cfg: DictConfig) -> None:
    """``launcher=slurm`` submits jobs through Hydra's submitit launcher, which only a multirun uses: without
    ``-m`` the cell would silently run here instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.launcher.name == "slurm" and HydraConfig.get().mode == RunMode.RUN:
        raise CellError(
            "launcher=slurm submits the cells as Slurm jobs, which Hydra does only for a multirun: add -m "
            "(python -m globalcom2.run -m launcher=slurm ...)"
        )


def sweep_jobs(config: DictConfig, config_loader: Any) -> list[list[str]]:
    """The overrides of every job a sweep launches, expanded as Hydra's basic sweeper does: the config's
    ``hydra.sweeper.params``, then the command line, a Cartesian product over the swept keys (glob and range
    sweeps included, resolved by the running app's config loader)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def check_sweep(config: DictConfig) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of the sweep, before any job runs: each job's config composed as its launcher
    will compose it (the running app's config loader: its primary config, search path and overrides), its
    values checked, and every distinct benchmark and model checked once on the disk. One line per distinct
    problem, with the jobs it concerns. Under ``launcher=slurm`` the jobs run on the cluster's nodes, not on
    the (often GPU-less) machine that submits them: its devices and compile backend are not checked here,
    and each job checks them where it runs. The warnings are settings that run but cannot help
    (:func:`unshared_input_cache`), per job, since a sweep value (``launcher.num_processes=1,2``) is not in
    the primary config."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    loader = GlobalHydra.instance().config_loader()
    problems: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    memo: dict[Any, Any] = {}
    for overrides in sweep_jobs(config, loader):
        job = " ".join(overrides) or "(the defaults)"
        try:
            cfg = loader.load_sweep_config(config, list(overrides))
            with open_dict(cfg):
                cfg.pop("hydra", None)  # the task function never sees it either
            check_logger(cfg.logger)
            CellSpec.from_config(cfg).check_environment(memo, runs_here=cfg.launcher.name != "slurm")
        except INPUT_ERRORS as err:
            problems.setdefault(_message(err), []).append(job)
            continue
        if unshared := unshared_input_cache(cfg):
            warnings.setdefault(unshared, []).append(job)
    return _with_jobs(problems), _with_jobs(warnings)


def _with_jobs(messages: dict[str, list[str]]) -> list[str]:
    """One line per message, naming the job it concerns or how many and the first."""
    lines = []
    for message, jobs in messages.items():
        where = jobs[0] if len(jobs) == 1 else f"{len(jobs)} cells, e.g. {jobs[0]}"
        lines.append(f"{message}  [{where}]")
    return lines


class PreRunChecks(Callback):
    """Hydra callbacks (``configs/hydra/default.yaml``) that run before Hydra creates any folder or starts
    any job: the results folder must be writable; every cell of a multirun is checked before the first one
    starts, so a bad value in the fourth cell does not surface after three have run. They end the process
    (``SystemExit``) rather than raise: Hydra turns a callback's exceptions into warnings and goes on."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_unwritable(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_unwritable(config)
        if config.get("dry_run"):
            if config.launcher.name == "slurm":
                raise SystemExit(
                    "dry_run=true with launcher=slurm would submit Slurm jobs; drop launcher=slurm to list the cells"
                )
            return  # a dry run lists every cell and what would fail, cell by cell
        export_paths(config)
        try:
            problems, warnings = check_sweep(config)
        except Exception as err:  # the check itself failed: never start a sweep that was not checked
            raise SystemExit(
                f"the sweep was not started: its cells could not be checked ({type(err).__name__}: {err}); "
                "dry_run=true lists them cell by cell"
            ) from err
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise SystemExit(f"the sweep was not started: some of its cells would be refused:\n{listing}")
        for warning in warnings:
            log.warning(warning)


def unshared_input_cache(config: DictConfig) -> str | None:
    """Why this sweep's ``input_cache_gib`` can serve no cell, if it cannot: the cache lives in one process
    (``globalcom2/lmms/input_cache.py``), and a Slurm job or a data-parallel cell's worker group is a process
    of its own, so each cell would only pay to fill a cache that ends with it."""
    try:
        gib = float(config.get("input_cache_gib", 0) or 0)
    except (TypeError, ValueError):  # refused by the cell checks, with the valid values
        return None
    if gib <= 0:
        return None
    launcher = config.launcher
    if launcher.name == "slurm":
        where = "launcher=slurm runs each cell as a job of its own"
    elif int(launcher.get("num_processes", 1)) > 1:
        where = f"launcher.num_processes={launcher.num_processes} runs each cell in processes of its own"
    else:
        return None
    return (
        f"input_cache_gib={config.input_cache_gib}: {where}, so no cell can read another's encoded inputs and the "
        "cache only costs its filling; set input_cache_gib=0"
    )


def _exit_if_unwritable(config: DictConfig) -> None:
    problem = writable_problem(Path(config.paths.results_dir))
    if problem:
        raise SystemExit(
            f"paths.results_dir: {problem}; set paths.results_dir (or GLOBALCOM2_RESULTS) to a writable folder"
        )


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from globalcom2.redaction import redacted_console

    note_code_state_at_start()  # the code this process imported, whatever the checkout holds when a cell ends
    with redacted_console():
        check_launch_mode(cfg)
        run(cfg)


if __name__ == "__main__":
    main()
