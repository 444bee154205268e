"""Write every table and plot of one experiment: the driver behind ``python -m globalcom2.report``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from globalcom2.report import plots, tables
from globalcom2.report.aggregate import COMPARABILITY, setting_text, write_tidy
from globalcom2.store import CURRENT_FILE, PARTIAL_DIR, RECORD_FILE


@dataclass
class Report:
    experiment: str
    directory: Path
    tables: list[tables.Table] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # an earlier build's files this one did not write


def mixed_settings(rows: pd.DataFrame) -> list[str]:
    """One line per model of ``rows`` (one experiment) whose cells differ in a :data:`COMPARABILITY`
    setting, with each value's cell count."""
    problems = []
    for model, group in rows.groupby("model", sort=True):
        cells = group.drop_duplicates("cell_dir")
        for column in COMPARABILITY:
            counts = cells[column].map(setting_text).value_counts().sort_index()
            if len(counts) > 1:
                listing = ", ".join(f"{value} ({count} cells)" for value, count in counts.items())
                problems.append(f"{model}: {column} differs between cells: {listing}")
    return problems


def experiment_tables(frame: pd.DataFrame, experiment: str) -> list[tables.Table]:
    """The tables an experiment's rows support (Table 1 per model, per-benchmark, efficiency, vs paper), each
    with a note per setting in which its experiment's cells differ and on the code versions they ran.

    Raises:
        ValueError: ``experiment`` has no rows in ``frame`` (the valid ones listed).
    """
    rows = _experiment_rows(frame, experiment)
    out = []
    for model in sorted(set(rows["model"])):
        if not rows[(rows["model"] == model) & (rows["kind"] == "paper")].empty:
            out.append(tables.table1(rows, model, vanilla_pool=frame))
        efficiency = rows[(rows["model"] == model) & (rows["kind"] == "efficiency")]
        for benchmark in sorted(set(efficiency["benchmark"])):
            out.append(tables.efficiency_table(rows, experiment, model, benchmark))
    paper_benchmarks = set(rows.loc[rows["kind"] == "paper", "benchmark"])
    for benchmark in sorted(set(rows["benchmark"]) - paper_benchmarks):
        out.append(tables.benchmark_table(rows, experiment, benchmark))
    if paper_benchmarks:
        out.append(tables.paper_vs_ours(rows))
    settings = [f"Cells run differently: {problem}." for problem in mixed_settings(rows)]
    settings += code_versions(rows) + library_versions(rows) + resumed_cells(rows)
    for table in out:
        table.notes += settings
    return out


def code_versions(rows: pd.DataFrame) -> list[str]:
    """A note where the cells ran from several commits or from an edited checkout: a commit that changes
    nothing a cell computes keeps its identity (``globalcom2.cells.IDENTITY_VERSION``), so a table can
    rightly mix commits, and says which."""
    cells = rows.drop_duplicates("cell_dir")
    notes = []
    if "git_sha" in cells:
        shas = cells["git_sha"].map(setting_text).value_counts().sort_index()
        if len(shas) > 1:
            listing = ", ".join(f"{sha[:12]} ({count} cells)" for sha, count in shas.items())
            notes.append(f"Cells ran from {len(shas)} commits: {listing}.")
    if "git_dirty" in cells:
        dirty = sum(1 for value in cells["git_dirty"] if isinstance(value, bool | np.bool_) and value)
        if dirty:
            notes.append(f"{dirty} of {len(cells)} cells ran from a checkout with uncommitted changes.")
    return notes


def library_versions(rows: pd.DataFrame) -> list[str]:
    """A note where the cells ran on several versions of the libraries that compute and score them
    (:data:`~globalcom2.report.aggregate.SOFTWARE_PACKAGES`): a cell's identity leaves versions out, so a
    sweep continued after an upgrade reuses the cells it finished before, while a release can change the
    kernels, the model code or the scoring its later cells ran."""
    if "software" not in rows:
        return []
    cells = rows.drop_duplicates("cell_dir")
    stacks = cells["software"].fillna("versions not recorded").value_counts().sort_index()
    if len(stacks) < 2:
        return []
    listing = "; ".join(f"{stack} ({count} cells)" for stack, count in stacks.items())
    return [f"Cells ran on {len(stacks)} library versions, whose answers and timings may differ: {listing}."]


def resumed_cells(rows: pd.DataFrame) -> list[str]:
    """A note where cells resumed after an interruption: their scores are an uninterrupted run's, but the
    timings of their replayed answers are the interrupted run's (``SampleRecord.replayed``), so their latency
    and memory mix two processes."""
    if "replayed" not in rows:
        return []
    cells = rows.drop_duplicates("cell_dir")
    resumed = cells[cells["replayed"].fillna(0).astype(int) > 0]
    if resumed.empty:
        return []
    listing = ", ".join(
        f"{row.model} {row.method} r{row.retention_ratio} {row.benchmark} ({int(row.replayed)} replayed)"
        for row in resumed.sort_values(["model", "method", "retention_ratio", "benchmark"]).itertuples()
    )
    return [
        f"{len(resumed)} of {len(cells)} cells resumed after an interruption, their latency and memory "
        f"mixing two runs: {listing}."
    ]


def _experiment_rows(frame: pd.DataFrame, experiment: str) -> pd.DataFrame:
    rows = frame[frame["experiment"] == experiment]
    if rows.empty:
        have = ", ".join(sorted(set(frame["experiment"].astype(str)))) or "(none)"
        raise ValueError(f"no finished cells for experiment {experiment!r}; experiments with some: {have}")
    return rows


def build_report(frame: pd.DataFrame, experiment: str, out_dir: str | Path) -> Report:
    """Tidy table, tables and plots of ``experiment`` under ``out_dir`` (``tables/``, ``plots/``)."""
    out_dir = Path(out_dir)
    rows = _experiment_rows(frame, experiment)
    for problem in mixed_settings(rows):
        warnings.warn(
            f"experiment {experiment!r}, {problem}; its tables compare cells run differently (re-run them "
            "with one setting, or read the differences as part of the comparison)",
            stacklevel=2,
        )
    report = Report(experiment, out_dir)
    report.files += write_tidy(rows, out_dir)
    for table in experiment_tables(frame, experiment):
        report.tables.append(table)
        report.files += table.write(out_dir / "tables")
    report.files += experiment_plots(frame, experiment, out_dir / "plots")
    report.removed = _remove_stale(report.files, out_dir / "tables", out_dir / "plots")
    return report


def experiment_plots(frame: pd.DataFrame, experiment: str, out_dir: str | Path) -> list[Path]:
    """The experiment's figures (PNG and PDF of each) in ``out_dir``: score against ratio, quality against
    TFLOPs (its vanilla borrowed from ``frame`` where the experiment has none, as Table 1's), and latency
    and memory against ratio. The one list of figures, for ``make tables`` and the notebook."""
    rows = frame[frame["experiment"] == experiment]
    return [
        *plots.score_vs_ratio(rows, out_dir),
        *plots.pareto(rows, out_dir, vanilla_pool=frame),
        *plots.latency_memory(rows, out_dir),
    ]


#: What the report writes into ``tables/`` and ``plots/``; any such file it did not write this time is an
#: earlier run's (a table of a model, benchmark or method since removed) and is deleted.
GENERATED_SUFFIXES = frozenset({".md", ".tex", ".csv", ".png", ".pdf"})


def remove_orphaned_reports(root: str | Path, reported: Iterable[str]) -> list[Path]:
    """Delete the report files (``tidy.*``, ``tables/``, ``plots/``) of each experiment folder under ``root``
    that holds cells but none finished: a forced re-run that was interrupted, or cells deleted, would
    otherwise leave its old tables beside the new top-level ``tidy.csv``, with numbers no cell backs any
    more. ``reported``: the experiments this build wrote. A folder with no cell at all (a committed report,
    such as ``results/demo`` in a fresh clone) is left alone. Returns the files deleted."""
    root, reported = Path(root), set(reported)
    removed: list[Path] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in reported):
        has_cells = any(
            next(folder.rglob(marker), None) is not None
            for marker in (RECORD_FILE, PARTIAL_DIR, CURRENT_FILE)
        )
        if not has_cells:
            continue
        tidy = [folder / name for name in ("tidy.csv", "tidy.parquet") if (folder / name).is_file()]
        for path in tidy:
            path.unlink()
        removed += tidy + _remove_stale([], folder / "tables", folder / "plots")
    return removed


def _remove_stale(written: list[Path], *folders: Path) -> list[Path]:
    """Delete the report files in ``folders`` that this build did not write; returns them."""
    kept = {Path(p).resolve() for p in written}
    removed = []
    for folder in folders:
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.is_file() and path.suffix in GENERATED_SUFFIXES and path.resolve() not in kept:
                path.unlink()
                removed.append(path)
    return removed
