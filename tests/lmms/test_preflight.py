"""Validation before running: bad tasks, missing data, bad methods fail before any model is loaded."""

from __future__ import annotations

import pytest
import torch
from helpers import write_llava15_checkpoint

from globalcom2.lmms import cli
from globalcom2.lmms.preflight import PreflightError, check_model_args, preflight
from globalcom2.methods.random_keep import RandomKeep
from globalcom2.paths import DATA_DIR_ENV

GOOD_MODEL = {"pretrained": "tiny", "method": "random", "retention_ratio": 0.5}


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("globalcom2.load_llava_next", refuse)
    monkeypatch.setattr("globalcom2.models.loader.load_llava_next", refuse)


def test_known_tasks_with_data_pass_and_report_their_data(fixture_data):
    checks = {
        c.name: c
        for c in preflight(["pope_adv_local", "gqa_local", "globalcom2_demo"], model_args=GOOD_MODEL)
    }
    assert checks["pope_adv_local"].data_path == str(fixture_data / "pope")
    assert checks["pope_adv_local"].data_kind == "synthetic-fixture"
    assert checks["gqa_local"].data_path == str(fixture_data / "gqa" / "instructions")
    assert checks["globalcom2_demo"].data_kind == "generated"


def test_an_unknown_task_is_named_with_suggestions(fixture_data):
    with pytest.raises(PreflightError, match=r"unknown task 'pope_adv_locl'\. Did you mean 'pope_adv_local'"):
        preflight(["pope_adv_locl"])


def test_missing_offline_data_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(PreflightError) as err:
        preflight(["mme_local", "gqa_local"])
    message = str(err.value)
    assert (
        str(tmp_path / "empty" / "mme") in message
        and str(tmp_path / "empty" / "gqa" / "instructions") in message
    )
    assert "make data BENCHMARKS=mme" in message and DATA_DIR_ENV in message


def test_a_split_missing_from_the_data_is_reported(fixture_data, tmp_path, monkeypatch):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"a": [1]})}).save_to_disk(
        str(tmp_path / "mme")
    )
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(PreflightError, match=r"has splits \['train'\], not 'test'"):
        preflight(["mme_local"])


def test_a_damaged_or_half_written_folder_is_reported_before_any_model_loads(
    fixture_data, tmp_path, monkeypatch
):
    """``save_to_disk`` writes ``dataset_dict.json`` first: a folder cut off after it used to pass, and an
    empty or corrupt JSON file gave a bare ``JSONDecodeError`` naming no path."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(fixture_data, copy)
    monkeypatch.setenv(DATA_DIR_ENV, str(copy))
    (copy / "mme" / "dataset_dict.json").write_text("")
    (arrow,) = (copy / "pope" / "test").glob("*.arrow")
    arrow.unlink()
    with pytest.raises(PreflightError) as err:
        preflight(["mme_local", "pope_adv_local"])
    message = str(err.value)
    assert f"cannot read {copy / 'mme' / 'dataset_dict.json'}" in message
    assert f"{copy / 'pope' / 'test'} is incomplete: missing ['{arrow.name}']" in message


def test_every_part_of_a_benchmark_is_checked_before_any_model_loads(fixture_data, tmp_path, monkeypatch):
    """GQA's questions read ``gqa/images`` while the task loads; without it the run used to fail only after
    the model had loaded."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(fixture_data, copy)
    shutil.rmtree(copy / "gqa" / "images")
    monkeypatch.setenv(DATA_DIR_ENV, str(copy))
    with pytest.raises(PreflightError, match=r"offline data for task 'gqa_local' is missing: .*gqa/images"):
        preflight(["gqa_local"])


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ({**GOOD_MODEL, "method": "fastvv"}, "unknown compression method 'fastvv'"),
        ({**GOOD_MODEL, "retention_ratio": 0}, r"retention_ratio must be in \(0, 1\]"),
        ({**GOOD_MODEL, "budget": 3}, "does not take 'budget'"),
        ({**GOOD_MODEL, "attn_implementation": "flash_attention_2"}, "does not support attn_implementation"),
        ({"method": "vanilla"}, "needs pretrained="),
        (
            {**GOOD_MODEL, "pretrained": "/nonexistent/llava"},
            "'/nonexistent/llava': no such checkpoint folder",
        ),
        # model-dependent ranges, checked against the checkpoint's config before any weight loads
        ({**GOOD_MODEL, "method": "fastv", "K": 999}, r"K must be in \[1, 4\).*got 999"),
        ({**GOOD_MODEL, "method": "fastv", "K": -1.0}, r"K must be in \[1, num_layers\).*got -1$"),
        (
            {**GOOD_MODEL, "method": "sparsevlm", "prune_layers": "[2,6,99]"},
            r"prune_layers must lie in \[0, 3\)",
        ),
        (
            {**GOOD_MODEL, "method": "globalcom2", "score_layer": 99},
            r"score_layer must be an int in \[-4, 3\]",
        ),
        ({**GOOD_MODEL, "device": f"cuda:{torch.cuda.device_count()}"}, "but this machine has"),
        ({**GOOD_MODEL, "device": "gpu0"}, "'gpu0' is not a device; valid: cpu, cuda"),
        ({**GOOD_MODEL, "batch_size": "x"}, "batch_size must be an integer >= 1, got 'x'"),
        ({**GOOD_MODEL, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({**GOOD_MODEL, "dtype": "float64"}, "dtype='float64' is not a dtype; valid: float32, float16"),
        ({**GOOD_MODEL, "protocol": "lava"}, "protocol='lava' is not a protocol; valid: lmms_eval, llava"),
        (
            {**GOOD_MODEL, "protocol": "llava", "generation_overrides": '{"max_new_tokens": 0}'},
            "max_new_tokens and num_beams must be >= 1",
        ),
        ({**GOOD_MODEL, "generation_overrides": '{"max_new_tokens": 4}'}, "apply under protocol=llava"),
    ],
)
def test_bad_model_args_are_refused(model_args, message, no_model_loading):
    with pytest.raises(PreflightError, match=message):
        check_model_args(model_args)


def test_a_llava_15_checkpoint_is_refused_by_every_entry_point(tmp_path, capsys, monkeypatch):
    """A LLaVA-1.5 checkpoint would load into LlavaNextForConditionalGeneration with a random image_newline;
    every entry point refuses it from its config, before any weight."""
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext
    from globalcom2.models.base import UnsupportedModelError
    from globalcom2.models.loader import load_llava_next

    folder = str(write_llava15_checkpoint(tmp_path / "llava-1.5"))
    found = r"'llava' model \(LlavaForConditionalGeneration\); only LLaVA-NeXT AnyRes"

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("transformers.LlavaNextForConditionalGeneration.from_pretrained", refuse)
    with pytest.raises(UnsupportedModelError, match=found):
        load_llava_next(folder)
    with pytest.raises(UnsupportedModelError, match=found):
        GlobalCom2LlavaNext(pretrained=folder, method="random", retention_ratio=0.5)
    with pytest.raises(PreflightError, match=found):
        check_model_args({**GOOD_MODEL, "pretrained": folder})
    argv = [
        "--model",
        "globalcom2_llava_next",
        "--model_args",
        f"pretrained={folder}",
        "--tasks",
        "globalcom2_demo",
    ]
    assert cli.main([*argv, "--output_path", str(tmp_path / "out")]) == cli.EXIT_PREFLIGHT
    assert "'llava' model" in capsys.readouterr().err


def test_the_plugin_checks_the_device_and_the_model_dependent_ranges_before_loading(no_model_loading):
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    with pytest.raises(ValueError, match=r"K must be in \[1, 4\)"):
        GlobalCom2LlavaNext(pretrained="tiny", method="fastv", retention_ratio=0.5, K=999)
    with pytest.raises(ValueError, match="but this machine has"):
        GlobalCom2LlavaNext(pretrained="tiny", device=f"cuda:{torch.cuda.device_count()}")


def test_batch_size_in_model_args_wins_over_the_cli_default():
    """lmms-eval passes --batch_size (default 1) next to model_args; the model_args value wins, without a
    clash of keyword arguments."""
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    lm = GlobalCom2LlavaNext.create_from_arg_string(
        "pretrained=tiny,batch_size=3", {"batch_size": 1, "max_batch_size": None, "device": None}
    )
    assert lm.batch_size == 3
    lm = GlobalCom2LlavaNext.create_from_arg_string("pretrained=tiny", {"batch_size": 2, "device": None})
    assert lm.batch_size == 2


@pytest.mark.parametrize("flag", [["--batch_size", "2"], ["-b", "2"], ["--batch", "2"], ["--batch_size=2"]])
def test_the_cli_refuses_two_different_batch_sizes_however_the_flag_is_spelled(
    tmp_path, capsys, no_model_loading, flag
):
    argv = ["--model", "globalcom2_llava_next", "--model_args", "pretrained=tiny,batch_size=4"]
    argv += [*flag, "--tasks", "globalcom2_demo", "--output_path", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_PREFLIGHT
    assert "--batch_size 2 and model_args batch_size=4 disagree" in capsys.readouterr().err


def test_plain_lmms_eval_refuses_two_different_batch_sizes_or_devices():
    """``python -m lmms_eval`` builds the model through ``create_from_arg_string`` without our CLI: a given
    ``-b`` (a string) that disagrees is refused there; lmms-eval's default (the integer 1) is not a value."""
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    with pytest.raises(ValueError, match="--batch_size 1 and model_args batch_size=3 disagree"):
        GlobalCom2LlavaNext.create_from_arg_string("pretrained=tiny,batch_size=3", {"batch_size": "1"})
    with pytest.raises(ValueError, match="--device cuda and model_args device=cpu disagree"):
        GlobalCom2LlavaNext.create_from_arg_string("pretrained=tiny,device=cpu", {"device": "cuda"})


def test_a_method_declares_its_attention_implementations(monkeypatch):
    monkeypatch.setattr(RandomKeep, "supported_attn_implementations", frozenset({"eager"}))
    with pytest.raises(
        PreflightError, match="'random' does not support attn_implementation 'sdpa'; it supports eager"
    ):
        check_model_args(GOOD_MODEL)
    check_model_args({**GOOD_MODEL, "attn_implementation": "eager"})
    check_model_args(
        {**GOOD_MODEL, "attn_implementation": '{"text_config": "eager", "vision_config": "eager"}'}
    )


def test_the_cli_stops_before_loading_anything(tmp_path, monkeypatch, capsys, no_model_loading):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    argv = [
        *(
            "--model",
            "globalcom2_llava_next",
            "--model_args",
            "pretrained=tiny,method=random,retention_ratio=2",
        ),
        *("--tasks", "pope_adv_local,no_such_task", "--output_path", str(tmp_path / "out")),
    ]
    assert cli.main(argv) == cli.EXIT_PREFLIGHT
    message = capsys.readouterr().err
    assert "retention_ratio must be in (0, 1]" in message
    assert "offline data for task 'pope_adv_local' is missing" in message
    assert "unknown task 'no_such_task'" in message
    assert not (tmp_path / "out").exists()


def test_the_cli_requires_an_output_path(capsys):
    assert cli.main(["--model", "globalcom2_llava_next", "--tasks", "mme_local"]) == cli.EXIT_PREFLIGHT
    assert "--output_path is required" in capsys.readouterr().err


def test_builtin_tasks_are_known_but_flagged_as_hub_tasks(fixture_data):
    (check,) = preflight(["mme"])
    assert check.origin == "lmms-eval" and check.data_path is None


def test_a_cells_identity_names_the_data_it_reads(fixture_data, tmp_path, monkeypatch):
    """Synthetic fixture rows and real data (or two hub revisions) must never share a cell."""
    import json
    import shutil

    from globalcom2.lmms.preflight import data_identity

    identity = data_identity(["pope_adv_local", "globalcom2_demo"])
    assert identity["pope_adv_local"]["kind"] == "synthetic-fixture"
    assert {k: identity["globalcom2_demo"][k] for k in ("kind", "split", "seed", "size")} == {
        "kind": "generated",
        "split": "test",
        "seed": 0,
        "size": 300,
    }
    copy = tmp_path / "data"
    shutil.copytree(fixture_data, copy)
    source = copy / "pope" / "globalcom2_source.json"
    source.write_text(json.dumps({**json.loads(source.read_text()), "kind": "hub", "revision": "abc"}))
    monkeypatch.setenv(DATA_DIR_ENV, str(copy))
    assert data_identity(["pope_adv_local"])["pope_adv_local"]["kind"] == "hub"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--limit", "2.7"],
            "--limit 2.7: give an integer >= 1 (documents per task) or a fraction in (0, 1)",
        ),
        (["--limit", "-1"], "--limit -1: give an integer >= 1"),
        (["--limit", "0"], "--limit 0: give an integer >= 1"),
    ],
)
def test_the_cli_refuses_a_limit_that_is_neither_a_count_nor_a_fraction(tmp_path, capsys, extra, message):
    argv = [
        "--model",
        "globalcom2_llava_next",
        "--model_args",
        "pretrained=tiny",
        "--tasks",
        "globalcom2_demo",
    ]
    assert cli.main([*argv, "--output_path", str(tmp_path / "out"), *extra]) == cli.EXIT_PREFLIGHT
    assert message in capsys.readouterr().err


def test_the_cli_finds_our_model_without_its_entry_point(tmp_path, capsys, monkeypatch, no_model_loading):
    """A checkout run from PYTHONPATH (not pip-installed) has no entry point: the CLI registers the model."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from globalcom2.lmms.manifest import MODEL_ID

    monkeypatch.setattr(
        MODEL_REGISTRY_V2,
        "_manifests",
        {k: v for k, v in MODEL_REGISTRY_V2._manifests.items() if k != MODEL_ID},
    )
    monkeypatch.setattr(
        MODEL_REGISTRY_V2,
        "_alias_to_model_id",
        {k: v for k, v in MODEL_REGISTRY_V2._alias_to_model_id.items() if v != MODEL_ID},
    )
    assert cli.model_problem(MODEL_ID) is not None  # as without the entry point
    out = ["--tasks", "globalcom2_demo", "--output_path", str(tmp_path / "out")]
    assert cli.main(["--model", MODEL_ID, "--model_args", "pretrained", *out]) == cli.EXIT_PREFLIGHT
    err = capsys.readouterr().err
    assert "unknown model" not in err and "model_args: 'pretrained' is not key=value" in err
    assert cli.model_problem(MODEL_ID) is None


def test_the_cli_names_an_unknown_model_and_a_malformed_model_args_in_one_line(
    tmp_path, capsys, no_model_loading
):
    out = ["--tasks", "globalcom2_demo", "--output_path", str(tmp_path / "out")]
    assert cli.main(["--model", "globalcom2_llava_nxt", *out]) == cli.EXIT_PREFLIGHT
    err = capsys.readouterr().err
    assert "unknown model 'globalcom2_llava_nxt'. Did you mean 'globalcom2_llava_next'" in err
    assert len(err.strip().splitlines()) == 1, err
    assert (
        cli.main(["--model", "globalcom2_llava_next", "--model_args", "pretrained", *out])
        == cli.EXIT_PREFLIGHT
    )
    err = capsys.readouterr().err
    assert "model_args: 'pretrained' is not key=value" in err and "Traceback" not in err
    argv = ["--model", "globalcom2_llava_next", "--model_args", "pretrained=tiny,method=globalcom2", *out]
    assert cli.main(argv) == cli.EXIT_PREFLIGHT
    assert "method 'globalcom2' needs retention_ratio" in capsys.readouterr().err


def test_the_cli_prints_the_warning_of_a_ratio_that_keeps_no_patch_token(tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise SystemExit(0)  # after the pre-flight: no evaluation

    monkeypatch.setattr("lmms_eval.__main__.cli_evaluate", stop)
    argv = [
        "--model",
        "globalcom2_llava_next",
        "--model_args",
        "pretrained=tiny,method=random,retention_ratio=0.0001",
    ]
    cli.main([*argv, "--tasks", "globalcom2_demo", "--output_path", str(tmp_path / "out")])
    assert "warning: retention_ratio=0.0001 keeps floor(R * N) = 0 patch tokens" in capsys.readouterr().err


def test_a_task_s_own_generation_kwargs_replace_its_base_s_whole(tmp_path):
    """As ``LocalDataTask`` merges ``{**base, **config}``: the base's ``do_sample: false`` does not survive."""
    from globalcom2.lmms.preflight import task_generation_kwargs

    (tmp_path / "own.yaml").write_text(
        "task: own_gqa\nclass: !function globalcom2.lmms.tasks.LocalDataTask\nbase_yaml: gqa/gqa.yaml\n"
        "local_data: gqa/instructions\ngeneration_kwargs:\n  temperature: 0.5\n"
    )
    (tmp_path / "inherits.yaml").write_text(
        "task: inherits_gqa\nclass: !function globalcom2.lmms.tasks.LocalDataTask\nbase_yaml: gqa/gqa.yaml\n"
        "local_data: gqa/instructions\n"
    )
    settings = task_generation_kwargs(["own_gqa", "inherits_gqa"], include_path=str(tmp_path))
    assert settings["own_gqa"] == {"temperature": 0.5}
    assert settings["inherits_gqa"]["do_sample"] is False and settings["inherits_gqa"]["max_new_tokens"] == 16


def test_the_cli_refuses_lmms_evals_response_cache_for_our_model(tmp_path, capsys, no_model_loading):
    argv = [
        *("--model", "globalcom2_llava_next", "--model_args", "pretrained=tiny,method=vanilla"),
        *("--tasks", "globalcom2_demo", "--output_path", str(tmp_path / "out")),
        *("--use_cache", str(tmp_path / "cache")),
    ]
    assert cli.main(argv) == cli.EXIT_PREFLIGHT
    assert "--use_cache (lmms-eval's response cache) is not supported" in capsys.readouterr().err
