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
from globalcom2.lmms.hub_data import SIDE_DATASETS, hub_data_identity, loaded_commit_problems, pinned_task


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


def test_every_split_is_checked_and_a_legacy_cache_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "datasets"
    for sha, when in (("a" * 40, 1_000), ("b" * 40, 2_000)):
        cached_hub_dataset(cache, "org/lite", "gqa", sha, {"q": ["x"]}, "lite", mtime=when)
    newest = datasets.load_dataset("org/lite", "gqa", cache_dir=str(cache))["lite"]  # commit b
    older = datasets.Dataset.from_file(
        str(cache / "org___lite" / "gqa" / "0.0.0" / ("a" * 40) / "lite-lite.arrow")
    )
    mixed = datasets.DatasetDict({"lite": older, "test": newest})
    (problem,) = loaded_commit_problems({"t": mixed}, {"t": "a" * 40})
    assert problem.startswith("task 't' read ") and problem.endswith(f"{'b' * 40}, not commit {'a' * 40}")
    legacy = cache / "org___lite" / "gqa-1f2e3d" / "0.0.0" / "5c4b3a2f1e0d"
    legacy.mkdir(parents=True)
    arrow = cache / "org___lite" / "gqa" / "0.0.0" / ("a" * 40) / "lite-lite.arrow"
    (legacy / arrow.name).write_bytes(arrow.read_bytes())
    old_layout = datasets.DatasetDict({"lite": datasets.Dataset.from_file(str(legacy / arrow.name))})
    (problem,) = loaded_commit_problems({"t": old_layout}, {"t": "a" * 40})
    assert "written by datasets < 3" in problem


def test_side_datasets_are_every_dataset_a_lite_tasks_code_loads():
    """:data:`SIDE_DATASETS` is read off lmms-eval's code by hand: every Python file of each lite task's
    folder is scanned for ``load_dataset(`` calls, whose quoted arguments must be a listed (repo, config),
    so an lmms-eval release that adds, drops or renames one fails here instead of leaving it out of the
    identity (a call without quoted arguments fails too: it needs a reading)."""
    suite = OmegaConf.load(CONFIGS / "benchmark" / "paper_suite.yaml")
    tasks_root = Path(lmms_eval.tasks.__file__).parent
    found = {}
    for task in suite.lite_tasks:
        yaml_path = preflight._builtin_index()[task]["yaml_path"]
        assert preflight.task_yaml(yaml_path)["dataset_path"]  # a hub task
        folder = Path(yaml_path).parent
        assert folder.is_relative_to(tasks_root) and folder != tasks_root
        calls = [
            tuple(re.findall(r'"([^"]*)"', arguments))
            for source in sorted(folder.rglob("*.py"))
            for arguments in re.findall(r"\bload_dataset\(([^)]*)\)", source.read_text())
        ]
        if calls:
            found[task] = tuple(call[:2] for call in calls)
            assert all(len(call) >= 2 for call in calls), f"{folder}: {calls}"
    assert found == SIDE_DATASETS


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """lmms-eval's datasets cache and ``datasets``' own, apart, both under ``tmp_path``, offline."""
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "lmms_eval"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _resolve_hf_datasets_cache_dir.cache_clear()
    yield tmp_path / "lmms_eval", tmp_path / "datasets"
    _resolve_hf_datasets_cache_dir.cache_clear()


def test_a_side_dataset_joins_the_identity_from_the_cache_its_call_reads(caches):
    """GQA-lite's images are loaded by lmms-eval's code with no ``cache_dir``: from ``datasets``' own cache,
    which is where their commit is read, not lmms-eval's (a copy there is never loaded)."""
    lmms_cache, datasets_cache = caches
    config = {"dataset_path": "lmms-lab-encoder/LMMs-Eval-Lite", "dataset_name": "gqa"}
    cached_hub_dataset(lmms_cache, config["dataset_path"], "gqa", "a" * 40, {"q": ["x"]}, "lite", 1)
    images = ("lmms-lab-encoder/GQA", "testdev_balanced_images")
    cached_hub_dataset(lmms_cache, *images, "c" * 40, {"id": ["1"]}, "testdev", 1)  # never read by the call
    assert hub_data_identity("gqa_lite", config)["unresolved"] == "lmms-lab-encoder/GQA"
    cached_hub_dataset(datasets_cache, *images, "b" * 40, {"id": ["1"]}, "testdev", 1)
    assert hub_data_identity("gqa_lite", config) == {
        "hub": "lmms-lab-encoder/LMMs-Eval-Lite",
        "config": "gqa",
        "commit": "a" * 40,
        "side": [{"hub": images[0], "config": images[1], "commit": "b" * 40}],
    }
    assert "side" not in hub_data_identity("vqav2_val_lite", config)
