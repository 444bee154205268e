"""Reporting: tidy aggregation, the tables' arithmetic, LaTeX, plots, wandb offline runs, the notebook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from helpers import synthetic_image

from globalcom2.report import plots, tables
from globalcom2.report.aggregate import load_cells, tidy_results
from globalcom2.report.build import build_report
from globalcom2.report.tables import AVG, benchmark_table, paper_vs_ours, table1
from globalcom2.store import CURRENT_FILE, cell_id

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:skipped .* cell")


def write_cell(
    root: Path,
    method: str,
    ratio: float,
    paper: dict,
    *,
    model="llava_next_7b",
    experiment="t1",
    benchmark="paper_suite",
    outputs=None,
    name=None,
    status="complete",
    identity=None,
    finished="2026-11-21T00:00:00+00:00",
    metrics=None,
) -> Path:
    """A hand-made finished cell with the fields the reporting layer reads."""
    label = name or method
    identity = identity or {"seed": 0}
    cell = root / experiment / model / label / f"r{ratio!r}" / benchmark / cell_id(identity)
    cell.mkdir(parents=True)
    record = {
        "status": status,
        "schema": 2,
        "cell": {
            "experiment": experiment,
            "model": model,
            "method": label,
            "retention_ratio": ratio,
            "benchmark": benchmark,
            "id": cell_id(identity),
            "identity": identity,
            "path": str(cell),
        },
        "spec": {
            "seed": 0,
            "model": {"random_init": False, "dtype": "float16", "attn_implementation": "sdpa"},
            "method": {"name": method, "params": {}},
            "benchmark": {"batch_size": 1, "limit": None, "protocol": "llava"},
        },
        "provenance": {"git": {"sha": "abc", "dirty": False}, "hardware": {"gpu": "NVIDIA H100"}},
        "finished": finished,
        "metrics": metrics or {"gqa_local": {"exact_match": paper.get("GQA", 0) / 100}},
        "paper_metrics": {
            c: {"value": v, "metric": "m", "comparable": True, "note": ""} for c, v in paper.items()
        },
        "efficiency": {
            "prefill_ms": {"median": 100 * ratio},
            "throughput_samples_per_s": 2 / ratio,
            "peak_memory_gib": {"max": 10 + ratio},
            "tflops": {"paper": 41.65 * ratio, "full": 42 * ratio},
            "kv_cache_mb": 1500 * ratio,
            "visual_tokens": {"before": 2928, "llm_input": 2928 * ratio, "equivalent": 2928 * ratio},
        },
        "files": {"records": "sample_records.jsonl"},
        # the rest of what the writer writes (a record lacking any field is refused as damaged)
        **{"config": {}, "run": {}, "timings": {}, "n_samples": {}, "samples": {}},
        **{"started": None, "wall_s": None},
    }
    (cell / "record.json").write_text(json.dumps(record))
    lines = [
        json.dumps({"task": "gqa_local", "doc_id": i, "output_token_ids": ids})
        for i, ids in enumerate(outputs or [])
    ]
    (cell / "sample_records.jsonl").write_text("\n".join(lines))
    return cell


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "results"
    write_cell(
        root,
        "vanilla",
        1.0,
        {"GQA": 60.0, "MME (perception)": 1500.0},
        outputs=[[1, 2], [3, 4], [5, 6], [7, 8]],
    )
    write_cell(
        root,
        "globalcom2",
        0.25,
        {"GQA": 54.0, "MME (perception)": 1200.0},
        outputs=[[1, 2], [3, 9], [5, 6], [0, 0]],
    )
    write_cell(root, "fastv", 0.25, {"GQA": 45.0}, outputs=[[1, 2]])
    corrupt = root / "t1" / "llava_next_7b" / "random" / "r0.25" / "paper_suite" / "0123456789ab"
    corrupt.mkdir(parents=True)
    (corrupt / "record.json").write_text('{"status": "comp')  # cut off mid-write
    (root / "t1" / "llava_next_7b" / "random" / "r0.5" / "paper_suite" / "ba9876543210" / ".partial").mkdir(
        parents=True
    )
    write_cell(root, "sparsevlm", 0.25, {"GQA": 1.0}, status="running")
    return root


BAD_RECORDS = {
    "a non-numeric metric": lambda r: r["metrics"]["gqa_local"].update(exact_match="abc"),
    "metrics as a string": lambda r: r.update(metrics="0.5"),
    "an empty spec": lambda r: r.update(spec={}),
    "efficiency: null": lambda r: r.update(efficiency=None),
    "a cell without its id": lambda r: r["cell"].pop("id"),
    "files: null": lambda r: r.update(files=None),
    "a null records file": lambda r: r.update(files={"records": None}),
    "a list as the model": lambda r: r["cell"].update(model=["x"]),
}


@pytest.mark.parametrize("defect", [*BAD_RECORDS, "record.json as a folder"])
def test_one_malformed_record_is_skipped_and_named_never_a_crash(tmp_path, defect):
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, outputs=[[1]])
    bad = write_cell(root, "vanilla" if "null" in defect else "fastv", 0.25, {"GQA": 50.0}, outputs=[[1]])
    if defect == "record.json as a folder":
        (bad / "record.json").unlink()
        (bad / "record.json").mkdir()
    else:
        record = json.loads((bad / "record.json").read_text())
        BAD_RECORDS[defect](record)
        (bad / "record.json").write_text(json.dumps(record))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = tidy_results(root)
    message = "\n".join(str(w.message) for w in caught)
    assert str(bad) in message and "skipped 1 cell" in message, message
    assert set(frame["method"]) == {"vanilla"}


@pytest.mark.slow
def test_the_aggregate_cli_skips_a_malformed_record_and_exits_0(tmp_path):
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, outputs=[[1]])
    bad = write_cell(root, "fastv", 0.25, {"GQA": 50.0}, outputs=[[1]])
    record = json.loads((bad / "record.json").read_text())
    record["metrics"]["gqa_local"]["exact_match"] = "abc"
    (bad / "record.json").write_text(json.dumps(record))
    done = subprocess.run(
        [sys.executable, "-m", "globalcom2.report", str(root)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(bad) in done.stderr and "metrics.gqa_local.exact_match is 'abc', not a number" in done.stderr


def test_of_two_identities_of_one_key_the_current_one_is_tabulated(tmp_path):
    root = tmp_path / "results"
    write_cell(
        root, "vanilla", 1.0, {"GQA": 60.0}, identity={"limit": 20}, finished="2026-11-22T00:00:00+00:00"
    )
    full = write_cell(root, "vanilla", 1.0, {"GQA": 61.0}, identity={"limit": None})
    key_dir = full.parent
    # no pointer: nobody can tell which is current, so neither is shown (not the newest in its place)
    for current, expected, said in ((None, [], "no current file"), (full.name, [61.0], "superseded")):
        if current:
            (key_dir / CURRENT_FILE).write_text(current + "\n")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frame = tidy_results(root)
        paper = frame[frame["kind"] == "paper"]
        assert paper["value"].tolist() == expected
        assert said in "\n".join(str(w.message) for w in caught)


CURRENT_DEFECTS = {
    "truncated": lambda cell: (cell / "record.json").write_text('{"status": "comp'),
    "empty": lambda cell: (cell / "record.json").write_text(""),
    "wrong-typed field": lambda cell: _edit(cell, lambda r: r.update(metrics="0.5")),
    "another cell's id": lambda cell: _edit(cell, lambda r: r["cell"].update(id="0123456789ab")),
    "still running": lambda cell: _edit(cell, lambda r: r.update(status="running")),
    "deleted": lambda cell: shutil.rmtree(cell),
    "binary current file": lambda cell: (cell.parent / CURRENT_FILE).write_bytes(b"\xff\xfe\x00\x01"),
}


def _edit(cell: Path, change) -> None:
    record = json.loads((cell / "record.json").read_text())
    change(record)
    (cell / "record.json").write_text(json.dumps(record))


@pytest.mark.parametrize("defect", list(CURRENT_DEFECTS))
def test_a_key_whose_current_cell_is_unreadable_shows_no_row_never_another_cell(tmp_path, defect):
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, outputs=[[1]])
    write_cell(root, "fastv", 0.25, {"GQA": 40.0}, identity={"alpha": 1}, outputs=[[1]])  # other settings
    current = write_cell(root, "fastv", 0.25, {"GQA": 50.0}, identity={"alpha": 2}, outputs=[[1]])
    (current.parent / CURRENT_FILE).write_text(current.name + "\n")
    CURRENT_DEFECTS[defect](current)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = tidy_results(root)
    assert set(frame["method"]) == {"vanilla"}, "the other fastv identity is never shown in its place"
    message = "\n".join(str(w.message) for w in caught)
    assert "no row for this key" in message and str(current.parent) in message


def test_missing_per_sample_and_lmms_eval_files_are_named(tmp_path):
    root = tmp_path / "results"
    cell = write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, outputs=[[1], [2]])
    _edit(cell, lambda r: r.update(samples={"samples": 3}, files={**r["files"], "results": "x/res.json"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tidy_results(root)
    message = "\n".join(str(w.message) for w in caught)
    assert "sample_records.jsonl has 2 of its 3 sample records" in message
    assert "lmms-eval's x/res.json is missing" in message
    (cell / "sample_records.jsonl").write_text('{"task": "gqa_local", "doc_id": 0, "outp')  # cut off
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tidy_results(root)
    assert "unreadable or truncated" in "\n".join(str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda root: None, "does not exist: nothing to report"),
        (
            lambda root: (root / "t1").mkdir(parents=True),
            "no finished cells under",
        ),
        (
            lambda root: (
                write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, experiment="other"),
                (write_cell(root, "fastv", 0.25, {"GQA": 50.0}) / "record.json").write_text("{"),
            ),
            "no finished cells for experiment 't1'",
        ),
    ],
)
def test_the_report_cli_says_what_is_wrong_in_one_line_and_fails(tmp_path, arrange, message):
    root = tmp_path / "results"
    arrange(root)
    done = subprocess.run(
        [sys.executable, "-m", "globalcom2.report", str(root), "--experiment", "t1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_aggregation_gives_the_expected_tidy_rows_and_lists_what_it_skipped(tree):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = tidy_results(tree)
    message = "\n".join(str(w.message) for w in caught)
    assert "skipped 3" in message and "corrupt record.json" in message and "partial" in message
    assert "record.json is not complete" in message
    assert sorted(set(frame["method"])) == ["fastv", "globalcom2", "vanilla"]
    paper = frame[frame["kind"] == "paper"].set_index(["method", "metric"])["value"]
    assert paper[("globalcom2", "MME (perception)")] == 1200.0 and ("fastv", "MME (perception)") not in paper
    score = frame[(frame["kind"] == "score") & (frame["method"] == "globalcom2")].iloc[0]
    assert (score["task"], score["metric"], score["value"]) == ("gqa_local", "exact_match", 0.54)
    assert (
        score["hardware"] == "NVIDIA H100" and score["retention_ratio"] == 0.25 and score["git_sha"] == "abc"
    )
    eff = frame[(frame["kind"] == "efficiency") & (frame["method"] == "globalcom2")].set_index("metric")[
        "value"
    ]
    assert eff["prefill_ms"] == 25.0 and eff["tflops_paper"] == pytest.approx(41.65 / 4)
    fidelity = frame[frame["kind"] == "fidelity"].set_index(["method", "metric"])["value"]
    assert fidelity[("globalcom2", "agreement_with_vanilla")] == 50.0  # docs 0 and 2 of 4 identical
    assert fidelity[("globalcom2", "first_token_agreement")] == 75.0  # docs 0, 1, 2 start alike
    assert fidelity[("fastv", "agreement_with_vanilla")] == 100.0  # over the one sample both answered
    assert (
        fidelity[("fastv", "agreement_samples")] == 1 and fidelity[("globalcom2", "agreement_samples")] == 4
    )
    assert fidelity[("vanilla", "agreement_with_vanilla")] == 100.0
    cells, skipped = load_cells(tree)
    assert len(cells) == 3 and len(skipped) == 3


def test_table1_average_is_relative_to_vanilla_column_by_column(tree):
    frame = tidy_results(tree)
    table = table1(frame, "llava_next_7b").frame.set_index("method")
    assert table.loc["vanilla", AVG] == pytest.approx(100.0)
    assert table.loc["globalcom2", AVG] == pytest.approx(
        (90.0 + 80.0) / 2
    )  # MME's 0-2000 scale weighs the same
    assert table.loc["fastv", AVG] == pytest.approx(75.0)  # only the columns it has
    assert list(table.index) == ["vanilla", "fastv", "globalcom2"]
    notes = [n for n in table1(frame, "llava_next_7b").notes if n.startswith(AVG)]
    assert notes == [f"{AVG} of fastv at R = 0.25: over 1 of the 2 columns, without MME (perception)."]
    no_vanilla = table1(frame[frame["method"] != "vanilla"], "llava_next_7b")
    assert set(no_vanilla.frame[AVG]) == {"n/a (no vanilla row)"}
    assert any("no vanilla row" in note for note in no_vanilla.notes)
    assert "perception" in " ".join(table1(frame, "llava_next_7b").frame.columns)


def test_paper_vs_ours_marks_reproduced_rows(tree):
    frame = tidy_results(tree)
    table = paper_vs_ours(frame).frame.set_index(["method", "benchmark"])
    # MODEL_ZOO 7B vanilla: GQA 64.2, MME 1519 -> deltas -4.2 (not reproduced) and -19 (within 30: reproduced)
    assert table.loc[("vanilla", "GQA"), "delta"] == pytest.approx(60.0 - 64.2)
    assert table.loc[("vanilla", "GQA"), "reproduced"] == "no"
    assert table.loc[("vanilla", "MME (perception)"), "reproduced"] == "yes"
    assert table.loc[("vanilla", "GQA"), "reliability"] == "primary"
    assert table.loc[("globalcom2", "GQA"), "paper"] == 61.5  # 7B, R = 0.25
    empty = paper_vs_ours(frame[frame["model"] == "nope"])
    assert empty.frame.empty and any("no published counterpart" in n for n in empty.notes)


def test_paper_vs_ours_reads_a_one_point_delta_as_within_and_a_missing_value_as_no_verdict(tmp_path):
    """64.9 - 63.9 is 1.0000000000000071 in floats: within the 1-point tolerance all the same; a value we do
    not have (NaN) gets no verdict, not "no"."""
    root = tmp_path / "results"
    write_cell(root, "globalcom2", 0.5, {"GQA": 64.9, "MME (perception)": float("nan")})
    table = paper_vs_ours(tidy_results(root)).frame.set_index("benchmark")
    assert table.loc["GQA", "paper"] == 63.9 and table.loc["GQA", "reproduced"] == "yes"
    assert table.loc["MME (perception)", "reproduced"] == "n/a (no value)"


def test_reference_numbers_carry_their_source():
    for name in ("accuracy.csv", "globalcom2_efficiency.csv"):
        table = pd.read_csv(REPO / "results" / "reference" / name)
        assert table["source"].notna().all() and set(table["reliability"]) <= {"primary", "secondary"}
    efficiency = pd.read_csv(REPO / "results" / "reference" / "globalcom2_efficiency.csv")
    assert efficiency.query("model == '7B' and retention_ratio == 0.1")["prefill_ms"].item() == 13.3


def test_tables_and_plots_are_written(tree, tmp_path):
    frame = tidy_results(tree)
    report = build_report(frame, "t1", tmp_path / "out")
    names = {p.name for p in report.files}
    for stem in ("table1_llava_next_7b", "efficiency_llava_next_7b_paper_suite", "paper_vs_ours"):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv"} <= names
    for stem in ("score_vs_ratio", "pareto", "latency_memory"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert all(p.stat().st_size > 0 for p in report.files)
    efficiency = pd.read_csv(
        tmp_path / "out" / "tables" / "efficiency_llava_next_7b_paper_suite.csv"
    ).set_index("method")
    assert efficiency.loc["globalcom2", "prefill speed-up (x)"] == pytest.approx(4.0)
    for table in report.tables:
        check_latex(table.latex(), tmp_path / f"{table.name}.tex")


def check_latex(source: str, path: Path) -> None:
    """Compile with pdflatex when available; otherwise check the structure parses (balanced, booktabs)."""
    assert source.count("\\begin{") == source.count("\\end{")
    assert all(rule in source for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    if shutil.which("pdflatex"):
        document = (
            "\\documentclass{article}\\usepackage{booktabs}\\begin{document}" + source + "\\end{document}"
        )
        path.write_text(document)
        done = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", path.name], cwd=path.parent, capture_output=True
        )
        assert done.returncode == 0, done.stdout[-2000:]


def test_peak_memory_is_marked_unavailable_not_zero(tree, tmp_path):
    frame = tidy_results(tree)
    frame = frame[frame["metric"] != "peak_memory_gib"].assign(hardware="CPU (x86_64, 2 cores)")
    table = build_report(frame, "t1", tmp_path / "cpu").tables
    efficiency = next(t for t in table if t.name.startswith("efficiency"))
    assert set(efficiency.frame["peak allocated (GiB)"]) == {"n/a (CPU)"}
    assert any("unavailable on CPU" in note for note in efficiency.notes)


# --- on real demo results -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory) -> Path:
    """A small real demo grid: vanilla, random and fastv at two ratios, 3 samples each."""
    root = tmp_path_factory.mktemp("demo") / "results"
    env = {**os.environ, "GLOBALCOM2_RESULTS": str(root)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "globalcom2.run",
            "-m",
            "experiment=demo",
            "method=vanilla,random,fastv",
            "method.retention_ratio=0.5,0.25",
            "benchmark.limit=3",
            "benchmark.gen_kwargs='max_new_tokens=3'",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_the_aggregate_cli_writes_the_demo_report(demo_results):
    done = subprocess.run(
        [sys.executable, "-m", "globalcom2.report", str(demo_results), "--experiment", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tables:" in done.stdout and "plots:" in done.stdout
    table = pd.read_csv(demo_results / "demo" / "tables" / "demo_demo.csv")
    assert len(table) == 5 and "agreement with vanilla (%)" in table.columns
    scores = [c for c in table.columns if c == "exact_match" or c.endswith("_accuracy")]
    assert scores == ["exact_match", "color_accuracy", "count_accuracy", "position_accuracy"]
    assert table[scores].notna().all().all()  # limit=3: one item of each question type per cell
    assert table.set_index("method").loc["vanilla", "agreement with vanilla (%)"] == 100.0
    assert (demo_results / "demo" / "plots" / "score_vs_ratio.png").stat().st_size > 10_000
    assert (demo_results / "tidy.parquet").is_file()
    # one setting throughout (FastV scores attention without changing the model's attention implementation):
    # nothing warned as mixed, and every row has its speed-up against the one vanilla
    assert "differs between cells" not in done.stderr and "more than one cell" not in done.stderr
    (efficiency,) = (demo_results / "demo" / "tables").glob("efficiency_*_demo.csv")
    assert pd.read_csv(efficiency)["prefill speed-up (x)"].notna().all()


@pytest.mark.slow
def test_the_notebook_executes_and_is_stored_stripped(demo_results):
    from nbclient import NotebookClient

    path = REPO / "notebooks" / "analysis.ipynb"
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook stripped"
    os.environ["GLOBALCOM2_RESULTS"], os.environ["GLOBALCOM2_EXPERIMENT"] = str(demo_results), "demo"
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    finally:
        del os.environ["GLOBALCOM2_RESULTS"], os.environ["GLOBALCOM2_EXPERIMENT"]
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "display_data" and "image/png" in o.data for o in outputs) == 3


@pytest.mark.slow
def test_wandb_offline_runs_contain_the_expected_keys(demo_results, tmp_path, monkeypatch):
    from globalcom2.report.build import build_report as report_of
    from globalcom2.tracking import log_cell, log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    (cell,) = [
        c
        for c in load_cells(demo_results)[0]
        if c.record.cell.method == "fastv" and c.record.cell.retention_ratio == 0.25
    ]
    run_dir = Path(log_cell(cell.record, {"project": "t", "dir": str(tmp_path / "wandb"), "group": "demo"}))
    keys = offline_keys(run_dir, {"globalcom2_demo/exact_match"})
    assert {"model", "method", "retention_ratio", "benchmark", "method_params"} <= keys["config"]
    assert {"globalcom2_demo/exact_match", "efficiency/prefill_ms", "efficiency/tflops_full"} <= keys[
        "summary"
    ]
    assert keys["group"] == "demo"
    report = report_of(tidy_results(demo_results), "demo", tmp_path / "report")
    keys = offline_keys(Path(log_report(report, project="t")), {"tables/demo_demo/_type"})
    assert {"tables/demo_demo/_type", "plots/score_vs_ratio/_type"} <= keys["summary"]


def offline_keys(run_dir: Path, summary_written: set[str], timeout_s: float = 60.0) -> dict:
    """Config keys, summary keys and group recorded in an offline wandb run's ``.wandb`` file.

    wandb's service process may still be appending the final summary when ``run.finish()`` returns (seen
    on a loaded machine), so the file is read again until ``summary_written`` is in it, or ``timeout_s``
    passes and the caller's assertions report what is missing.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        keys = _scan_offline_run(run_dir)
        if summary_written <= keys["summary"] or time.monotonic() > deadline:
            return keys
        time.sleep(0.5)


def _scan_offline_run(run_dir: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = run_dir.glob("run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    keys: dict = {"config": set(), "summary": set(), "group": None}
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            keys["config"] |= {item.key for item in record.run.config.update}
            keys["group"] = record.run.run_group
        elif kind == "summary":
            keys["summary"] |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    return keys


def test_kept_token_visualisation(tiny, tmp_path):
    from globalcom2 import attach
    from globalcom2.anyres import packed_layout
    from globalcom2.prompts import vicuna_v1_prompt
    from globalcom2.report.visualize import draw, fastv_kept, pre_llm_kept

    model, processor = tiny
    image = synthetic_image(800, 600)
    inputs = processor(images=image, text=vicuna_v1_prompt("Q"), return_tensors="pt")
    layout = packed_layout((600, 800), model.config.image_grid_pinpoints)
    with attach(model, "globalcom2", retention_ratio=0.25) as handle:
        model(**inputs)
        stats = handle.stats[-1]
        kept = {"globalcom2": pre_llm_kept(model, handle.method, inputs, layout)}
    assert int(kept["globalcom2"].sum()) == stats.tokens_after
    kept["fastv"] = fastv_kept(model, inputs, 0.25)
    assert int(kept["fastv"].sum()) == round(0.25 * layout.num_tokens)  # FastV: round(R * N_vis)
    assert type(model.model).__name__ == "LlavaNextModel"
    paths = draw(image, kept, layout, 0.25, tmp_path / "kept")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in paths)
    assert torch.is_tensor(kept["fastv"])


def test_plots_say_when_memory_is_unavailable(tree, tmp_path, monkeypatch):
    frame = tidy_results(tree)
    texts: list[list[str]] = []
    original = plots.save

    def capturing_save(figure, out_dir, name):
        texts.append([text.get_text() for ax in figure.axes for text in ax.texts])
        return original(figure, out_dir, name)

    monkeypatch.setattr(plots, "save", capturing_save)
    on_cpu = frame[frame["metric"] != "peak_memory_gib"].assign(hardware="CPU (x86_64, 2 cores)")
    paths = plots.latency_memory(on_cpu, tmp_path / "cpu")
    plots.latency_memory(frame, tmp_path / "gpu")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in paths)
    without, with_memory = texts
    assert any("unavailable on CPU" in text for text in without)
    assert not any("unavailable" in text for text in with_memory)


# --- the demo benchmark: accuracy per question type, no paper columns -----------------------------------

DEMO_METRICS = ("exact_match", "color_accuracy", "count_accuracy", "position_accuracy")
DEMO_CELLS = {  # (method, R): (exact_match, color, count, position), generated ids of 4 samples
    ("vanilla", 1.0): ((0.6, 0.9, 0.3, 0.6), [[1], [2], [3], [4]]),
    ("globalcom2", 0.5): ((0.5, 0.8, 0.2, 0.5), [[1], [2], [3], [0]]),
    ("globalcom2", 0.25): ((0.4, 0.7, 0.1, 0.4), [[1], [2], [0], [0]]),
    ("fastv", 0.5): ((0.3, 0.5, 0.1, 0.3), [[1], [0], [0], [0]]),
    ("fastv", 0.25): ((0.2, 0.3, 0.0, 0.3), [[0], [0], [0], [0]]),
}


@pytest.fixture
def demo_tree(tmp_path) -> Path:
    """Hand-made demo cells of the trained tiny model: lmms-eval's four demo metrics, TFLOPs, outputs."""
    root = tmp_path / "results"
    for (method, ratio), (scores, outputs) in DEMO_CELLS.items():
        write_cell(
            root,
            method,
            ratio,
            {},
            model="tiny_trained",
            experiment="demo",
            benchmark="demo",
            metrics={"globalcom2_demo": dict(zip(DEMO_METRICS, scores, strict=True))},
            outputs=outputs,
        )
    return root


def test_the_demo_table_has_overall_and_per_type_accuracy_and_agreement_for_every_cell(demo_tree):
    from globalcom2.report.tables import benchmark_table

    rendered = benchmark_table(tidy_results(demo_tree), "demo", "demo")
    table = rendered.frame
    assert any(
        note.startswith("color_accuracy, count_accuracy, position_accuracy:") for note in rendered.notes
    )
    columns = list(table.columns)
    assert columns[3:7] == list(DEMO_METRICS), columns  # overall first, then the question types
    assert {"agreement with vanilla (%)", "first-token agreement (%)", "TFLOPs (full)"} <= set(columns)
    assert sorted(zip(table["method"], table["R"], strict=True)) == sorted(DEMO_CELLS)
    rows = table.set_index(["method", "R"])
    for key, (scores, _) in DEMO_CELLS.items():
        assert rows.loc[key, list(DEMO_METRICS)].tolist() == pytest.approx([100 * s for s in scores])
    assert rows.loc[("globalcom2", 0.25), "agreement with vanilla (%)"] == 50.0
    assert rows.loc[("fastv", 0.5), "first-token agreement (%)"] == 25.0


def test_demo_pareto_plots_accuracy_per_question_type_against_tflops(demo_tree, tmp_path, monkeypatch):
    frame = tidy_results(demo_tree)
    figures: list = []
    original = plots.save

    def capturing_save(figure, out_dir, name):
        figures.append(
            [
                (ax.get_title(), ax.get_ylabel(), {line.get_label(): line.get_xydata() for line in ax.lines})
                for ax in figure.axes
                if ax.get_visible()
            ]
        )
        return original(figure, out_dir, name)

    monkeypatch.setattr(plots, "save", capturing_save)
    paths = plots.pareto(frame, tmp_path / "plots")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in paths)
    (panels,) = figures
    assert [title for title, _, _ in panels] == [f"globalcom2_demo: {m}" for m in DEMO_METRICS]
    assert {ylabel for _, ylabel, _ in panels} == {"accuracy (%)"}  # not agreement with vanilla
    for (_, _, lines), column in zip(panels, range(4), strict=True):
        assert set(lines) == {"vanilla", "globalcom2", "fastv"}
        for method in ("globalcom2", "fastv"):  # write_cell: tflops_full = 42 R; sorted by TFLOPs
            expected = [(42 * r, 100 * DEMO_CELLS[(method, r)][0][column]) for r in (0.25, 0.5)]
            assert lines[method].ravel().tolist() == pytest.approx(sum(expected, ()))
        assert lines["vanilla"].ravel().tolist() == pytest.approx(
            [42.0, 100 * DEMO_CELLS[("vanilla", 1.0)][0][column]]
        )


def test_a_partial_average_is_drawn_hollow_on_the_pareto_plot(tree, tmp_path, monkeypatch):
    """FastV's Avg covers one of Table 1's two columns (a note says so under the table); on the plot it sat
    among the full averages as a filled point, a Pareto claim the table does not make."""
    frame = tidy_results(tree)
    assert table1(frame, "llava_next_7b").partial_averages == {("fastv", 0.25)}
    drawn: list = []
    original = plots.save

    def capturing_save(figure, out_dir, name):
        (ax,) = [a for a in figure.axes if a.get_visible()]
        drawn.append((ax.lines, [t.get_text() for t in ax.texts]))
        return original(figure, out_dir, name)

    monkeypatch.setattr(plots, "save", capturing_save)
    plots.pareto(frame, tmp_path / "plots")
    ((lines, texts),) = drawn
    by_label = {line.get_label(): line for line in lines}
    assert list(by_label["fastv"].get_markevery()) == []  # its one point is partial: no filled marker
    assert by_label["globalcom2"].get_markevery() is None  # full averages keep theirs
    (hollow,) = [line for line in lines if line.get_markerfacecolor() == "none"]
    assert hollow.get_xydata().tolist() == by_label["fastv"].get_xydata().tolist()
    assert hollow.get_markeredgecolor() == by_label["fastv"].get_color()
    assert any("hollow" in text for text in texts)


def test_demo_agreement_with_vanilla_stays_in_score_vs_ratio(demo_tree):
    titles = [title for title, _ in plots.panels(tidy_results(demo_tree))]
    assert "demo: agreement with vanilla (%)" in titles and "demo: first token agreement (%)" in titles
    assert not any("agreement samples" in title for title in titles)  # a count, not a percentage
    assert "globalcom2_demo: color_accuracy" in titles


def test_cells_of_an_experiment_named_like_a_trackers_folder_are_shown(tmp_path):
    """Only records at a cell's depth are cells: an experiment called ``wandb`` is tabulated like any other."""
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, experiment="wandb")
    (root / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    (root / "wandb" / "offline-run-1" / "files" / "record.json").write_text("{}")  # a tracker's file
    frame = tidy_results(root)
    assert set(frame["experiment"]) == {"wandb"} and set(frame["method"]) == {"vanilla"}


def test_the_prefetch_thread_count_of_a_cell_from_before_it_is_unknown(tmp_path):
    """Before the encoding pool, a prefetching cell's one background thread both read and encoded: no count
    of today's pool is that, so its count is unknown (and a table mixing it with today's cells says so);
    a cell that prepared in turn had none."""
    root = tmp_path / "results"
    for method, run in (
        ("vanilla", {"prefetch": True}),
        ("random", {}),
        ("fastv", {"prefetch": True, "prefetch_threads": 4}),
    ):
        cell = write_cell(root, method, 1.0 if method == "vanilla" else 0.25, {"GQA": 60.0})
        record = json.loads((cell / "record.json").read_text())
        record["run"] = run
        (cell / "record.json").write_text(json.dumps(record))
    threads = tidy_results(root).groupby("method")["prefetch_threads"].first()
    assert pd.isna(threads["vanilla"]) and threads["random"] == 0 and threads["fastv"] == 4


def test_the_input_cache_of_a_cell_is_its_size_and_the_batches_it_served(tmp_path):
    """Off and nothing served in a cell from before the cache; otherwise as the run recorded it."""
    root = tmp_path / "results"
    for method, run in (
        ("vanilla", {}),
        ("random", {"input_cache_gib": 2.0, "input_cache": {"hits": 0, "misses": 40, "held_bytes": 9}}),
        ("fastv", {"input_cache_gib": 2.0, "input_cache": {"hits": 40, "misses": 0, "held_bytes": 9}}),
    ):
        cell = write_cell(root, method, 1.0 if method == "vanilla" else 0.25, {"GQA": 60.0})
        record = json.loads((cell / "record.json").read_text())
        record["run"] = run
        (cell / "record.json").write_text(json.dumps(record))
    cells = tidy_results(root).groupby("method")[["input_cache_gib", "input_cache_hits"]].first()
    assert cells.loc["vanilla"].tolist() == [0.0, 0]
    assert cells.loc["random"].tolist() == [2.0, 0] and cells.loc["fastv"].tolist() == [2.0, 40]


def test_a_table_that_mixes_batch_sizes_dtypes_or_execution_settings_warns(tmp_path):
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one setting throughout: no warning
        build_report(tidy_results(root), "t1", tmp_path / "same")
    cell = write_cell(root, "globalcom2", 0.25, {"GQA": 54.0})
    record = json.loads((cell / "record.json").read_text())
    record["spec"]["benchmark"]["batch_size"] = 8
    record["spec"]["model"]["dtype"] = "bfloat16"
    record["spec"]["model"]["batch_invariant"] = True
    record["spec"]["model"]["compile"] = "default"
    record["provenance"]["hardware"] = {"gpu": "NVIDIA H200"}
    record["spec"]["benchmark"]["limit"] = 20
    # throughput is the sum of the processes' rates; batches prepared beside the timed calls, by four threads
    record["run"] = {"world_size": 2, "prefetch": True, "prefetch_threads": 4, "input_cache_gib": 2.0}
    (cell / "record.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning) as caught:
        build_report(tidy_results(root), "t1", tmp_path / "mixed")
    messages = [str(w.message) for w in caught]
    assert any("batch_size differs between cells: 1 (1 cells), 8 (1 cells)" in m for m in messages), messages
    assert any("dtype differs between cells: bfloat16 (1 cells), float16 (1 cells)" in m for m in messages)
    assert any(
        "batch_invariant differs between cells: False (1 cells), True (1 cells)" in m for m in messages
    )
    assert any("compile differs between cells: default (1 cells), no (1 cells)" in m for m in messages)
    assert any("limit differs between cells: 20 (1 cells), None (1 cells)" in m for m in messages)
    assert any("world_size differs between cells: 1 (1 cells), 2 (1 cells)" in m for m in messages)
    assert any("prefetch differs between cells: False (1 cells), True (1 cells)" in m for m in messages)
    assert any("prefetch_threads differs between cells: 0 (1 cells), 4 (1 cells)" in m for m in messages)
    assert any("input_cache_gib differs between cells: 0 (1 cells), 2 (1 cells)" in m for m in messages)
    assert any(
        "hardware differs between cells: NVIDIA H100 (1 cells), NVIDIA H200 (1 cells)" in m for m in messages
    )


def test_a_cpu_cell_on_a_gpu_machine_is_labelled_with_the_cpu(tmp_path):
    """The hardware column follows the device the cell ran on (its record's ``run.device``), not merely
    the GPU the machine has: a CPU run's latency must not be read as the GPU's."""
    root = tmp_path / "results"
    machine = {"gpu": "NVIDIA H100", "machine": "x86_64", "cpu_count": 16}
    for ratio, device in [(0.25, "cpu"), (0.5, "cuda:0")]:
        cell = write_cell(root, "globalcom2", ratio, {"GQA": 54.0})
        record = json.loads((cell / "record.json").read_text())
        record["run"] = {"device": device}
        record["provenance"]["hardware"] = machine
        (cell / "record.json").write_text(json.dumps(record))
    frame = tidy_results(root)
    labels = frame.drop_duplicates("retention_ratio").set_index("retention_ratio")["hardware"]
    assert labels.to_dict() == {0.25: "CPU (x86_64, 16 cores)", 0.5: "NVIDIA H100"}


def _edit_record(cell: Path, edit) -> None:
    record = json.loads((cell / "record.json").read_text())
    edit(record)
    (cell / "record.json").write_text(json.dumps(record))


def _prefill(ms: float):
    return lambda record: record["efficiency"].update(prefill_ms={"median": ms})


def test_efficiency_speed_ups_compare_cells_of_one_benchmark(tmp_path):
    """Vanilla on gqa (100 ms) and pope (50 ms), GlobalCom² on pope only (40 ms): one table per benchmark,
    and pope's speed-up is 50/40, never gqa's vanilla over pope's method (2.5)."""
    root = tmp_path / "results"
    _edit_record(write_cell(root, "vanilla", 1.0, {}, benchmark="gqa"), _prefill(100.0))
    _edit_record(write_cell(root, "vanilla", 1.0, {}, benchmark="pope"), _prefill(50.0))
    _edit_record(write_cell(root, "globalcom2", 0.25, {}, benchmark="pope"), _prefill(40.0))
    report = build_report(tidy_results(root), "t1", tmp_path / "out")
    by_name = {table.name: table for table in report.tables}
    pope = by_name["efficiency_llava_next_7b_pope"].frame.set_index("method")
    assert pope.loc["globalcom2", "prefill speed-up (x)"] == pytest.approx(1.25)
    assert "on pope" in by_name["efficiency_llava_next_7b_pope"].caption
    assert list(by_name["efficiency_llava_next_7b_gqa"].frame["method"]) == ["vanilla"]


def test_each_table_entry_comes_from_one_cell_and_a_second_one_is_named(tmp_path):
    """paper_suite and a benchmark=mme cell both give GlobalCom²'s MME: the table shows the later one and
    warns with both folders, never an arbitrary first."""
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0, "MME (perception)": 1500.0})
    write_cell(
        root, "globalcom2", 0.25, {"GQA": 54.0, "MME (perception)": 1200.0}, finished="2026-11-21T00:00:00"
    )
    later = write_cell(
        root,
        "globalcom2",
        0.25,
        {"MME (perception)": 1300.0},
        benchmark="mme",
        finished="2026-11-22T00:00:00",
    )
    with pytest.warns(UserWarning, match="come from more than one cell") as caught:
        table = table1(tidy_results(root), "llava_next_7b").frame.set_index("method")
    assert table.loc["globalcom2", "MME (perception)"] == 1300.0 and table.loc["globalcom2", "GQA"] == 54.0
    message = "\n".join(str(w.message) for w in caught)
    assert str(later) in message and "paper_suite" in message


def test_a_borrowed_vanilla_comes_whole_from_one_experiment_and_says_which(tmp_path):
    """An ablation without vanilla uses another experiment's, whole: the one run with the ablation's settings
    before one with more columns; when only a vanilla with other settings exists, the note names them and
    warns (a 20-sample vanilla is no baseline)."""
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 50.0}, experiment="default")
    limited = write_cell(root, "vanilla", 1.0, {"GQA": 80.0, "MME (perception)": 1000.0}, experiment="smoke")
    _edit_record(limited, lambda record: record["spec"]["benchmark"].update(limit=20))
    write_cell(root, "globalcom2", 0.25, {"GQA": 40.0, "MME (perception)": 900.0}, experiment="ablations")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: nothing to warn
        frame = tidy_results(root)
        table = table1(frame, "llava_next_7b", "ablations", vanilla_pool=frame)
    assert table.frame.set_index("method").loc["globalcom2", AVG] == pytest.approx(80.0)  # default's GQA
    assert any("experiment 'default', as this one has none." in note for note in table.notes)

    shutil.rmtree(root / "default")
    frame = tidy_results(root)
    with pytest.warns(UserWarning, match="limit 20") as caught:
        report = build_report(frame, "ablations", tmp_path / "out")
    (table,) = [t for t in report.tables if t.name.startswith("table1")]
    row = table.frame.set_index("method").loc["globalcom2"]
    assert row[AVG] == pytest.approx((40 / 80 + 900 / 1000) * 50)  # smoke's vanilla: both columns, one source
    note = next(n for n in table.notes if "against the vanilla row" in n)
    assert "'smoke'" in note and "limit 20 (this table: None)" in note
    assert any("Table 1 of llava_next_7b" in str(w.message) for w in caught)


def test_a_copied_cell_folder_is_not_tabled_under_its_original_key(tmp_path):
    root = tmp_path / "results"
    for cell in (
        write_cell(root, "vanilla", 1.0, {"GQA": 60.0}),
        write_cell(root, "globalcom2", 0.25, {"GQA": 54.0}),
    ):
        (cell.parent / CURRENT_FILE).write_text(cell.name + "\n")  # as the store leaves a key
    shutil.copytree(root / "t1", root / "t1_old")
    with pytest.warns(UserWarning, match="belongs to t1/llava_next_7b") as caught:
        frame = tidy_results(root)
    listing = "\n".join(str(w.message) for w in caught)
    assert "skipped 2 cell(s)" in listing, "each copy is listed once, under its key (not also on its own)"
    assert listing.count("belongs to t1/llava_next_7b") == 2 and listing.count("no row for this key") == 2
    assert set(frame["experiment"]) == {"t1"}
    assert frame.drop_duplicates("cell_dir")["cell_dir"].str.contains("t1_old").sum() == 0
    assert len(frame.drop_duplicates("cell_dir")) == 2


def test_efficiency_rows_compare_with_the_vanilla_of_their_own_attention_and_compile_mode(tmp_path):
    """GlobalCom² at 0.25 under eager attention and at 0.5 compiled, vanilla under SDPA, eager mode: only the
    row that matches vanilla's settings gets a speed-up; each row shows its own settings, and the mix warns."""
    root = tmp_path / "results"

    def settings(attention: str, compile_mode: str):
        def edit(record):
            record["spec"]["model"].update(attn_implementation=attention, compile=compile_mode)
            record["efficiency"]["prefill_ms"] = {"median": 50.0}

        return edit

    _edit_record(write_cell(root, "vanilla", 1.0, {}), settings("sdpa", "no"))
    _edit_record(write_cell(root, "globalcom2", 0.25, {}), settings("eager", "no"))
    _edit_record(write_cell(root, "globalcom2", 0.5, {}), settings("sdpa", "default"))
    _edit_record(write_cell(root, "globalcom2", 0.75, {}), settings("sdpa", "no"))
    with pytest.warns(UserWarning) as caught:
        report = build_report(tidy_results(root), "t1", tmp_path / "out")
    messages = "\n".join(str(w.message) for w in caught)
    assert "attn_implementation differs between cells" in messages and "compile differs" in messages
    (table,) = [t for t in report.tables if t.name.startswith("efficiency")]
    rows = table.frame.set_index("R")
    assert (rows.loc[0.25, "attention"], rows.loc[0.5, "compiled"]) == ("eager", "default")
    assert rows.loc[0.75, "prefill speed-up (x)"] == 1.0
    assert rows.loc[[0.25, 0.5], "prefill speed-up (x)"].isna().all()  # no vanilla of their kind
    assert any(
        n.startswith("No speed-ups for globalcom2 at R = 0.5, globalcom2 at R = 0.25:") for n in table.notes
    )


def test_paper_vs_ours_gives_no_verdict_on_limited_or_random_init_cells(tmp_path):
    root = tmp_path / "results"
    write_cell(root, "globalcom2", 0.25, {"GQA": 60.0})
    _edit_record(
        write_cell(root, "globalcom2", 0.25, {"GQA": 60.0}, experiment="smoke"),
        lambda record: record["spec"]["benchmark"].update(limit=20),
    )
    _edit_record(
        write_cell(root, "globalcom2", 0.25, {"GQA": 60.0}, experiment="random"),
        lambda record: record["spec"]["model"].update(random_init=True),
    )
    frame = tidy_results(root)
    reference = pd.DataFrame(
        [{"model": "7B", "method": "globalcom2", "retention_ratio": 0.25, "column": "GQA", "value": 60.5,
          "source": "paper", "reliability": "primary"}]
    )  # fmt: skip
    assert len(paper_vs_ours(frame[frame["experiment"] == "t1"], reference).frame) == 1
    _edit_record(
        write_cell(root, "globalcom2", 0.25, {"GQA": 60.0}, experiment="lmms"),
        lambda record: record["spec"]["benchmark"].update(protocol="lmms_eval"),
    )
    frame = tidy_results(root)
    for experiment in ("smoke", "random", "lmms"):
        table = paper_vs_ours(frame[frame["experiment"] == experiment], reference)
        assert table.frame.empty and any("1 cell(s) left out" in note for note in table.notes)


def test_a_plot_line_never_joins_two_models():
    frame = pd.DataFrame(
        {
            "model": ["tiny", "tiny", "llava_next_7b", "llava_next_7b"],
            "method": ["globalcom2"] * 4,
            "method_name": ["globalcom2"] * 4,
            "retention_ratio": [0.25, 0.5, 0.25, 0.5],
            "value": [1.0, 2.0, 3.0, 4.0],
        }
    )
    series = plots._series(frame)
    assert [(label, list(rows["value"])) for label, _, _, _, rows in series] == [
        ("llava_next_7b: globalcom2", [3.0, 4.0]),
        ("tiny: globalcom2", [1.0, 2.0]),
    ]
    assert [label for label, *_ in plots._series(frame[frame["model"] == "tiny"])] == ["globalcom2"]


def test_no_two_lines_of_a_figure_look_alike():
    """Every method of the paper's order, and an ablation's variants of one method, get distinct (colour,
    marker) pairs (ten methods on eight colours gave GlobalCom² random's style, and every variant one style)."""
    methods = tables.method_order()
    styles = [plots.method_style(m, m) for m in methods]
    assert len({(s["color"], s["marker"]) for s in styles}) == len(methods)
    assert styles[methods.index("vanilla")]["color"] == "#000000"
    variants = ["globalcom2", "globalcom2 (no global)", "globalcom2 (uniform)", "globalcom2 (thumbnail only)"]
    frame = pd.DataFrame(
        {
            "model": "tiny",
            "method": variants,
            "method_name": "globalcom2",
            "retention_ratio": 0.25,
            "value": 1.0,
        }
    )
    looks = {
        (style["color"], style["marker"])
        for label, name, _, variant, _ in plots._series(frame)
        for style in [plots.method_style(label, name, variant)]
    }
    assert len(looks) == len(variants)


@pytest.mark.parametrize("gpu", ["Tesla V100-SXM2-32GB", "AMD Instinct MI300X", "NVIDIA H100 80GB HBM3"])
def test_any_gpu_name_counts_as_a_gpu_in_the_efficiency_notes(tmp_path, gpu):
    root = tmp_path / "results"
    for method, ratio in (("vanilla", 1.0), ("globalcom2", 0.25)):
        _edit_record(
            write_cell(root, method, ratio, {}),
            lambda record: record["provenance"].update(
                hardware={"gpu": gpu, "machine": "x86_64", "cpu_count": 8}
            ),
        )
    report = build_report(tidy_results(root), "t1", tmp_path / "out")
    (table,) = [t for t in report.tables if t.name.startswith("efficiency")]
    assert not any("CPU timings" in note for note in table.notes) and gpu in table.notes[0]


def test_a_benchmark_of_several_tasks_keeps_each_tasks_score_apart(tmp_path):
    root = tmp_path / "results"
    for method, ratio, scores in (("vanilla", 1.0, (0.5, 0.7)), ("globalcom2", 0.25, (0.4, 0.6))):
        metrics = {"task_a": {"exact_match": scores[0]}, "task_b": {"exact_match": scores[1]}}
        write_cell(root, method, ratio, {}, benchmark="two_tasks", metrics=metrics)
    table = benchmark_table(tidy_results(root), "t1", "two_tasks").frame.set_index("method")
    assert table.loc["globalcom2", "task_a: exact_match"] == pytest.approx(40.0)
    assert table.loc["globalcom2", "task_b: exact_match"] == pytest.approx(60.0)
    assert "exact_match" not in table.columns


def test_only_fractions_are_scaled_and_counts_are_not_plotted(tmp_path):
    """MME's points, MMBench's percent and counts (an MM-Vet cell's judge_pending) are shown as lmms-eval
    reports them; x100 made MME 150000 and 218 pending answers 21800."""
    root = tmp_path / "results"
    for method, ratio in (("vanilla", 1.0), ("globalcom2", 0.25)):
        metrics = {
            "mme_local": {"mme_perception_score": 1500.0 * ratio},
            "pope_adv_local": {"pope_f1_score": 0.8 * ratio},
            "mmvet_local": {"judge_pending": 218.0},
        }
        write_cell(root, method, ratio, {}, benchmark="mixed", metrics=metrics)
    frame = tidy_results(root)
    table = benchmark_table(frame, "t1", "mixed").frame.set_index("method")
    assert table.loc["globalcom2", "mme_local: mme_perception_score"] == pytest.approx(375.0)
    assert table.loc["globalcom2", "pope_adv_local: pope_f1_score"] == pytest.approx(20.0)
    assert table.loc["globalcom2", "mmvet_local: judge_pending"] == pytest.approx(218.0)
    titles = [title for title, _ in plots.panels(frame[frame["experiment"] == "t1"])]
    assert not any("judge_pending" in title for title in titles) and len(titles) == 2
    assert [title for title, _ in plots._accuracy_vs_tflops(frame)] == ["pope_adv_local: pope_f1_score"]


def test_an_average_without_a_column_vanilla_lacks_is_noted(tmp_path):
    """Every row's Avg covered only GQA while the table showed MME too: the vanilla row had no MME."""
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0})
    write_cell(root, "fastv", 0.25, {"GQA": 45.0, "MME (perception)": 1200.0})
    table = table1(tidy_results(root), "llava_next_7b")
    assert table.frame.set_index("method").loc["fastv", AVG] == pytest.approx(75.0)
    assert f"{AVG}: the vanilla row has no MME (perception), so no row's average covers it." in table.notes


def _mmvet_cell(root: Path, method: str, ratio: float, judged: dict | None) -> Path:
    """A finished MM-Vet cell whose record leaves the column to the judge, with the judge's file if given."""
    cell = write_cell(root, method, ratio, {"GQA": 60.0 * ratio}, benchmark="mmvet")

    def pending(record):
        record["paper_metrics"]["MM-Vet"] = {"value": None, "metric": "gpt_eval_score", "pending": "judge"}

    _edit_record(cell, pending)
    samples = cell / "llava" / "20261206_samples_mmvet_local.jsonl"
    samples.parent.mkdir()
    samples.write_text("")
    if judged is not None:
        judged = {"judge": {"samples_file": str(samples)}, **judged}  # as mmvet_judge writes it
        (samples.parent / f"{samples.stem}_judged.json").write_text(json.dumps(judged))
    return cell


def test_a_judged_mmvet_score_enters_table1_and_an_unjudged_one_is_named_pending(tmp_path):
    root = tmp_path / "results"
    judged = {"results": {"mmvet_local": {"gpt_eval_score,none": 31.5}}, "partial": False}
    _mmvet_cell(root, "vanilla", 1.0, judged)
    _mmvet_cell(root, "globalcom2", 0.25, None)
    _mmvet_cell(root, "fastv", 0.25, {**judged, "partial": True})
    _mmvet_cell(
        root, "random", 0.25, {**judged, "judge": {"samples_file": "/elsewhere/x_samples_mmvet_local.jsonl"}}
    )
    table = table1(tidy_results(root), "llava_next_7b")
    shown = table.frame.set_index("method")
    assert shown.loc["vanilla", "MM-Vet"] == pytest.approx(31.5)
    assert shown[["MM-Vet"]].drop(index="vanilla").isna().all().all()
    (note,) = [n for n in table.notes if n.startswith("MM-Vet: pending")]
    assert "globalcom2 R = 0.25 (not judged yet)" in note and "judged a subset (--allow-partial)" in note
    assert (
        "graded /elsewhere/x_samples_mmvet_local.jsonl, not this cell's" in note
    )  # copied in from elsewhere
    assert f"{AVG} of globalcom2 at R = 0.25: over 1 of the 2 columns, without MM-Vet." in table.notes


def test_a_rebuild_removes_the_files_of_tables_it_no_longer_writes(tmp_path):
    root = tmp_path / "results"
    for model in ("llava_next_7b", "llava_next_13b"):
        write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, model=model)
    first = build_report(tidy_results(root), "t1", tmp_path / "out")
    stale = tmp_path / "out" / "tables" / "table1_llava_next_13b.md"
    assert stale in first.files and not first.removed
    (tmp_path / "out" / "tables" / "notes.txt").write_text("mine")  # not a report file: kept
    shutil.rmtree(root / "t1" / "llava_next_13b")
    second = build_report(tidy_results(root), "t1", tmp_path / "out")
    assert stale in second.removed and not stale.exists()
    assert {p.name for p in second.removed} >= {"table1_llava_next_13b.tex", "table1_llava_next_13b.csv"}
    assert all(p.exists() for p in second.files) and (tmp_path / "out" / "tables" / "notes.txt").exists()


def test_agreement_and_the_average_compare_with_one_and_the_same_vanilla_cell(tmp_path):
    """An ablation's second vanilla (``vanilla_eager``) beside ``vanilla``: the Avg and the agreement column
    both measure against the cell labelled ``vanilla``, whichever comes later in path order."""
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, outputs=[[1], [2], [3], [4]])
    write_cell(root, "vanilla", 1.0, {"GQA": 50.0}, outputs=[[9], [9], [9], [4]], name="vanilla_eager")
    write_cell(root, "globalcom2", 0.25, {"GQA": 54.0}, outputs=[[1], [2], [3], [4]])
    frame = tidy_results(root)
    fidelity = frame[frame["kind"] == "fidelity"].set_index(["method", "metric"])["value"]
    assert fidelity[("globalcom2", "agreement_with_vanilla")] == 100.0
    assert fidelity[("vanilla_eager", "agreement_with_vanilla")] == 25.0
    average = table1(frame, "llava_next_7b").frame.set_index("method")[AVG]
    assert average["globalcom2"] == pytest.approx(90.0) and average["vanilla_eager"] == pytest.approx(250 / 3)


def test_make_tables_removes_the_reports_of_an_experiment_whose_cells_are_no_longer_finished(tmp_path):
    """A forced re-run that was interrupted leaves ``.partial/`` where the finished cell was: that
    experiment's old tables go, and a folder with no cell at all (a committed report) stays."""
    from globalcom2.report.__main__ import main

    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0}, experiment="t1")
    cell = write_cell(root, "fastv", 0.25, {"GQA": 40.0}, experiment="t2")
    committed = root / "demo" / "tables" / "demo_demo.md"
    committed.parent.mkdir(parents=True)
    committed.write_text("| committed |")
    (root / "demo" / "tidy.csv").write_text("committed\n")
    main([str(root)])
    old = root / "t2" / "tables" / "table1_llava_next_7b.md"
    assert old.exists() and (root / "t2" / "tidy.csv").exists()
    (cell / "record.json").unlink()
    (cell / ".partial").mkdir()
    main([str(root)])
    assert not old.exists() and not (root / "t2" / "tidy.csv").exists()
    assert (root / "t1" / "tables" / "table1_llava_next_7b.md").exists()
    assert committed.read_text() == "| committed |" and (root / "demo" / "tidy.csv").exists()


def test_markdown_and_latex_show_missing_values_as_dashes_and_escape_what_latex_reads(tmp_path):
    frame = pd.DataFrame(
        {"method": ["a", "b"], "GQA": [61.23456, float("nan")], AVG: [88.52459016393442, "n/a (x)"]}
    )
    table = tables.Table("t", frame, "R ~ 0.25 of {x}", ["tiny model: accuracy is ~0 at 5$ ^2", "in <cell>/"])
    markdown = table.markdown()
    assert "nan" not in markdown.lower() and "–" in markdown
    assert "88.52" in markdown and "88.524" not in markdown and "61.23" in markdown
    latex = table.latex()
    assert "NaN" not in latex and r"\textasciitilde{}0 at 5\$ \textasciicircum{}2" in latex
    assert r"\caption{R \textasciitilde{} 0.25 of \{x\}}" in latex
    assert r"in \textless{}cell\textgreater{}/" in latex  # OT1 would print < > as inverted marks


def test_table1_says_why_textvqa_is_not_comparable_with_the_published_row(tmp_path):
    """The published vanilla TextVQA (64.9) reproduces only without LLaVA's OCR-token line, which the
    llava protocol sends: the column is marked, and the note says why (haotian-liu/LLaVA#1326)."""
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"TextVQA": 61.4, "GQA": 64.0})
    notes = table1(tidy_results(root), "llava_next_7b").notes
    (note,) = [n for n in notes if n.startswith("TextVQA:")]
    assert "OCR-token line" in note and "haotian-liu/LLaVA#1326" in note
    assert not any(n.startswith("GQA:") for n in notes)


def test_a_table_of_lmms_eval_protocol_cells_says_so_and_a_mix_of_protocols_warns(tmp_path):
    root = tmp_path / "results"
    for method, ratio in (("vanilla", 1.0), ("globalcom2", 0.25)):
        _edit_record(
            write_cell(root, method, ratio, {"GQA": 60.0}),
            lambda record: record["spec"]["benchmark"].update(protocol="lmms_eval"),
        )
    frame = tidy_results(root)
    assert any(n.startswith("Protocol lmms_eval:") for n in table1(frame, "llava_next_7b").notes)
    write_cell(root, "fastv", 0.25, {"GQA": 50.0})  # the paper's protocol
    with pytest.warns(
        UserWarning, match=r"protocol differs between cells: llava \(1 cells\), lmms_eval \(2 cells\)"
    ):
        build_report(tidy_results(root), "t1", tmp_path / "out")


def test_paper_vs_ours_gives_no_verdict_on_a_column_that_is_not_comparable(tmp_path):
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"TextVQA": 61.4, "GQA": 64.0})
    reference = pd.DataFrame(
        [{"model": "7B", "method": "vanilla", "retention_ratio": 1.0, "column": c, "value": v,
          "source": "paper", "reliability": "primary"} for c, v in (("TextVQA", 64.9), ("GQA", 64.2))]
    )  # fmt: skip
    table = paper_vs_ours(tidy_results(root), reference)
    verdicts = table.frame.set_index("benchmark")["reproduced"]
    assert verdicts.to_dict() == {"TextVQA": "n/a (not comparable)", "GQA": "yes"}
    assert any(n.startswith("TextVQA, no verdict:") for n in table.notes)


def test_a_plot_shows_the_cell_its_table_shows(tmp_path):
    """Two cells give vanilla's MME (paper_suite, then a later benchmark=mme cell): the plotted vanilla line is
    the later one, as in Table 1, and the method's line has one point per ratio."""
    import matplotlib.pyplot as plt

    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"MME (perception)": 1500.0}, finished="2026-11-21T00:00:00")
    write_cell(
        root, "vanilla", 1.0, {"MME (perception)": 1400.0}, benchmark="mme", finished="2026-11-22T00:00:00"
    )
    write_cell(root, "globalcom2", 0.25, {"MME (perception)": 1300.0}, finished="2026-11-21T00:00:00")
    write_cell(
        root,
        "globalcom2",
        0.25,
        {"MME (perception)": 1200.0},
        benchmark="mme",
        finished="2026-11-20T00:00:00",
    )
    frame = tidy_results(root)
    rows = frame[(frame["kind"] == "paper") & (frame["metric"] == "MME (perception)")]
    figure, ax = plt.subplots()
    plots.plot_against_ratio(ax, rows)
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    plt.close(figure)
    assert list(lines["vanilla"]) == [1400.0, 1400.0] and list(lines["globalcom2"]) == [1300.0]
    with pytest.warns(UserWarning, match="more than one cell"):
        table = table1(frame, "llava_next_7b").frame.set_index("method")
    assert table["MME (perception)"].to_dict() == {"vanilla": 1400.0, "globalcom2": 1300.0}


def test_a_speed_up_never_divides_a_gpu_row_by_a_cpu_vanilla_and_the_tables_say_how_cells_differ(tmp_path):
    """The vanilla ran on the CPU and GlobalCom² on a GPU from another commit: no speed-up is computed across
    them, the table shows each row's hardware, and every table of the experiment notes the differences."""
    root = tmp_path / "results"
    cpu = {"machine": "x86_64", "cpu_count": 2}

    def on(hardware, device, sha):
        def edit(record):
            record["provenance"].update(hardware=hardware, git={"sha": sha, "dirty": sha == "def"})
            record["run"] = {"device": device}
            record["efficiency"].pop("peak_memory_gib")  # a GPU record without the peak: not a CPU

        return edit

    _edit_record(write_cell(root, "vanilla", 1.0, {"GQA": 60.0}), on(cpu, "cpu", "abc"))
    _edit_record(
        write_cell(root, "globalcom2", 0.25, {"GQA": 54.0}), on({**cpu, "gpu": "NVIDIA H100"}, "cuda", "def")
    )
    with pytest.warns(UserWarning, match="hardware differs"):
        report = build_report(tidy_results(root), "t1", tmp_path / "out")
    (efficiency,) = [t for t in report.tables if t.name.startswith("efficiency")]
    rows = efficiency.frame.set_index("method")
    assert rows.loc["globalcom2", "hardware"] == "NVIDIA H100" and rows.loc["vanilla", "hardware"].startswith(
        "CPU"
    )
    assert (
        pd.isna(rows.loc["globalcom2", "prefill speed-up (x)"])
        and rows.loc["vanilla", "prefill speed-up (x)"] == 1
    )
    assert rows["peak allocated (GiB)"].to_dict() == {
        "vanilla": "n/a (CPU)",
        "globalcom2": "n/a (not recorded)",
    }
    for table in report.tables:
        assert any(
            n.startswith("Cells run differently: llava_next_7b: hardware differs") for n in table.notes
        )
        assert "Cells ran from 2 commits: abc (1 cells), def (1 cells)." in table.notes
        assert "1 of 2 cells ran from a checkout with uncommitted changes." in table.notes


def test_a_misspelt_model_benchmark_or_experiment_is_refused_naming_the_valid_ones(tree, tmp_path):
    """A typo gave an empty table whose note advised running vanilla."""
    from globalcom2.report.build import experiment_tables

    frame = tidy_results(tree)
    with pytest.raises(ValueError, match=r"no model 'llava_next_7B' in the results; valid: llava_next_7b"):
        table1(frame, "llava_next_7B")
    with pytest.raises(ValueError, match=r"no benchmark 'gqa' in experiment 't1'; valid: paper_suite"):
        benchmark_table(frame, "t1", "gqa")
    with pytest.raises(ValueError, match=r"no benchmark 'mme' in experiment 't1'; valid: paper_suite"):
        tables.efficiency_table(frame, "t1", "llava_next_7b", "mme")
    with pytest.raises(ValueError, match=r"no finished cells for experiment 'T1'; experiments with some: t1"):
        build_report(frame, "T1", tmp_path / "out")
    with pytest.raises(ValueError, match="experiments with some: t1"):
        experiment_tables(frame, "T1")


def test_large_numbers_are_never_in_scientific_notation_and_table1_prints_one_decimal(tree):
    frame = pd.DataFrame({"method": ["a"], "prefill ms": [123456.7], "GQA": [61.25]})
    table = tables.Table("t", frame, "c", formats={"GQA": ".1f"})
    assert "123457" in table.markdown() and "e+" not in table.markdown() + table.latex()
    assert "61.2" in table.markdown() and "61.25" not in table.latex()
    shown = table1(tidy_results(tree), "llava_next_7b")
    row = next(line for line in shown.markdown().splitlines() if line.startswith("| globalcom2"))
    assert [cell.strip() for cell in row.split("|")[3:6]] == ["54.0", "1200.0", "85.0"]  # (90 + 80) / 2


def test_a_partial_average_says_how_many_columns_it_covers_in_every_output(tree, tmp_path):
    table = table1(tidy_results(tree), "llava_next_7b")
    covered = table.frame.set_index("method")[tables.AVERAGED]
    assert covered.to_dict() == {"vanilla": "2 of 2", "globalcom2": "2 of 2", "fastv": "1 of 2"}
    table.write(tmp_path)
    assert "1 of 2" in (tmp_path / f"{table.name}.csv").read_text()
    assert "1 of 2" in (tmp_path / f"{table.name}.tex").read_text()


def test_the_memory_panel_says_not_recorded_for_a_gpu_record_without_its_peak(tmp_path, monkeypatch):
    root = tmp_path / "results"
    cell = write_cell(root, "vanilla", 1.0, {"GQA": 60.0})
    _edit_record(cell, lambda record: record["efficiency"].pop("peak_memory_gib"))  # an H100 record
    texts = []
    original = plots.save

    def capturing_save(figure, out_dir, name):
        texts.extend(t.get_text() for ax in figure.axes for t in ax.texts)
        return original(figure, out_dir, name)

    monkeypatch.setattr(plots, "save", capturing_save)
    plots.latency_memory(tidy_results(root), tmp_path / "plots")
    assert any(text.startswith("not recorded") for text in texts) and not any("CPU" in t for t in texts)


def test_every_table_names_the_cells_that_resumed_after_an_interruption(tmp_path):
    root = tmp_path / "results"
    write_cell(root, "vanilla", 1.0, {"GQA": 60.0})
    resumed = write_cell(root, "globalcom2", 0.25, {"GQA": 55.0})
    _edit(resumed, lambda record: record["samples"].update(replayed=7))
    frame = tidy_results(root)
    assert sorted(frame.drop_duplicates("cell_dir")["replayed"]) == [0, 7]
    report = build_report(frame, "t1", tmp_path / "out")
    note = (
        "1 of 2 cells resumed after an interruption, their latency and memory mixing two runs: "
        "llava_next_7b globalcom2 r0.25 paper_suite (7 replayed)."
    )
    assert report.tables and all(note in table.notes for table in report.tables)
    _edit(resumed, lambda record: record["samples"].update(replayed=0))
    assert not any(
        "resumed" in n
        for t in build_report(tidy_results(root), "t1", tmp_path / "o2").tables
        for n in t.notes
    )


def test_every_table_names_the_library_versions_where_its_cells_ran_on_several(tmp_path):
    """A cell's identity leaves library versions out, so a sweep continued after an upgrade mixes them."""
    root = tmp_path / "results"
    versions = {"torch": "2.13.0", "transformers": "5.25.0", "tokenizers": "0.23.2", "lmms_eval": "0.7.3"}
    for method, ratio, transformers in (("vanilla", 1.0, "5.25.0"), ("globalcom2", 0.25, "5.23.0")):
        cell = write_cell(root, method, ratio, {"GQA": 60.0})
        _edit(
            cell, lambda r, t=transformers: r["provenance"].update(versions={**versions, "transformers": t})
        )
    old = write_cell(root, "fastv", 0.25, {"GQA": 50.0})  # a record without versions names none
    frame = tidy_results(root)
    by_method = frame.drop_duplicates("cell_dir").set_index("method")["software"]
    assert by_method["vanilla"] == "torch 2.13.0, transformers 5.25.0, tokenizers 0.23.2, lmms-eval 0.7.3"
    assert pd.isna(by_method["fastv"])
    note = (
        "Cells ran on 3 library versions, whose answers and timings may differ: "
        "torch 2.13.0, transformers 5.23.0, tokenizers 0.23.2, lmms-eval 0.7.3 (1 cells); "
        "torch 2.13.0, transformers 5.25.0, tokenizers 0.23.2, lmms-eval 0.7.3 (1 cells); "
        "versions not recorded (1 cells)."
    )
    report = build_report(frame, "t1", tmp_path / "out")
    assert report.tables and all(note in table.notes for table in report.tables)
    shutil.rmtree(old)
    _edit(
        next(root.rglob("globalcom2/**/record.json")).parent,
        lambda r: r["provenance"].update(versions={**versions, "lmms_eval": None}),  # run without lmms-eval
    )
    (note,) = [
        n for n in build_report(tidy_results(root), "t1", tmp_path / "o2").tables[0].notes if "library" in n
    ]
    assert "lmms-eval none (1 cells)" in note
    _edit(
        next(root.rglob("globalcom2/**/record.json")).parent,
        lambda r: r["provenance"].update(versions=versions),
    )
    assert not any(
        "library" in n
        for t in build_report(tidy_results(root), "t1", tmp_path / "o3").tables
        for n in t.notes
    )
