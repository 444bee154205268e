"""Write every table and plot of one experiment: the driver behind ``python -m globalcom2.report``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from globalcom2.report import plots, tables
from globalcom2.report.aggregate import COMPARABILITY, setting_text, write_tidy


@dataclass
class Report:
    experiment: str
    directory: Path
    tables: list[tables.Table] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


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
    """The tables an experiment's rows support (Table 1 per model, per-benchmark, efficiency, vs paper)."""
    rows = frame[frame["experiment"] == experiment]
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
    return out


def build_report(frame: pd.DataFrame, experiment: str, out_dir: str | Path) -> Report:
    """Tidy table, tables and plots of ``experiment`` under ``out_dir`` (``tables/``, ``plots/``)."""
    out_dir = Path(out_dir)
    rows = frame[frame["experiment"] == experiment]
    if rows.empty:
        raise ValueError(f"no finished cells for experiment {experiment!r}")
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
    report.files += plots.score_vs_ratio(rows, out_dir / "plots")
    report.files += plots.pareto(rows, out_dir / "plots", vanilla_pool=frame)
    report.files += plots.latency_memory(rows, out_dir / "plots")
    return report
