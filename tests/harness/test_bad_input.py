"""Bad input to ``globalcom2.run`` is refused before any weight loads, in one line that names the value and
what is valid; a traceback only with HYDRA_FULL_ERROR=1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_cell, write_llava15_checkpoint

import globalcom2.run as run_module
from globalcom2.cells import CellSpec
from globalcom2.methods import METHODS

MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"  # one past the last device: absent on every machine

BAD = {
    "limit not a number": (["benchmark.limit=abc"], r"benchmark\.limit must be an integer >= 1 .*got 'abc'"),
    "limit not whole": (["benchmark.limit=2.7"], r"benchmark\.limit must be an integer >= 1 .*got 2\.7"),
    "batch size": (["benchmark.batch_size=x"], r"benchmark\.batch_size must be an integer >= 1, got 'x'"),
    "batch size not whole": (
        ["benchmark.batch_size=2.0"],
        r"benchmark\.batch_size must be an integer >= 1, got 2\.0",
    ),
    "batch size a boolean": (
        ["benchmark.batch_size=true"],
        r"benchmark\.batch_size must be an integer >= 1, got True",
    ),
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
    "a typo in a key": (
        ["+benchmark.limt=3"],
        r"unknown config key benchmark\.limt; the benchmark keys are ",
    ),
    "an unknown model key": (["+model.foo=1"], r"unknown config key model\.foo"),
    "an unknown top-level key": (["+foo=bar"], r"unknown config key foo; the top-level keys are "),
    "a negative method seed": (["method.params.seed=-5"], r"seed must be an integer >= 0, got -5"),
    "local with two processes": (
        ["launcher=local", "launcher.num_processes=2"],
        r"launcher=local runs a cell in this process, so launcher\.num_processes must be 1, got 2",
    ),
    "a wandb mode": (["logger=wandb", "logger.mode=foo"], r"logger\.mode='foo' is not a wandb mode"),
    "a compile mode": (["compile=fast"], r"compile must be true, false or one of default"),
    "no ratio": (
        ["method=globalcom2", "~method.retention_ratio"],
        r"method 'globalcom2' needs method\.retention_ratio",
    ),
    "a task list as a number": (["benchmark.tasks=5"], r"benchmark\.tasks must be a list of task names"),
    "no benchmark": (["benchmark=_default"], r"benchmark\.tasks is not set: choose a benchmark"),
    "an attention sub-config": (
        ["model.attn_implementation={bogus_config:eager}"],
        r"attn_implementation names sub-configs \['bogus_config'\]",
    ),
    "vanilla's ignored ratio is still a ratio": (
        ["method=vanilla", "method.retention_ratio=-3"],
        r"method\.retention_ratio must be in \(0, 1\]",
    ),
}


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


@pytest.mark.parametrize(
    ("environment", "overrides", "message"),
    [
        ("offline", ["logger.mode=foo"], r"logger\.mode='foo' is not a wandb mode"),  # as under `make`
        ("bar", ["logger.mode=offline"], r"WANDB_MODE='bar' is not a wandb mode"),
    ],
)
def test_a_wandb_mode_is_checked_wherever_it_is_set(
    environment, overrides, message, tmp_path, nothing_loads, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", environment)
    with pytest.raises(run_module.CellError, match=message):
        run_module.run(compose_cell(tmp_path, "logger=wandb", *overrides))


@pytest.mark.parametrize(
    ("environment", "overrides", "mode"),
    [
        ("offline", ["logger.mode=online"], "online"),  # `make ... ARGS="logger.mode=online"` logged offline
        ("offline", [], "offline"),  # make's default
        ("disabled", [], "disabled"),
        (None, [], "offline"),
    ],
)
def test_an_explicit_wandb_mode_wins_over_the_environment(
    environment, overrides, mode, tmp_path, monkeypatch
):
    from globalcom2.tracking import wandb_mode

    if environment is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", environment)
    assert wandb_mode(compose_cell(tmp_path, "logger=wandb", *overrides).logger) == mode


def test_online_wandb_without_an_api_key_is_refused_before_the_cell_runs(
    tmp_path, nothing_loads, monkeypatch
):
    """Otherwise the first finished cell of an interactive sweep waits at wandb's login prompt."""
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb, "api", SimpleNamespace(api_key=None))
    with pytest.raises(run_module.CellError, match=r"logger\.mode=online, but no wandb API key is set"):
        run_module.run(compose_cell(tmp_path, "logger=wandb", "logger.mode=online"))


def test_wandb_logging_without_the_package_is_refused_before_the_cell_runs(
    tmp_path, nothing_loads, monkeypatch
):
    """Found on a machine given only the carried wheels: the cell ran, then its logging failed."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(run_module.CellError, match=r"logger=wandb, but the wandb package is not installed"):
        run_module.run(compose_cell(tmp_path, "logger=wandb"))


def test_a_ratio_that_keeps_no_patch_token_warns(tmp_path):
    with pytest.warns(
        UserWarning, match=r"retention_ratio=0\.0001 keeps floor\(R \* N\) = 0 .*no image keeps"
    ):
        CellSpec.from_config(compose_cell(tmp_path, "method.retention_ratio=0.0001"))


def hydra_run(
    tmp_path: Path, *overrides: str, full_error: bool, multirun: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOBALCOM2_RESULTS": str(tmp_path / "results")}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "globalcom2.run", *(["-m"] if multirun else []), "benchmark=demo", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_the_hydra_path_prints_one_line_without_a_traceback_wall(tmp_path):
    done = hydra_run(tmp_path, "benchmark.limit=abc", full_error=False)
    assert done.returncode != 0
    assert "benchmark.limit must be an integer >= 1" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 4, done.stderr
    full = hydra_run(tmp_path, "benchmark.limit=abc", full_error=True)
    assert full.returncode != 0 and "Traceback" in full.stderr and "benchmark.limit must be" in full.stderr


def test_a_checkpoint_folder_without_weights_is_refused_before_running(tmp_path, nothing_loads):
    from globalcom2.models.tiny_trained import CHECKPOINT_DIR

    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(CHECKPOINT_DIR / "config.json", folder / "config.json")
    (folder / "training_args.bin").write_bytes(b"a training state, not weights")
    with pytest.raises(run_module.CellError, match=r"has a config\.json but no weights"):
        run_module.run(compose_cell(tmp_path, f"model.pretrained={folder}"))
    assert not list((tmp_path / "results").rglob(".partial"))


def test_a_results_folder_that_cannot_be_written_is_named_before_anything_loads(tmp_path, nothing_loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = compose_cell(tmp_path)
    cfg.paths.results_dir = str(blocker / "results")
    with pytest.raises(run_module.CellError, match=r"paths\.results_dir: .*a-file/results cannot be created"):
        run_module.run(cfg)
    done = subprocess.run(  # through Hydra, before it creates its own folders under the results folder
        [sys.executable, "-m", "globalcom2.run", f"paths.results_dir={blocker / 'results'}", "dry_run=true"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "a-file is not a folder" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


#: The same bad value through Hydra and through lmms-eval's model_args: (Hydra overrides, model_args).
SAME_VALUE = {
    "ratio": (["method.retention_ratio=1.5"], {"retention_ratio": 1.5}),
    "dtype": (["model.dtype=float64"], {"dtype": "float64"}),
    "parameter": (["+method.params.sead=1"], {"sead": 1}),
    "seed": (["method.params.seed=-5"], {"seed": -5}),
    "compile": (["compile=fast"], {"compile": "fast"}),
    "batch size": (["benchmark.batch_size=0"], {"batch_size": 0}),
    "depth": (["method=fastv", "method.params.K=999"], {"method": "fastv", "K": 999}),
    "no ratio": (
        ["method=globalcom2", "~method.retention_ratio"],
        {"method": "globalcom2", "retention_ratio": None},
    ),
}


@pytest.mark.parametrize("case", list(SAME_VALUE))
def test_every_entry_point_says_the_same_line_for_the_same_bad_value(case, tmp_path, nothing_loads):
    """Hydra and model_args go through one front door: one message, the key spelled as each entry point
    spells it (``method.retention_ratio`` in Hydra, ``retention_ratio`` in model_args)."""
    from globalcom2.lmms.preflight import PreflightError, check_model_args

    overrides, model_args = SAME_VALUE[case]
    with pytest.raises(run_module.CellError) as hydra:
        run_module.run(compose_cell(tmp_path, *overrides))
    args = {"pretrained": "tiny", "method": "random", "retention_ratio": 0.5, **model_args}
    with pytest.raises(PreflightError) as lmms:
        check_model_args({k: v for k, v in args.items() if v is not None})
    said_by_hydra = str(hydra.value).split(": ", 1)[1]  # after "invalid cell:" or the cell's label
    said_by_lmms = str(lmms.value).splitlines()[1].removeprefix("- ")
    for group in ("method.", "model.", "benchmark."):
        said_by_hydra = said_by_hydra.replace(group, "")
    assert said_by_hydra == said_by_lmms


@pytest.mark.parametrize(
    "launch",
    [
        (),
        # The jobs run on the cluster's nodes: a login node without a GPU used to refuse every
        # ``device=cuda`` sweep before submitting it; its other problems are still found before submission.
        ("launcher=slurm", "model.device=cuda"),
    ],
    ids=["local", "slurm-from-a-gpu-less-node"],
)
def test_a_sweep_is_checked_cell_by_cell_before_its_first_cell_runs(tmp_path, launch):
    done = hydra_run(
        tmp_path,
        *launch,
        "method=random",
        "method.retention_ratio=0.5,2",
        "benchmark.limit=2",
        full_error=False,
        multirun=True,
    )
    assert done.returncode != 0
    assert "the sweep was not started: some of its cells would be refused" in done.stderr, done.stderr[-3000:]
    assert "method.retention_ratio=2" in done.stderr and "must be in (0, 1]" in done.stderr
    assert "CUDA device" not in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "results").rglob("record.json")), "no cell ran"
    assert not list((tmp_path / "results").rglob(".submitit")), "nothing was submitted"


def test_slurm_without_multirun_is_refused_instead_of_running_here(tmp_path):
    done = hydra_run(tmp_path, "launcher=slurm", "benchmark.limit=2", full_error=False)
    assert done.returncode != 0 and "add -m" in done.stderr, done.stderr[-2000:]
    assert not list((tmp_path / "results").rglob("record.json"))


def test_a_cell_checked_for_another_machine_skips_only_this_machines_devices(
    tmp_path, nothing_loads, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a login node, wherever this runs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    spec = CellSpec.from_config(compose_cell(tmp_path, "model.device=cuda"))
    with pytest.raises(ValueError, match=r"model\.device='cuda' but this machine has no CUDA device"):
        spec.check_environment()
    spec.check_environment(runs_here=False)
    missing = CellSpec.from_config(
        compose_cell(tmp_path, "model.device=cuda", f"model.pretrained={tmp_path}/none")
    )
    with pytest.raises(FileNotFoundError):
        missing.check_environment(runs_here=False)


@pytest.mark.slow
def test_a_glob_sweep_is_checked_and_one_problem_of_many_cells_is_said_once(tmp_path):
    done = hydra_run(
        tmp_path,
        "method=glob(*,exclude=vanilla)",
        "method.retention_ratio=0.5,1.5",
        "benchmark.limit=2",
        full_error=False,
        multirun=True,
    )
    assert done.returncode != 0, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "must be in (0, 1]" in line]
    bad_cells = len(METHODS.names()) - 1  # every method but vanilla at R = 1.5
    assert len(said) == 1 and f"{bad_cells} cells, e.g." in said[0], done.stderr[-3000:]
    assert not list((tmp_path / "results").rglob("record.json")), "no cell ran"


def test_vanilla_at_another_ratio_is_refused_alone_and_is_the_r1_cell_in_a_sweep(
    tmp_path, monkeypatch, nothing_loads
):
    cfg = compose_cell(tmp_path, "method=vanilla", "method.retention_ratio=0.25", "dry_run=true")
    monkeypatch.setattr(run_module, "single_run", lambda: True)
    with pytest.raises(
        run_module.CellError, match=r"method 'vanilla' keeps every token, so method\.retention_ratio"
    ):
        run_module.run(cfg)
    monkeypatch.setattr(run_module, "single_run", lambda: False)  # a sweep's job (or a call from Python)
    assert run_module.run(cfg) is None  # the dry run lists the r1.0 cell


def test_a_failed_run_reports_its_own_error_when_its_partial_folder_cannot_be_removed(
    tmp_path, monkeypatch, capsys
):
    """A rank still writing into ``.partial/`` can make its removal fail: the evaluation's error is the one
    raised, and the leftover is deleted by the next run's ``prepare``."""
    from globalcom2.store import Cell

    def evaluation_fails(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    def busy(self):
        raise OSError("Directory not empty")

    monkeypatch.setattr(run_module, "execute", evaluation_fails)
    monkeypatch.setattr(Cell, "discard_partial", busy)
    monkeypatch.setattr(run_module, "_SEEN_THIS_SWEEP", set())
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        run_module.run(compose_cell(tmp_path))
    out = capsys.readouterr().out
    assert "could not remove" in out and "Directory not empty" in out and "[failed]" in out
