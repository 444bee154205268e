"""Evaluation throughput of the real path, and what batching changes: ``globalcom2.run`` cells at several batch
sizes, each through lmms-eval and the plugin, read back from their records.

Every cell is one ``python -m globalcom2.run`` process (a user's cell, ``force=true``, in its own results
folder), so what is timed is what a sweep pays: data loading, preprocessing, generation, answer decoding and
lmms-eval's scoring. Two reports come from the same cells:

* **throughput** (``make bench-throughput``): per method x R x batch size, samples/s over the plugin's batch
  loop (first call excluded, as in every latency figure) and over lmms-eval's whole ``evaluate`` (task
  building and scoring included); the seconds spent in each stage, summed over the batches (data loading and
  preprocessing run in the plugin's background threads, ``globalcom2/lmms/batch_pipeline.py``, so their sum
  with generate may exceed the loop's wall time: the ``overlap`` column is that ratio); the padded share of
  the batches' prompt tokens; and peak memory. ``--prefetch both`` (this mode's default) runs every cell with
  the background threads and without them; ``--prefetch-threads 1 4`` runs each prefetching cell with one
  encoding thread and with four (``prep threads``: the count the plugin used, 0 for a cell without
  prefetching).
* **batch effect** (``make bench-batch-effect``): per method and batch size N > 1, how many answers (generated
  token ids) differ from batch 1's, and every metric's change. In fp32 none should (the harness's exactness
  claim, ``tests/lmms``); in bf16 on a GPU, kernels depend on the batch shape and this measures how much.
  ``--batch-invariant both`` runs every cell also under ``batch_invariant=true``
  (``globalcom2/models/batch_invariant.py``), whose rows must show no change at all; the throughput columns
  of the same cells price it.

    python -m globalcom2.perf.throughput                                    # tiny-trained, CPU, efficiency split
    python -m globalcom2.perf.throughput --mode batch-effect --benchmark demo --limit 64
    python -m globalcom2.perf.throughput --mode batch-effect --batch-invariant both --dtype bfloat16
    python -m globalcom2.perf.throughput --model llava_next_7b --random-init --device cuda --dtype bfloat16

Writes ``results/throughput/<model>_<device>_<mode>[_invariant_<on|both>].{md,json}`` (:func:`output_name`;
the mode with ``_`` for ``-``; the JSON carries every row, the settings, each cell's folder and provenance)
and prints the table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from globalcom2.atomic import atomic_write_json, atomic_write_text
from globalcom2.efficiency.summary import latency_summary
from globalcom2.paths import PROJECT_ROOT
from globalcom2.perf.efficiency import Variant, parse_variant
from globalcom2.provenance import hardware_label, provenance
from globalcom2.records import ratio_label
from globalcom2.run_spec import prefetch_threads_setting
from globalcom2.sample_records import RECORDS_FILE, SampleRecord, read_jsonl
from globalcom2.stage_timing import OTHER, STAGES
from globalcom2.store import Cell, LoadedCell, current_cell_id

MODES = ("throughput", "batch-effect")
PREFETCH: dict[str, tuple[bool | None, ...]] = {
    "auto": (None,),
    "on": (True,),
    "off": (False,),
    "both": (True, False),
}
BATCH_INVARIANT: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}
DEFAULTS: dict[str, dict[str, Any]] = {
    "throughput": {
        "variants": ["vanilla@1", "globalcom2@0.25"],
        "batch_sizes": [1, 4, 8, 16],
        "benchmark": "efficiency",
        "limit": None,  # the efficiency split's 30 images
        "prefetch": "both",
    },
    "batch-effect": {
        "variants": ["vanilla@1", "random@0.25", "globalcom2@0.25", "fastv@0.25", "sparsevlm@0.25"],
        "batch_sizes": [1, 8],
        "benchmark": "demo",
        "limit": 96,  # of the demo's 300 test items: every question type, ten cells in minutes on a CPU
        "prefetch": "auto",
    },
}


@dataclass(frozen=True)
class Setting:
    """One cell of the benchmark."""

    method: str
    ratio: float
    batch_size: int
    prefetch: bool | None  # None: the harness's default (auto)
    batch_invariant: bool = False
    threads: int | None = None  # prefetch_threads (None: the harness's default, auto)

    @property
    def experiment(self) -> str:
        mode = {None: "", True: "_prefetch", False: "_serial"}[self.prefetch]
        threads = "" if self.threads is None else f"_t{self.threads}"
        return f"throughput_b{self.batch_size}{mode}{threads}{'_invariant' if self.batch_invariant else ''}"


def cell_overrides(setting: Setting, args: argparse.Namespace, results_dir: Path) -> list[str]:
    """The ``globalcom2.run`` command line of one setting."""
    overrides = [
        f"model={args.model}",
        f"benchmark={args.benchmark}",
        f"method={setting.method}",
        f"benchmark.batch_size={setting.batch_size}",
        f"prefetch={'auto' if setting.prefetch is None else str(setting.prefetch).lower()}",
        f"prefetch_threads={'auto' if setting.threads is None else setting.threads}",
        f"experiment_name={setting.experiment}",
        f"paths.results_dir={results_dir}",
        "force=true",
    ]
    if setting.method != "vanilla":
        overrides.append(f"method.retention_ratio={setting.ratio}")
    if args.limit is not None:
        overrides.append(f"benchmark.limit={args.limit}")
    if args.device:
        overrides.append(f"model.device={args.device}")
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    if args.random_init:
        overrides.append("model.random_init=true")
    if args.vicuna_text:
        overrides.append("model.vicuna_text=true")
    if args.compile:
        overrides.append("compile=true")
    if setting.batch_invariant:
        overrides.append("batch_invariant=true")
    return overrides + list(args.extra)


def run_cell(setting: Setting, args: argparse.Namespace, results_dir: Path) -> int:
    """Run one cell in its own process (its output goes to the console); returns its exit status."""
    command = [sys.executable, "-m", "globalcom2.run", *cell_overrides(setting, args, results_dir)]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=PROJECT_ROOT, check=False).returncode


def find_cell(results_dir: Path, setting: Setting) -> LoadedCell:
    """The cell a setting ran: the one its key folder's ``current`` file names (the store's rule)."""
    ratio = ratio_label(1.0 if setting.method == "vanilla" else setting.ratio)
    key_dirs = sorted(results_dir.glob(f"{setting.experiment}/*/{setting.method}/{ratio}/*"))
    if len(key_dirs) != 1:
        raise LookupError(f"expected one key folder for {setting} under {results_dir}, found {key_dirs}")
    current = current_cell_id(key_dirs[0])
    if current is None:
        raise LookupError(f"{key_dirs[0]} names no current cell: the run of {setting} did not finish")
    folder = key_dirs[0] / current
    return LoadedCell(folder, Cell.finished_record(folder))


def read_records(cell: LoadedCell) -> list[SampleRecord]:
    return read_jsonl(cell.path / cell.record.files.get("records", RECORDS_FILE))


def mean_text_tokens(records: list[SampleRecord]) -> float | None:
    """The mean text tokens per sample; ``None`` when a record lacks the count (a cell stored before it was
    recorded): unknown, not 0."""
    counts = [r.text_tokens for r in records]
    if not counts or any(n is None for n in counts):
        return None
    return sum(counts) / len(counts)


def padded_share(records: list[SampleRecord]) -> float:
    """Share of the batches' token slots that are padding: 1 - sum(prompt) / sum(batch x longest prompt)."""
    batches: dict[tuple[int, int], list[int]] = {}
    for record in records:
        batches.setdefault((record.rank, record.batch_id), []).append(record.prompt_tokens)
    slots = sum(len(lengths) * max(lengths) for lengths in batches.values())
    return 1.0 - sum(sum(lengths) for lengths in batches.values()) / slots


def throughput_row(setting: Setting, cell: LoadedCell, records: list[SampleRecord]) -> dict[str, Any]:
    """One row of the throughput table from a finished cell. Stage seconds are summed over the timed batches:
    the first, and any that compiled, are left out, as in every latency figure."""
    calls = [c for c in {(r.rank, r.batch_id): r for r in records}.values() if c.in_statistics]
    latency = latency_summary(records)
    timings = cell.record.timings

    def total(name: str) -> float:
        return sum(getattr(c, name) or 0.0 for c in calls)

    stages = {
        "load_s": total("load_s"),
        "preprocess_s": total("preprocess_s"),
        "generate_s": total("total_s"),
        "postprocess_s": total("postprocess_s"),
    }
    # Where generate's time went, from each call's stage clock (CUDA events on a GPU): the columns that say
    # whether a slow cell is prefill-bound, decode-bound or host-bound. Not part of `overlap`: they split
    # generate_s, they are not beside it.
    generate_stages = {
        f"{name}_s": sum((c.stages_s or {}).get(name, 0.0) for c in calls)
        if any(c.stages_s for c in calls)
        else None
        for name in (*STAGES, OTHER)
    }
    loop = total("loop_s")
    evaluate = timings.get("evaluate_s")
    generate_until = timings.get("generate_until_s")
    peak = latency.get("peak_memory_gib") or {}
    first = latency.get("first_call")
    return {
        "method": setting.method,
        "R": setting.ratio,
        "batch": setting.batch_size,
        "prefetch": cell.record.run.get("prefetch"),  # as the plugin resolved it
        "prep threads": cell.record.run.get("prefetch_threads"),  # likewise (0: prepared in turn)
        "batch-invariant": setting.batch_invariant,
        "samples": len(records),
        "text tokens": mean_text_tokens(records),
        "timed batches": len(calls),
        "samples/s (loop)": latency["throughput_samples_per_s_end_to_end"],
        "samples/s (evaluate)": len(records) / evaluate if evaluate else None,
        **stages,
        **generate_stages,
        "wait_s": total("wait_s"),
        "loop_s": loop,
        "overlap": sum(stages.values()) / loop if loop else None,
        # lmms-eval's own time around the plugin: building tasks and datasets, then scoring
        "lmms_eval_s": evaluate - generate_until if evaluate and generate_until is not None else None,
        "padded share": padded_share(records),
        "peak GiB": peak.get("max"),
        "first call s": first["total_ms"] / 1e3 if first else None,
        # later batches that compiled (a shape the warm-up missed): left out like the first, counted here
        "batches that compiled": (latency.get("compiled_calls") or {}).get("calls", 0),
        "cell": str(cell.path),
    }


def batch_effect_rows(
    cells: dict[Setting, tuple[LoadedCell, list[SampleRecord]]],
) -> list[dict[str, Any]]:
    """Per method and batch size N > 1: answers that differ from batch 1's and each metric's change."""
    rows = []

    def group(s: Setting) -> tuple:
        return s.method, s.ratio, s.prefetch, s.threads, s.batch_invariant

    singles = {group(s): v for s, v in cells.items() if s.batch_size == 1}
    for setting, (cell, records) in cells.items():
        single = singles.get(group(setting))
        if setting.batch_size == 1 or single is None:
            continue
        single_cell, single_records = single
        alone = {(r.task, r.doc_id): r.output_token_ids for r in single_records}
        together = {(r.task, r.doc_id): r.output_token_ids for r in records}
        shared = alone.keys() & together.keys()
        changed = sum(alone[key] != together[key] for key in shared)
        first = sum(alone[key][:1] != together[key][:1] for key in shared)
        deltas = {}
        for task, metrics in cell.record.metrics.items():
            for metric, value in metrics.items():
                base = single_cell.record.metrics.get(task, {}).get(metric)
                if base is not None:
                    deltas[f"{task}/{metric}"] = value - base
        rows.append(
            {
                "method": setting.method,
                "R": setting.ratio,
                "batch": setting.batch_size,
                "batch-invariant": setting.batch_invariant,
                "samples": len(shared),
                "answers changed": changed,
                "first token changed": first,
                "largest metric change": max(deltas.values(), key=abs) if deltas else None,
                "metric changes": deltas,
                "cell": str(cell.path),
                "batch-1 cell": str(single_cell.path),
            }
        )
    return rows


def output_name(args: argparse.Namespace, device: str) -> str:
    """The tables' file name without suffix: model, device type, mode, and the batch-invariant setting (the
    compile mode is not in it: ``--out`` separates compiled tables)."""
    invariant = "" if args.batch_invariant == "off" else f"_invariant_{args.batch_invariant}"
    return f"{args.model}_{device.split(':')[0]}_{args.mode.replace('-', '_')}{invariant}"


def markdown(frame: pd.DataFrame, drop: tuple[str, ...] = ("cell", "batch-1 cell", "metric changes")) -> str:
    shown = frame.drop(columns=[c for c in drop if c in frame.columns])
    return shown.to_markdown(index=False, floatfmt=".3g")


def threads_setting(text: str) -> int | None:
    """``--prefetch-threads`` value, read as the harness reads ``prefetch_threads``: ``auto`` (``None``) or an
    integer the plugin accepts."""
    try:
        return prefetch_threads_setting(text, "--prefetch-threads")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="throughput")
    parser.add_argument("--model", default="tiny_trained", help="a configs/model option")
    parser.add_argument("--benchmark", default=None, help="a configs/benchmark option (default: per mode)")
    parser.add_argument(
        "--limit", type=int, default=None, help="first N documents per task (default: per mode)"
    )
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=None, help="METHOD@R ...")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument(
        "--prefetch",
        choices=PREFETCH,
        default=None,
        help="the plugin's background preparation: auto, on, off, or both (each cell twice); default per mode",
    )
    parser.add_argument(
        "--prefetch-threads",
        nargs="+",
        type=threads_setting,
        default=[None],
        metavar="N|auto",
        help="prefetch_threads of every prefetching cell, one cell per value (default: auto)",
    )
    parser.add_argument("--device", default=None, help="model.device (default: the model config's)")
    parser.add_argument("--dtype", default=None, help="model.dtype (default: the model config's)")
    parser.add_argument("--random-init", action="store_true", help="model.random_init=true (7B/13B)")
    parser.add_argument(
        "--vicuna-text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model.vicuna_text=true: prompt text at Vicuna's token count (default: with --random-init on the "
        "efficiency benchmark, the one whose prompts have recorded counts)",
    )
    parser.add_argument("--compile", action="store_true", help="compile=true")
    parser.add_argument(
        "--batch-invariant",
        choices=BATCH_INVARIANT,
        default="off",
        help="batch_invariant=true for every cell (on), or every cell with and without it (both)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where the cells go (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "throughput")
    parser.add_argument("extra", nargs="*", help="further Hydra overrides for every cell")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.mode]
    args.variants = args.variants or [parse_variant(v) for v in defaults["variants"]]
    args.batch_sizes = args.batch_sizes or defaults["batch_sizes"]
    args.benchmark = args.benchmark or defaults["benchmark"]
    args.prefetch = args.prefetch or defaults["prefetch"]
    args.limit = args.limit if args.limit is not None else defaults["limit"]
    if args.vicuna_text is None:
        args.vicuna_text = args.random_init and args.benchmark == "efficiency"
    if args.vicuna_text and not args.random_init:
        parser.error(
            "--vicuna-text needs --random-init (a checkpoint's tokenizer already gives Vicuna's count)"
        )
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    if args.mode == "batch-effect" and 1 not in args.batch_sizes:
        parser.error("--mode batch-effect compares with batch size 1: include 1 in --batch-sizes")
    return args


def settings_of(args: argparse.Namespace) -> list[Setting]:
    variants: list[Variant] = args.variants
    prefetch = PREFETCH[args.prefetch]
    return [
        Setting(method, ratio, size, on, invariant, threads)
        for invariant in BATCH_INVARIANT[args.batch_invariant]
        for on in prefetch
        # a cell without prefetching prepares in turn, whatever the thread count: run it once
        for threads in ((None,) if on is False else args.prefetch_threads)
        for size in args.batch_sizes
        for method, ratio in variants
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every setting's cell in turn and rewrite the table after each one, so a time limit or a failed
    cell costs only the cells after it; a failed cell is listed in the JSON's ``failures`` and the benchmark
    exits non-zero once the others have run."""
    args = parse_args(argv)
    # The code the cells run, taken before this benchmark writes its own tables.
    info = provenance(args.device)
    results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="globalcom2-throughput-"))
    settings = settings_of(args)
    cells: dict[Setting, tuple[LoadedCell, list[SampleRecord]]] = {}
    failures: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}
    for done, setting in enumerate(settings, start=1):
        status = run_cell(setting, args, results_dir)
        if status == 0:
            cell = find_cell(results_dir, setting)
            cells[setting] = (cell, read_records(cell))
        else:
            failures.append({"setting": repr(setting), "exit": status})
            print(f"cell {setting} failed (exit {status}); its output is above", flush=True)
        if cells:
            payload = write_tables(args, cells, failures, len(settings) - done, info, results_dir)
    if failures:
        raise SystemExit(f"{len(failures)} of {len(settings)} cells failed: {failures}")
    return payload


#: Timed batches a row's samples/s should rest on: the first call, and any that compiled, are left out, so
#: the efficiency split's 30 samples at batch 16 leave one batch of 14 (the title names such batch sizes).
MIN_TIMED_BATCHES = 3


def few_timed_batches(rows: list[dict[str, Any]]) -> list[int]:
    """The batch sizes of throughput rows whose samples/s rest on fewer than :data:`MIN_TIMED_BATCHES` timed
    batches (none for the batch-effect rows, which count answers, not time)."""
    return sorted(
        {row["batch"] for row in rows if row.get("timed batches", MIN_TIMED_BATCHES) < MIN_TIMED_BATCHES}
    )


def write_tables(
    args: argparse.Namespace,
    cells: dict[Setting, tuple[LoadedCell, list[SampleRecord]]],
    failures: list[dict[str, Any]],
    pending: int,
    info: dict[str, Any],
    results_dir: Path,
) -> dict[str, Any]:
    """The table of the cells finished so far (``.md`` and ``.json``, written atomically); its title says how
    many cells are still to run and how many failed."""
    if args.mode == "throughput":
        rows = [throughput_row(s, cell, records) for s, (cell, records) in cells.items()]
    else:
        rows = batch_effect_rows(cells)
    any_cell, any_records = next(iter(cells.values()))
    device, dtype = any_cell.record.run.get("device"), any_cell.record.run.get("dtype")
    stem = args.out / output_name(args, str(device))
    title = (
        f"{args.mode} of {args.model} on {args.benchmark} ({len(any_records)} samples per cell), "
        f"{device} ({hardware_label(any_cell.record.provenance.get('hardware', {}), device)}), {dtype}"
    )
    if pending:
        title += f"; PARTIAL, {pending} cells still to run"
    if failures:
        title += f"; {len(failures)} cells FAILED"
    if thin := few_timed_batches(rows):
        sizes = ", ".join(map(str, thin))
        title += f"; samples/s of batch {sizes} rest on fewer than {MIN_TIMED_BATCHES} timed batches"
    text = f"# {title}\n\n{markdown(pd.DataFrame(rows))}\n" if rows else f"# {title}\n\n(no rows yet)\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".md"), text)
    payload = {
        "title": title,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "failures": failures,
        "complete": pending == 0,
        "torch_threads": torch.get_num_threads(),
        "provenance": info,
    }
    atomic_write_json(stem.with_suffix(".json"), payload, default=str)
    print(text)
    print(f"wrote {stem}.md and .json; cells under {results_dir}", flush=True)
    return payload


if __name__ == "__main__":
    main()
