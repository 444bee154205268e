"""MM-Vet's separate judging step: score recorded answers with lmms-eval's own GPT grader.

``mmvet_local`` only records answers (lmms-eval's MM-Vet scoring calls a GPT judge per sample). This
step reads the samples file of such a run, looks each document up in the local MM-Vet data by its
``doc_id``, and calls lmms-eval's ``mmvet_process_results`` / ``mmvet_aggregate_results`` unchanged::

    OPENAI_API_KEY=... python -m globalcom2.lmms.mmvet_judge \\
        --samples results/.../20250101_000000_samples_mmvet_local.jsonl

The judge is configured as lmms-eval configures it: ``API_TYPE`` (``openai`` by default, or ``azure``),
``OPENAI_API_KEY`` / ``OPENAI_API_URL`` or ``AZURE_API_KEY`` / ``AZURE_ENDPOINT``, and ``MODEL_VERSION``
(default ``gpt-4o-2024-11-20``; the LLaVA papers used GPT-4-0613). Without credentials it stops with a
message and computes nothing; a sample the judge fails to grade (no reply, or replies whose grade lmms-eval
cannot read, which it would count as 0) stops it too, and so does a judge that keeps replying out of range
(:class:`RecordedJudge`).

It fails fast rather than retrying for minutes: one probe request (``--timeout`` seconds, no retry)
must succeed before any sample is graded; every later request gets the same timeout and at most
``--retries`` attempts (lmms-eval's defaults are 5 attempts 10 s apart, each inside 3 rounds of
``get_chat_response``, with the OpenAI client's own retries on top); the first sample the judge cannot
grade stops the run; and ``--time-limit`` bounds the whole step. These bounds are set on lmms-eval's
``mmvet.utils`` module for this process only (its ``ServerConfig`` and the judge client's options); the
prompt, the parsing and the aggregation stay lmms-eval's.

The output (default: ``<samples>`` with ``_judged.json``) has lmms-eval's results layout,
``{"results": {"mmvet_local": {"gpt_eval_score,none": ...}}}``, plus the per-sample grades, so
``paper_metric_value("MM-Vet", ...)`` reads it like any results file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_json

TASK = "mmvet_local"
CREDENTIALS = {"openai": ("OPENAI_API_KEY",), "azure": ("AZURE_API_KEY", "AZURE_ENDPOINT")}
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
DEFAULT_TIME_LIMIT_S = 3600.0


#: The most judge requests one sample may take. After a reply whose first word is no number, lmms-eval's grader
#: asks again at a temperature 0.5 higher (two requests each time) and gives the sample 0 at temperature 2,
#: at most 9 requests; after a number outside [0, 1] it asks again at the same temperature, with no end.
MAX_REQUESTS_PER_SAMPLE = 10


class JudgeUnavailableError(RuntimeError):
    """The GPT judge cannot be used (credentials, API type, network): nothing was scored."""


def grade_in_reply(content: str) -> float | None:
    """The grade lmms-eval's grader reads from a judge reply (its first word, a number in [0, 1]), or ``None``
    (lmms-eval ``tasks/mmvet/utils.py``, ``mmvet_process_results``)."""
    try:
        grade = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return grade if 0.0 <= grade <= 1.0 else None


class RecordedJudge:
    """lmms-eval's ``get_chat_response`` with each sample's replies kept and its requests bounded.

    The grade lmms-eval returns is a real one only when the sample's last reply holds it: its grader also
    returns 0 after replies it cannot read, which would enter the average as a wrong answer. And a judge that
    keeps replying out of range would be asked forever; past :data:`MAX_REQUESTS_PER_SAMPLE` the step stops.
    Each request first checks the step's deadline, so the time limit is overrun by one request at most
    (``--retries`` attempts of ``--timeout`` seconds).
    """

    def __init__(self, request: Any, deadline: float = math.inf, time_limit_s: float = math.inf) -> None:
        self.request = request
        self.replies: list[str] = []
        self.deadline, self.time_limit_s = deadline, time_limit_s  # time.monotonic() values

    def __call__(self, prompt: str, *args: Any, **kwargs: Any) -> tuple[str, str]:
        if time.monotonic() > self.deadline:  # checked per request: one sample may take ten of them
            raise RuntimeError(
                f"the time limit of {self.time_limit_s:.0f} s ran out while grading a sample; no score written "
                "(raise --time-limit)"
            )
        if len(self.replies) >= MAX_REQUESTS_PER_SAMPLE:
            raise RuntimeError(
                f"the judge gave no grade in [0, 1] in {MAX_REQUESTS_PER_SAMPLE} requests for one sample (last "
                f"replies: {self.replies[-3:]!r}); no score written"
            )
        content, model = self.request(prompt, *args, **kwargs)
        self.replies.append(content)
        return content, model

    def graded(self, grade: dict[str, Any]) -> bool:
        """Whether lmms-eval's ``grade`` of the sample just judged is one the judge gave."""
        last = grade_in_reply(self.replies[-1]) if self.replies else None
        return bool(grade.get("eval_model")) and last is not None and last == grade.get("score")


def check_credentials() -> str:
    """The API type, after checking it is supported and its credentials are set."""
    api_type = os.environ.get("API_TYPE", "openai")
    if api_type not in CREDENTIALS:
        raise JudgeUnavailableError(
            f"API_TYPE={api_type!r} is not a judge API this step supports; valid: {', '.join(CREDENTIALS)}"
        )
    missing = [name for name in CREDENTIALS[api_type] if not os.environ.get(name)]
    if missing:
        raise JudgeUnavailableError(
            f"MM-Vet is scored by a GPT judge and {', '.join(missing)} is not set (API_TYPE={api_type}). "
            "No score was computed. Set the key (optionally OPENAI_API_URL for a compatible server and "
            "MODEL_VERSION for the judge model) and run this command again; the recorded answers are kept."
        )
    return api_type


def bound_judge(mmvet: Any, timeout_s: float, retries: int) -> None:
    """Give every judge request of lmms-eval's MM-Vet module a timeout and at most ``retries`` attempts."""
    import functools

    mmvet.ServerConfig = functools.partial(
        mmvet.ServerConfig, timeout=math.ceil(timeout_s), num_retries=retries, retry_delay=1.0
    )
    client = getattr(mmvet.server, "client", None)
    if client is not None and hasattr(client, "with_options"):  # the openai client retries on its own too
        mmvet.server.client = client.with_options(timeout=timeout_s, max_retries=0)


def probe_judge(mmvet: Any, timeout_s: float) -> None:
    """One short request; :class:`JudgeUnavailableError` (with the cause) unless the judge answers."""
    from lmms_eval.llm_judge import Request

    config = mmvet.ServerConfig(model_name=mmvet.MODEL_VERSION, max_tokens=1)
    config.num_retries = 1
    request = Request(messages=[{"role": "user", "content": "Reply with 1."}], config=config)
    try:
        mmvet.server.evaluate(request)
    except Exception as err:
        where = os.environ.get("OPENAI_API_URL") or os.environ.get("AZURE_ENDPOINT") or "the default endpoint"
        raise JudgeUnavailableError(
            f"the judge at {where} did not answer a probe request within {timeout_s:.0f} s "
            f"({type(err).__name__}: {err}); no sample was graded. Check the network and the key."
        ) from err


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no samples file at {path}: pass the *_samples_mmvet_local.jsonl that a run with mmvet_local "
            "wrote next to its results"
        )
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


def judge(
    samples_path: str | Path,
    out: str | Path | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Grade every sample; write and return the judged results.

    The samples must cover every MM-Vet document once: a run with ``limit``, or two samples files joined,
    would otherwise give an ordinary-looking score of another set. ``allow_partial`` scores a subset and
    marks the result ``partial`` (its score is not MM-Vet's).

    Raises:
        JudgeUnavailableError: no credentials, an unknown API type, or a judge that does not answer.
        FileNotFoundError: no samples file, or no local MM-Vet data.
        RuntimeError: a sample the judge could not grade, or ``time_limit_s`` exceeded.
    """
    import datasets

    from globalcom2.data.local import require_local_dataset

    if timeout_s <= 0 or retries < 1 or time_limit_s <= 0:
        raise ValueError(
            f"need timeout > 0, retries >= 1 and time limit > 0, got {timeout_s}, {retries}, {time_limit_s}"
        )
    api_type = check_credentials()
    samples = read_samples(samples_path)
    docs = datasets.load_from_disk(str(require_local_dataset("mmvet", "test", TASK)))["test"]
    docs = docs.remove_columns([c for c in docs.column_names if c == "image"])
    check_samples(samples, docs, allow_partial)  # before any request
    from lmms_eval.tasks.mmvet import utils as mmvet  # builds the judge client; needs the credentials

    bound_judge(mmvet, timeout_s, retries)
    deadline = time.monotonic() + time_limit_s
    probe_judge(mmvet, timeout_s)
    judge_requests = RecordedJudge(mmvet.get_chat_response, deadline, time_limit_s)
    mmvet.get_chat_response = judge_requests  # restored below: lmms-eval's module outlives this step
    try:
        graded, failures = _grade_all(mmvet, samples, docs, judge_requests, deadline, time_limit_s)
    finally:
        mmvet.get_chat_response = judge_requests.request
    if failures:
        listing = "; ".join(f"{g['question_id']}: {reply!r}" for g, reply in failures[:5])
        raise RuntimeError(
            f"the judge returned no grade for {len(failures)} samples (question id: its last reply, "
            f"{listing}); no score written"
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
        "partial": len(graded) != len(docs),
        "grades": graded,
    }
    beside = Path(samples_path).with_name(Path(samples_path).stem + "_judged.json")
    out = Path(out) if out else beside
    atomic_write_json(out, result, ensure_ascii=False, sort_keys=False)
    print(f"MM-Vet gpt_eval_score = {score:.2f} over {len(graded)} samples -> {out}")
    if out.resolve() != beside.resolve():
        print(
            f"note: make tables reads a cell's judged score from {beside.name} beside its samples only; this "
            f"score stays out of the tables unless it is written there (drop --out)"
        )
    return result


def check_samples(samples: list[dict[str, Any]], docs: Any, allow_partial: bool) -> None:
    """Every sample names a document of the local data once, with that document's answer as its target,
    and (unless ``allow_partial``) every document has a sample; ``ValueError`` naming what is wrong."""
    seen: set[int] = set()
    for sample in samples:
        doc_id = sample.get("doc_id")
        if isinstance(doc_id, str) and doc_id.isdigit():
            doc_id = int(doc_id)
        if isinstance(doc_id, bool) or not isinstance(doc_id, int) or not 0 <= doc_id < len(docs):
            raise ValueError(
                f"a sample's doc_id is {doc_id!r}; the local MM-Vet data has docs 0-{len(docs) - 1}"
            )
        if doc_id in seen:
            raise ValueError(f"doc {doc_id} has two samples: were two samples files joined? no score written")
        seen.add(doc_id)
        answer = docs[doc_id]["answer"]
        if "target" in sample and str(sample["target"]) != answer:
            raise ValueError(
                f"doc {doc_id}: the samples file's target {sample['target']!r} differs from the local "
                f"data's answer {answer!r}; the data changed since the run"
            )
    if len(seen) != len(docs) and not allow_partial:
        raise ValueError(
            f"the samples cover {len(seen)} of the {len(docs)} MM-Vet documents (a run with a limit?): their "
            "score would not be MM-Vet's. Pass --allow-partial to score them anyway, marked partial"
        )


def _grade_all(
    mmvet: Any,
    samples: list[dict[str, Any]],
    docs: Any,
    judge_requests: RecordedJudge,
    deadline: float,
    time_limit_s: float,
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Grade ``samples`` in turn with lmms-eval's grader until the first one the judge does not grade:
    ``(grades, [(failed grade, the judge's last reply)])``."""
    graded: list[dict[str, Any]] = []
    failures: list[tuple[dict[str, Any], str]] = []
    for sample in samples:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the time limit of {time_limit_s:.0f} s ran out after {len(graded)} of {len(samples)} samples; "
                "no score written (raise --time-limit)"
            )
        doc = docs[int(sample["doc_id"])]
        judge_requests.replies = []
        grade = mmvet.mmvet_process_results(doc, [answer_of(sample)])["gpt_eval_score"]
        if not judge_requests.graded(grade):  # lmms-eval counts an ungraded sample as 0; stop instead
            failures.append((grade, judge_requests.replies[-1] if judge_requests.replies else ""))
            break
        graded.append(grade)
    return graded, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score recorded MM-Vet answers with lmms-eval's GPT judge.")
    parser.add_argument("--samples", required=True, help="the *_samples_mmvet_local.jsonl of a run")
    parser.add_argument("--out", default=None, help="output JSON (default: next to the samples file)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per judge request")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="attempts per judge request")
    parser.add_argument(
        "--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="seconds for the whole step"
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="score samples that cover only some documents (the result is marked partial)",
    )
    args = parser.parse_args(argv)
    from globalcom2.redaction import redacted_console

    with redacted_console():
        try:
            judge(
                args.samples,
                args.out,
                timeout_s=args.timeout,
                retries=args.retries,
                time_limit_s=args.time_limit,
                allow_partial=args.allow_partial,
            )
        except (JudgeUnavailableError, FileNotFoundError, ValueError) as err:
            print(f"mmvet_judge: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:
            print(f"mmvet_judge: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
