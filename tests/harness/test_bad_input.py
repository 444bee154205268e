"""Bad input to ``globalcom2.run`` is refused before any weight loads, in one line that names the value and
what is valid; a traceback only with HYDRA_FULL_ERROR=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, write_llava15_checkpoint
from hydra import compose, initialize_config_dir

import globalcom2.run as run_module
from globalcom2.cells import CellSpec

MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"  # one past the last device: absent on every machine

BAD = {
    "limit not a number": (["benchmark.limit=abc"], r"benchmark\.limit must be an integer >= 1 .*got 'abc'"),
    "limit not whole": (["benchmark.limit=2.7"], r"benchmark\.limit must be an integer >= 1 .*got 2\.7"),
    "batch size": (["benchmark.batch_size=x"], r"benchmark\.batch_size must be an integer >= 1, got 'x'"),
    "seed": (["seed=abc"], r"seed must be an integer >= 0, got 'abc'"),
    "processes": (["launcher.num_processes=0"], r"launcher\.num_processes must be an integer >= 1, got 0"),
    "dtype": (["model.dtype=float64"], r"model\.dtype='float64' is not a dtype; valid: float32, float16"),
    "missing folder": (
        ["model.pretrained=/nonexistent/path"],
        r"'/nonexistent/path': no such checkpoint folder",
    ),
    "not a hub id": (["model.pretrained=a b"], r"'a b' is neither an existing folder nor a hub id"),
    "tiny seed": (["model.pretrained=tiny:x"], r"'tiny:x'.*integer seed"),
    "FastV K past the depth": (["method=fastv", "method.params.K=999"], r"K must be in \[1, 4\).*got 999"),
    "SparseVLM layer past the depth": (
        ["method=sparsevlm", "method.params.prune_layers=[2,6,99]"],
        r"prune_layers must lie in \[0, 3\)",
    ),
    "GlobalCom² score layer": (
        ["method=globalcom2", "method.params.score_layer=99"],
        r"score_layer must be an int in \[-4, 3\] for this 4-layer vision tower, got 99",
    ),
    "absent device": ([f"model.device={MISSING_CUDA}"], r"model\.device='cuda:\d+' but this machine has"),
    "unknown parameter": (
        ["+method.params.sead=1"],
        r"method 'random' does not take 'sead'.*Its parameters: ",
    ),
    "ratio": (["method.retention_ratio=1.5"], r"method\.retention_ratio must be in \(0, 1\]"),
    "gen_kwargs form": (
        ["benchmark.gen_kwargs='max_new_tokens'"],
        r"benchmark\.gen_kwargs='max_new_tokens' is not",
    ),
    "gen_kwargs value": (
        ["benchmark.gen_kwargs='max_new_tokens=0'"],
        r"max_new_tokens and num_beams must be >= 1",
    ),
    "gen_kwargs key": (["benchmark.gen_kwargs='foo=1'"], r"unsupported generation_kwargs \['foo'\]"),
}


def compose_cell(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                "model=tiny",
                "benchmark=demo",
                "method=random",
                f"paths.results_dir={tmp_path / 'results'}",
                *overrides,
            ],
        )


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded or an evaluation started")

    monkeypatch.setattr("transformers.LlavaNextForConditionalGeneration.from_pretrained", refuse)
    monkeypatch.setattr(run_module, "execute", refuse)
    monkeypatch.setattr(run_module, "_SEEN_THIS_SWEEP", set())


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named_before_any_weight_loads(case, tmp_path, nothing_loads):
    overrides, message = BAD[case]
    with pytest.raises(run_module.CellError, match=message):
        run_module.run(compose_cell(tmp_path, *overrides))
    assert not list((tmp_path / "results").rglob("record.json"))


def test_a_llava_15_checkpoint_is_refused_with_what_was_found(tmp_path, nothing_loads):
    folder = write_llava15_checkpoint(tmp_path / "llava-1.5")
    with pytest.raises(run_module.CellError) as err:
        run_module.run(compose_cell(tmp_path, f"model.pretrained={folder}"))
    message = str(err.value)
    assert "is a 'llava' model (LlavaForConditionalGeneration)" in message
    assert "only LLaVA-NeXT AnyRes checkpoints are supported" in message and "llava_next" in message


def test_dry_run_lists_the_problem_instead_of_stopping(tmp_path, nothing_loads, capsys):
    assert (
        run_module.run(compose_cell(tmp_path, "method=fastv", "method.params.K=999", "dry_run=true")) is None
    )
    assert "would fail before loading: K must be in [1, 4)" in capsys.readouterr().out


def test_a_ratio_that_keeps_no_patch_token_warns(tmp_path):
    with pytest.warns(
        UserWarning, match=r"retention_ratio=0\.0001 keeps floor\(R \* N\) = 0 .*no image keeps"
    ):
        CellSpec.from_config(compose_cell(tmp_path, "method.retention_ratio=0.0001"))


def hydra_run(tmp_path: Path, *overrides: str, full_error: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOBALCOM2_RESULTS": str(tmp_path / "results")}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "globalcom2.run", "benchmark=demo", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_the_hydra_path_prints_one_line_without_a_traceback_wall(tmp_path):
    done = hydra_run(tmp_path, "benchmark.limit=abc", full_error=False)
    assert done.returncode != 0
    assert "benchmark.limit must be an integer >= 1" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 4, done.stderr
    full = hydra_run(tmp_path, "benchmark.limit=abc", full_error=True)
    assert full.returncode != 0 and "Traceback" in full.stderr and "benchmark.limit must be" in full.stderr
