"""Pinning a hub task's data to its commit and checking it once loaded (``globalcom2.lmms.hub_data``)."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import lmms_eval.tasks
import pytest
from helpers import CONFIGS, cached_hub_dataset
from omegaconf import OmegaConf

from globalcom2.lmms import preflight
from globalcom2.lmms.hub_data import SIDE_DATASETS, loaded_commit_problems, pinned_task
from globalcom2.lmms.preflight import task_config


def test_a_pinned_task_keeps_its_other_dataset_kwargs():
    """lmms-eval replaces a task's ``dataset_kwargs`` with a dict entry's, key by key: dropping ``token``
    would fail a gated download."""
    config = {"dataset_path": "org/lite", "dataset_kwargs": {"token": True, "revision": "main"}}
    assert pinned_task("t", config, "a" * 40) == {
        "task": "t",
        "dataset_kwargs": {"token": True, "revision": "a" * 40},
    }
    assert pinned_task("t", {}, "a" * 40)["dataset_kwargs"] == {"revision": "a" * 40}
    with pytest.raises(ValueError, match="task 't': dataset_kwargs is 'token', not a mapping"):
        pinned_task("t", {"dataset_kwargs": "token"}, "a" * 40)


def test_loaded_data_must_lie_in_the_folder_of_its_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "datasets"
    cached_hub_dataset(cache, "org/lite", "gqa", "a" * 40, {"q": ["x", "y"]}, "lite", mtime=1_000)
    loaded = datasets.load_dataset("org/lite", "gqa", cache_dir=str(cache))
    mapped = datasets.DatasetDict({"lite": loaded["lite"].map(lambda row: {"q": row["q"] * 2})})
    assert loaded_commit_problems({"t": loaded, "u": mapped}, {"t": "a" * 40, "u": "a" * 40}) == []
    assert loaded_commit_problems({"t": loaded}, {}) == []  # nothing pinned, nothing checked
    (other,) = loaded_commit_problems({"t": loaded}, {"t": "b" * 40})
    assert (
        other == f"task 't' read {cache / 'org___lite' / 'gqa' / '0.0.0' / ('a' * 40)}, not commit {'b' * 40}"
    )
    in_memory = datasets.DatasetDict({"lite": datasets.Dataset.from_dict({"q": ["x"]})})
    (memory,) = loaded_commit_problems({"t": in_memory}, {"t": "a" * 40})
    assert "held in memory" in memory
    (absent,) = loaded_commit_problems({}, {"t": "a" * 40})
    assert "holds no dataset" in absent


def test_side_datasets_are_every_dataset_a_lite_tasks_code_loads():
    """:data:`SIDE_DATASETS` is read off lmms-eval's code by hand: each lite task's ``utils.py`` is scanned
    for ``load_dataset("<repo>", "<config>"`` so an lmms-eval release that adds, drops or renames one fails
    here instead of leaving it out of the identity."""
    suite = OmegaConf.load(CONFIGS / "benchmark" / "paper_suite.yaml")
    found = {}
    for task in suite.lite_tasks:
        assert task_config(task)["dataset_path"]  # a hub task
        yaml_path = Path(preflight._builtin_index()[task]["yaml_path"])
        assert yaml_path.is_relative_to(Path(lmms_eval.tasks.__file__).parent)
        utils = yaml_path.with_name("utils.py")
        source = utils.read_text() if utils.is_file() else ""
        calls = re.findall(r'load_dataset\(\s*"([^"]+)",\s*"([^"]+)"', source)
        if calls:
            found[task] = tuple(calls)
    assert found == SIDE_DATASETS


def test_a_side_dataset_joins_the_identity_and_must_be_named(tmp_path, monkeypatch):
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    from globalcom2.lmms.hub_data import hub_data_identity

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    _resolve_hf_datasets_cache_dir.cache_clear()
    try:
        config = {"dataset_path": "lmms-lab-encoder/LMMs-Eval-Lite", "dataset_name": "gqa"}
        cached_hub_dataset(
            tmp_path / "datasets", config["dataset_path"], "gqa", "a" * 40, {"q": ["x"]}, "lite", 1
        )
        missing = hub_data_identity("gqa_lite", config)
        assert missing["unresolved"] == "lmms-lab-encoder/GQA"
        cached_hub_dataset(
            tmp_path / "datasets",
            "lmms-lab-encoder/GQA",
            "testdev_balanced_images",
            "b" * 40,
            {"id": ["1"]},
            "testdev",
            1,
        )
        assert hub_data_identity("gqa_lite", config) == {
            "hub": "lmms-lab-encoder/LMMs-Eval-Lite",
            "config": "gqa",
            "commit": "a" * 40,
            "side": [
                {"hub": "lmms-lab-encoder/GQA", "config": "testdev_balanced_images", "commit": "b" * 40}
            ],
        }
        assert "side" not in hub_data_identity("vqav2_val_lite", {**config, "dataset_name": "gqa"})
    finally:
        _resolve_hf_datasets_cache_dir.cache_clear()
