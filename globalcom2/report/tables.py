"""The paper's tables from the tidy results, written as Markdown, LaTeX (booktabs) and CSV.

* :func:`table1`: GlobalCom² Table 1 layout: vanilla, then method x ratio; the ten paper columns and
  "Avg. (% of vanilla)" (mean over the columns both rows have of ``ours / vanilla * 100``, so MME's 0-2000
  scale and the 0-100 accuracies weigh the same).
* :func:`benchmark_table`: any benchmark by its own metrics (the demo), with agreement with vanilla.
* :func:`efficiency_table`: GlobalCom² Tables 8/9 layout per model and benchmark, with the hardware that
  produced it.
* :func:`paper_vs_ours`: our paper-column numbers beside the published ones (``results/reference``).

Every entry of a table comes from one results cell (:func:`one_cell_per_slot`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from globalcom2.atomic import atomic_write_text
from globalcom2.data.benchmarks import PAPER_METRICS
from globalcom2.efficiency.table import SAME_KIND, efficiency_display, vanilla_row
from globalcom2.methods import METHODS
from globalcom2.paths import PROJECT_ROOT
from globalcom2.report.aggregate import COMPARABILITY, ran_on_cpu, setting_text

#: The paper's Table 1 row order, baselines first and GlobalCom² last, with the later baselines (VisionZip, DART,
#: DivPrune) among the baselines (``fastervlm`` is a published row we do not run).
PAPER_METHOD_ORDER = (
    *("vanilla", "random", "fastv", "sparsevlm", "pdrop"),
    *("visionzip", "dart", "divprune", "fastervlm", "globalcom2"),
)
AVG = "Avg. (% of vanilla)"
AVERAGED = "Avg. over (columns)"  # shown where some row's Avg covers fewer columns than the table's
REFERENCE_DIR = PROJECT_ROOT / "results" / "reference"
MODEL_SIZES = {"llava_next_7b": "7B", "llava_next_13b": "13B"}
REPRODUCED_TOLERANCE = {"MME (perception)": 30.0}  # points; 1.0 for every other (0-100) benchmark


def method_order() -> list[str]:
    """The paper's row order, then every other registered method by name: a newly registered method is
    tabled and plotted without an edit here."""
    return [*PAPER_METHOD_ORDER, *(m for m in METHODS.names() if m not in PAPER_METHOD_ORDER)]


@dataclass
class Table:
    """A rendered table: its frame (display order), a caption and footnotes."""

    name: str
    frame: pd.DataFrame
    caption: str
    notes: list[str] = field(default_factory=list)
    # (method, R) of the rows whose Avg covers fewer columns than the table's (Table 1; a note names them)
    partial_averages: frozenset[tuple[str, float]] = frozenset()
    # column -> format spec of its numbers in Markdown and LaTeX (Table 1's scores to one decimal, as the
    # paper prints them); any other column: :func:`number_text`
    formats: dict[str, str] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> list[Path]:
        """``<name>.md``, ``<name>.tex`` (booktabs) and ``<name>.csv`` in ``out_dir``, each written atomically
        (a killed ``make tables`` leaves the previous file or the new one, never half of one)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, tex, csv = (out_dir / f"{self.name}.{ext}" for ext in ("md", "tex", "csv"))
        notes = "".join(f"\n{i + 1}. {note}" for i, note in enumerate(self.notes))
        atomic_write_text(md, f"**{self.caption}**\n\n{self.markdown()}\n{notes}\n")
        atomic_write_text(tex, self.latex())
        atomic_write_text(csv, self.frame.to_csv(index=False))
        return [md, tex, csv]

    def text(self, missing: str = "–") -> pd.DataFrame:
        """The frame as it reads: numbers by :attr:`formats` or :func:`number_text`, also in a column that
        mixes them with text (an Avg that is "n/a (...)" for one row), a missing value as ``missing``."""
        return pd.DataFrame(
            {
                column: [cell_text(v, self.formats.get(str(column)), missing) for v in self.frame[column]]
                for column in self.frame.columns
            },
            index=self.frame.index,
        )

    def markdown(self) -> str:
        """The frame as a Markdown table (:meth:`text`; a missing value as a dash, never "nan")."""
        if not len(self.frame):
            return "(no rows)"
        return self.text().to_markdown(index=False, disable_numparse=True)

    def latex(self) -> str:
        if len(self.frame):
            shown = self.text(missing="--").map(_tex_escape)
            shown.columns = [_tex_escape(str(c)) for c in shown.columns]
        else:
            shown = pd.DataFrame({"": ["(no rows)"]})
        body = shown.to_latex(index=False, escape=False)  # booktabs rules; every cell escaped above
        notes = "".join(f"\\item {_tex_escape(n)}\n" for n in self.notes)
        notes = f"\\begin{{itemize}}\n{notes}\\end{{itemize}}\n" if notes else ""
        return (
            f"\\begin{{table}}[t]\n\\centering\n\\caption{{{_tex_escape(self.caption)}}}\n\\small\n{body}{notes}"
            "\\end{table}\n"
        )


def number_text(value: float) -> str:
    """A number as a table shows it by default: 4 significant digits, never in scientific notation (a CPU
    prefill of 123,456 ms reads ``123456``, not ``1.235e+05``)."""
    return f"{value:.0f}" if abs(value) >= 1e4 else format(value, ".4g")


def cell_text(value: Any, spec: str | None = None, missing: str = "–") -> str:
    """How a table cell reads: a float by ``spec`` (default :func:`number_text`), a missing value as
    ``missing``, anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return format(value, spec) if spec else number_text(value)
    return str(value)


#: Characters LaTeX treats specially in text, and how they are typeset (one pass: a replacement is never
#: escaped again).
TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def _tex_escape(text: str) -> str:
    return text.translate(str.maketrans(TEX_SPECIAL))


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    """Vanilla first, then ratio descending, then the paper's method order."""
    rank = {m: i for i, m in enumerate(method_order())}
    keys = frame.assign(
        _vanilla=frame["method_name"] != "vanilla",
        _ratio=-frame["retention_ratio"],
        _method=frame["method_name"].map(lambda m: rank.get(m, len(rank))),
    )
    return keys.sort_values(["_vanilla", "_ratio", "_method", "method"]).drop(
        columns=["_vanilla", "_ratio", "_method"]
    )


#: What makes a table row: one method at one ratio of one model.
ROW_KEYS = ("model", "method", "method_name", "retention_ratio")


def _wide(
    frame: pd.DataFrame, kind: str, metrics: list[str] | None = None, keys: tuple[str, ...] = ROW_KEYS
) -> pd.DataFrame:
    """One row per ``keys``, one column per metric of ``kind``; each cell of the table from one cell of the
    results (:func:`one_cell_per_slot`). A key that is missing from a cell (an old record) reads ``n/a``."""
    rows = frame[frame["kind"] == kind]
    if metrics is not None:
        rows = rows[rows["metric"].isin(metrics)]
    if rows.empty:
        return pd.DataFrame(columns=list(keys))
    extra = [k for k in keys if k not in ROW_KEYS]
    rows = one_cell_per_slot(rows.assign(**{k: rows[k].fillna("n/a") for k in extra}), [*keys, "metric"])
    wide = rows.pivot_table(index=list(keys), columns="metric", values="value", aggfunc="first")
    return wide.reset_index()


def one_cell_per_slot(rows: pd.DataFrame, slot: list[str], warn: bool = True) -> pd.DataFrame:
    """``rows`` with each table slot (``slot``: the row's keys and the metric) filled from one results cell.

    Two cells can give the same slot: a ``benchmark=mme`` cell beside ``paper_suite`` (both give MME), or one
    model's efficiency on two benchmarks. A table must not pick one of them silently, and no rule can tell
    which the user meant, so the slot shows the latest finished cell and a warning names every cell in it.
    (The efficiency tables are built per benchmark, so there only a real duplicate warns.) The plots apply the
    same rule without a second warning (``warn=False``), so a figure never disagrees with its table."""
    if "cell_dir" not in rows or rows.empty:
        return rows
    cells = rows.groupby(slot, dropna=False, sort=True)["cell_dir"].nunique()
    clashes = cells[cells > 1]
    if clashes.empty:
        return rows
    ordered = rows.sort_values("finished", kind="stable", na_position="first")
    latest = ordered.groupby(slot, dropna=False, sort=False)["cell_dir"].transform("last")
    shown = ordered[ordered["cell_dir"] == latest]
    if not warn:
        return shown.sort_index()
    listing = []
    for key in clashes.index[:10]:
        match = (rows[slot] == pd.Series(key, index=slot)).all(axis=1)
        dirs = sorted(set(rows.loc[match, "cell_dir"]))
        chosen = shown.loc[(shown[slot] == pd.Series(key, index=slot)).all(axis=1), "cell_dir"].iloc[0]
        listing.append(f"  {dict(zip(slot, key, strict=True))}: {', '.join(dirs)}; shown: {chosen}")
    more = f"\n  ... and {len(clashes) - 10} more" if len(clashes) > 10 else ""
    warnings.warn(
        f"{len(clashes)} table entries come from more than one cell; each shows its latest finished cell "
        f"(run the duplicates in another experiment to compare them):\n" + "\n".join(listing) + more,
        stacklevel=3,
    )
    return shown.sort_index()


def shared_columns(row: pd.Series, vanilla: pd.Series, columns: list[str]) -> list[str]:
    """The columns of ``columns`` that both ``row`` and ``vanilla`` have (a non-zero vanilla value)."""
    return [
        c
        for c in columns
        if c in row and c in vanilla and pd.notna(row[c]) and pd.notna(vanilla[c]) and vanilla[c] != 0
    ]


def relative_average(row: pd.Series, vanilla: pd.Series | None, columns: list[str]) -> float | str:
    """Mean of ``row / vanilla * 100`` over the columns both have; n/a (with why) without a vanilla row."""
    if vanilla is None:
        return "n/a (no vanilla row)"
    ratios = [100.0 * row[c] / vanilla[c] for c in shared_columns(row, vanilla, columns)]
    return sum(ratios) / len(ratios) if ratios else "n/a (no column in common with vanilla)"


def _partial_averages(
    wide: pd.DataFrame, vanilla: pd.Series | None, columns: list[str]
) -> tuple[list[str], frozenset[tuple[str, float]]]:
    """Notes for the rows whose Avg covers fewer than the table's columns, and those rows' (method, R): an
    average over MME alone is not comparable with one over ten benchmarks, nor one without the column vanilla
    lacks with the table's."""
    if vanilla is None or wide.empty:
        return [], frozenset()
    notes, partial = [], set()
    without_vanilla = [c for c in columns if not shared_columns(vanilla, vanilla, [c])]
    if without_vanilla:
        notes.append(
            f"{AVG}: the vanilla row has no {', '.join(without_vanilla)}, so no row's average covers it."
        )
    for _, row in wide.iterrows():
        shared = shared_columns(row, vanilla, columns)
        missing = [c for c in columns if c not in shared and c not in without_vanilla]
        if missing:
            partial.add((row["method"], row["retention_ratio"]))
            notes.append(
                f"{AVG} of {row['method']} at R = {row['retention_ratio']}: over {len(shared)} of the "
                f"{len(columns)} columns, without {', '.join(missing)}."
            )
    return notes, frozenset(partial)


def _pending_columns(rows: pd.DataFrame, wide: pd.DataFrame) -> list[str]:
    """A note per paper column some cells of ``rows`` fill only after a separate step not yet done (MM-Vet's
    judge), naming the cells' methods and why; a slot that shows a value (from another cell of the slot) is
    not pending."""
    pending = rows[rows["kind"] == "pending"]
    shown = {
        (m, r, c)
        for c in set(pending["metric"]) & set(wide.columns)
        for m, r, v in wide[["method", "retention_ratio", c]].itertuples(index=False)
        if pd.notna(v)
    }
    slots = pending[["method", "retention_ratio", "metric"]].itertuples(index=False)
    pending = pending[
        pd.Series([tuple(slot) not in shown for slot in slots], index=pending.index, dtype=bool)
    ]
    notes = []
    for column, group in pending.groupby("metric", sort=False):
        cells = ", ".join(
            f"{m} R = {r} ({why})"
            for m, r, why in group[["method", "retention_ratio", "task"]].itertuples(index=False)
        )
        notes.append(
            f"{column}: pending for {len(group)} cell(s), {cells}; judge the samples with `python -m "
            "globalcom2.lmms.mmvet_judge --samples <cell>/…/*_samples_mmvet_local.jsonl`, then build the tables again."
        )
    return notes


def _check_choice(frame: pd.DataFrame, column: str, value: str, where: str = "the results") -> None:
    """``ValueError`` naming ``value`` and the valid ones where ``frame``'s ``column`` never holds it: a typo
    (``llava_next_7B``) would otherwise give an empty table, or one whose note advises running vanilla."""
    have = sorted(set(frame[column].dropna().astype(str))) if column in frame else []
    if value not in have:
        raise ValueError(f"no {column} {value!r} in {where}; valid: {', '.join(have) or '(none)'}")


def table1(
    frame: pd.DataFrame, model: str, experiment: str | None = None, vanilla_pool: pd.DataFrame | None = None
) -> Table:
    """GlobalCom² Table 1 layout for one model (optionally one experiment).

    Args:
        frame: the tidy results.
        model: the model folder name (``llava_next_7b``).
        experiment: restrict rows to one experiment.
        vanilla_pool: where to look for the vanilla row if the rows have none (ablations reuse Table 1's).

    Raises:
        ValueError: ``experiment`` or ``model`` names none of ``frame``'s, listing those it has.
    """
    if experiment:
        _check_choice(frame, "experiment", experiment)
    _check_choice(
        frame[frame["experiment"] == experiment] if experiment else frame,
        "model",
        model,
        f"experiment {experiment!r}" if experiment else "the results",
    )
    rows = frame[(frame["model"] == model) & ((frame["experiment"] == experiment) if experiment else True)]
    columns = [c for c in PAPER_METRICS if c in set(rows.loc[rows["kind"] == "paper", "metric"])]
    wide = _wide(rows, "paper", columns)
    vanilla = _find_vanilla(wide)
    notes = ["MME is the perception score only (0-2000); the other columns are 0-100."]
    if vanilla is None and vanilla_pool is not None:
        vanilla, note = _borrowed_vanilla(rows, vanilla_pool, model, columns)
        notes += [note] if note else []
    wide = _order(wide) if len(wide) else wide
    wide[AVG] = [relative_average(r, vanilla, columns) for _, r in wide.iterrows()]
    partial_notes, partial = _partial_averages(wide, vanilla, columns)
    notes += partial_notes
    notes += _pending_columns(rows, wide)
    display = wide[["method", "retention_ratio", *columns, AVG]].rename(columns={"retention_ratio": "R"})
    if partial:  # in every output, not only in a note: an average over GQA alone beside one over ten columns
        averaged = [c for c in columns if shared_columns(vanilla, vanilla, [c])]
        display[AVERAGED] = [
            f"{len(shared_columns(row, vanilla, averaged))} of {len(averaged)}" for _, row in wide.iterrows()
        ]
    notes += [f"{c}: {PAPER_METRICS[c].note}" for c in columns if not PAPER_METRICS[c].comparable]
    protocols = (
        sorted(set(rows.loc[rows["kind"] == "paper", "protocol"].dropna())) if "protocol" in rows else []
    )
    if protocols and protocols != ["llava"]:
        notes.append(
            f"Protocol {'/'.join(protocols)}: cells run with lmms-eval's task prompts and decoding differ from the "
            "paper's LLaVA protocol by up to several points on TextVQA, POPE and MM-Vet (README, protocols); "
            "compare such a table with itself, not with the paper."
        )
    if vanilla is None:
        notes.append(
            f"{AVG}: n/a because no vanilla row exists for {model}; run method=vanilla on the same benchmarks."
        )
    caption = f"Table 1 layout, {model}" + (f" ({experiment})" if experiment else "")
    name = f"table1_{model}" + (f"_{experiment}" if experiment else "")
    formats = {c: ".1f" for c in (*columns, AVG)}  # the paper prints one decimal
    return Table(name, display, caption, notes, partial_averages=partial, formats=formats)


def _borrowed_vanilla(
    rows: pd.DataFrame, pool: pd.DataFrame, model: str, columns: list[str]
) -> tuple[pd.Series | None, str | None]:
    """The vanilla row of ``model`` from one other experiment of ``pool``, with a note that says which.

    An ablation experiment reuses Table 1's vanilla rather than re-running it. The row comes whole from one
    experiment, never column by column from several: the one whose cells differ from the table's own in the
    fewest settings (:data:`COMPARABILITY`), then whose vanilla has the most of ``columns``, then the first by
    name. The note names it and every setting in which it differs, which is also warned: a vanilla run on
    ``benchmark.limit=20`` would make every "% of vanilla" a comparison with 20 samples."""
    candidates = pool[
        (pool["model"] == model) & (pool["method_name"] == "vanilla") & (pool["kind"] == "paper")
    ]
    own = rows.drop_duplicates("cell_dir")
    best: tuple[tuple[int, int], str, pd.Series, list[str]] | None = None
    for experiment, group in candidates.groupby("experiment", sort=True):
        found = _find_vanilla(_wide(group, "paper", columns))
        if found is None:
            continue
        differences = _setting_differences(own, group.drop_duplicates("cell_dir"))
        covered = int(found[[c for c in columns if c in found]].notna().sum())
        rank = (len(differences), -covered)  # the same settings first, then the most columns
        if best is None or rank < best[0]:
            best = (rank, str(experiment), found, differences)
    if best is None:
        return None, None
    _, experiment, vanilla, differences = best
    note = f"{AVG}: against the vanilla row of experiment {experiment!r}, as this one has none"
    if differences:
        note += "; it was run with other settings: " + ", ".join(differences)
        warnings.warn(f"Table 1 of {model}: {note}", stacklevel=3)
    return vanilla, note + "."


def _setting_differences(own: pd.DataFrame, other: pd.DataFrame) -> list[str]:
    """``"<setting> <other's values> (this table: <own values>)"`` for each :data:`COMPARABILITY` setting in
    which two sets of cells (one row per cell) differ."""
    differences = []
    for column in (c for c in COMPARABILITY if c in own and c in other):
        ours, theirs = (sorted(set(cells[column].map(setting_text))) for cells in (own, other))
        if ours != theirs:
            differences.append(f"{column} {'/'.join(theirs)} (this table: {'/'.join(ours)})")
    return differences


def _find_vanilla(wide: pd.DataFrame) -> pd.Series | None:
    return vanilla_row(wide) if len(wide) else None


PER_TYPE_SUFFIX = "_accuracy"  # the demo's per-question-type metrics: color_accuracy, count_accuracy, ...

#: lmms-eval metrics that are fractions in [0, 1] besides ``exact_match`` and ``*accuracy`` (POPE's,
#: ``lmms_eval/tasks/pope/utils.py``); shown x100. Every other metric is shown as lmms-eval reports it: MME's
#: points (0-2000), ``gpt_eval_score`` (MMBench's already in %), and counts.
FRACTION_METRICS = frozenset(
    {"pope_f1_score", "pope_precision", "pope_recall", "pope_yes_ratio", "pope_answer_yes_ratio"}
    | {"llava_exact_match"}  # GQA as LLaVA scores it (globalcom2.lmms.task_utils)
)
#: Counts that lmms-eval reports as metrics (answers written, answers awaiting the judge): no score to plot.
COUNT_METRICS = frozenset({"submission", "judge_pending"})


def is_fraction(metric: str) -> bool:
    """Whether ``metric`` (or a qualified ``<task>: <metric>``) is a fraction in [0, 1], shown x100."""
    name = metric.rsplit(": ", 1)[-1]
    return name == "exact_match" or name.endswith("accuracy") or name in FRACTION_METRICS


def displayed(metric: str, values: pd.Series) -> pd.Series:
    """``values`` of ``metric`` as the report shows them: x100 for a fraction, unchanged otherwise."""
    return 100.0 * values if is_fraction(metric) else values


def ordered_scores(metrics: Iterable[str]) -> list[str]:
    """Overall metrics first, then per-question-type ones (``*_accuracy``), each group sorted.

    The demo reports ``exact_match`` over every sample and ``<type>_accuracy`` over one question type's;
    alphabetical order would put the overall score between the per-type ones.
    """
    return sorted(metrics, key=lambda m: (m.endswith(PER_TYPE_SUFFIX), m))


def benchmark_table(frame: pd.DataFrame, experiment: str, benchmark: str) -> Table:
    """One benchmark by its own metrics (fractions x100; overall before per-type), agreement with vanilla,
    and costs.

    A benchmark of several lmms-eval tasks names each score ``<task>: <metric>``: two tasks' ``exact_match``
    are two columns, never one.

    Raises:
        ValueError: ``experiment`` or ``benchmark`` names none of ``frame``'s, listing those it has.
    """
    _check_choice(frame, "experiment", experiment)
    in_experiment = frame[frame["experiment"] == experiment]
    _check_choice(in_experiment, "benchmark", benchmark, f"experiment {experiment!r}")
    rows = in_experiment[in_experiment["benchmark"] == benchmark]
    score_rows = rows[rows["kind"] == "score"]
    if score_rows["task"].nunique() > 1:
        qualified = score_rows["task"].astype(str) + ": " + score_rows["metric"].astype(str)
        rows = rows.assign(metric=rows["metric"].where(rows["kind"] != "score", qualified))
    scores = _wide(rows, "score")
    metrics = ordered_scores(c for c in scores.columns if c not in ROW_KEYS)
    for metric in metrics:
        scores[metric] = displayed(metric, scores[metric])
    extra = _wide(rows, "fidelity").merge(
        _wide(
            rows,
            "efficiency",
            ["visual_tokens_llm_input", "equivalent_visual_tokens", "tflops_full", "prefill_ms"],
        ),
        on=list(ROW_KEYS),
        how="outer",
    )
    wide = _order(scores.merge(extra, on=list(ROW_KEYS), how="left"))
    rename = {
        "retention_ratio": "R",
        "agreement_with_vanilla": "agreement with vanilla (%)",
        "first_token_agreement": "first-token agreement (%)",
        "agreement_samples": "samples compared",
        "visual_tokens_llm_input": "visual tokens at LLM input",
        "equivalent_visual_tokens": "equivalent visual tokens",
        "tflops_full": "TFLOPs (full)",
        "prefill_ms": "prefill ms",
    }
    columns = [
        "model",
        "method",
        "retention_ratio",
        *metrics,
        *[c for c in rename if c in wide and c != "retention_ratio"],
    ]
    display = wide[columns].rename(columns=rename)
    notes = [
        "Scores are lmms-eval's metrics; fractions (exact_match, accuracies, POPE's F1, precision, recall and "
        "yes-ratio) x 100, others (MME's points, gpt_eval_score, counts) as lmms-eval reports them.",
        "agreement with vanilla: % of samples whose generated token ids equal the vanilla cell's (first-token: "
        "the first generated token only); it measures how far a method moves the model's outputs, not accuracy.",
        "equivalent visual tokens: visual tokens entering each decoder layer, averaged over layers.",
    ]
    per_type = [m for m in metrics if m.endswith(PER_TYPE_SUFFIX)]
    if per_type:
        notes.append(
            f"{', '.join(per_type)}: exact match over the samples of that question type only "
            "(exact_match: over all samples)."
        )
    if set(display.get("model", [])) == {"tiny"}:
        notes.append(
            "The tiny model has random weights: its accuracy is ~0 by construction; compare agreement and costs."
        )
    return Table(f"{experiment}_{benchmark}", display, f"{benchmark} ({experiment})", notes)


def efficiency_table(frame: pd.DataFrame, experiment: str, model: str, benchmark: str) -> Table:
    """GlobalCom² Tables 8/9 layout, stage-resolved: cost per method and ratio on one benchmark (its images and
    prompts set every cost), ratios to the vanilla row of the same compile mode, attention implementation,
    hardware and dtype (:func:`globalcom2.efficiency.table.efficiency_display`, shared with
    ``make bench-efficiency``).

    Raises:
        ValueError: ``experiment``, ``model`` or ``benchmark`` names none of ``frame``'s, listing those it has.
    """
    _check_choice(frame, "experiment", experiment)
    in_experiment = frame[frame["experiment"] == experiment]
    for column, value in (("model", model), ("benchmark", benchmark)):
        _check_choice(in_experiment, column, value, f"experiment {experiment!r}")
    rows = in_experiment[(in_experiment["model"] == model) & (in_experiment["benchmark"] == benchmark)]
    name, caption = (
        f"efficiency_{model}_{benchmark}",
        f"Efficiency (Tables 8/9 layout), {model} on {benchmark}",
    )
    wide = _wide(rows, "efficiency", keys=(*ROW_KEYS, *SAME_KIND))
    if wide.empty:
        return Table(name, wide, f"{caption} ({experiment})", ["No efficiency records."])
    wide = _order(wide)
    display = efficiency_display(wide)
    for position, setting in enumerate(("hardware", "dtype"), start=2):  # after method and R, where they vary
        if wide[setting].nunique(dropna=False) > 1:
            display.insert(position, setting, wide[setting])
    hardware = ", ".join(sorted(set(rows["hardware"].dropna())))
    batch_sizes = sorted(set(rows["batch_size"].dropna().astype(int))) if "batch_size" in rows else []
    notes = [
        f"Measured on {hardware}; batch size {', '.join(map(str, batch_sizes)) or 'n/a'}; medians over the "
        "benchmark's generate calls, warm-up and each process's first measured call excluded.",
        "Stage times (vision, compression, LLM prefill, decode) are exclusive and add up with generate's own "
        "host work to the total; prefill is everything up to the first token's logits. LLM forward is the "
        "LLM prefill with an in-LLM method's work inside it (its compression): what the paper's Tables 8/9 "
        "time, and what the LLM prefill speed-up divides.",
        "TFLOPs (paper): visual tokens only at each method's nominal schedule for 2880 tokens (GlobalCom² Tables "
        "8/9). TFLOPs (full): every token entering each decoder layer, plus method overhead, mean per sample.",
    ]
    if "peak_memory_gib" not in wide or wide["peak_memory_gib"].isna().all():
        on_cpu = ran_on_cpu(wide["hardware"])
        if on_cpu.all():
            display["peak allocated (GiB)"] = "n/a (CPU)"
            notes.append("Peak memory: unavailable on CPU (torch tracks no CPU allocator peak); not zero.")
        else:  # a GPU record without it is an old or unprofiled one, not a CPU
            display["peak allocated (GiB)"] = ["n/a (CPU)" if cpu else "n/a (not recorded)" for cpu in on_cpu]
            notes.append(
                "Peak memory: n/a (CPU) where torch tracks no allocator peak; n/a (not recorded) where a GPU "
                "cell's record holds none (profile=false, or a record from before it was measured)."
            )
    if ran_on_cpu(rows["hardware"].dropna()).all():
        notes.append(
            "CPU timings of cells run one after another drift with the machine's load; for speed-ups on CPU use "
            "`make bench-efficiency`, which interleaves the methods."
        )
    if _find_vanilla(wide) is None:
        notes.append("Speed-ups and FLOPs ratios: n/a, no vanilla row.")
    elif "prefill speed-up (x)" in display and display["prefill speed-up (x)"].isna().any():
        orphans = display.loc[display["prefill speed-up (x)"].isna(), ["method", "R"]]
        listing = ", ".join(f"{m} at R = {r}" for m, r in orphans.itertuples(index=False))
        notes.append(
            f"No speed-ups for {listing}: no vanilla row of the same compile mode, attention implementation, "
            "hardware and dtype (run vanilla with those settings)."
        )
    if set(rows["random_init"]) == {True}:
        notes.append("Random-initialised weights: costs are real, scores are not.")
    return Table(name, display, f"{caption} ({experiment})", notes)


def load_reference(directory: str | Path = REFERENCE_DIR) -> pd.DataFrame:
    """Published accuracy rows (``results/reference/accuracy.csv``)."""
    return pd.read_csv(Path(directory) / "accuracy.csv")


def paper_vs_ours(frame: pd.DataFrame, reference: pd.DataFrame | None = None) -> Table:
    """Our paper-column values beside the published ones; reproduced within 1 point (MME: 30)."""
    reference = load_reference() if reference is None else reference
    ours = frame[(frame["kind"] == "paper") & (frame["method"] == frame["method_name"])].copy()
    ours["size"] = ours["model"].map(MODEL_SIZES)
    ours = ours.dropna(subset=["size"])
    # A published number is over the whole benchmark, with trained weights, under the paper's LLaVA protocol:
    # a limited, random-init or lmms-eval-protocol cell has no counterpart, and a verdict on it would read as
    # one on the method.
    partial = ours["limit"].notna() | ours["random_init"].astype(bool) | (ours["protocol"] != "llava")
    left_out = ours.loc[partial, "cell_dir"].nunique()
    ours = one_cell_per_slot(ours[~partial], [*ROW_KEYS, "metric"], warn=False)  # Table 1 names duplicates
    rank = {"primary": 0, "secondary": 1}
    ref = reference.assign(_rank=reference["reliability"].map(rank)).sort_values("_rank", kind="stable")
    # the most reliable source; among equally reliable ones the first listed (a stable sort: the file's order)
    ref = ref.drop_duplicates(["model", "method", "retention_ratio", "column"])
    merged = ours.merge(
        ref,
        left_on=["size", "method_name", "retention_ratio", "metric"],
        right_on=["model", "method", "retention_ratio", "column"],
        suffixes=("", "_ref"),
    )
    display = pd.DataFrame(
        {
            "model": merged["model"],
            "method": merged["method_name"],
            "R": merged["retention_ratio"],
            "benchmark": merged["metric"],
            "ours": merged["value"],
            "paper": merged["value_ref"],
        }
    )
    # rounded: 64.9 - 63.9 is 1.0000000000000071 in floats, and a 1-point delta is within the tolerance
    display["delta"] = (display["ours"] - display["paper"]).round(6)
    tolerance = display["benchmark"].map(lambda c: REPRODUCED_TOLERANCE.get(c, 1.0)).astype(float)
    display["reproduced"] = (display["delta"].abs() <= tolerance).map({True: "yes", False: "no"})
    display.loc[display["delta"].isna(), "reproduced"] = "n/a (no value)"  # a missing number is no verdict
    # A column computed on another split or with another prompt or judge (PAPER_METRICS) gets no verdict.
    comparable = display["benchmark"].map(
        lambda c: PAPER_METRICS[c].comparable if c in PAPER_METRICS else True
    )
    differs = ~comparable.astype(bool)
    display.loc[differs, "reproduced"] = "n/a (not comparable)"
    display["source"] = merged["source"]
    display["reliability"] = merged["reliability"]
    notes = ["Reproduced: |ours - paper| <= 1 point (MME perception: 30), as agreed for this project."]
    for column in sorted(set(display.loc[differs, "benchmark"])):
        notes.append(f"{column}, no verdict: {PAPER_METRICS[column].note}.")
    if left_out:
        notes.append(
            f"{left_out} cell(s) left out: run on a sample limit, with random-initialised weights or under "
            "protocol=lmms_eval, which no published number is comparable with."
        )
    if display.empty:
        notes.append(
            "No cell matches a published row (same model size, method, ratio and benchmark); "
            "tiny-model and random-init runs have no published counterpart."
        )
    return Table("paper_vs_ours", display, "Paper vs ours", notes)
