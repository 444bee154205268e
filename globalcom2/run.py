"""``python -m globalcom2.run``: evaluate one cell (model x method x ratio x benchmark); ``-m`` sweeps.

Reads like a recipe: compose -> validate -> skip if finished -> run (here, or as a data-parallel worker
group) -> commit ``record.json``. Examples::

    python -m globalcom2.run method=globalcom2 method.retention_ratio=0.25 benchmark=demo
    python -m globalcom2.run -m experiment=demo                 # the demo grid
    python -m globalcom2.run -m experiment=paper_table1_7b dry_run=true   # list the cells only

Cells land in ``results/<experiment>/<model>/<method>/r<ratio>/<benchmark>/`` (``globalcom2/store.py``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from globalcom2.cells import CellSpec
from globalcom2.provenance import provenance
from globalcom2.store import Cell, CellBusy
from globalcom2.worker import OUTCOME_FILE, evaluate_cell

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECORD_SCHEMA = 1
log = logging.getLogger("globalcom2.run")
_SEEN_THIS_SWEEP: set[Path] = set()  # cells already handled by this process (vanilla: one cell per sweep)

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def worker_command(spec: CellSpec, spec_path: Path, out_dir: Path) -> list[str]:
    """The command that runs ``globalcom2.worker`` on ``launcher.num_processes`` processes."""
    n = spec.launcher.num_processes
    tool = spec.launcher.tool
    if tool == "auto":  # accelerate launch starts a single process on a CPU-only machine (lmms_eval.md §4.3b)
        tool = "accelerate" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "torchrun"
    worker = ["-m", "globalcom2.worker", str(spec_path), str(out_dir)]
    if tool == "torchrun":
        with socket.socket() as probe:  # a free port, so concurrent cells never collide
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            f"--master_port={port}",
            *worker,
        ]
    if tool == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={n}", *worker]
    raise ValueError(f"launcher.tool must be auto, torchrun or accelerate, got {tool!r}")


def execute(spec: CellSpec, partial: Path) -> dict[str, Any]:
    """Run the cell's evaluation into ``partial`` and return the outcome rank 0 wrote."""
    if spec.launcher.num_processes == 1:
        outcome = evaluate_cell(spec, partial)
        assert outcome is not None  # a single process is rank 0
        return outcome
    spec_path = partial / "cell_spec.json"
    spec_path.write_text(json.dumps(spec.to_dict(), indent=2))
    command = worker_command(spec, spec_path, partial)
    log.info("launching %s", " ".join(command))
    done = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the worker group exited with {done.returncode}: the cell is not finished")
    outcome_file = partial / OUTCOME_FILE
    if not outcome_file.exists():
        raise RuntimeError(f"the worker group exited 0 but wrote no {OUTCOME_FILE}: the cell is not finished")
    spec_path.unlink()
    return json.loads(outcome_file.read_text())


def read_outcome(partial: Path) -> None:
    """Drop the worker's hand-off file: everything in it goes into ``record.json``."""
    (partial / OUTCOME_FILE).unlink(missing_ok=True)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the cell ``cfg`` describes; returns its record (``None`` for a dry run)."""
    spec = CellSpec.from_config(cfg)  # everything checkable without loading: method, ratio, launcher...
    cell = Cell(Path(cfg.paths.results_dir), spec.key)
    label = f"{spec.model.name} | {spec.method.label} r={spec.method.retention_ratio} | {spec.benchmark.name}"
    if cell.dir in _SEEN_THIS_SWEEP:
        print(f"[same]    {label}  (another job of this sweep resolved to this cell)", flush=True)
        return cell.read_record()
    _SEEN_THIS_SWEEP.add(cell.dir)
    if cell.is_complete() and not cfg.force:
        print(f"[done]    {label}  ({cell.dir})", flush=True)
        return cell.read_record()
    if cfg.dry_run:
        try:
            spec.preflight()
            problem = ""
        except (FileNotFoundError, ValueError, KeyError) as err:  # report, do not stop the listing
            problem = f"\n          !! would fail before loading: {err}"
        print(f"[dry-run] {label}  -> {cell.dir}{problem}", flush=True)
        return None
    spec.preflight()  # tasks, their offline data, the checkpoint: still nothing loaded
    print(f"[run]     {label}", flush=True)
    try:
        with cell.lock():
            partial = cell.prepare()
            (partial / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            started = datetime.now(timezone.utc)
            clock = time.perf_counter()
            outcome = execute(spec, partial)
            record = {
                "schema": RECORD_SCHEMA,
                "cell": {**vars(spec.key), "path": str(cell.dir)},
                "spec": spec.to_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True),
                "provenance": provenance(),
                "started": started.isoformat(),
                "finished": datetime.now(timezone.utc).isoformat(),
                "wall_s": time.perf_counter() - clock,
                **outcome,
            }
            read_outcome(partial)
            cell.commit(record)
    except CellBusy as err:
        print(f"[busy]    {label}: {err}", flush=True)
        return None
    print(f"[ok]      {label}  {summary_line(record)}", flush=True)
    track(cfg, record)
    return record


def track(cfg: DictConfig, record: dict[str, Any]) -> None:
    """Log the committed cell to the configured tracker; a failure is reported loudly, the cell stays."""
    if cfg.logger.name != "wandb":
        return
    from globalcom2.tracking import log_cell

    try:
        print(f"[wandb]   {log_cell(record, OmegaConf.to_container(cfg.logger, resolve=True))}", flush=True)
    except Exception:  # the result is already safe on disk; never let the tracker undo that
        log.exception("wandb logging failed for %s (the cell itself is committed)", record["cell"]["path"])
        print(
            "[wandb]   LOGGING FAILED (see the traceback above); the cell's record.json is intact",
            file=sys.stderr,
        )


def summary_line(record: dict[str, Any]) -> str:
    """A one-line digest of a finished record for the console."""
    parts = [
        f"{col}={m['value']:.2f}"
        for col, m in record.get("paper_metrics", {}).items()
        if m.get("value") is not None
    ]
    if not parts:
        parts = [
            f"{task}:{name}={value:.3f}"
            for task, values in record["metrics"].items()
            for name, value in list(values.items())[:1]
        ]
    eff = record["efficiency"]
    prefill = eff["prefill_ms"]["median"] if eff.get("prefill_ms") else float("nan")
    return f"{' '.join(parts)} | prefill {prefill:.1f} ms | TFLOPs(full) {eff['tflops']['full']:.4f} | {record['wall_s']:.0f} s"


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
