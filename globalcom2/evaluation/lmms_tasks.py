"""lmms-eval task classes our YAMLs name with ``class: !function globalcom2.evaluation.lmms_tasks.<Name>``.

lmms-eval passes the whole YAML mapping to the class; the keys below are ours and are removed before
``ConfigurableTask`` sees the config.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.task import ConfigurableTask
from loguru import logger

from globalcom2.evaluation.local_data import load_builtin_config, provenance, require_local_dataset


def _on_disk(config: dict[str, Any], path: str) -> dict[str, Any]:
    """``config`` reading the ``save_to_disk`` folder ``path`` (recorded in the run's task config)."""
    return {**config, "dataset_path": path, "dataset_name": None, "dataset_kwargs": {"load_from_disk": True}}


class LocalDataTask(ConfigurableTask):
    """A built-in lmms-eval config plus our overrides, reading data from the local data directory.

    YAML keys: ``base_yaml`` (built-in config to inherit, relative to ``lmms_eval/tasks``; optional),
    ``local_data`` (folder under ``$GLOBALCOM2_DATA_DIR``; required).
    """

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = dict(config or {})
        config.pop("class", None)
        base_yaml = config.pop("base_yaml", None)
        local_data = config.pop("local_data", None)
        if not local_data:
            raise ValueError(f"task {config.get('task')!r}: LocalDataTask needs a `local_data` key")
        merged = {**(load_builtin_config(base_yaml) if base_yaml else {}), **config}
        task = merged.get("task", "")
        path = require_local_dataset(local_data, merged.get("test_split") or "", task)
        if provenance(local_data).get("kind") == "synthetic-fixture":
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
        from globalcom2.evaluation import demo

        config = dict(config or {})
        config.pop("class", None)
        split = config.pop("demo_split", "test")
        seed = config.pop("demo_seed", None)
        size = config.pop("demo_size", None)
        path = demo.ensure_demo_dataset(split=split, seed=seed, size=size)
        config["test_split"] = split
        super().__init__(config=_on_disk(config, str(path)), **kwargs)
