"""Figures from the tidy results: one style, colour-blind-safe colours (Okabe & Ito), PNG and PDF.

* :func:`score_vs_ratio`: each benchmark's metric against the retention ratio, a line per method, vanilla
  as a dashed reference;
* :func:`pareto`: Avg. % of vanilla (or, without paper columns, each benchmark's accuracy metrics x100,
  one panel each) against TFLOPs;
* :func:`latency_memory`: prefill latency and peak memory against the ratio (peak memory is marked
  unavailable on CPU, never drawn as zero).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from globalcom2.atomic import atomic_write_bytes
from globalcom2.data.benchmarks import PAPER_METRICS
from globalcom2.report.aggregate import AGREEMENT_SAMPLES, ran_on_cpu
from globalcom2.report.tables import (
    AVG,
    COUNT_METRICS,
    ROW_KEYS,
    displayed,
    is_fraction,
    method_order,
    one_cell_per_slot,
    ordered_scores,
    table1,
)

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2", "#F0E442"]
#: The methods' colours: Okabe & Ito without black, which is vanilla's. Seven colours against eight markers,
#: so the first 56 styles are distinct (colour, marker) pairs: the paper's nine compressed methods included.
METHOD_COLOURS = OKABE_ITO[1:]
MARKERS = "os^vDP*X"
VANILLA_STYLE = {"color": OKABE_ITO[0], "marker": "*"}


@contextmanager
def style() -> Iterator[None]:
    with plt.rc_context(
        {
            "figure.dpi": 110,
            "savefig.dpi": 200,
            "font.size": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
        }
    ):
        yield


def method_style(label: str, method_name: str, variant: int = 0) -> dict:
    """Colour and marker of a method, fixed by its place in :func:`method_order` (vanilla: black), shifted
    by ``variant`` for the further labels of one method (an ablation's variants of GlobalCom²), so that no
    two lines of a figure look alike."""
    if method_name == "vanilla":
        return {**VANILLA_STYLE, "label": label}
    order = [m for m in method_order() if m != "vanilla"]
    i = (order.index(method_name) if method_name in order else len(order)) + variant * (len(order) + 1)
    return {
        "color": METHOD_COLOURS[i % len(METHOD_COLOURS)],
        "marker": MARKERS[i % len(MARKERS)],
        "label": label,
    }


def save(figure: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """``<name>.png`` and ``<name>.pdf`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=path.suffix[1:], bbox_inches="tight")
        atomic_write_bytes(path, buffer.getvalue())
    plt.close(figure)
    return paths


#: Line styles of the contexts (models, benchmarks) sharing one panel; a method keeps its colour in each.
CONTEXT_LINES = ("-", ":", "-.", (0, (5, 1)))


def _series(
    frame: pd.DataFrame, by: tuple[str, ...] = ("model",)
) -> list[tuple[str, str, int, int, pd.DataFrame]]:
    """(label, registry name, context index, variant, rows) per method and context, in the paper's method
    order.

    A context is a value of the ``by`` columns that vary in ``frame`` (each model, and for costs each
    benchmark): a method's line never joins two models' or two benchmarks' points, and its label names the
    context when there are several. ``variant`` ranks a label among the labels of its registry name in the
    whole frame (0 for the first; an ablation's variants count up), the same in every context."""
    rank = {m: i for i, m in enumerate(method_order())}
    labels = frame[["method_name", "method"]].drop_duplicates().sort_values(["method_name", "method"])
    variant_of = {
        (name, label): k
        for name, group in labels.groupby("method_name")
        for k, label in enumerate(group["method"])
    }
    varying = [k for k in by if k in frame and frame[k].nunique() > 1]
    contexts = (
        sorted(frame[varying].drop_duplicates().itertuples(index=False, name=None)) if varying else [()]
    )
    groups = []
    for index, context in enumerate(contexts):
        rows = frame
        for key, value in zip(varying, context, strict=True):
            rows = rows[rows[key] == value]
        prefix = ", ".join(map(str, context)) + ": " if context else ""
        for label, series in rows.groupby("method"):
            name = series["method_name"].iloc[0]
            groups.append((prefix + str(label), name, index, variant_of[(name, label)], series))
    return sorted(groups, key=lambda g: (g[2], rank.get(g[1], len(rank)), g[0]))


#: Vanilla's dashed reference line, one shade per context.
VANILLA_SHADES = ("#000000", "#777777", "#BBBBBB")


def plot_against_ratio(ax: plt.Axes, rows: pd.DataFrame, by: tuple[str, ...] = ("model",)) -> None:
    """One line per method (and context, :func:`_series`) of ``value`` against retention ratio; vanilla as a
    dashed horizontal line. Each point from one cell, the one its table shows (:func:`one_cell_per_slot`)."""
    slot = [*ROW_KEYS, *(k for k in (*by, "metric") if k in rows and k not in ROW_KEYS)]
    rows = one_cell_per_slot(rows, list(dict.fromkeys(slot)), warn=False)
    for label, method_name, context, variant, series in _series(rows, by):
        series = series.sort_values("retention_ratio")
        if method_name == "vanilla":
            shade = VANILLA_SHADES[context % len(VANILLA_SHADES)]
            ax.axhline(series["value"].iloc[0], color=shade, linestyle="--", linewidth=1, label=label)
        else:
            ax.plot(
                series["retention_ratio"],
                series["value"],
                linewidth=1.4,
                markersize=4,
                linestyle=CONTEXT_LINES[context % len(CONTEXT_LINES)],
                **method_style(label, method_name, variant),
            )


def panels(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows of one metric) per panel: paper columns when present, else each benchmark's own scores
    (fractions x100, counts left out) and agreement with vanilla."""
    paper = frame[frame["kind"] == "paper"]
    if not paper.empty:
        return [(c, paper[paper["metric"] == c]) for c in PAPER_METRICS if c in set(paper["metric"])]
    out = []
    scores = frame[(frame["kind"] == "score") & ~frame["metric"].isin(COUNT_METRICS)]
    for (benchmark, task, metric), rows in scores.groupby(["benchmark", "task", "metric"]):
        out.append(
            (
                f"{benchmark}: {metric}" if task == benchmark else f"{task}: {metric}",
                rows.assign(value=displayed(metric, rows["value"])),
            )
        )
    fidelity = frame[(frame["kind"] == "fidelity") & (frame["metric"] != AGREEMENT_SAMPLES)]  # a count
    for (benchmark, metric), rows in fidelity.groupby(["benchmark", "metric"]):
        out.append((f"{benchmark}: {metric.replace('_', ' ')} (%)", rows))
    return out


def panel_grid(count: int, width: float, height: float) -> tuple[plt.Figure, np.ndarray]:
    """Up to 4 columns of ``width`` x ``height`` panels for ``count`` plots (at least one); extra panels hidden."""
    cols = min(4, max(count, 1))
    rows = max(-(-count // cols), 1)
    figure, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    return figure, axes


def legend_below(figure: plt.Figure, axes: np.ndarray, bottom: float) -> None:
    """The first panel's legend, once, under the grid (``bottom``: the figure fraction it takes)."""
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if labels:
        figure.legend(
            handles, labels, loc="lower center", ncol=min(6, len(labels)), bbox_to_anchor=(0.5, -0.02)
        )
    figure.tight_layout(rect=(0, bottom if labels else 0, 1, 1))


def score_vs_ratio(frame: pd.DataFrame, out_dir: str | Path, name: str = "score_vs_ratio") -> list[Path]:
    items = panels(frame)
    if not items:
        experiments = (
            ", ".join(sorted(set(frame["experiment"].astype(str)))) if "experiment" in frame else "?"
        )
        raise ValueError(f"no scores to plot for experiment {experiments}: no cell recorded a numeric score")
    with style():
        figure, axes = panel_grid(len(items), 3.2, 2.6)
        for ax, (title, rows) in zip(axes.flat, items, strict=False):
            plot_against_ratio(ax, rows)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("retention ratio R")
        legend_below(figure, axes, bottom=0.05)
        return save(figure, out_dir, name)


def pareto(
    frame: pd.DataFrame, out_dir: str | Path, name: str = "pareto", vanilla_pool: pd.DataFrame | None = None
) -> list[Path]:
    """Quality against compute (TFLOPs per prefill, full convention), a line per method.

    With paper columns: Avg. % of vanilla, one panel. Without (the demo): one panel per score metric of each
    benchmark, x100 (overall ``exact_match``, then each question type's accuracy), because on a trained
    model accuracy is what compression trades for compute; agreement with vanilla, which measures how far
    a method moves the outputs rather than whether they are right, stays in the tables and in
    :func:`score_vs_ratio`.
    """
    if not frame[frame["kind"] == "paper"].empty:
        merged = _paper_quality_vs_tflops(frame, vanilla_pool)
        with style():
            figure, ax = plt.subplots(figsize=(4.6, 3.4))
            _plot_vs_tflops(ax, merged)
            ax.set_ylabel(AVG)
            if merged.empty:
                _say_empty(ax)
            else:
                ax.legend(fontsize=8)
            return save(figure, out_dir, name)
    items = _accuracy_vs_tflops(frame)
    with style():
        figure, axes = panel_grid(len(items), 3.4, 2.8)
        for ax, (title, merged) in zip(axes.flat, items, strict=False):
            _plot_vs_tflops(ax, merged)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("accuracy (%)")
        if not items:
            _say_empty(axes.flat[0])
            axes.flat[0].set_visible(True)
        legend_below(figure, axes, bottom=0.07)
        return save(figure, out_dir, name)


def _plot_vs_tflops(ax: plt.Axes, merged: pd.DataFrame) -> None:
    """One line per method of ``value`` against ``tflops`` (vanilla: its single point). A point whose value
    is a partial average (``partial``: Table 1's Avg over fewer columns than the table's, named in its
    notes) is drawn hollow and the axes say so: it is not comparable with the filled ones."""
    for label, method_name, context, variant, series in _series(merged):
        series = series.sort_values("tflops")
        line = ax.plot(
            series["tflops"],
            series["value"],
            linewidth=1.2,
            markersize=5,
            linestyle=CONTEXT_LINES[context % len(CONTEXT_LINES)],
            **method_style(label, method_name, variant),
        )[0]
        hollow = series[series["partial"].astype(bool)] if "partial" in series else series.iloc[:0]
        if len(hollow):
            line.set_markevery(list(np.flatnonzero(~series["partial"].to_numpy(dtype=bool))))
            ax.plot(
                hollow["tflops"],
                hollow["value"],
                linestyle="none",
                marker=line.get_marker(),
                markersize=5,
                markerfacecolor="none",
                markeredgecolor=line.get_color(),
            )
    if "partial" in merged and merged["partial"].astype(bool).any():
        ax.text(
            0.02,
            0.02,
            "hollow: Avg over fewer benchmarks (Table 1 notes)",
            fontsize=6,
            transform=ax.transAxes,
        )
    ax.set_xlabel("TFLOPs per prefill (full convention)")


def _say_empty(ax: plt.Axes) -> None:
    ax.text(0.5, 0.5, "no quality/compute pairs", ha="center", va="center", transform=ax.transAxes)


def _tflops(frame: pd.DataFrame) -> pd.DataFrame:
    """``tflops_full`` per cell, its value renamed ``tflops``."""
    rows = frame[(frame["kind"] == "efficiency") & (frame["metric"] == "tflops_full")]
    rows = one_cell_per_slot(rows, [*ROW_KEYS, "benchmark"], warn=False)
    columns = [*ROW_KEYS, "benchmark", "value"]
    return rows[columns].rename(columns={"value": "tflops"})


def _paper_quality_vs_tflops(frame: pd.DataFrame, vanilla_pool: pd.DataFrame | None = None) -> pd.DataFrame:
    """Avg. % of vanilla (Table 1, with its vanilla from ``vanilla_pool`` where ``frame`` has none) per
    model, method and ratio, beside the mean TFLOPs of the row's cells."""
    quality = []
    columns = ["model", "method", "retention_ratio", "value", "partial"]
    for model in sorted(set(frame["model"])):
        built = table1(frame, model, vanilla_pool=vanilla_pool)
        table = built.frame.rename(columns={"R": "retention_ratio"})
        table = table[pd.to_numeric(table[AVG], errors="coerce").notna()]
        partial = [
            (m, r) in built.partial_averages
            for m, r in zip(table["method"], table["retention_ratio"], strict=True)
        ]
        quality.append(table.assign(model=model, value=table[AVG].astype(float), partial=partial)[columns])
    quality = pd.concat(quality) if quality else pd.DataFrame(columns=columns)
    # A row's Avg spans its benchmarks' cells, whose images (so TFLOPs) differ: one point at their mean.
    tflops = _tflops(frame).groupby(list(ROW_KEYS), as_index=False)["tflops"].mean()
    return quality.merge(tflops, on=["model", "method", "retention_ratio"])


def _accuracy_vs_tflops(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per (model, benchmark, task, metric) of the accuracy-like (fraction) score metrics:
    value x100 beside TFLOPs.

    The model is named in the title only when the frame holds several (each panel holds one model, so a
    method's line never joins two models' points)."""
    scores = frame[(frame["kind"] == "score") & frame["metric"].map(is_fraction).astype(bool)]
    merged = scores.merge(
        _tflops(frame).drop(columns="method_name"), on=["model", "method", "retention_ratio", "benchmark"]
    )
    several_models = merged["model"].nunique() > 1
    items = []
    for model, benchmark, task in (
        merged[["model", "benchmark", "task"]].drop_duplicates().itertuples(index=False)
    ):
        rows = merged[
            (merged["model"] == model) & (merged["benchmark"] == benchmark) & (merged["task"] == task)
        ]
        for metric in ordered_scores(set(rows["metric"])):
            subject = benchmark if task == benchmark else task
            title = f"{model}, {subject}: {metric}" if several_models else f"{subject}: {metric}"
            metric_rows = rows[rows["metric"] == metric]
            items.append((title, metric_rows.assign(value=displayed(metric, metric_rows["value"]))))
    return items


def latency_memory(frame: pd.DataFrame, out_dir: str | Path, name: str = "latency_memory") -> list[Path]:
    """Prefill latency and peak memory against the ratio; peak memory marked unavailable when absent (CPU)."""
    efficiency = frame[frame["kind"] == "efficiency"]
    with style():
        figure, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, metric, ylabel in (
            (axes[0], "prefill_ms", "prefill latency (ms, median)"),
            (axes[1], "peak_memory_gib", "peak GPU memory allocated (GiB)"),
        ):
            rows = efficiency[efficiency["metric"] == metric]
            plot_against_ratio(ax, rows, by=("model", "benchmark"))
            if rows.empty:
                on_cpu = ran_on_cpu(efficiency["hardware"]).all()
                ax.text(
                    0.5,
                    0.5,
                    "unavailable on CPU\n(torch tracks no CPU allocator peak)"
                    if on_cpu
                    else "not recorded\n(profile=false, or records from before it)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
            else:
                ax.legend(fontsize=7)
            ax.set_xlabel("retention ratio R")
            ax.set_ylabel(ylabel)
        hardware = ", ".join(sorted(set(efficiency["hardware"].dropna())))
        figure.suptitle(f"measured on {hardware}", fontsize=8)
        figure.tight_layout()
        return save(figure, out_dir, name)
