"""Processes and secrets: a killed ``globalcom2.run`` takes its worker group with it, and no credential
reaches the console or a file we write. Real subprocesses, the way users and Slurm run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST = ["benchmark=demo", "benchmark.gen_kwargs='max_new_tokens=2'", "method=random"]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies have none)."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if pid != os.getpid() and text in _cmd(pid)]


def wait_for(condition, timeout: float, what: str, detail=lambda: "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}{detail()}"
        time.sleep(0.2)


def describe(pids: list[int]) -> str:
    """``; still alive:`` each process's state, parent and command line, for a failure message."""
    lines = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            lines.append(f"pid {pid} state {stat[0]} ppid {stat[1]}: {_cmd(pid)[:200]}")
        except OSError:
            continue
    return "; still alive: " + " | ".join(lines) if lines else ""


@pytest.mark.parametrize(
    "signum",
    [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["SIGKILL", "SIGTERM"],
)
def test_killing_the_parent_ends_its_worker_group(tmp_path, signum):
    results = tmp_path / "results"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "globalcom2.run",
            *FAST,
            "benchmark.limit=60",
            "launcher=accelerate",
            "launcher.num_processes=2",
        ],
        env={**os.environ, "GLOBALCOM2_RESULTS": str(results)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = str(results)  # every launcher and worker command line names its cell's .partial/ folder
    try:
        wait_for(
            lambda: len([p for p in processes_mentioning(marker) if "globalcom2.worker" in _cmd(p)]) >= 2,
            240,
            "two workers",
        )
        os.kill(parent.pid, signum)
        parent.wait(timeout=60)
        wait_for(
            lambda: not processes_mentioning(marker),
            60,
            "the worker group to end",
            lambda: describe(processes_mentioning(marker)),
        )
    finally:
        for pid in processes_mentioning(marker):
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        with _suppress():
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert not list(results.rglob("record.json"))


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _suppress():
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


SECRETS = {
    "HF_TOKEN": "hf_" + "FakeTokenForTheLeakTest" * 2,
    "OPENAI_API_KEY": "sk-" + "FakeOpenAIKeyForTheLeakTest",
    "WANDB_API_KEY": "0123456789abcdef" * 2 + "fakewandb",
}


@pytest.mark.slow
def test_no_secret_reaches_the_console_or_any_file(tmp_path):
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "GLOBALCOM2_RESULTS": str(tmp_path / "results")}
    evaluation = subprocess.run(
        [
            *(sys.executable, "-m", "globalcom2.lmms", "--model", "globalcom2_llava_next"),
            *(
                "--model_args",
                "pretrained=tiny,method=random,retention_ratio=0.5",
                "--tasks",
                "globalcom2_demo",
            ),
            *("--limit", "1", "--gen_kwargs", "max_new_tokens=2", "--log_samples"),
            *("--output_path", str(tmp_path / "cli")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    # lmms-eval did log its tracker arguments, token included: masked
    assert "Evaluation tracker args" in evaluation.stdout + evaluation.stderr
    run = subprocess.run(
        [sys.executable, "-m", "globalcom2.run", *FAST, "benchmark.limit=1", "logger=wandb"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    texts = {"console": evaluation.stdout + evaluation.stderr + run.stdout + run.stderr}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "record.json" for p in files)
    texts.update({str(p): p.read_bytes().decode("utf-8", "replace") for p in files})
    leaks = [
        (where, name) for where, text in texts.items() for name, value in SECRETS.items() if value in text
    ]
    assert not leaks


def test_a_rank_whose_launcher_died_before_it_started_exits_at_once(tmp_path):
    """The launcher can die while a rank still imports (seconds; under load, more): the rank is adopted
    before its ``main`` runs, so a death signal set against its parent then would wait for init. It must
    see that its launcher is gone and exit, here before it reads its spec: a FIFO nobody writes, on which
    a rank that carried on would block for ever. (This race left two ranks running in CI.)"""
    spec = tmp_path / "spec.fifo"
    os.mkfifo(spec)
    env = {**os.environ, "GLOBALCOM2_RUN_PID": str(os.getpid())}
    launcher = subprocess.run(  # starts the rank in the background and exits: the rank is orphaned at once
        [
            "sh",
            "-c",
            f'"{sys.executable}" -m globalcom2.worker "{spec}" "{tmp_path}" </dev/null >/dev/null 2>&1 & echo $!',
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rank = int(launcher.stdout.strip())
    try:
        wait_for(
            lambda: not Path(f"/proc/{rank}").exists() or _zombie(rank), 120, "the orphaned rank to exit"
        )
    finally:
        with _suppress():
            os.kill(rank, signal.SIGKILL)


def test_a_rank_knows_its_launcher_from_an_adopter():
    """``launcher_is_alive``: under ``globalcom2.run`` the parent must be a child of its pid; outside it, the
    parent must be the one the rank started under, whatever its pid (a launcher that is pid 1 in a container
    is alive). The check runs in a process whose parent is a shell started here."""
    code = (
        "import os, sys; from globalcom2.worker import launcher_is_alive; "
        "print(launcher_is_alive(int(sys.argv[1])), launcher_is_alive(int(sys.argv[1]) + 999999), "
        "launcher_is_alive(None), launcher_is_alive(None, os.getppid() + 1), "
        "launcher_is_alive(None, 1) == (os.getppid() == 1))"
    )
    shell = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "{code}" {os.getpid()}; true'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.split() == ["True", "False", "True", "False", "True"]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
