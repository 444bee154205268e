"""``python -m globalcom2.report [results_dir]``: tidy results, tables and plots (``make tables``).

For every experiment under ``results_dir`` (or only ``--experiment``) it writes, next to the cells,
``<results_dir>/<experiment>/{tidy.csv, tidy.parquet, tables/, plots/}``, and the tidy table of everything
to ``<results_dir>/tidy.{csv,parquet}``. Unfinished or corrupt cells are skipped with a warning. Without
``--experiment``, an experiment folder whose cells are all unfinished loses its old report files.
``--wandb`` also logs the tables (``wandb.Table``) and plots (images) to a Weights & Biases run, offline by
default (``make wandb-sync`` uploads).

argparse rather than Hydra: the only inputs are a folder and a few switches, and the report must run
in seconds at the end of ``make demo``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from globalcom2.paths import PROJECT_ROOT
from globalcom2.report.aggregate import tidy_results, write_tidy
from globalcom2.report.build import build_report, remove_orphaned_reports

DEFAULT_RESULTS = PROJECT_ROOT / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m globalcom2.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--experiment", help="only this experiment (default: every one found)")
    parser.add_argument(
        "--wandb", action="store_true", help="log tables and plots to wandb (offline by default)"
    )
    parser.add_argument("--wandb-project", default="globalcom2")
    args = parser.parse_args(argv)

    if not args.results_dir.is_dir():
        state = "is not a folder" if args.results_dir.exists() else "does not exist"
        raise SystemExit(f"results folder {args.results_dir} {state}: nothing to report")
    frame = tidy_results(args.results_dir)
    if frame.empty:
        raise SystemExit(f"no finished cells under {args.results_dir} (the warnings above say why)")
    experiments = [args.experiment] if args.experiment else sorted(set(frame["experiment"]))
    missing = [e for e in experiments if e not in set(frame["experiment"])]
    if missing:
        raise SystemExit(
            f"no finished cells for experiment {missing[0]!r} under {args.results_dir} (the warnings above say "
            f"why); experiments with finished cells: {', '.join(sorted(set(frame['experiment'])))}"
        )
    write_tidy(frame, args.results_dir)
    for experiment in experiments:
        report = build_report(frame, experiment, args.results_dir / experiment)
        print(f"{experiment}: {len(set(frame.loc[frame['experiment'] == experiment, 'cell_dir']))} cells")
        print(f"  tables: {report.directory / 'tables'}  ({', '.join(t.name for t in report.tables)})")
        print(f"  plots:  {report.directory / 'plots'}")
        print(f"  tidy:   {report.directory / 'tidy.csv'}")
        if report.removed:
            print(f"  removed, not written by this build: {', '.join(p.name for p in report.removed)}")
        if args.wandb:
            from globalcom2.tracking import log_report

            print(f"  wandb:  {log_report(report, project=args.wandb_project)}")
    if not args.experiment:
        orphaned = remove_orphaned_reports(args.results_dir, experiments)
        if orphaned:
            print(
                "removed the reports of experiments whose cells are no longer finished: "
                + ", ".join(str(p.relative_to(args.results_dir)) for p in orphaned)
            )


if __name__ == "__main__":
    main()
