"""Weights & Biases, optional: one run per cell, one run per report. Offline by default (no login).

``logger=wandb`` makes ``python -m globalcom2.run`` log each finished cell: its configuration (model,
method, ratio, benchmark, parameters) as the run config, its metrics, paper columns and efficiency as the
summary, grouped by experiment (the sweep). ``python -m globalcom2.report --wandb`` logs the tables as
``wandb.Table`` and the plots as images. Cell runs land in ``results/wandb``, report runs in
``results/<experiment>/wandb`` (``make wandb-sync`` uploads).
The tracker runs after the cell is committed: a tracker failure is reported, but never loses a result.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from globalcom2.efficiency.summary import EFFICIENCY_METRICS, efficiency_value
from globalcom2.records import CellRecord


def cell_summary(record: CellRecord) -> dict[str, float]:
    """Flat summary metrics of a record: ``<task>/<metric>``, ``paper/<column>``, ``efficiency/<metric>``."""
    summary = {
        f"{task}/{name}": value for task, values in record.metrics.items() for name, value in values.items()
    }
    summary.update(
        {f"paper/{c}": m["value"] for c, m in record.paper_metrics.items() if m["value"] is not None}
    )
    for name, paths in EFFICIENCY_METRICS.items():
        value = efficiency_value(record.efficiency, paths)
        if value is not None:
            summary[f"efficiency/{name}"] = value
    return summary


LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")  # wandb 0.25's Settings.mode


def check_logger(logger: Any) -> None:
    """Refuse a logger config that would fail only after the cell has run: an unknown ``logger``, a wandb
    ``mode`` (or ``WANDB_MODE``) wandb does not know, or ``wandb`` where the package is not installed (a
    machine given only ``make carry-wheels``' wheels, which trace cells that log nowhere). The configuration
    is checked before the environment, so a typo is named the same way on every machine."""
    name = logger.get("name")
    if name not in LOGGERS:
        raise ValueError(f"logger={name!r}; valid: {', '.join(LOGGERS)}")
    if name == "wandb":
        # Both are checked, not only the one that wins: ``make`` exports WANDB_MODE, and a typo in
        # ``logger.mode`` must not pass just because the environment happens to override it today.
        for source, mode in (
            ("logger.mode", logger.get("mode", "offline")),
            ("WANDB_MODE", os.environ.get("WANDB_MODE")),
        ):
            if mode is not None and mode not in WANDB_MODES:
                raise ValueError(f"{source}={mode!r} is not a wandb mode; valid: {', '.join(WANDB_MODES)}")
        if importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "logger=wandb, but the wandb package is not installed in this environment; install it "
                "(pip install wandb) or choose logger=none"
            )
        if wandb_mode(logger) == "online" and not _has_api_key():
            raise ValueError(
                "logger.mode=online, but no wandb API key is set (WANDB_API_KEY or `wandb login`): the first "
                "finished cell would stop at wandb's login prompt; log in, or use logger.mode=offline and "
                "`make wandb-sync` later"
            )


def wandb_mode(logger: Any) -> str:
    """The mode a cell logs in: ``logger.mode`` as configured (its default, in ``configs/logger/wandb.yaml``,
    is ``WANDB_MODE``, else offline), so an explicit ``logger.mode=online`` wins over the ``WANDB_MODE=offline``
    that ``make`` exports."""
    return str(logger.get("mode") or os.environ.get("WANDB_MODE") or "offline")


def _has_api_key() -> bool:
    import wandb

    return bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)


def log_cell(record: CellRecord, logger: dict[str, Any]) -> str:
    """Log one finished cell; returns the run's local directory."""
    import wandb

    cell, spec = record.cell, record.spec
    config = {
        "experiment": cell.experiment,
        "model": cell.model,
        "method": cell.method,
        "method_name": spec["method"]["name"],
        "retention_ratio": cell.retention_ratio,
        "benchmark": cell.benchmark,
        "method_params": spec["method"]["params"],
        "seed": spec["seed"],
        "batch_size": spec["benchmark"]["batch_size"],
        "git_sha": record.provenance["git"]["sha"],
        "git_dirty": record.provenance["git"].get("dirty"),
        "cell_id": cell.id,
        "identity": cell.identity,
        "cell_path": cell.path,
    }
    directory = Path(logger["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=logger.get("project", "globalcom2"),
        entity=logger.get("entity"),
        mode=wandb_mode(logger),
        group=logger.get("group") or cell.experiment,
        job_type="cell",
        name=f"{cell.model}|{cell.method}|r{cell.retention_ratio}|{cell.benchmark}",
        dir=str(directory),
        config=config,
        reinit="finish_previous",
    )
    try:
        run.summary.update(cell_summary(record))
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def log_report(report: Any, project: str = "globalcom2", mode: str | None = None) -> str:
    """Log a :class:`globalcom2.report.build.Report`: tables as ``wandb.Table``, plots as images."""
    import wandb

    directory = report.directory / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        mode=mode or os.environ.get("WANDB_MODE", "offline"),
        group=report.experiment,
        job_type="report",
        name=f"report|{report.experiment}",
        dir=str(directory),
        reinit="finish_previous",
    )
    try:
        payload = {f"tables/{t.name}": wandb.Table(dataframe=t.frame.astype(str)) for t in report.tables}
        payload |= {f"plots/{p.stem}": wandb.Image(str(p)) for p in report.files if p.suffix == ".png"}
        run.log(payload)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
