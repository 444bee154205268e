"""Every config file of every group composes; every experiment dry-runs; bad choices are named."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import CONFIGS
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import globalcom2.run  # registers the project_root resolver
from globalcom2.cells import CellSpec
from globalcom2.methods import METHODS

GROUPS = ["model", "method", "benchmark", "launcher", "logger", "experiment", "sweep", "debug"]


def all_options() -> list[tuple[str, str]]:
    """Every selectable option (a ``_``-prefixed file is a base the others inherit, refused on its own)."""
    return [
        (group, p.stem)
        for group in GROUPS
        for p in sorted((CONFIGS / group).glob("*.yaml"))
        if not p.stem.startswith("_")
    ]


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


@pytest.mark.parametrize(("group", "option"), all_options(), ids=lambda v: str(v))
def test_every_option_composes_into_a_valid_cell(group, option):
    cfg = compose_eval(f"{group}={option}")
    spec = CellSpec.from_config(cfg)  # resolves every interpolation and validates method and ratio
    assert spec.key.relative_path().parts[0] == cfg.experiment_name


def test_the_groups_cover_what_the_issue_names():
    options = set(all_options())
    for expected in [
        ("model", "llava_next_7b"),
        ("model", "llava_next_13b"),
        ("model", "tiny"),
        ("model", "tiny_trained"),
        ("launcher", "local"),
        ("launcher", "accelerate"),
        ("launcher", "slurm"),
        ("logger", "none"),
        ("logger", "wandb"),
        ("benchmark", "paper_suite"),
        ("benchmark", "demo"),
        ("experiment", "paper_table1_7b"),
        ("experiment", "paper_table1_13b"),
        ("experiment", "ablations"),
        ("experiment", "efficiency"),
    ]:
        assert expected in options
    assert {m for g, m in options if g == "method"} >= {
        "vanilla",
        "random",
        "globalcom2",
        "fastv",
        "sparsevlm",
    }
    assert len([o for g, o in options if g == "benchmark"]) >= 12  # the ten, paper_suite, demo


def test_the_trained_tiny_model_config_mirrors_tiny_and_names_the_committed_checkpoint():
    tiny, trained = (compose_eval(f"model={name}").model for name in ("tiny", "tiny_trained"))
    assert (trained.name, trained.pretrained) == ("tiny_trained", "tiny-trained")
    assert {k: v for k, v in trained.items() if k not in ("name", "pretrained")} == {
        k: v for k, v in tiny.items() if k not in ("name", "pretrained")
    }
    assert compose_eval("experiment=demo").model.name == "tiny_trained"  # the demo runs the trained model


def test_experiments_are_global_deltas_with_their_command_on_line_2():
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path.name
        assert lines[1].startswith("# python -m globalcom2.run -m experiment=" + path.stem), path.name


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(
        ConfigCompositionException, match=r"(?s)method/globalcom3.*Available options.*globalcom2.*sparsevlm"
    ):
        compose_eval("method=globalcom3")


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_ratio_out_of_range_fails_before_loading(ratio):
    with pytest.raises(ValueError, match=r"retention_ratio must be in \(0, 1\]"):
        CellSpec.from_config(compose_eval("method=random", f"method.retention_ratio={ratio}"))


def test_vanilla_cells_of_every_ratio_are_one_cell():
    specs = [
        CellSpec.from_config(compose_eval("method=vanilla", f"method.retention_ratio={r}"))
        for r in (0.75, 0.1)
    ]
    assert specs[0].key == specs[1].key and specs[0].method.retention_ratio == 1.0


def test_missing_checkpoint_and_missing_data_fail_preflight_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = CellSpec.from_config(compose_eval("model=llava_next_7b", "benchmark=demo"))
    with pytest.raises(
        FileNotFoundError,
        match=r"llava-v1.6-vicuna-7b-hf.*not in the local Hugging Face cache.*random_init=true",
    ):
        spec.check_environment()
    assert CellSpec.from_config(
        compose_eval("model=llava_next_7b", "model.random_init=true")
    ).model.random_init
    monkeypatch.setenv("GLOBALCOM2_DATA_DIR", str(tmp_path / "no-data"))
    spec = CellSpec.from_config(compose_eval("benchmark=pope"))
    with pytest.raises(ValueError, match=r"offline data for task 'pope_adv_local' is missing.*make data"):
        spec.check_environment()


def test_lite_subset_option():
    spec = CellSpec.from_config(compose_eval("benchmark=gqa", "benchmark.lite=true"))
    assert spec.benchmark.tasks == ("gqa_lite",) and spec.benchmark.name == "gqa_lite"
    with pytest.raises(ValueError, match="no LMMs-Eval-Lite subset"):
        CellSpec.from_config(compose_eval("benchmark=pope", "benchmark.lite=true"))


def sweep_cells(experiment: str) -> list[list[str]]:
    """The override lists of every job of the experiment's multirun grid (Hydra's basic sweeper is Cartesian)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        grid = compose(config_name="eval", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        params = dict(grid.hydra.sweeper.params or {})
    jobs = [[f"experiment={experiment}"]]
    for key, values in params.items():
        jobs = [[*job, f"{key}={value}"] for job in jobs for value in str(values).split(",")]
    return jobs


# The two Table 1 grids dry-run 33 cells on the ten benchmarks each (17 s each on the 2-core CI machine): `slow`.
LARGE_GRIDS = {"paper_table1_7b", "paper_table1_13b"}


@pytest.mark.parametrize(
    "experiment",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in LARGE_GRIDS else name
        for name in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    ],
)
def test_every_experiment_dry_runs(experiment, tmp_path, monkeypatch, capsys):
    """Every job of the grid resolves to a valid cell and is listed; nothing is written."""
    monkeypatch.setenv("GLOBALCOM2_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("GLOBALCOM2_DATA_DIR", str(tmp_path / "data"))
    jobs = sweep_cells(experiment)
    assert len(jobs) >= 9
    for job in jobs:
        assert globalcom2.run.run(compose_eval(*job, "dry_run=true")) is None
    listed = capsys.readouterr().out
    assert listed.count("[dry-run]") + listed.count("[same]") == len(jobs)
    assert not (tmp_path / "results").exists(), "a dry run writes no cell"


@pytest.mark.slow
def test_the_cli_dry_run_lists_the_demo_grid(tmp_path):
    env = {**os.environ, "GLOBALCOM2_RESULTS": str(tmp_path / "results")}
    done = subprocess.run(
        [sys.executable, "-m", "globalcom2.run", "-m", "experiment=demo", "dry_run=true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cells = 1 + 3 * (len(METHODS.names()) - 1)  # vanilla once, every other method at three ratios
    assert done.stdout.count("[dry-run]") == cells and done.stdout.count("[same]") == 2  # vanilla: one cell
    assert "would fail" not in done.stdout
