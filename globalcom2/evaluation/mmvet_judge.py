"""MM-Vet's separate judging step: score recorded answers with lmms-eval's own GPT grader.

``mmvet_local`` only records answers (lmms-eval's MM-Vet scoring calls a GPT judge per sample). This
step reads the samples file of such a run, looks each document up in the local MM-Vet data by its
``doc_id``, and calls lmms-eval's ``mmvet_process_results`` / ``mmvet_aggregate_results`` unchanged::

    OPENAI_API_KEY=... python -m globalcom2.evaluation.mmvet_judge \\
        --samples results/.../20250101_000000_samples_mmvet_local.jsonl

The judge is configured as lmms-eval configures it: ``API_TYPE`` (``openai`` by default, or ``azure``),
``OPENAI_API_KEY`` / ``OPENAI_API_URL`` or ``AZURE_API_KEY`` / ``AZURE_ENDPOINT``, and ``MODEL_VERSION``
(default ``gpt-4o-2024-11-20``; the LLaVA papers used GPT-4-0613). Without credentials it stops with a
message and computes nothing; a sample the judge fails to grade stops it too, instead of counting 0.

The output (default: ``<samples>`` with ``_judged.json``) has lmms-eval's results layout,
``{"results": {"mmvet_local": {"gpt_eval_score,none": ...}}}``, plus the per-sample grades, so
``paper_metric_value("MM-Vet", ...)`` reads it like any results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

TASK = "mmvet_local"
CREDENTIALS = {"openai": ("OPENAI_API_KEY",), "azure": ("AZURE_API_KEY", "AZURE_ENDPOINT")}


class JudgeUnavailableError(RuntimeError):
    """No credentials for the GPT judge: nothing was scored."""


def check_credentials() -> str:
    """The API type, after checking its credentials are set (raises :class:`JudgeUnavailableError`)."""
    api_type = os.environ.get("API_TYPE", "openai")
    missing = [name for name in CREDENTIALS.get(api_type, ()) if not os.environ.get(name)]
    if missing:
        raise JudgeUnavailableError(
            f"MM-Vet is scored by a GPT judge and {', '.join(missing)} is not set (API_TYPE={api_type}). "
            "No score was computed. Set the key (optionally OPENAI_API_URL for a compatible server and "
            "MODEL_VERSION for the judge model) and run this command again; the recorded answers are kept."
        )
    return api_type


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        samples = [json.loads(line) for line in handle if line.strip()]
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def answer_of(sample: dict[str, Any]) -> str:
    """The model's answer as lmms-eval logged it (``filtered_resps``; flattened or not)."""
    value = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"doc {sample.get('doc_id')}: expected one answer, got {value!r}")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"doc {sample.get('doc_id')}: answer is not text: {value!r}")
    return value


def judge(samples_path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Grade every sample; write and return the judged results."""
    import datasets

    from globalcom2.evaluation.local_data import require_local_dataset

    api_type = check_credentials()
    samples = read_samples(samples_path)
    docs = datasets.load_from_disk(str(require_local_dataset("mmvet", "test", TASK)))["test"]
    docs = docs.remove_columns([c for c in docs.column_names if c == "image"])
    from lmms_eval.tasks.mmvet import utils as mmvet  # builds the judge client; needs the credentials

    graded, failures = [], []
    for sample in samples:
        doc = docs[int(sample["doc_id"])]
        if "target" in sample and str(sample["target"]) != doc["answer"]:
            raise ValueError(
                f"doc {sample['doc_id']}: the samples file's target {sample['target']!r} differs from the local "
                f"data's answer {doc['answer']!r}; the data changed since the run"
            )
        grade = mmvet.mmvet_process_results(doc, [answer_of(sample)])["gpt_eval_score"]
        (graded if grade.get("eval_model") else failures).append(grade)
    if failures:
        ids = ", ".join(str(g["question_id"]) for g in failures[:5])
        raise RuntimeError(
            f"the judge returned no grade for {len(failures)} samples (e.g. {ids}); no score written"
        )
    score = mmvet.mmvet_aggregate_results(graded)
    result = {
        "results": {TASK: {"alias": TASK, "gpt_eval_score,none": score}},
        "judge": {
            "api_type": api_type,
            "model_version": mmvet.MODEL_VERSION,
            "samples_file": str(samples_path),
        },
        "n-samples": {TASK: {"original": len(docs), "effective": len(graded)}},
        "grades": graded,
    }
    out = Path(out) if out else Path(samples_path).with_name(Path(samples_path).stem + "_judged.json")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    tmp.replace(out)
    print(f"MM-Vet gpt_eval_score = {score:.2f} over {len(graded)} samples -> {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score recorded MM-Vet answers with lmms-eval's GPT judge.")
    parser.add_argument("--samples", required=True, help="the *_samples_mmvet_local.jsonl of a run")
    parser.add_argument("--out", default=None, help="output JSON (default: next to the samples file)")
    args = parser.parse_args(argv)
    try:
        judge(args.samples, args.out)
    except JudgeUnavailableError as err:
        print(f"mmvet_judge: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
