"""lmms-eval integration: offline benchmark tasks, their data, the demo benchmark, checks and helpers.

* :data:`PAPER_METRICS` / :data:`BENCHMARKS` (``benchmarks``): which task and metric make each paper column;
* ``local_data``: the data directory (``$GLOBALCOM2_DATA_DIR``) and its checks;
* ``lmms_tasks``: the task classes our YAMLs in ``tasks/`` use;
* ``fixtures`` / ``demo``: synthetic real-schema rows, the synthetic demo benchmark;
* ``preflight`` / ``cli`` / ``api``: checks before loading, the loud CLI, the Python helper;
* ``download`` (``make data``), ``mmvet_judge`` (MM-Vet's separate GPT-judging step).

The model plugin itself is :mod:`globalcom2.lmms_plugin`.
"""

from globalcom2.evaluation.benchmarks import (
    BENCHMARKS,
    DEMO_TASK,
    EFFICIENCY_TASK,
    GENERATED_TASKS,
    PAPER_METRICS,
    PaperMetric,
    paper_metric_value,
)

__all__ = [
    "BENCHMARKS",
    "DEMO_TASK",
    "EFFICIENCY_TASK",
    "GENERATED_TASKS",
    "PAPER_METRICS",
    "PaperMetric",
    "paper_metric_value",
]
