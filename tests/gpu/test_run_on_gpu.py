"""The user's whole path on a GPU: ``python -m globalcom2.run`` -> lmms-eval -> plugin, locally and through
``launcher=accelerate``, against the same cell run on the CPU in fp32.

Tolerance, stated: fp32 on both devices still differs by rounding (cuDNN runs the vision tower's patch
convolution in TF32 by default, and the kernels sum in other orders), and a greedy decode can turn on a near
tie. So at least 90 % of the answers must be identical token for token, and each accuracy may move by no
more than the answers that differ can move it: ``changed / n`` for a metric over ``n`` items (24 in all, 8 of
each question type). With two GPUs, ``launcher=accelerate`` must give exactly the local run's answers.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import run_globalcom2

from globalcom2.data import demo

pytestmark = pytest.mark.gpu
CELL = [
    "model=tiny_trained",
    "benchmark=demo",
    "benchmark.limit=24",
    "method=globalcom2",
    "method.retention_ratio=0.25",
    "experiment_name=gpu_path",
]


def run_cell(root: Path, *overrides: str) -> dict:
    """One cell in its own process; returns its ``record.json`` with its answers under ``"answers"``."""
    done = run_globalcom2(root, *CELL, *overrides, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (path,) = root.rglob("record.json")
    record = json.loads(path.read_text())
    lines = (path.parent / record["files"]["records"]).read_text().splitlines()
    record["answers"] = {row["doc_id"]: row["output_token_ids"] for row in map(json.loads, lines)}
    return record


@pytest.fixture(scope="module")
def cpu_record(tmp_path_factory) -> dict:
    return run_cell(tmp_path_factory.mktemp("cpu"), "model.device=cpu")


@pytest.fixture(scope="module")
def gpu_record(tmp_path_factory) -> dict:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device (make test-gpu on a GPU machine)"
    return run_cell(tmp_path_factory.mktemp("gpu"), "model.device=cuda")


def agreement(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return sum(a[k] == b[k] for k in a) / len(a)


def test_a_cell_on_cuda_answers_as_on_the_cpu_and_records_the_gpu(cpu_record, gpu_record):
    assert gpu_record["run"]["device"].startswith("cuda") and cpu_record["run"]["device"] == "cpu"
    assert gpu_record["run"]["dtype"] == "torch.float32"
    assert agreement(cpu_record["answers"], gpu_record["answers"]) >= 0.9
    changed = sum(cpu_record["answers"][k] != gpu_record["answers"][k] for k in cpu_record["answers"])
    per_type = Counter(
        item.question_type for item in demo.generate_items("test")[: len(cpu_record["answers"])]
    )
    for task, metrics in cpu_record["metrics"].items():
        for name, value in metrics.items():
            if name.endswith("_accuracy") or name == "exact_match":
                items = (
                    per_type[name.removesuffix("_accuracy")]
                    if name != "exact_match"
                    else sum(per_type.values())
                )
                assert abs(gpu_record["metrics"][task][name] - value) <= changed / items + 1e-9, (task, name)
    efficiency = gpu_record["efficiency"]
    assert efficiency["peak_memory_gib"]["max"] > 0 and efficiency["peak_memory_reserved_gib"]["max"] > 0
    assert "CPU" not in (efficiency["peak_memory_note"] or "")
    assert gpu_record["provenance"]["hardware"]["gpu"]
    assert cpu_record["efficiency"]["peak_memory_gib"] is None


def test_bf16_on_cuda_is_recorded_as_bf16_with_less_memory(gpu_record, tmp_path):
    bf16 = run_cell(tmp_path, "model.device=cuda", "model.dtype=bfloat16")
    assert bf16["run"]["dtype"] == "torch.bfloat16"
    assert bf16["efficiency"]["peak_memory_gib"]["max"] < gpu_record["efficiency"]["peak_memory_gib"]["max"]
    assert len(bf16["answers"]) == len(gpu_record["answers"])


def test_launcher_accelerate_on_cuda_gives_the_local_answers(gpu_record, tmp_path):
    """Two ranks, one GPU each. A single process runs in the Hydra process itself (``globalcom2/run.py``
    ``execute``), so it would not exercise the worker group: with one GPU this test cannot run."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for a two-rank accelerate group, found {torch.cuda.device_count()}")
    launched = run_cell(tmp_path, "launcher=accelerate", "launcher.num_processes=2", "model.device=cuda")
    assert launched["run"]["world_size"] == 2
    assert launched["run"]["device"].startswith("cuda")
    assert launched["answers"] == gpu_record["answers"]
    assert launched["metrics"] == gpu_record["metrics"]
