"""Results tree -> one tidy table: a row per cell x benchmark x metric, with the cell's configuration.

Only finished cells count (:meth:`globalcom2.store.Cell.finished_record`, the store's one rule); partial,
corrupt or malformed ones are skipped and named in a warning, never read as results and never a crash.

Metric kinds (column ``kind``):

* ``score``: every numeric lmms-eval metric of every task (``task`` set);
* ``paper``: the paper-table columns (``globalcom2.data.benchmarks.PAPER_METRICS``), in the paper's unit;
  MM-Vet's from the judge's file beside the cell's samples (:func:`judged_paper_value`);
* ``pending``: a paper column the cell fills only after a separate step (MM-Vet's judge), not yet done
  (``value`` NaN, ``task`` says why), so a table can say what it is missing;
* ``efficiency``: latency, memory, FLOPs, KV cache, visual tokens (``globalcom2/efficiency/summary.py``);
  unavailable values (peak memory on CPU) are absent rows, never zeros;
* ``fidelity``: ``agreement_with_vanilla``, the % of samples whose generated token ids equal those of the
  vanilla cell of the same experiment, model and benchmark (``first_token_agreement``: the first token only),
  and ``agreement_samples``, how many samples both answered. It measures how far a method moves the model's
  outputs, and stays meaningful when accuracy does not (the tiny model's random weights answer gibberish).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from globalcom2.atomic import atomic_write_bytes, atomic_write_text
from globalcom2.efficiency.summary import EFFICIENCY_METRICS, efficiency_value
from globalcom2.efficiency.table import preferred_vanilla
from globalcom2.protocol.rules import DEFAULT_PROTOCOL
from globalcom2.provenance import CPU_LABEL, hardware_label
from globalcom2.records import RecordError
from globalcom2.sample_records import RECORDS_FILE
from globalcom2.store import CURRENT_FILE, PARTIAL_DIR, RECORD_FILE, Cell, LoadedCell, current_cell_id

RECORDS = RECORDS_FILE
#: The ``fidelity`` metric that counts the samples an agreement compared (not a percentage: never plotted).
AGREEMENT_SAMPLES = "agreement_samples"
CELL_DEPTH = 7  # <experiment>/<model>/<method>/r<ratio>/<benchmark>/<cell id>/record.json

CONFIG_COLUMNS = [
    "experiment", "model", "method", "method_name", "retention_ratio", "benchmark", "seed", "batch_size",
    "world_size", "attn_implementation", "random_init", "vicuna_text", "dtype", "compile", "batch_invariant",
    "prefetch", "prefetch_threads", "input_cache_gib", "input_cache_hits", "limit", "protocol",
    "hardware",
    "git_sha",
    "git_dirty",
    "software",
    "replayed",
    "finished", "cell_id", "cell_dir",
]  # fmt: skip

#: The libraries whose version can change a cell's answers or scores (``provenance.versions``): the kernels,
#: the model code, the tokenizer, lmms-eval's scoring. A cell's identity leaves them out (an upgrade would
#: re-run every cell), so the tidy table names them per cell (``software``) and the reports note a table
#: whose cells ran on different ones (``globalcom2.report.build.library_versions``).
SOFTWARE_PACKAGES = ("torch", "transformers", "tokenizers", "lmms_eval")


#: Settings that change what a table compares beyond the method and its ratio: in bf16 on a GPU a batch's
#: shape changes its rows' answers, the dtype changes every answer, the batch-invariant mode changes the
#: kernels' shapes (so answers, and latency), prefetching and its thread count (host work beside the timed
#: calls) change latency, the cache of encoded inputs (host work an earlier cell did) changes the end-to-end
#: rate, compile mode changes latency most and answers by reassociation, so does the attention
#: implementation (SDPA or eager), random-initialised weights change every score, a random-initialised
#: model's prompt length (``vicuna_text``) changes its latency, a sample ``limit`` changes which samples a
#: score averages, the protocol (``llava`` or ``lmms_eval``) changes prompts and decoding, so scores, the
#: hardware changes every latency, and the number of processes a cell's throughput (the sum of their rates).
#: A table's cells should agree on these (``make tables`` warns where they do not).
COMPARABILITY = (
    *("batch_size", "dtype", "batch_invariant", "prefetch", "prefetch_threads", "input_cache_gib", "compile"),
    "attn_implementation",
    *("random_init", "vicuna_text", "limit", "protocol", "hardware", "world_size"),
)


def ran_on_cpu(hardware: pd.Series) -> pd.Series:
    """Per row of a ``hardware`` column (:func:`globalcom2.provenance.hardware_label`), whether it names a
    CPU; a missing label is not a CPU."""
    return hardware.astype(str).str.startswith(CPU_LABEL)


def setting_text(value: Any) -> str:
    """How a :data:`COMPARABILITY` value is named in a warning: ``None`` for a missing one (so a cell without
    a sample limit differs visibly from one with), whole floats as integers (a limit of 20 read back as 20.0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def software_label(versions: dict[str, Any]) -> str | None:
    """``"torch 2.13.0, transformers 5.25.0, ..."`` of :data:`SOFTWARE_PACKAGES` from a record's
    ``provenance.versions`` (``lmms_eval`` as ``lmms-eval``; a package the run lacked as ``none``), or
    ``None`` where the record names none of them."""
    if not any(name in versions for name in SOFTWARE_PACKAGES):
        return None
    return ", ".join(f"{name.replace('_', '-')} {versions.get(name) or 'none'}" for name in SOFTWARE_PACKAGES)


def load_cells(root: str | Path) -> tuple[list[LoadedCell], list[tuple[Path, str]]]:
    """The cell each key shows, and every cell or key left out with the reason (a warning lists them).

    A cell is skipped, never a crash, when its run was interrupted, its ``record.json`` is unreadable,
    corrupt, unfinished, from before cell identities (schema 1), or has a field the tables cannot read
    (a non-numeric metric, ``metrics`` that is not a mapping, ...). A key
    (``<experiment>/<model>/<method>/r<ratio>/<benchmark>``) shows the cell its ``current`` file names (the
    last run or reused); its other finished identities have other settings and are listed as superseded.
    When the current cell cannot be read (corrupt, deleted, unfinished, a ``current`` file that names no
    cell), the key shows **no row**: another identity is never shown in its place. Without a ``current``
    file, a key shows its one finished cell, or none when it has several.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"results folder {root} {'is not a folder' if root.exists() else 'does not exist'}"
        )
    found, skipped = [], []
    for partial in sorted(root.rglob(PARTIAL_DIR)):
        if not (partial.parent / RECORD_FILE).exists():
            skipped.append((partial.parent, "partial: a run was interrupted (no record.json)"))
    unreadable: dict[Path, str] = {}
    for path in sorted(root.rglob(RECORD_FILE)):
        # a cell's record sits at <experiment>/<model>/<method>/r<ratio>/<benchmark>/<id>/record.json; any
        # other record.json (a tracker's files, a copy) is no cell
        if PARTIAL_DIR in path.parts or len(path.relative_to(root).parts) != CELL_DEPTH:
            continue
        problem = _record_problem(path)
        if isinstance(problem, str):
            unreadable[path.parent] = problem
        else:
            found.append(problem)
    by_key: dict[Path, list[LoadedCell]] = {}
    for cell in found:
        by_key.setdefault(cell.path.parent, []).append(cell)
    key_dirs = set(by_key) | {
        current.parent
        for current in root.rglob(CURRENT_FILE)
        if len(current.relative_to(root).parts) == CELL_DEPTH - 1
    }
    cells, cited = [], set()
    for key_dir in sorted(key_dirs):
        group = by_key.get(key_dir, [])
        chosen, reason, unreadable_current = _current_of(key_dir, group, unreadable)
        if chosen is not None:
            cells.append(chosen)
        elif reason:
            skipped.append((key_dir, reason))
            cited.add(unreadable_current)
        skipped += [
            (c.path, f"superseded: {key_dir.name}'s current cell is not this one (other settings)")
            for c in group
            if c is not chosen
        ]
    # an unreadable cell is listed on its own unless its key's line already says why it shows no row
    skipped += [(path, why) for path, why in unreadable.items() if path not in cited]
    if skipped:
        listing = "\n".join(f"  {path}: {why}" for path, why in skipped)
        warnings.warn(f"skipped {len(skipped)} cell(s):\n{listing}", stacklevel=2)
    incomplete = [(cell.path, problem) for cell in cells for problem in _file_problems(cell)]
    if incomplete:
        listing = "\n".join(f"  {path}: {why}" for path, why in incomplete)
        warnings.warn(f"{len(incomplete)} file(s) missing from shown cells:\n{listing}", stacklevel=2)
    return sorted(cells, key=lambda c: c.path), skipped


def _record_problem(path: Path) -> LoadedCell | str:
    """The loaded cell, or why ``path`` cannot be tabulated.

    A record is tabled only in its own key's folder (:meth:`Cell.finished_record`): its rows take experiment,
    model, method, ratio and benchmark from the record, so a cell folder copied or moved to another key
    (``cp -r results/exp results/exp_old``) would otherwise appear twice under the original experiment, and
    its vanilla could stand in for the real one."""
    try:
        cell = LoadedCell(path.parent, Cell.finished_record(path.parent))
    except RecordError as err:
        return str(err)
    try:
        records = cell.record.files.get("records", RECORDS)
        if not isinstance(records, str):
            raise TypeError(f"files is {cell.record.files!r}, not a mapping naming the records file")
        _config_row(cell)
        list(_metric_rows(cell))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"malformed record.json ({type(err).__name__}: {err})"
    return cell


def _current_of(
    key_dir: Path, group: list[LoadedCell], unreadable: dict[Path, str]
) -> tuple[LoadedCell | None, str | None, Path | None]:
    """The cell ``key_dir`` shows, or ``None`` with why it shows no row (see :func:`load_cells`), and the
    unreadable current cell that reason already names (so it is not listed twice)."""
    try:
        named = current_cell_id(key_dir)
    except RecordError as err:
        return None, f"no row for this key: {err}", None
    if named is None:
        if len(group) > 1:
            return (
                None,
                (
                    f"no row for this key: {len(group)} finished identities and no current file naming one of them"
                ),
                None,
            )
        return (group[0], None, None) if group else (None, None, None)
    for cell in group:
        if cell.path.name == named:
            return cell, None, None
    why = unreadable.get(key_dir / named, "its folder is gone")
    others = (
        f"; its other cells ({', '.join(c.path.name for c in group)}) have other settings" if group else ""
    )
    return (
        None,
        f"no row for this key: its current cell {named} cannot be read ({why}){others}",
        key_dir / named,
    )


def _file_problems(cell: LoadedCell) -> list[str]:
    """What is missing of the files a finished cell's record names: the per-sample records (the agreement
    columns need them) and lmms-eval's results and samples files."""
    files, problems = cell.record.files, []
    records = cell.path / files.get("records", RECORDS)
    expected = cell.record.samples.get("samples")
    try:
        lines = [line for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
        for line in lines:
            json.loads(line)
        if isinstance(expected, int) and len(lines) != expected:
            problems.append(f"{records.name} has {len(lines)} of its {expected} sample records")
    except FileNotFoundError:
        problems.append(f"{records.name} is missing: no agreement with vanilla for this cell")
    except (OSError, ValueError) as err:
        problems.append(f"{records.name} is unreadable or truncated ({type(err).__name__}): no agreement")
    for name in [files.get("results"), *(files.get("samples") or [])]:
        if isinstance(name, str) and not (cell.path / name).is_file():
            problems.append(f"lmms-eval's {name} is missing")
    return problems


def _config_row(cell: LoadedCell) -> dict[str, Any]:
    record, ref = cell.record, cell.record.cell
    spec, run = record.spec, record.run
    hardware = record.provenance.get("hardware", {})
    git = record.provenance.get("git", {})
    attn = run.get("attn_implementation", spec["model"].get("attn_implementation"))
    return {
        "experiment": ref.experiment,
        "model": ref.model,
        "method": ref.method,
        "method_name": spec["method"]["name"],
        "retention_ratio": ref.retention_ratio,
        "benchmark": ref.benchmark,
        "seed": spec.get("seed"),
        "batch_size": spec["benchmark"].get("batch_size"),
        "world_size": run.get("world_size", 1),
        "attn_implementation": json.dumps(attn, sort_keys=True) if isinstance(attn, dict) else attn,
        "random_init": spec["model"].get("random_init", False),
        "vicuna_text": bool(spec["model"].get("vicuna_text", False)),  # off in cells from before it
        "dtype": run.get("dtype", spec["model"].get("dtype")),
        "compile": run.get("compile") or spec["model"].get("compile") or "no",
        "batch_invariant": bool(spec["model"].get("batch_invariant", False)),  # off in cells from before it
        "prefetch": bool(run.get("prefetch", False)),  # cells from before the option ran every batch in turn
        # 0: prepared in turn. A cell from before the count that prefetched has none: its one background thread
        # both read and encoded, which no count of the encoding pool's reproduces
        "prefetch_threads": run.get("prefetch_threads", None if run.get("prefetch") else 0),
        # the cache of encoded inputs across a process's cells (lmms/input_cache.py): its size, 0 when off and
        # in cells from before it, and how many of this cell's encodings it served, its warm-up's included
        "input_cache_gib": float(run.get("input_cache_gib", 0.0)),
        "input_cache_hits": int((run.get("input_cache") or {}).get("hits", 0)),
        "limit": spec["benchmark"].get("limit"),
        "protocol": spec["benchmark"].get("protocol", DEFAULT_PROTOCOL),  # cells from before it: lmms-eval's
        "hardware": hardware_label(hardware, run.get("device")),
        "git_sha": git.get("sha"),
        "git_dirty": git.get("dirty"),
        "software": software_label(record.provenance.get("versions") or {}),
        # answers an interrupted run of the cell journaled and this run replayed (globalcom2/answer_journal.py)
        "replayed": int(record.samples.get("replayed", 0)),  # 0 in cells from before resuming existed
        "finished": record.finished,
        "cell_id": ref.id,
        "cell_dir": str(cell.path),
    }


def _metric_rows(cell: LoadedCell) -> Iterable[dict[str, Any]]:
    record = cell.record
    for task, values in record.metrics.items():
        for metric, value in values.items():
            yield {"kind": "score", "task": task, "metric": metric, "value": float(value)}
    for column, entry in record.paper_metrics.items():
        value, why = (
            (entry["value"], "") if entry.get("value") is not None else judged_paper_value(cell, column)
        )
        if value is None:
            yield {"kind": "pending", "task": why, "metric": column, "value": math.nan}
        else:
            yield {"kind": "paper", "task": "", "metric": column, "value": float(value)}
    for name, paths in EFFICIENCY_METRICS.items():
        value = efficiency_value(record.efficiency, paths)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield {"kind": "efficiency", "task": "", "metric": name, "value": float(value)}


def judged_paper_value(cell: LoadedCell, column: str) -> tuple[float | None, str]:
    """A judged paper column (MM-Vet) of ``cell``: ``(value, "")`` from the judge's output beside the cell's
    samples (``python -m globalcom2.lmms.mmvet_judge``'s default ``<samples>_judged.json``), else
    ``(None, why)``.

    The file is part of the cell's folder, so a ``force=true`` re-run removes it with the samples it graded.
    A partial judging (``--allow-partial``) is not a paper value; two judged files are ambiguous.
    """
    from globalcom2.data.benchmarks import PAPER_METRICS, paper_metric_value

    spec = PAPER_METRICS.get(column)
    if spec is None or spec.source != "mmvet_judge":
        return None, f"needs a step this report does not read ({spec.source if spec else column})"
    found = sorted(
        path
        for task in spec.tasks
        for path in cell.path.rglob(f"*_samples_{task}_judged.json")
        if not any(part.startswith(".") for part in path.relative_to(cell.path).parts)  # not .partial/ etc.
    )
    if not found:
        return None, "not judged yet"
    if len(found) > 1:
        return None, f"{len(found)} judged files, ambiguous: {', '.join(p.name for p in found)}"
    (path,) = found
    samples = path.with_name(path.name.removesuffix("_judged.json") + ".jsonl")
    try:
        judged = json.loads(path.read_text(encoding="utf-8"))
        if Path(judged["judge"]["samples_file"]).name != samples.name or not samples.is_file():
            return (
                None,
                f"{path.name} graded {judged['judge']['samples_file']}, not this cell's {samples.name}",
            )
        if judged.get("partial"):
            return None, f"{path.name} judged a subset (--allow-partial)"
        return paper_metric_value(column, judged), ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"{path.name} is unreadable ({type(err).__name__}: {err})"


def sample_outputs(cell: LoadedCell) -> dict[tuple[str, int], tuple[int, ...]]:
    """``(task, doc_id) -> generated token ids`` from the cell's ``sample_records.jsonl``."""
    outputs = {}
    path = cell.path / RECORDS
    try:
        path = cell.path / cell.record.files.get("records", RECORDS)
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for line in filter(str.strip, lines):
            row = json.loads(line)
            outputs[(row["task"], int(row["doc_id"]))] = tuple(row["output_token_ids"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # load_cells has named the problem (_file_problems)
    return outputs


def agreement_with_vanilla(
    cells: list[LoadedCell], first_token: bool = False
) -> dict[Path, tuple[float, int]]:
    """``(% agreeing, samples compared)`` per cell: the share of its samples whose generated token ids equal
    those of the vanilla cell of the same experiment, model and benchmark, over the samples both answered
    (the count says how many: a cell run on ``limit=1`` compares one). ``first_token`` compares only the first
    generated token (a gentler measure: any later divergence of a greedy decode compounds). Where a group has
    several vanilla variants, the one :func:`~globalcom2.efficiency.table.preferred_vanilla` names, as the
    tables' Avg and speed-ups do. Cells without a vanilla are absent."""

    def group(cell: LoadedCell) -> tuple[str, str, str]:
        c = cell.record.cell
        return c.experiment, c.model, c.benchmark

    variants: dict[tuple[str, str, str], dict[str, LoadedCell]] = {}
    for cell in cells:
        if cell.record.spec["method"]["name"] == "vanilla":
            variants.setdefault(group(cell), {})[cell.record.cell.method] = cell
    vanilla = {
        key: sample_outputs(labelled[preferred_vanilla(labelled)]) for key, labelled in variants.items()
    }
    agreement = {}
    for cell in cells:
        reference = vanilla.get(group(cell))
        if not reference:
            continue
        outputs = sample_outputs(cell)
        shared = outputs.keys() & reference.keys()
        if shared:
            width = 1 if first_token else None
            same = sum(outputs[k][:width] == reference[k][:width] for k in shared)
            agreement[cell.path] = (100.0 * same / len(shared), len(shared))
    return agreement


def tidy_results(root: str | Path) -> pd.DataFrame:
    """The tidy table of every finished cell under ``root`` (an empty table with the columns if none)."""
    cells, _ = load_cells(root)
    fidelity = {
        "agreement_with_vanilla": agreement_with_vanilla(cells),
        "first_token_agreement": agreement_with_vanilla(cells, first_token=True),
    }
    rows = []
    for cell in cells:
        config = _config_row(cell)
        for metric in _metric_rows(cell):
            rows.append({**config, **metric})
        for metric, values in fidelity.items():
            if cell.path in values:
                share, compared = values[cell.path]
                fidelity_row = {**config, "kind": "fidelity", "task": ""}
                rows.append({**fidelity_row, "metric": metric, "value": share})
                if metric == "agreement_with_vanilla":
                    rows.append({**fidelity_row, "metric": AGREEMENT_SAMPLES, "value": compared})
    columns = [*CONFIG_COLUMNS, "kind", "task", "metric", "value"]
    return pd.DataFrame(rows, columns=columns)


def write_tidy(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``tidy.csv`` and ``tidy.parquet`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, parquet = out_dir / "tidy.csv", out_dir / "tidy.parquet"
    atomic_write_text(csv, frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(parquet, buffer.getvalue())
    return [csv, parquet]
