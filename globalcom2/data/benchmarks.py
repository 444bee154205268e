"""The ten paper benchmarks and the two EvalAI test splits: where their data comes from, which offline tasks
run them, and which metric enters the paper table (:data:`PAPER_METRICS`, the one place the reporting layer reads).

Offline task names end in ``_local`` (built-in lmms-eval names win on conflicts, so ours must differ).
Each task inherits its built-in lmms-eval config (prompts, generation settings, scoring; under
``protocol=llava`` the plugin sends LLaVA's prompts and settings instead and reads the answers as LLaVA's
scripts do, ``globalcom2.protocol.rules``) and reads its data from ``$GLOBALCOM2_DATA_DIR/<local_data>``
(``globalcom2.data.local``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class HubPart:
    """One split of one hub dataset config, saved locally under ``<benchmark>/<subdir>``."""

    repo: str
    config: str | None
    split: str
    subdir: str = ""  # "" = the benchmark folder itself


@dataclass(frozen=True)
class Benchmark:
    """A paper benchmark.

    Attributes:
        key: folder name under the data directory, and the name ``make data BENCHMARKS=`` takes.
        title: human-readable name.
        tasks: our offline lmms-eval task names for it.
        parts: the hub data it needs (lmms-eval 0.7.3 reads these repos; ``HF_TOKEN`` required).
        evalai: for a split without public answers, the EvalAI challenge that scores its submission file
            (``globalcom2.lmms.submissions``); ``None`` for the locally scored benchmarks. Such a split
            is downloaded only when asked for by name (``make data BENCHMARKS=<key>``).
    """

    key: str
    title: str
    tasks: tuple[str, ...]
    parts: tuple[HubPart, ...]
    evalai: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    b.key: b
    for b in (
        Benchmark(
            "vqav2",
            "VQAv2 (val)",
            ("vqav2_val_local",),
            (HubPart("lmms-lab-encoder/VQAv2", None, "validation"),),
        ),
        Benchmark(
            "gqa",
            "GQA (testdev balanced)",
            ("gqa_local",),
            (
                HubPart("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev", "instructions"),
                HubPart("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev", "images"),
            ),
        ),
        Benchmark(
            "vizwiz_vqa",
            "VizWiz (val)",
            ("vizwiz_vqa_val_local",),
            (HubPart("lmms-lab-encoder/VizWiz-VQA", None, "val"),),
        ),
        Benchmark(
            "scienceqa_img",
            "ScienceQA-IMG (test)",
            ("scienceqa_img_local",),
            (HubPart("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"),),
        ),
        Benchmark(
            "textvqa",
            "TextVQA (val)",
            ("textvqa_val_local",),
            (HubPart("lmms-lab-encoder/textvqa", None, "validation"),),
        ),
        Benchmark(
            "pope",
            "POPE (adversarial, popular, random)",
            ("pope_adv_local", "pope_pop_local", "pope_random_local"),
            (HubPart("lmms-lab-encoder/POPE", None, "test"),),
        ),
        Benchmark("mme", "MME", ("mme_local",), (HubPart("lmms-lab-encoder/MME", None, "test"),)),
        Benchmark(
            "mmbench_en",
            "MMBench-EN (dev)",
            ("mmbench_en_dev_static_local",),
            (HubPart("lmms-lab-encoder/MMBench", "en", "dev"),),
        ),
        Benchmark(
            "mmbench_cn",
            "MMBench-CN (dev)",
            ("mmbench_cn_dev_static_local",),
            (HubPart("lmms-lab-encoder/MMBench", "cn", "dev"),),
        ),
        Benchmark("mmvet", "MM-Vet", ("mmvet_local",), (HubPart("lmms-lab-encoder/MMVet", None, "test"),)),
        # The two columns the paper reports on test splits; their files go to EvalAI.
        Benchmark(
            "vqav2_testdev",
            "VQAv2 (test-dev, EvalAI)",
            ("vqav2_testdev_local",),
            (HubPart("lmms-lab-encoder/VQAv2", None, "testdev"),),
            evalai="https://eval.ai/web/challenges/challenge-page/830 (VQA Challenge; LLaVA docs/Evaluation.md L46)",
        ),
        Benchmark(
            "vizwiz_vqa_test",
            "VizWiz (test, EvalAI)",
            ("vizwiz_vqa_test_local",),
            (HubPart("lmms-lab-encoder/VizWiz-VQA", None, "test"),),
            evalai="https://eval.ai/web/challenges/challenge-page/2185 (VizWiz-VQA; LLaVA docs/Evaluation.md L63)",
        ),
    )
}
#: The benchmarks scored here (every paper column has one); `make data` fetches these by default.
LOCALLY_SCORED = tuple(key for key, benchmark in BENCHMARKS.items() if benchmark.evalai is None)
#: Tasks whose result is a submission file for an EvalAI server (they need an output path).
EVALAI_TASKS = tuple(
    task for benchmark in BENCHMARKS.values() if benchmark.evalai for task in benchmark.tasks
)

DEMO_TASK = "globalcom2_demo"
# The demo data's ``efficiency`` split (30 images at 672x672), the input of `make efficiency`.
EFFICIENCY_TASK = "globalcom2_efficiency"
GENERATED_TASKS = (DEMO_TASK, EFFICIENCY_TASK)


@dataclass(frozen=True)
class PaperMetric:
    """How one paper-table column is computed from lmms-eval results.

    Attributes:
        benchmark: key into :data:`BENCHMARKS`; its tasks are the ones whose results enter the value.
        metric: lmms-eval metric name (results key ``"<metric>,none"``).
        reduce: ``"single"`` (one task) or ``"mean"`` (the mean over ``tasks``).
        scale: multiply by this to get the paper's unit (lmms-eval accuracies are fractions).
        source: ``"results"`` (the lmms-eval results file) or ``"mmvet_judge"`` (the separate judging step).
        comparable: whether the value is computed on the split and protocol the paper reports.
        note: what differs from the paper's protocol, or why it matches.
    """

    benchmark: str
    metric: str
    reduce: Literal["single", "mean"]
    scale: float
    source: Literal["results", "mmvet_judge"]
    comparable: bool
    note: str

    @property
    def tasks(self) -> tuple[str, ...]:
        """The benchmark's tasks (stated once, in :data:`BENCHMARKS`)."""
        return BENCHMARKS[self.benchmark].tasks


# Column header -> how the column is computed. MME is the perception score only (sum over its ten
# perception subtasks, max 2000), as GlobalCom² and LLaVA report it.
PAPER_METRICS: dict[str, PaperMetric] = {
    "VQAv2": PaperMetric(
        "vqav2",
        "exact_match",
        "single",
        100.0,
        "results",
        False,
        "VQA accuracy on val, a local proxy; the paper reports test-dev, which only EvalAI scores "
        "(benchmark=vqav2_testdev writes the submission file)",
    ),
    "GQA": PaperMetric(
        "gqa",
        "llava_exact_match",
        "single",
        100.0,
        "results",
        True,
        "exact match on testdev-balanced as LLaVA scores it: a trailing '.' stripped and lower-cased, then "
        "compared exactly (scripts/convert_gqa_for_eval.py, GQA's eval.py); lmms-eval's exact_match, which "
        "also ignores punctuation inside an answer (tshirt = t-shirt), stays in the cell's metrics",
    ),
    "VizWiz": PaperMetric(
        "vizwiz_vqa",
        "exact_match",
        "single",
        100.0,
        "results",
        False,
        "VQA accuracy on val, a local proxy; the paper reports test, which only EvalAI scores "
        "(benchmark=vizwiz_vqa_test writes the submission file)",
    ),
    "SQA-IMG": PaperMetric(
        "scienceqa_img",
        "exact_match",
        "single",
        100.0,
        "results",
        True,
        "option-letter accuracy on the image subset of test; protocol=llava reads answers as LLaVA's "
        "eval_science_qa.py does",
    ),
    "TextVQA": PaperMetric(
        "textvqa",
        "exact_match",
        "single",
        100.0,
        "results",
        False,
        "VQA accuracy on val. protocol=llava sends the OCR-token line of LLaVA's question file, as the eval "
        "scripts the paper cites do; the published vanilla 64.9 (7B, LLaVA's model zoo) is reproduced without "
        "it (about 61.4 with it: haotian-liu/LLaVA#1326), and GlobalCom2's later loader drops it; "
        "protocol=lmms_eval sends no OCR line",
    ),
    "POPE": PaperMetric(
        "pope",
        "pope_f1_score",
        "mean",
        100.0,
        "results",
        True,
        "F1 averaged over the adversarial, popular and random splits (LLaVA eval_pope); lmms-lab's random "
        "split holds 3,000 questions, LLaVA's question file 2,910",
    ),
    "MME (perception)": PaperMetric(
        "mme",
        "mme_perception_score",
        "single",
        1.0,
        "results",
        True,
        "perception score only (max 2000); lmms-eval's prompt suffix replaces 'Please answer yes or no.'",
    ),
    "MMBench-EN": PaperMetric(
        "mmbench_en",
        "gpt_eval_score",
        "single",
        1.0,
        "results",
        False,
        "CircularEval on dev with rule-based (no-GPT) answer extraction; the paper used the GPT-assisted "
        "matching of the MMBench tooling, which differs only for answers without a clear option letter; "
        "lmms-lab's en dev split (4,329 rows) appears to be the 20231003 release, where LLaVA's script "
        "scored mmbench_dev_20230712.tsv (4,377 rows)",
    ),
    "MMBench-CN": PaperMetric(
        "mmbench_cn",
        "gpt_eval_score",
        "single",
        1.0,
        "results",
        False,
        "as MMBench-EN, on the Chinese dev set",
    ),
    "MM-Vet": PaperMetric(
        "mmvet",
        "gpt_eval_score",
        "single",
        1.0,
        "mmvet_judge",
        False,
        "GPT-judged score from `python -m globalcom2.lmms.mmvet_judge`; the judge model "
        "(MODEL_VERSION, default gpt-4o-2024-11-20) differs from the paper's GPT-4-0613",
    ),
}


def all_local_tasks() -> list[str]:
    """Every offline task of the ten benchmarks and the EvalAI test splits, in table order."""
    return [task for b in BENCHMARKS.values() for task in b.tasks]


def paper_metric_value(column: str, results: Mapping[str, Any]) -> float:
    """The paper-table value of ``column`` from an lmms-eval results dict (or a judge results dict).

    Args:
        column: a key of :data:`PAPER_METRICS`.
        results: the dict ``simple_evaluate`` returns / ``*_results.json`` holds (``results[task][metric]``);
            for MM-Vet, the judge's output file, which has the same layout.

    Raises:
        KeyError: an unknown column (the message lists the valid ones), or a task or metric is missing
            from ``results`` (never a silent 0).
    """
    if column not in PAPER_METRICS:
        raise KeyError(f"unknown paper-table column {column!r}; choose from {list(PAPER_METRICS)}")
    spec = PAPER_METRICS[column]
    per_task = results.get("results", {})
    values = []
    for task in spec.tasks:
        if task not in per_task:
            raise KeyError(f"{column}: task {task!r} is not in the results (have: {sorted(per_task)})")
        key = f"{spec.metric},none"
        if key not in per_task[task] or per_task[task][key] is None:
            raise KeyError(
                f"{column}: metric {key!r} missing for task {task!r} (have: {sorted(per_task[task])})"
            )
        values.append(float(per_task[task][key]))
    value = values[0] if spec.reduce == "single" else sum(values) / len(values)
    return value * spec.scale
