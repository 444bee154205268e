"""lmms-eval task classes our YAMLs name with ``class: !function globalcom2.lmms.tasks.<Name>``.

lmms-eval passes the whole YAML mapping to the class; the keys below are ours and are removed before
``ConfigurableTask`` sees the config. A task YAML in ``tasks/`` names the built-in lmms-eval YAML it
inherits (``base_yaml``, relative to ``lmms_eval/tasks``) and the data folder it reads (``local_data``,
under ``$GLOBALCOM2_DATA_DIR``: ``globalcom2.data.local``). Inheriting the built-in YAML by package-relative
path keeps prompts, generation settings and scoring exactly lmms-eval's, with no copy that could drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableTask
from loguru import logger

from globalcom2.data.local import data_source, require_benchmark_data


def load_builtin_config(base_yaml: str) -> dict[str, Any]:
    """A built-in lmms-eval task config (``<lmms_eval>/tasks/<base_yaml>``), includes and functions resolved."""
    import lmms_eval.tasks
    from lmms_eval import utils

    path = Path(lmms_eval.tasks.__file__).parent / base_yaml
    if not path.is_file():
        raise FileNotFoundError(
            f"built-in lmms-eval task config {path} not found (lmms-eval version changed?)"
        )
    config = utils.load_yaml_config(yaml_path=str(path), mode="full")
    for key in ("task", "tag", "group", "group_alias", "task_alias"):
        config.pop(key, None)
    return config


def _on_disk(config: dict[str, Any], path: str) -> dict[str, Any]:
    """``config`` reading the ``save_to_disk`` folder ``path`` (recorded in the run's task config)."""
    return {**config, "dataset_path": path, "dataset_name": None, "dataset_kwargs": {"load_from_disk": True}}


class LocalDataTask(ConfigurableTask):
    """A built-in lmms-eval config plus our overrides, reading data from the local data directory.

    YAML keys: ``base_yaml`` (built-in config to inherit, relative to ``lmms_eval/tasks``; optional),
    ``local_data`` (folder under ``$GLOBALCOM2_DATA_DIR``; required), ``extra_metrics`` (entries appended to
    the ``metric_list`` of the merged config, whose inherited entries then stay lmms-eval's, with no copy to
    drift; optional, and refused beside a ``process_results``, which lmms-eval lets compute every metric).
    """

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = dict(config or {})
        config.pop("class", None)
        base_yaml = config.pop("base_yaml", None)
        local_data = config.pop("local_data", None)
        if not local_data:
            raise ValueError(f"task {config.get('task')!r}: LocalDataTask needs a `local_data` key")
        extra_metrics = config.pop("extra_metrics", None) or []
        merged = {**(load_builtin_config(base_yaml) if base_yaml else {}), **config}
        if extra_metrics:
            if merged.get("process_results") is not None:
                # lmms-eval would key each metric by its function and never compute it (ConfigurableTask
                # ._prepare_metric_and_aggregation): the missing score would show only after the evaluation
                raise ValueError(
                    f"task {merged.get('task')!r}: extra_metrics cannot be added to a task with a "
                    "process_results, which computes every metric itself; add them there"
                )
            merged["metric_list"] = [*(merged.get("metric_list") or []), *extra_metrics]
        task = merged.get("task", "")
        path = require_benchmark_data(local_data, merged.get("test_split") or "", task)
        if data_source(local_data).get("kind") == "synthetic-fixture":
            logger.warning(
                f"task {task!r} reads SYNTHETIC FIXTURE rows from {path}: its scores test the wiring, "
                "they are not benchmark results"
            )
        super().__init__(config=_on_disk(merged, str(path)), **kwargs)


class DemoTask(ConfigurableTask):
    """The synthetic demo benchmark: generated (once, cached) on first use, then read from disk.

    YAML keys: ``demo_split`` (``test`` by default), ``demo_seed`` and ``demo_size`` (optional overrides
    of the embedded defaults).
    """

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from globalcom2.data import demo

        config = dict(config or {})
        config.pop("class", None)
        split = config.pop("demo_split", "test")
        seed = config.pop("demo_seed", None)
        size = config.pop("demo_size", None)
        path = demo.ensure_demo_dataset(split=split, seed=seed, size=size)
        config["test_split"] = split
        super().__init__(config=_on_disk(config, str(path)), **kwargs)
