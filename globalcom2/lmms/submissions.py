"""EvalAI submission files for the two test splits the paper reports: VQAv2 test-dev and VizWiz test.

Neither split has public answers; only the EvalAI servers score them (LLaVA's ``docs/Evaluation.md`` links
challenges 830 and 2185 on eval.ai). Our offline tasks ``vqav2_testdev_local`` and ``vizwiz_vqa_test_local``
generate the answers and, at the end of the cell, write the files to upload into ``<cell>/submissions/``
(lmms-eval's ``output_path``). The files follow LLaVA's converters, which produced the paper's columns
(haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd):

* VQAv2 (``scripts/convert_vqav2_for_submission.py``): ``[{"question_id": int, "answer": str}]`` with every
  answer passed through the EvalAI answer processor, **padded** with ``""`` to every question of test2015
  in the order of the official question file, because the server expects the whole test2015 set even for
  the test-dev phase. The test2015 ids are not in the test-dev rows we download, so padding reads the
  official ``v2_OpenEnded_mscoco_test2015_questions.json`` (visualqa.org's ``v2_Questions_Test_mscoco.zip``)
  when it lies in ``$GLOBALCOM2_DATA_DIR`` (outside the dataset folder, so ``make data --force`` keeps it).
  Without it the task writes the test-dev answers, sorted by id, and says how to pad them
  (``python -m globalcom2.lmms.submissions pad-vqav2``).
* VizWiz (``scripts/convert_vizwiz_for_submission.py``): ``[{"image": "VizWiz_test_XXXXXXXX.jpg",
  "answer": str}]``, processed answers, sorted by image (the server matches by image, not by position).

LLaVA asserts that every VizWiz test question was answered and pads VQAv2 silently. A padded file of a
partial run would be accepted and scored near zero, so when fewer questions were answered than the split
holds (``benchmark.limit``) we write the answers as ``partial_<benchmark>.json``, never as the upload
file, and warn. Two answers to one question are refused.

The answer processor is lmms-eval's ``EvalAIAnswerProcessor``, the same normalisation as LLaVA's
``llava/eval/m4c_evaluator.py`` (punctuation, digits, articles, contractions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from globalcom2.atomic import atomic_write_json
from globalcom2.data.local import data_source
from globalcom2.paths import data_dir

VQAV2_BENCHMARK = "vqav2_testdev"
VIZWIZ_BENCHMARK = "vizwiz_vqa_test"
VQAV2_ANSWERS = "vqav2_testdev_answers.json"
VQAV2_SUBMISSION = "vqav2_test2015_submission.json"
VQAV2_QUESTIONS = "v2_OpenEnded_mscoco_test2015_questions.json"
VIZWIZ_SUBMISSION = "vizwiz_test_submission.json"
SUBMISSIONS_DIR = "submissions"


@functools.cache
def _processor() -> Any:
    """lmms-eval's ``EvalAIAnswerProcessor``, built once (it compiles its regular expressions)."""
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    return EvalAIAnswerProcessor()


# -- lmms-eval hooks (named in tasks/vqav2/vqav2_testdev_local.yaml, tasks/vizwiz_vqa/vizwiz_vqa_test_local.yaml) --
def vqav2_submission_result(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """``process_results``: one submission entry per question."""
    (answer,) = results
    return {"submission": {"question_id": int(doc["question_id"]), "answer": _processor()(answer)}}


def vizwiz_submission_result(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """``process_results``: one submission entry per question (VizWiz names the image, not the question)."""
    (answer,) = results
    return {"submission": {"image": f"{doc['question_id']}.jpg", "answer": _processor()(answer)}}


def write_vqav2_submission(results: list[dict[str, Any]], args: Any) -> int:
    """``aggregation``: the test-dev answers and, with the test2015 question file, the padded upload.

    Returns the number of answered questions (lmms-eval reports it as the ``submission`` metric).
    """
    folder = submissions_dir(args)
    answers = sorted(unique_answers(results, "question_id"), key=lambda entry: entry["question_id"])
    _remove_earlier(folder, VQAV2_BENCHMARK, VQAV2_ANSWERS, VQAV2_SUBMISSION)
    if not _complete(answers, VQAV2_BENCHMARK, folder):
        return len(answers)
    atomic_write_json(folder / VQAV2_ANSWERS, answers)
    questions = data_dir() / VQAV2_QUESTIONS
    if questions.is_file():
        padded = pad_vqav2(answers, load_question_ids(questions))
        atomic_write_json(folder / VQAV2_SUBMISSION, padded)
        logger.info(f"VQAv2: {len(answers)} answers padded to {len(padded)} test2015 questions in {folder}")
    else:
        logger.warning(
            f"VQAv2: wrote {len(answers)} test-dev answers to {folder / VQAV2_ANSWERS}, not yet uploadable: "
            "EvalAI expects every test2015 question. Pad them with `python -m globalcom2.lmms.submissions "
            f"pad-vqav2 --answers {folder / VQAV2_ANSWERS} --questions <{VQAV2_QUESTIONS}> --out "
            f"{folder / VQAV2_SUBMISSION}` (the file is in visualqa.org's v2_Questions_Test_mscoco.zip; put it "
            f"into {questions.parent} and later cells pad by themselves)"
        )
    return len(answers)


def write_vizwiz_submission(results: list[dict[str, Any]], args: Any) -> int:
    """``aggregation``: the VizWiz test upload. Returns the number of answered questions."""
    folder = submissions_dir(args)
    answers = sorted(unique_answers(results, "image"), key=lambda entry: entry["image"])
    _remove_earlier(folder, VIZWIZ_BENCHMARK, VIZWIZ_SUBMISSION)
    if _complete(answers, VIZWIZ_BENCHMARK, folder):
        atomic_write_json(folder / VIZWIZ_SUBMISSION, answers)
        logger.info(f"VizWiz: {len(answers)} answers written to {folder / VIZWIZ_SUBMISSION}")
    return len(answers)


# -- the pieces --------------------------------------------------------------------------------------------------
def submissions_dir(args: Any) -> Path:
    """``<output_path>/submissions`` of this evaluation; refuses to guess when there is no output path."""
    output = getattr(args, "output_path", None)
    if not output:
        raise ValueError(
            "the EvalAI test tasks write their submission next to the results: give an output_path "
            "(globalcom2.run does; the CLI needs --output_path)"
        )
    folder = Path(output) / SUBMISSIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def unique_answers(results: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """``results``, or ``ValueError`` if two entries answer the same question (``key``)."""
    counts: dict[Any, int] = {}
    for entry in results:
        counts[entry[key]] = counts.get(entry[key], 0) + 1
    twice = sorted(question for question, count in counts.items() if count > 1)
    if twice:
        raise ValueError(
            f"{len(twice)} questions were answered more than once (e.g. {twice[:3]}); no submission"
        )
    return results


def split_rows(benchmark: str) -> int | None:
    """Rows of the benchmark's split as ``make data`` (or the fixtures) recorded them; ``None`` if unknown."""
    rows = [part.get("rows") for part in data_source(benchmark).get("parts", {}).values()]
    return rows[0] if len(rows) == 1 and isinstance(rows[0], int) else None


def _remove_earlier(folder: Path, benchmark: str, *names: str) -> None:
    """Delete what an earlier evaluation into the same output path wrote for ``benchmark`` (its answers, its
    upload, its partial answers) before this one writes: a later ``--limit`` run, or one without the question
    file, would otherwise leave the earlier method's upload beside its own answers."""
    for name in (*names, f"partial_{benchmark}.json"):
        (folder / name).unlink(missing_ok=True)


def _complete(answers: list[dict[str, Any]], benchmark: str, folder: Path) -> bool:
    """True if ``answers`` cover the whole split; otherwise keep them as ``partial_<benchmark>.json`` and warn."""
    expected = split_rows(benchmark)
    if expected is not None and len(answers) == expected:
        return True
    path = folder / f"partial_{benchmark}.json"
    atomic_write_json(path, answers)
    logger.warning(
        f"{benchmark}: {len(answers)} questions answered, the split has "
        f"{expected if expected is not None else 'an unknown number'} (benchmark.limit?), so no EvalAI file was "
        f"written; the answers are in {path}"
    )
    return False


def load_question_ids(path: str | Path) -> list[int]:
    """Question ids of an official VQA question file (``{"questions": [{"question_id": ...}, ...]}``), in order."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict) or not isinstance(payload.get("questions"), list):
        raise ValueError(f"{path} is not a VQA question file (no top-level 'questions' list)")
    return [int(question["question_id"]) for question in payload["questions"]]


def pad_vqav2(answers: Sequence[dict[str, Any]], question_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Every id of ``question_ids``, in that order, with its answer or ``""`` (LLaVA's converter).

    Raises:
        ValueError: a question is answered twice, or an answer's question is not among ``question_ids``
            (the wrong question file).
    """
    by_id = {int(entry["question_id"]): entry["answer"] for entry in answers}
    if len(by_id) != len(answers):
        raise ValueError("the answers name some question more than once; not padding")
    unknown = sorted(set(by_id) - set(question_ids))
    if unknown:
        raise ValueError(
            f"{len(unknown)} answered questions are not in the test2015 question file (e.g. {unknown[:3]}); "
            f"is it {VQAV2_QUESTIONS}?"
        )
    return [{"question_id": qid, "answer": by_id.get(qid, "")} for qid in question_ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="EvalAI submission files for VQAv2 test-dev.")
    commands = parser.add_subparsers(dest="command", required=True)
    pad = commands.add_parser("pad-vqav2", help="pad test-dev answers to every test2015 question")
    pad.add_argument("--answers", required=True, help=f"the cell's submissions/{VQAV2_ANSWERS}")
    pad.add_argument("--questions", required=True, help=VQAV2_QUESTIONS)
    pad.add_argument("--out", required=True, help="the file to upload")
    args = parser.parse_args(argv)
    try:
        answers = json.loads(Path(args.answers).read_text())
        padded = pad_vqav2(answers, load_question_ids(args.questions))
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, or the wrong shape
        print(f"error: {err!r}", file=sys.stderr)
        return 2
    os.makedirs(Path(args.out).parent, exist_ok=True)
    atomic_write_json(args.out, padded)
    print(f"{len(answers)} answers padded to {len(padded)} questions: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
