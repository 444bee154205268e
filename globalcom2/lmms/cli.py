"""``python -m globalcom2.lmms`` (or ``globalcom2-eval``): lmms-eval's CLI, made loud.

Takes exactly lmms-eval's arguments and adds three things:

1. **Pre-flight** (:mod:`globalcom2.lmms.preflight`): an unknown model, task, method or parameter, missing
   offline data, a ``--limit`` that is not a count or a fraction, a malformed ``--model_args``, or a method
   that does not support the attention implementation stop the run before any model is loaded (exit code
   2); the front door's warnings (a ratio that keeps no patch token) are printed.
2. **Defaults**: ``--include_path`` defaults to this checkout's ``tasks/``, ``--timezone`` to UTC;
   ``--output_path`` is required.
3. **Failure detection**: lmms-eval's CLI catches a failing evaluation, prints the traceback and exits 0
   (unless ``--verbosity DEBUG``). Here any exception inside the evaluation, or a run that did not write a
   results file covering every requested task (and a samples file per task with ``--log_samples``),
   exits 1.

Example::

    python -m globalcom2.lmms --model globalcom2_llava_next \\
        --model_args pretrained=tiny,method=random,retention_ratio=0.25 \\
        --tasks pope_adv_local,globalcom2_demo --batch_size 4 --output_path results/x --log_samples
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_PREFLIGHT = 0, 1, 2


def _fail(message: str, code: int) -> int:
    print(f"globalcom2.lmms: {message}", file=sys.stderr, flush=True)
    return code


def verify_outputs(output_path: str | Path, tasks: list[str], since: float, log_samples: bool) -> list[str]:
    """Problems with the files a run started at ``since`` should have written under ``output_path``."""
    root = Path(output_path)
    results = [p for p in root.rglob("*_results.json") if p.stat().st_mtime >= since - 1]
    if not results:
        return [f"no results file was written under {root}"]
    latest = max(results, key=lambda p: p.stat().st_mtime)
    data = json.loads(latest.read_text())
    present = set(data.get("results", {})) | set(data.get("group_subtasks", {}))
    problems = [f"task {t!r} is missing from {latest}" for t in tasks if t not in present]
    if log_samples:
        leaves = [
            t
            for t in data.get("results", {})
            if t not in data.get("group_subtasks", {}) or not data["group_subtasks"][t]
        ]
        for task in leaves:
            if not [
                p for p in latest.parent.glob(f"*_samples_{task}.jsonl") if p.stat().st_mtime >= since - 1
            ]:
                problems.append(f"no samples file for task {task!r} next to {latest}")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import lmms_eval.__main__ as lmms_main

    from globalcom2.redaction import redacted_console

    # lmms-eval's parser reads sys.argv, here and again inside cli_evaluate.
    saved_argv, sys.argv = sys.argv, ["lmms_eval", *argv]
    try:
        with redacted_console():  # lmms-eval logs HF_TOKEN among its tracker arguments
            return _run(lmms_main)
    finally:
        sys.argv = saved_argv


def limit_problem(limit: float | None) -> str | None:
    """Why ``--limit`` is refused: lmms-eval reads it as a float and runs everything for a negative one and a
    truncated count for 2.7, where a user meant something else."""
    if limit is None or 0 < limit < 1 or (limit >= 1 and float(limit).is_integer()):
        return None
    return (
        f"--limit {limit:g}: give an integer >= 1 (documents per task) or a fraction in (0, 1); omit --limit "
        "to evaluate every document"
    )


def model_problem(model: str) -> str | None:
    """Why ``--model`` names no lmms-eval model (with the close names, and ours)."""
    import difflib

    from lmms_eval.models import MODEL_REGISTRY_V2

    from globalcom2.lmms.manifest import MODEL_ID

    try:
        MODEL_REGISTRY_V2.resolve(model)
    except (KeyError, ValueError):
        close = difflib.get_close_matches(model, MODEL_REGISTRY_V2.list_model_names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown model {model!r}.{hint} This harness's model is --model {MODEL_ID}."
    return None


def _run(lmms_main: Any) -> int:
    from globalcom2.lmms.manifest import MODEL_ID, register
    from globalcom2.lmms.preflight import PreflightError, llava_unused_options, preflight
    from globalcom2.paths import tasks_dir
    from globalcom2.run_spec import cli_option_conflicts, parse_model_args

    _, args = lmms_main.parse_eval_args()
    register()  # a checkout run from PYTHONPATH, not installed, has no entry point
    for problem in (limit_problem(args.limit), model_problem(args.model)):
        if problem:
            return _fail(problem, EXIT_PREFLIGHT)
    if not any(a == "--timezone" or a.startswith("--timezone=") for a in sys.argv):
        args.timezone = "UTC"  # lmms-eval stamps file names in Asia/Singapore time by default
    if args.config:
        return _fail("--config files are not supported here; pass the arguments as flags", EXIT_PREFLIGHT)
    if not args.tasks or args.tasks in {"list", "list_groups", "list_tags"}:
        return _fail("--tasks is required (a comma-separated list of task names)", EXIT_PREFLIGHT)
    if not args.output_path:
        return _fail(
            "--output_path is required: the run is verified by reading the files it writes", EXIT_PREFLIGHT
        )
    ours = str(tasks_dir())
    if args.include_path is None:
        args.include_path = ours
    elif Path(args.include_path).resolve() != Path(ours):
        args.include_path = [args.include_path, ours]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model_args: dict[str, Any] | None = None
    if args.model == MODEL_ID:
        try:
            model_args = parse_model_args(args.model_args or "")
        except ValueError as err:
            return _fail(str(err), EXIT_PREFLIGHT)
        conflicts = cli_option_conflicts(model_args, vars(args))
        if conflicts:
            return _fail("; ".join(conflicts), EXIT_PREFLIGHT)
        if getattr(args, "use_cache", None) is not None:
            from globalcom2.lmms.api import RESPONSE_CACHE_REFUSAL

            return _fail(f"--{RESPONSE_CACHE_REFUSAL}", EXIT_PREFLIGHT)
        for key in ("batch_size", "device"):
            if getattr(args, key, None) is not None:
                model_args.setdefault(key, getattr(args, key))
        unused = llava_unused_options(args.gen_kwargs, args.system_instruction, args.num_fewshot, flag="--")
        if model_args.get("protocol") == "llava" and unused:
            return _fail(unused, EXIT_PREFLIGHT)
    with warnings.catch_warnings(record=True) as caught:  # shown even where lmms-eval filters warnings
        warnings.simplefilter("always")
        try:
            preflight(tasks, include_path=args.include_path, model_args=model_args)
        except PreflightError as err:
            return _fail(str(err), EXIT_PREFLIGHT)
    for warning in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print(f"globalcom2.lmms: warning: {warning}", file=sys.stderr, flush=True)

    failures: list[BaseException] = []
    original = lmms_main.cli_evaluate_single

    def guarded(single_args: Any) -> Any:
        try:
            return original(single_args)
        except BaseException as err:
            failures.append(err)
            raise

    started = time.time()
    lmms_main.cli_evaluate_single = guarded
    try:
        lmms_main.cli_evaluate(args)
    except BaseException as err:  # --verbosity DEBUG re-raises; report it the same way
        if not failures:
            failures.append(err)
    finally:
        lmms_main.cli_evaluate_single = original
    if failures:
        return _fail(f"evaluation failed: {type(failures[0]).__name__}: {failures[0]}", EXIT_FAILED)
    if int(os.environ.get("RANK", "0")) == 0:
        problems = verify_outputs(
            args.output_path, tasks, started, bool(args.log_samples or args.predict_only)
        )
        if problems:
            return _fail("the run did not produce its outputs:\n- " + "\n- ".join(problems), EXIT_FAILED)
        if "mmvet_local" in tasks:
            print(
                "MM-Vet answers are recorded, not scored. Judge them with\n"
                f"  python -m globalcom2.lmms.mmvet_judge --samples {args.output_path}/<model>/*_samples_mmvet_local.jsonl",
                flush=True,
            )
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
