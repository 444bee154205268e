"""The Hydra benchmark configs agree with the one benchmark table (``globalcom2.data.benchmarks``).

``BENCHMARKS`` says which offline tasks run a benchmark and ``PAPER_METRICS`` which paper column each
fills; the YAML files under ``configs/benchmark`` restate that for Hydra. This test makes the table the
single source: a task or column added to one side and not the other fails here.
"""

from __future__ import annotations

import pytest
from helpers import CONFIGS
from hydra import compose, initialize_config_dir

import globalcom2.run  # noqa: F401  (registers the project_root resolver)
from globalcom2.data.benchmarks import BENCHMARKS, GENERATED_TASKS, LOCALLY_SCORED, PAPER_METRICS

FILES = sorted(p.stem for p in (CONFIGS / "benchmark").glob("*.yaml") if not p.stem.startswith("_"))


def benchmark_config(stem: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"benchmark={stem}"]).benchmark


def test_every_benchmark_of_the_table_has_a_config():
    assert set(BENCHMARKS) <= set(FILES)
    assert set(FILES) - set(BENCHMARKS) == {"paper_suite", "demo", "efficiency"}


@pytest.mark.parametrize("stem", FILES)
def test_a_config_states_what_the_table_says(stem):
    config = benchmark_config(stem)
    assert config.name == stem
    if stem in BENCHMARKS:
        assert list(config.tasks) == list(BENCHMARKS[stem].tasks)
        assert list(config.columns) == [c for c, m in PAPER_METRICS.items() if m.benchmark == stem]
    elif stem == "paper_suite":
        assert list(config.tasks) == [t for key in LOCALLY_SCORED for t in BENCHMARKS[key].tasks]
        assert list(config.columns) == list(PAPER_METRICS)
    else:
        assert set(config.tasks) <= set(GENERATED_TASKS) and list(config.columns) == []
    # every key comes from the shared default, and a file leaves nothing mandatory unset
    assert set(config) == set(benchmark_config("gqa"))
