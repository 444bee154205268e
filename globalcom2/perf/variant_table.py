"""The tables of the benches: each named variant's quartiles and their Markdown
(``globalcom2.perf.globalcom2_selection``, ``globalcom2.perf.divprune_lockstep``), a bench's rows with its
settings and provenance (``globalcom2.perf.compile_cost``, ``globalcom2.lmms.prefetch_threads``), and the
``.md``/``.json`` pair written atomically."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from globalcom2.atomic import atomic_write_json, atomic_write_text
from globalcom2.efficiency.summary import quartiles


def summarise(samples: dict[str, list[float]]) -> list[dict[str, object]]:
    """One row per variant: median and quartiles of its seconds per call, in milliseconds."""
    rows = []
    for name, values in samples.items():
        q25, median, q75 = (1e3 * q for q in quartiles(values))
        rows.append({"variant": name, "median (ms)": median, "p25 (ms)": q25, "p75 (ms)": q75})
    return rows


def markdown_table(caption: str, rows: list[dict[str, object]], digits: int = 3) -> str:
    """``rows`` (:func:`summarise`) under a bold caption, milliseconds to ``digits`` decimals."""
    lines = [f"**{caption}**", "", "| variant | median (ms) | p25-p75 (ms) |", "|---|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['median (ms)']:.{digits}f} | "
            f"{row['p25 (ms)']:.{digits}f}-{row['p75 (ms)']:.{digits}f} |"
        )
    return "\n".join(lines) + "\n"


def write_table(stem: Path, markdown: str, record: dict[str, Any]) -> None:
    """``<stem>.md`` and ``<stem>.json`` (``record``: caption, rows, settings, provenance), each atomically,
    then both printed where they went."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".md"), markdown)
    atomic_write_json(stem.with_suffix(".json"), record)
    print(markdown)
    print(f"written: {stem}.{{md,json}}")


def write_rows_table(
    stem: Path,
    caption: str,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    info: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """``rows`` under a bold ``caption`` as ``<stem>.md``, and as ``<stem>.json`` with ``extra`` fields, the
    bench's arguments (paths as text) and the provenance ``info``, through :func:`write_table`; returns the
    JSON's record."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"caption": caption, "rows": rows, **extra, "settings": settings, "provenance": info}
    markdown = f"**{caption}**\n\n{pd.DataFrame(rows).to_markdown(index=False, floatfmt='.3g')}\n"
    write_table(stem, markdown, record)
    return record
