"""Helpers for the lmms-eval integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from globalcom2.data.benchmarks import DEMO_TASK, all_local_tasks

ALL_TASKS = [*all_local_tasks(), DEMO_TASK]
REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python <args>`` with the test environment (offline, fixture data); output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["WANDB_MODE"] = "disabled"
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
