"""``make gpu-checklist``: the steps run in order, each within its limit and the budget, and every step's
files reach the output folder even when a step fails."""

from __future__ import annotations

import json
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest

from globalcom2.perf import gpu_checklist
from globalcom2.perf.gpu_checklist import Step, main


def test_dry_run_lists_the_steps_in_order_of_value(capsys):
    assert main(["--dry-run"]) == 0
    names = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [
        "efficiency_7b_compiled",
        "selection",
        "cuda_syncs",
        "main_path_tests",
        "efficiency_7b",
        "compiled_equivalence",
        "throughput_7b",
        "prefetch_threads",
        "divprune_lockstep",
        "gpu_tests",
        "efficiency_7b_cuda_graphs",
        "throughput_7b_compiled",
        "batch_effect_bf16",
        "efficiency_13b",
    ]
    assert main(["--dry-run", "--carried", ".whl"]) == 0  # the carried wheels are checked before any step
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("carried_wheels ")  # by path: the check imports nothing of the package
    assert first.endswith(f"globalcom2/carry.py --verify {Path('.whl').resolve()}")


def test_every_gpu_marked_test_file_is_run_by_a_checklist_step():
    """A ``gpu`` test that no step runs is never run: the GPU machine runs the checklist, not ``make test``."""
    from globalcom2.paths import PROJECT_ROOT
    from globalcom2.perf import gpu_checklist

    marked = {
        path.relative_to(PROJECT_ROOT).as_posix()
        for path in (PROJECT_ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in path.read_text()
    }
    covered = set()
    for step in gpu_checklist.steps(images=10):
        if step.command[2:3] != ["pytest"]:
            continue
        named = [arg for arg in step.command if arg.startswith("tests")]
        ignored = {arg.split("=", 1)[1] for arg in step.command if arg.startswith("--ignore=")}
        covered |= {
            path
            for path in marked
            if path not in ignored and any(path == n or path.startswith(n.rstrip("/") + "/") for n in named)
        }
    assert marked and covered == marked, sorted(marked - covered)


def test_the_efficiency_steps_declare_the_files_their_benchmark_writes(monkeypatch):
    """A declared output the benchmark does not write would come back as 'not written'; the CUDA-graph step's
    table must land beside the default-mode one, not over it."""
    from globalcom2.perf import efficiency, gpu_checklist

    monkeypatch.setattr(efficiency, "compile_problem", lambda device, mode: None)  # no Triton on this CPU
    for step in gpu_checklist.steps(images=10):
        if step.command[2:3] != ["globalcom2.perf.efficiency"]:
            continue
        args = efficiency.parse_args(step.command[3:])
        stem = args.out / f"llava_next_{args.random_init}_random_init_cuda"
        assert {str(gpu_checklist.RESULTS / name) for name in step.outputs} == {
            f"{stem}.md",
            f"{stem}.json",
        }, step.name
    plan = {s.name: s for s in gpu_checklist.steps(images=10)}
    args = efficiency.parse_args(plan["efficiency_7b_cuda_graphs"].command[3:])
    assert args.compile_mode == ["reduce-overhead"] and args.images == 5 and args.attention == ["sdpa"]
    eager = efficiency.parse_args(plan["efficiency_7b"].command[3:])  # every variant, both attentions
    assert not eager.compile_mode and eager.attention == ["sdpa", "eager"]
    assert eager.variants == efficiency.default_variants()
    compiled = efficiency.parse_args(plan["efficiency_7b_compiled"].command[3:])
    assert compiled.compile_mode == ["default"] and compiled.attention == ["sdpa"]
    assert ("vanilla", 1.0) in compiled.variants and ("globalcom2", 0.1) in compiled.variants
    # in one call's budget (540 s), the targets' table and then selection, syncs and the main path start
    # even if each step before them runs to its limit
    first = ["efficiency_7b_compiled", "selection", "cuda_syncs", "main_path_tests"]
    for index, name in enumerate(first):
        assert 540 - sum(plan[n].limit_s for n in first[:index]) >= plan[name].min_s, name
    # the 13B table measures the targets' variants, not all 21 twice over
    assert efficiency.parse_args(plan["efficiency_13b"].command[3:]).variants == compiled.variants


def test_the_throughput_steps_declare_the_files_their_benchmark_writes():
    """Eager and compiled throughput tables have the same name, so they must go to different folders."""
    from globalcom2.perf import gpu_checklist, throughput

    folders = set()
    for step in gpu_checklist.steps(images=10):
        if step.command[2:3] != ["globalcom2.perf.throughput"]:
            continue
        args = throughput.parse_args(step.command[3:])
        folders.add(args.out)
        stem = args.out / throughput.output_name(args, "cuda")
        assert {str(gpu_checklist.RESULTS / name) for name in step.outputs} == {
            f"{stem}.md",
            f"{stem}.json",
        }, step.name
    assert len(folders) == 2


def test_the_prefetch_threads_step_declares_the_files_its_benchmark_writes():
    from globalcom2.lmms import prefetch_threads

    (step,) = [s for s in gpu_checklist.steps(images=10) if s.name == "prefetch_threads"]
    stem = prefetch_threads.output_stem(prefetch_threads.parse_args(step.command[3:]))
    assert {str(gpu_checklist.RESULTS / name) for name in step.outputs} == {f"{stem}.md", f"{stem}.json"}


def test_a_failing_step_does_not_stop_the_next_and_only_fresh_outputs_are_packed(tmp_path, monkeypatch):
    results = tmp_path / "results"
    (results / "efficiency").mkdir(parents=True)
    (results / "efficiency" / "old.md").write_text("| from an earlier run |")
    monkeypatch.setattr(gpu_checklist, "RESULTS", results)
    write = f"open({str(results / 'efficiency' / 'table.md')!r}, 'w').write('| a |'); print('measured')"
    plan = [
        Step("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30),
        Step("writes", [sys.executable, "-c", write], 30, ("efficiency/table.md",)),
        Step("stale", [sys.executable, "-c", "1"], 30, ("efficiency/old.md",)),
        Step("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 1),
    ]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--budget-s", "600"]) == 1
    log = (out / "checklist.log").read_text()
    assert "===== fails" in log and "measured" in log and "===== slow" in log
    with tarfile.open(out / "results.tar.gz") as archive:
        assert archive.getnames() == ["results/efficiency/table.md"]  # not the stale table
        assert archive.extractfile("results/efficiency/table.md").read() == b"| a |"
    report = json.loads((out / "checklist.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in report] == [
        ("fails", "exit 3"),
        ("writes", "ok"),
        ("stale", "ok"),
        ("slow", "timed out"),  # its own limit
    ]
    assert sorted(p.name for p in out.iterdir()) == ["checklist.json", "checklist.log", "results.tar.gz"]


def test_a_step_starts_only_with_its_minimum_left(tmp_path, monkeypatch):
    """A step that cannot reach its first useful output in what is left of the budget is skipped, saying so,
    and a cheaper one after it still runs."""
    plan = [
        Step("spends", [sys.executable, "-c", "import time; time.sleep(2)"], 30),
        Step("big", [sys.executable, "-c", "1"], 30, min_s=100),
        Step("small", [sys.executable, "-c", "1"], 30),
    ]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--budget-s", "90"]) == 0
    report = json.loads((out / "checklist.json").read_text())["steps"]
    assert [s["step"] for s in report] == ["spends", "big", "small"]
    assert report[1]["status"].startswith("skipped: ") and report[1]["status"].endswith("it needs 100 s")
    assert report[2]["status"] == "ok"


def test_a_step_stopped_by_the_budget_is_not_reported_as_over_its_own_limit(tmp_path, monkeypatch):
    """A step cut at the budget's end may be well inside its own limit: the report must say which, or a slow
    step reads as a hung one."""
    plan = [Step("long", [sys.executable, "-c", "import time; time.sleep(30)"], 300, min_s=1)]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    assert main(["--out", str(tmp_path / "out"), "--budget-s", "2"]) == 1
    (report,) = json.loads((tmp_path / "out" / "checklist.json").read_text())["steps"]
    assert (
        report["status"].startswith("timed out: the budget ended (") and "of its 300 s)" in report["status"]
    )
    assert report["seconds"] < 10


def test_a_timed_out_step_takes_its_children_with_it(tmp_path, monkeypatch):
    """A benchmark's globalcom2.run cells are its children: left running, they would slow the next step."""
    pid_file = tmp_path / "child.pid"
    spawn = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    plan = [Step("spawns", [sys.executable, "-c", spawn], 2)]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    assert main(["--out", str(tmp_path / "out"), "--budget-s", "600"]) == 1
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init: gone within moments of the SIGKILL
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} outlived the step")


def test_only_and_skip_select_steps_and_refuse_unknown_names(capsys):
    assert main(["--dry-run", "--only", "selection", "throughput_7b", "--carried", ".whl"]) == 0
    names = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["carried_wheels", "selection", "throughput_7b"]  # the wheels' check stays first
    assert main(["--dry-run", "--skip", "efficiency_7b_compiled", "selection"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("cuda_syncs ")
    with pytest.raises(
        SystemExit, match="unknown step 'selektion'; valid: efficiency_7b_compiled, selection"
    ):
        main(["--dry-run", "--only", "selektion"])


def test_steps_run_offline_unless_the_caller_says_otherwise(tmp_path, monkeypatch):
    show = "import os; print('env', os.environ['HF_HUB_OFFLINE'], os.environ['WANDB_MODE'])"
    monkeypatch.setattr(
        gpu_checklist, "steps", lambda images, carried=None: [Step("env", [sys.executable, "-c", show], 30)]
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["--out", str(tmp_path), "--budget-s", "600"]) == 0
    assert "env 1 disabled" in (tmp_path / "checklist.log").read_text()


def test_relative_pythonpath_entries_hold_in_any_directory_a_step_starts_a_process_in(tmp_path, monkeypatch):
    """The device runs the checklist with ``PYTHONPATH=.:/tmp/site``; a test that starts a process in its scratch
    folder must still import the checkout."""
    caller = tmp_path / "checkout"
    caller.mkdir()
    (caller / "probe_module.py").write_text("WHERE = 'caller'\n")
    child = "import probe_module; print('found', probe_module.WHERE)"
    command = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], cwd='/', check=True)"
    )
    monkeypatch.setattr(
        gpu_checklist,
        "steps",
        lambda images, carried=None: [Step("probe", [sys.executable, "-c", command], 30)],
    )
    monkeypatch.chdir(caller)
    monkeypatch.setenv("PYTHONPATH", ".")
    out = tmp_path / "out"
    assert main(["--out", str(out), "--budget-s", "600"]) == 0
    assert "found caller" in (out / "checklist.log").read_text()


def test_no_step_starts_without_budget_and_a_checklist_that_measured_nothing_fails(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        gpu_checklist, "steps", lambda images, carried=None: [Step("x", [sys.executable, "-c", "1"], 30)]
    )
    assert main(["--out", str(tmp_path), "--budget-s", "10"]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"\[skip\] x: (9|10) s of the budget left, it needs 30 s", printed), printed
    assert "no step ran: nothing was measured" in printed


def test_failed_carried_wheels_skip_the_main_path_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    """lmms-eval and Hydra would run at versions nothing was tested on; the benchmarks check their own stack
    (a transformers outside the pinned range is refused at every load), and a mismatch only lmms-eval reads
    must not cost the efficiency tables."""
    plan = [
        Step("carried_wheels", [sys.executable, "-c", "raise SystemExit(1)"], 30),
        Step("efficiency", [sys.executable, "-c", "1"], 30),
        Step("throughput", [sys.executable, "-c", "1"], 30, main_path=True),
    ]
    monkeypatch.setattr(gpu_checklist, "steps", lambda images, carried=None: plan)
    assert main(["--out", str(tmp_path), "--budget-s", "600"]) == 1
    printed = capsys.readouterr().out
    assert "[ok] efficiency" in printed
    assert "[skip] throughput: the carried wheels failed" in printed
    steps = json.loads((tmp_path / "checklist.json").read_text())["steps"]
    assert [s["status"].split(":")[0] for s in steps] == ["exit 1", "ok", "skipped"]


def test_the_steps_that_run_the_main_path_are_marked_so():
    """A step marked ``main_path`` is skipped when the carried wheels fail; an unmarked one that runs
    ``globalcom2.run`` or the plugin would then run on an untested lmms-eval."""
    for step in gpu_checklist.steps(images=10):
        needs_lmms_eval = any(
            name in step.command
            for name in (
                "globalcom2.perf.throughput",
                "globalcom2.lmms.prefetch_threads",
                "tests/gpu/test_run_on_gpu.py",
            )
        )
        assert step.main_path == needs_lmms_eval, step.name


def test_sigterm_kills_the_running_step_and_still_packs_what_it_wrote(tmp_path):
    """The device tool's time limit sends SIGTERM: the step's phase that finished comes back, the step's
    process is gone, the later steps are marked skipped, and the exit status names the signal."""
    import os
    import signal
    import subprocess

    results, out, pid_file = tmp_path / "results", tmp_path / "out", tmp_path / "step.pid"
    (results / "efficiency").mkdir(parents=True)
    write = (
        "import os, time; "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        f"open({str(results / 'efficiency' / 'phase1.md')!r}, 'w').write('| phase 1 |'); time.sleep(60)"
    )
    driver = f"""
import sys
from globalcom2.perf import gpu_checklist
from globalcom2.perf.gpu_checklist import Step
gpu_checklist.RESULTS = __import__("pathlib").Path({str(results)!r})
plan = [
    Step("measures", [sys.executable, "-c", {write!r}], 120, ("efficiency/phase1.md",)),
    Step("later", [sys.executable, "-c", "1"], 30),
]
gpu_checklist.steps = lambda images, carried=None: plan
raise SystemExit(gpu_checklist.main(["--out", {str(out)!r}, "--budget-s", "600"]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(gpu_checklist.__file__).parents[2])}
    process = subprocess.Popen([sys.executable, "-c", driver], env=env)
    for _ in range(300):  # the step has written its first phase
        if pid_file.exists() and (results / "efficiency" / "phase1.md").exists():
            break
        time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError("the step never started")
    running = json.loads((out / "checklist.json").read_text())["steps"]
    assert running == [{"step": "measures", "status": "running", "seconds": 0.0}]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    report = json.loads((out / "checklist.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in report] == [
        ("measures", f"interrupted (signal {int(signal.SIGTERM)})"),
        ("later", f"skipped: the checklist was interrupted (signal {int(signal.SIGTERM)})"),
    ]
    with tarfile.open(out / "results.tar.gz") as archive:
        assert archive.extractfile("results/efficiency/phase1.md").read() == b"| phase 1 |"
    step = int(pid_file.read_text())
    for _ in range(50):
        if not Path(f"/proc/{step}").exists() or "Z" in Path(f"/proc/{step}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step {step} outlived the checklist")
