"""``python -m globalcom2.run`` end to end on the tiny model and the demo task: multirun, resume after a
kill, force, and data parallelism. Runs as subprocesses, the way users and Slurm run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_globalcom2

FAST = ["benchmark=demo", "benchmark.gen_kwargs='max_new_tokens=2'"]


def run(
    tmp_path: Path, *overrides: str, multirun: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    arguments = [*(["-m"] if multirun else []), *FAST, *overrides]
    done = run_globalcom2(tmp_path / "results", *arguments, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def records(tmp_path: Path) -> dict[str, dict]:
    """``{"<experiment>/<model>/<method>/r<ratio>/<benchmark>": record}``: one identity per key here."""
    found = {}
    for path in sorted((tmp_path / "results").rglob("record.json")):
        key = str(path.parent.parent.relative_to(tmp_path / "results"))
        assert key not in found, f"two finished identities of {key}"
        found[key] = json.loads(path.read_text())
    return found


@pytest.mark.slow
def test_multirun_of_two_methods_and_two_ratios_gives_four_complete_cells(tmp_path):
    out = run(tmp_path, "method=random,globalcom2", "method.retention_ratio=0.5,0.25", "benchmark.limit=3")
    cells = records(tmp_path)
    assert sorted(cells) == [
        "default/tiny/globalcom2/r0.25/demo",
        "default/tiny/globalcom2/r0.5/demo",
        "default/tiny/random/r0.25/demo",
        "default/tiny/random/r0.5/demo",
    ]
    for name, record in cells.items():
        assert record["status"] == "complete" and record["n_samples"] == {"globalcom2_demo": 3}, name
        assert record["provenance"]["git"]["sha"] and record["provenance"]["versions"]["lmms_eval"]
        assert record["run"]["seed"] == 0 and record["run"]["batch_size"] == 1
        assert record["run"]["attn_implementation"] == {"text_config": "sdpa", "vision_config": "sdpa"}
        efficiency = record["efficiency"]
        assert efficiency["peak_memory_gib"] is None and "CPU" in efficiency["peak_memory_note"]
        # three calls: the first is reported apart; every stage of the other two is there, within the total
        assert efficiency["first_call"]["calls"] == 1 and efficiency["timed_calls"] == 2
        stages = efficiency["stages_ms"]
        assert set(stages) == {"vision", "compression", "llm_prefill", "decode", "other"}
        assert all(stages[s]["median"] > 0 for s in ("vision", "compression", "llm_prefill"))
        assert sum(stages[s]["mean"] for s in stages) == pytest.approx(efficiency["total_ms"]["mean"])
        assert efficiency["text_tokens"] > 0
        cell = Path(record["cell"]["path"])
        assert cell.parent == tmp_path / "results" / name and cell.name == record["cell"]["id"]
        assert (cell / record["files"]["results"]).is_file() and (cell / record["files"]["records"]).is_file()
        assert not (cell / ".partial").exists() and not (cell / ".lock").exists()
    assert out.stdout.count("[ok]") == 4

    # A second launch finds every cell finished and runs none; force=true re-runs one.
    again = run(tmp_path, "method=random,globalcom2", "method.retention_ratio=0.5,0.25", "benchmark.limit=3")
    assert again.stdout.count("[done]") == 4 and "[run]" not in again.stdout
    assert records(tmp_path) == cells
    run(
        tmp_path,
        "method=random",
        "method.retention_ratio=0.5",
        "benchmark.limit=3",
        "force=true",
        multirun=False,
    )
    after = records(tmp_path)
    assert (
        after["default/tiny/random/r0.5/demo"]["finished"]
        > cells["default/tiny/random/r0.5/demo"]["finished"]
    )
    assert after["default/tiny/random/r0.25/demo"] == cells["default/tiny/random/r0.25/demo"]


@pytest.mark.slow
def test_a_sweep_killed_mid_cell_resumes_without_rerunning_finished_cells(tmp_path):
    env = {**os.environ, "GLOBALCOM2_RESULTS": str(tmp_path / "results")}
    sweep = ["method=random", "method.retention_ratio=0.5,0.25", "benchmark.limit=40"]
    first = tmp_path / "results/default/tiny/random/r0.5/demo"
    second = tmp_path / "results/default/tiny/random/r0.25/demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "globalcom2.run", "-m", *FAST, *sweep],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 400
        while not (list(first.glob("*/record.json")) and answered(second) >= 5):
            assert process.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline, "the sweep never reached its second cell's fifth answer"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # well inside the second cell's 40 samples
    finally:
        process.wait()
    killed = records(tmp_path)
    assert list(killed) == ["default/tiny/random/r0.5/demo"], "a killed cell must never pass as finished"
    (second_cell,) = second.iterdir()
    assert (second_cell / ".partial").exists() and not (second_cell / "record.json").exists()
    kept = answered(second)  # batches of one: one answer per journaled line
    assert 5 <= kept < 40

    out = run(tmp_path, *sweep)
    resumed = records(tmp_path)
    assert resumed["default/tiny/random/r0.5/demo"] == killed["default/tiny/random/r0.5/demo"]  # not re-run
    assert "[done]" in out.stdout and out.stdout.count("[run]") == 1
    cell = resumed["default/tiny/random/r0.25/demo"]
    assert cell["n_samples"] == {"globalcom2_demo": 40}
    assert cell["samples"]["replayed"] == kept  # the killed run's answers, not generated again
    assert not (second_cell / ".partial").exists() and not (second_cell / ".lock").exists()
    assert not (second_cell / ".answers").exists()  # its answers are in the finished cell now

    # the same cell run without a kill, under another experiment name: the same answers and scores
    run(
        tmp_path,
        "method=random",
        "method.retention_ratio=0.25",
        "benchmark.limit=40",
        "experiment_name=whole",
    )
    whole = records(tmp_path)["whole/tiny/random/r0.25/demo"]
    assert whole["metrics"] == cell["metrics"] and whole["samples"]["replayed"] == 0

    def answers(record):
        path = Path(record["cell"]["path"]) / record["files"]["records"]
        return [
            (row["doc_id"], row["output_token_ids"]) for row in map(json.loads, path.read_text().splitlines())
        ]

    assert answers(cell) == answers(whole)


def answered(key_dir: Path) -> int:
    """Whole lines in the answers journal of the one cell under ``key_dir`` (0 before it has one)."""
    journals = list(key_dir.glob("*/.answers/rank0.jsonl"))
    return journals[0].read_bytes().count(b"\n") if journals else 0


@pytest.mark.slow
def test_two_processes_write_one_record_with_the_scores_of_one(tmp_path):
    common = ["method=random", "method.retention_ratio=0.25", "benchmark.limit=6"]
    run(tmp_path / "one", *common, "experiment_name=dp", multirun=False)
    run(
        tmp_path / "two",
        *common,
        "experiment_name=dp",
        "launcher=accelerate",
        "launcher.num_processes=2",
        multirun=False,
    )
    (one,) = records(tmp_path / "one").values()
    (two,) = records(tmp_path / "two").values()
    assert two["run"]["world_size"] == 2 and one["run"]["world_size"] == 1
    assert one["metrics"] == two["metrics"]

    def answers(root: Path, record: dict) -> dict:
        cell = root / "results" / record["cell"]["path"].split("/results/", 1)[1]
        lines = (cell / record["files"]["records"]).read_text().splitlines()
        return {r["doc_id"]: r["output_token_ids"] for r in map(json.loads, lines)}

    assert answers(tmp_path / "one", one) == answers(tmp_path / "two", two)
    assert len(list((tmp_path / "two" / "results").rglob("record.json"))) == 1


@pytest.mark.slow
def test_a_two_process_cell_killed_mid_way_resumes_with_the_answers_of_one_process(tmp_path):
    """Each rank journals its own batches; the resumed group replays them (a rank reads every rank's file)
    and generates the rest, and the finished cell answers as one uninterrupted process does."""
    common = ["method=random", "method.retention_ratio=0.25", "benchmark.limit=24", "experiment_name=dp"]
    run(tmp_path / "one", *common, multirun=False)
    two = ["launcher=accelerate", "launcher.num_processes=2"]
    results = tmp_path / "two" / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "globalcom2.run", *FAST, *common, *two],
        env={**os.environ, "GLOBALCOM2_RESULTS": str(results)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 400
        while journaled(results) < 4:
            assert process.poll() is None, "the cell ended before it could be interrupted"
            assert time.time() < deadline, "the cell never journaled four answers"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    kept = journaled(results)
    assert 4 <= kept < 24 and not list(results.rglob("record.json"))
    deadline = time.time() + 60  # the ranks die with their launcher (globalcom2.worker.die_with_launcher)
    while (done := run_globalcom2(results, *FAST, *common, *two)).returncode != 0:
        assert "worker process of an earlier run" in done.stdout + done.stderr, done.stderr[-3000:]
        assert time.time() < deadline, "the killed ranks never ended"
        time.sleep(1.0)
    (one,) = records(tmp_path / "one").values()
    (resumed,) = records(tmp_path / "two").values()
    assert resumed["run"]["world_size"] == 2 and resumed["samples"]["replayed"] == kept
    assert resumed["metrics"] == one["metrics"]

    def answers(record: dict) -> dict:
        lines = (Path(record["cell"]["path"]) / record["files"]["records"]).read_text().splitlines()
        return {r["doc_id"]: r["output_token_ids"] for r in map(json.loads, lines)}

    assert answers(resumed) == answers(one)


def journaled(results: Path) -> int:
    """Whole lines in every rank's answers journal under ``results``."""
    return sum(path.read_bytes().count(b"\n") for path in results.rglob(".answers/rank*.jsonl"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=random", "method.retention_ratio=1.5"], r"retention_ratio must be in \(0, 1\]"),
        (["method=globalcom3"], "Available options"),
        (["model=llava_next_13b"], "not in the local Hugging Face cache"),
    ],
)
def test_bad_input_fails_before_anything_loads(tmp_path, overrides, message):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HYDRA_FULL_ERROR": "1"}
    done = run_globalcom2(tmp_path / "results", *FAST, *overrides, timeout=300, env=env)
    assert done.returncode != 0
    import re

    assert re.search(message, done.stdout + done.stderr), done.stderr[-2000:]
    assert not list((tmp_path / "results").rglob("record.json"))
    assert "generate" not in done.stderr  # no evaluation started
