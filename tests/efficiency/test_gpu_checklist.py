"""``make gpu-checklist``: the steps run in order, each within its limit and the budget, and every step's
files reach the output folder even when a step fails."""

from __future__ import annotations

import sys
from pathlib import Path

from globalcom2.perf import gpu_checklist
from globalcom2.perf.gpu_checklist import Step, main


def test_dry_run_lists_the_steps_in_order_of_value(capsys):
    assert main(["--dry-run"]) == 0
    names = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [
        "efficiency_7b",
        "gpu_tests",
        "selection",
        "throughput_7b",
        "batch_effect_bf16",
        "main_path_tests",
        "efficiency_13b",
    ]
    assert main(["--dry-run", "--carried", ".whl"]) == 0  # the carried wheels are checked before any step
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("carried_wheels ")  # by path: the check imports nothing of the package
    assert first.endswith(f"globalcom2/carry.py --verify {Path('.whl').resolve()}")


def test_a_failing_step_does_not_stop_the_next_and_outputs_are_copied(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table.md").write_text("| a |")
    monkeypatch.setattr(gpu_checklist, "RESULTS", results)
    plan = [
        Step("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30),
        Step("writes", [sys.executable, "-c", "print('measured')"], 30, ("table.md",)),
        Step("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 1),
    ]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--budget-s", "600"]) == 1
    log = (out / "checklist.log").read_text()
    assert "===== fails" in log and "measured" in log and "===== slow" in log
    assert (out / "table.md").read_text() == "| a |"
    assert sorted(p.name for p in out.iterdir()) == ["checklist.log", "table.md"]


def test_no_step_starts_without_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        gpu_checklist, "steps", lambda images, carried=None: [Step("x", [sys.executable, "-c", "1"], 30)]
    )
    assert main(["--out", str(tmp_path), "--budget-s", "10"]) == 0
    assert "[skip] x" in capsys.readouterr().out


def test_failed_carried_wheels_skip_the_main_path_steps_only(tmp_path, monkeypatch, capsys):
    plan = [
        Step("carried_wheels", [sys.executable, "-c", "raise SystemExit(1)"], 30),
        Step("efficiency", [sys.executable, "-c", "1"], 30),
        Step("throughput", [sys.executable, "-c", "1"], 30, main_path=True),
    ]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    assert main(["--out", str(tmp_path), "--budget-s", "600"]) == 1
    printed = capsys.readouterr().out
    assert "[ok] efficiency" in printed and "[skip] throughput: the carried wheels failed" in printed
