"""The benchmark catalog, the paper-metric table, the task YAMLs and the data-directory rules agree."""

from __future__ import annotations

from pathlib import Path

import lmms_eval.tasks
import pytest
from lmms_eval import utils

from globalcom2.data.benchmarks import (
    BENCHMARKS,
    GENERATED_TASKS,
    LOCALLY_SCORED,
    PAPER_METRICS,
    paper_metric_value,
)
from globalcom2.data.local import MissingDataError, require_local_dataset
from globalcom2.paths import DATA_DIR_ENV, PROJECT_ROOT, data_dir, tasks_dir

BUILTIN = Path(lmms_eval.tasks.__file__).parent


def our_task_configs() -> dict[str, dict]:
    configs = {}
    for path in tasks_dir().rglob("*.yaml"):
        config = utils.load_yaml_config(str(path), mode="simple")
        configs[config["task"]] = config
    return configs


def builtin_config(base_yaml: str) -> dict:
    return utils.load_yaml_config(str(BUILTIN / base_yaml), mode="simple")


def test_every_catalog_task_has_a_yaml_and_vice_versa():
    configs = our_task_configs()
    catalog = {t for b in BENCHMARKS.values() for t in b.tasks}
    assert set(configs) == catalog | set(GENERATED_TASKS)
    assert all(t.endswith("_local") for t in catalog)


def test_paper_metrics_cover_the_ten_benchmarks():
    scored = set(LOCALLY_SCORED)
    assert len(PAPER_METRICS) == 10 and {m.benchmark for m in PAPER_METRICS.values()} == scored
    # the two test splits the paper reports are EvalAI-only, and each has its val proxy here
    assert set(BENCHMARKS) - scored == {"vqav2_testdev", "vizwiz_vqa_test"}
    assert all(BENCHMARKS[key].evalai for key in set(BENCHMARKS) - scored)
    assert (
        "MME (perception)" in PAPER_METRICS
        and PAPER_METRICS["MME (perception)"].metric == "mme_perception_score"
    )
    for spec in PAPER_METRICS.values():  # a column reduces one task, or averages several (POPE)
        assert spec.benchmark in scored and (spec.reduce == "single") == (len(spec.tasks) == 1)


def test_the_hub_sources_are_the_ones_lmms_eval_reads():
    configs = our_task_configs()
    for benchmark in BENCHMARKS.values():
        task = configs[benchmark.tasks[0]]
        if "base_yaml" not in task:
            continue
        base = builtin_config(task["base_yaml"])
        part = benchmark.parts[0]
        split = task.get("test_split", base["test_split"])  # VQAv2 test-dev: the repo's testdev split
        assert (base["dataset_path"], base.get("dataset_name"), split) == (
            part.repo, part.config, part.split
        ), benchmark.key  # fmt: skip
    gqa_utils = (BUILTIN / "gqa" / "utils.py").read_text()
    assert 'load_dataset("lmms-lab-encoder/GQA", "testdev_balanced_images", split="testdev"' in gqa_utils


def test_mmvet_restates_the_builtin_prompt_and_generation_settings():
    ours, builtin = our_task_configs()["mmvet_local"], builtin_config("mmvet/mmvet.yaml")
    for key in (
        "generation_kwargs",
        "lmms_eval_specific_kwargs",
        "doc_to_target",
        "test_split",
        "output_type",
    ):
        assert ours[key] == builtin[key], key
    part = BENCHMARKS["mmvet"].parts[0]
    assert (part.repo, part.config, part.split) == (builtin["dataset_path"], None, builtin["test_split"])


def test_no_task_name_collides_with_a_builtin_one():
    from globalcom2.lmms.preflight import _builtin_index  # cached: indexing takes seconds

    assert not set(our_task_configs()) & set(_builtin_index())  # built-in names would win over ours


def test_paper_metric_value():
    results = {
        "results": {
            t: {"pope_f1_score,none": f}
            for t, f in zip(BENCHMARKS["pope"].tasks, [0.8, 0.9, 1.0], strict=True)
        }
    }
    assert paper_metric_value("POPE", results) == pytest.approx(90.0)
    with pytest.raises(KeyError, match="task 'mme_local' is not in the results"):
        paper_metric_value("MME (perception)", results)


def test_the_data_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert data_dir() == PROJECT_ROOT / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(MissingDataError, match=rf"{tmp_path / 'pope'}.*make data BENCHMARKS=pope"):
        require_local_dataset("pope", "test", "pope_adv_local")


def test_an_unknown_paper_column_is_named_with_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown paper-table column 'POEP'; choose from \[.*'POPE'"):
        paper_metric_value("POEP", {"results": {}})
