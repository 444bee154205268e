"""Functions our task YAMLs reference (``!function globalcom2.lmms.task_utils.<name>``).

Only what the built-in configs cannot do offline lives here; scoring stays lmms-eval's own:

* GQA: the built-in ``process_docs`` loads the images config from the hub by id; ours joins the
  locally saved images config instead (same join on ``imageId``).
* POPE: one task per COCO split (adversarial, popular, random), filtered from the local test split by
  its ``category`` column, so the paper's "F1 averaged over the three splits" can be computed; and the
  model's yes ratio (LLaVA's) in place of lmms-eval's, which is the answer key's.
* MMBench: the real ``en`` config stores ``index`` as a string, and lmms-eval's evaluator compares it with
  ``int(1e6)`` (``mmbench_evals.py``, ``eval_result``), which raises ``TypeError`` at the very end of a
  cell; ``mmbench_docs`` casts it to int64 first (both languages, a no-op where it already is).
* MMBench-CN: the built-in CN tasks only have the GPT-assisted aggregation; ours calls the same
  evaluator with ``eval_method="static"`` (rule-based extraction), as the built-in EN static task does.
* MM-Vet: predict-only. Scoring needs a GPT judge, so the task records the answers and reports how many
  await judging; ``globalcom2.lmms.mmvet_judge`` scores them later (and needs an API key).
"""

from __future__ import annotations

from typing import Any

import datasets
from loguru import logger

from globalcom2.atomic import atomic_write_json
from globalcom2.data.local import require_local_dataset

# -- GQA ---------------------------------------------------------------------------------------------


def gqa_local_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Attach each question's image from the local ``gqa/images`` config (joined on ``imageId``)."""
    images = datasets.load_from_disk(str(require_local_dataset("gqa/images", "testdev", "gqa_local")))[
        "testdev"
    ]
    row_of = {image_id: row for row, image_id in enumerate(images["id"])}
    missing = sorted(set(dataset["imageId"]) - set(row_of))
    if missing:
        raise KeyError(
            f"GQA questions refer to {len(missing)} image ids absent from gqa/images, e.g. {missing[:3]}"
        )
    encoded = images.cast_column("image", datasets.Image(decode=False))["image"]  # bytes, not pixels
    column = [encoded[row_of[image_id]] for image_id in dataset["imageId"]]
    return dataset.add_column("image", column, feature=datasets.Image())


def llava_exact_match(references: list[str], predictions: list[str]) -> float:
    """GQA scored as LLaVA scores it, for the paper's GQA column: each answer stripped (lmms-eval strips it
    before any metric, as ``llava/eval/model_vqa_loader.py`` L116 does), its trailing ``.`` removed and
    lower-cased (``scripts/convert_gqa_for_eval.py`` L14, haotian-liu/LLaVA at c121f04), then compared with
    the gold answer exactly (GQA's ``eval.py``, which LLaVA's ``scripts/v1_5/eval/gqa.sh`` L39 runs:
    ``correct = (predicted == gold)``). lmms-eval's ``exact_match`` beside it also ignores punctuation inside
    an answer (``t-shirt`` = ``tshirt``) and case in the gold answer; GQA's gold answers are lower-case.

    lmms-eval calls a metric per document, with its one gold answer and its one prediction in lists
    (``ConfigurableTask.process_results``); the mean over the pairs is returned.
    """
    if len(references) != len(predictions) or not references:
        raise ValueError(
            f"one prediction per gold answer expected, got {len(predictions)} and {len(references)}"
        )
    hits = [p.strip().rstrip(".").lower() == r for r, p in zip(references, predictions, strict=True)]
    return sum(hits) / len(hits)


# -- POPE --------------------------------------------------------------------------------------------


def _pope_split(dataset: datasets.Dataset, category: str) -> datasets.Dataset:
    # Only the category column is read (no image decoding), and nothing is cached next to the data:
    # the data directory may be read-only or shared between processes.
    subset = dataset.filter(lambda value: value == category, input_columns="category", keep_in_memory=True)
    if len(subset) == 0:
        raise ValueError(
            f"POPE data has no rows with category {category!r} (present: {sorted(set(dataset['category']))})"
        )
    return subset


def pope_adversarial_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return _pope_split(dataset, "adversarial")


def pope_popular_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return _pope_split(dataset, "popular")


def pope_random_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return _pope_split(dataset, "random")


#: The POPE metric that replaces lmms-eval's ``pope_yes_ratio`` (``tasks/pope/_pope_local_template``).
POPE_ANSWER_YES_RATIO = "pope_answer_yes_ratio"


def pope_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """lmms-eval's POPE scoring of one answer (``lmms_eval/tasks/pope/utils.py``, ``pope_process_results``),
    its ``pope_yes_ratio`` entry renamed :data:`POPE_ANSWER_YES_RATIO`: the same per-answer record, which
    :func:`pope_answer_yes_ratio` aggregates over the answers instead of the answer key."""
    from lmms_eval.tasks.pope.utils import pope_process_results as builtin

    scored = builtin(doc, results)
    scored[POPE_ANSWER_YES_RATIO] = scored.pop("pope_yes_ratio")
    return scored


def pope_answer_yes_ratio(results: list[dict[str, Any]]) -> float:
    """The share of answers that are "yes": LLaVA's ``yes_ratio`` (``llava/eval/eval_pope.py`` L37,
    ``pred_list.count(1) / len(pred_list)``), the model's yes-bias. lmms-eval's ``pope_yes_ratio`` counts
    the ground truth instead, so reads 0.5 on every balanced split whatever the model answers. An answer
    counts as yes as lmms-eval's precision and recall count it, ``prediction == "yes"`` (under
    ``protocol=llava`` the prediction is LLaVA's reading of the answer, ``protocol.rules.llava_pope_answer``)."""
    if not results:
        raise ValueError("POPE yes ratio of no answers")
    return sum(result["prediction"] == "yes" for result in results) / len(results)


# -- MMBench-CN, static ------------------------------------------------------------------------------


def mmbench_cn_dev_static_aggregate(results: list[dict[str, Any]], args: Any) -> float:
    """CircularEval accuracy (percent) with rule-based answer extraction; no API calls.

    Mirrors lmms-eval's ``en_utils.mmbench_aggregate_dev_results_static`` for the CN evaluator.
    """
    from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
    from lmms_eval.tasks.mmbench.cn_utils import mmbench_evaluator

    overall, by_category, by_l2 = mmbench_evaluator.eval_result(results, eval_method="static")
    path = generate_submission_file("mmbench_cn_dev_static_results.json", args)
    detail = {"overall_acc": overall, "category_acc": by_category, "l2_category_acc": by_l2}
    atomic_write_json(path, detail)  # whole or absent, never half of it
    return overall * 100


# -- MM-Vet, predict-only ----------------------------------------------------------------------------
# lmms-eval's own mmvet utils build the judge client at import time and fail without an API key, so
# the two prompt helpers are restated here (same behaviour as lmms_eval/tasks/mmvet/utils.py).


def mmvet_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [] if doc["image"] is None else [doc["image"].convert("RGB")]


def mmvet_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def mmvet_predict_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """No score: mark the answer as awaiting the judge (the samples file keeps the answer)."""
    return {"judge_pending": {"question_id": doc["question_id"]}}


def mmvet_count_pending(items: list[dict[str, Any]]) -> int:
    """How many MM-Vet answers await judging. Deliberately not a score: see the warning."""
    logger.warning(
        f"MM-Vet: {len(items)} answers recorded and NOT scored (the score needs a GPT judge). Run "
        "`python -m globalcom2.lmms.mmvet_judge --samples <…_samples_mmvet_local.jsonl>` with "
        "OPENAI_API_KEY set to compute gpt_eval_score."
    )
    return len(items)


# -- the synthetic demo benchmark -------------------------------------------------------------------


def demo_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def demo_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def demo_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match after normalisation, overall and for the item's question type."""
    from globalcom2.data.demo import normalize_answer

    score = float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))
    return {"exact_match": score, f"{doc['question_type']}_accuracy": score}


# -- MMBench -----------------------------------------------------------------------------------------


def mmbench_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """``index`` as int64 (the ``en`` config stores it as a string; the CircularEval grouping needs ints)."""
    if dataset.features["index"].dtype == "int64":
        return dataset
    # A new in-memory column, not ``cast_column``: that writes a cache file next to the (read-only) data.
    index = [int(value) for value in dataset["index"]]
    return dataset.remove_columns("index").add_column("index", index, feature=datasets.Value("int64"))
