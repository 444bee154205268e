"""The measurements only a GPU gives, as one command with a time budget: ``make gpu-checklist``.

A GPU is lent for minutes, so the checks run in order of value, each in its own process with a time limit,
and each step's files are copied to ``--out`` as soon as it ends (a step that fails or runs out of time does
not stop the next). Importable with torch, transformers, pandas and pillow only (no lmms-eval): the GPU
machine may have nothing else. Run from the checkout with ``PYTHONPATH=.``::

    python -m globalcom2.perf.gpu_checklist --out "$OUT" --budget-s 540
    python -m globalcom2.perf.gpu_checklist --dry-run          # list the steps

Steps:

1. the 7B efficiency table, eager and compiled, SDPA and eager attention, with measured ceilings
   (``globalcom2.perf.efficiency``);
2. the ``gpu``-marked tests that need no lmms-eval (CUDA sync budgets, compile mode on CUDA, the benchmark's
   GPU columns);
3. GlobalCom²'s selection time per image on the GPU (``globalcom2.perf.globalcom2_selection``);
4. throughput through the real path, 7B random-init in bf16 at batch 1/8/16 (``globalcom2.perf.throughput``);
5. the batch effect in bf16 on the trained tiny model, every method at R = 0.25, batch 1 against 8;
6. the main path's ``gpu`` tests (``tests/gpu/test_run_on_gpu.py``: a cell on CUDA against the CPU, and
   through ``launcher=accelerate``);
7. the 13B efficiency table (SDPA, eager and compiled), if time is left.

Steps 4-6 run ``globalcom2.run`` and so need lmms-eval and Hydra: ``make carry-wheels HAVE=<the machine's pip
list>`` makes the wheels it lacks (``globalcom2/carry.py``); with ``--carried <their folder>`` a first step
checks that the environment holds them at the versions required. Without them those steps fail and the
others still run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from globalcom2.paths import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "results" / "efficiency"


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    limit_s: int  # the most this step may take
    outputs: tuple[str, ...] = ()  # files under RESULTS it writes (copied to --out)
    main_path: bool = False  # runs globalcom2.run (lmms-eval, Hydra): skipped when the carried wheels fail


def steps(images: int, carried: Path | None = None) -> list[Step]:
    python = sys.executable
    plan = [
        Step(
            "efficiency_7b",
            [python, "-m", "globalcom2.perf.efficiency", "--random-init", "7b", "--device", "cuda", "--compile",
             "--images", str(images)],
            300,
            ("llava_next_7b_random_init_cuda.md", "llava_next_7b_random_init_cuda.json"),
        ),
        Step(
            "gpu_tests",
            [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu",
             "tests/models/test_compiled.py", "tests/efficiency", "--ignore=tests/gpu/test_run_on_gpu.py"],
            180,
        ),
        Step(
            "selection",
            [python, "-m", "globalcom2.perf.globalcom2_selection", "--device", "cuda"],
            60,
            ("globalcom2_selection_cuda.md", "globalcom2_selection_cuda.json"),
        ),
        Step(
            "throughput_7b",
            [python, "-m", "globalcom2.perf.throughput", "--model", "llava_next_7b", "--random-init",
             "--device", "cuda", "--dtype", "bfloat16", "--batch-sizes", "1", "8", "16", "--prefetch", "both"],
            420,
            ("../throughput/llava_next_7b_cuda_throughput.md", "../throughput/llava_next_7b_cuda_throughput.json"),
            main_path=True,
        ),
        Step(
            "batch_effect_bf16",
            [python, "-m", "globalcom2.perf.throughput", "--mode", "batch-effect", "--device", "cuda",
             "--dtype", "bfloat16"],
            240,
            ("../throughput/tiny_trained_cuda_batch_effect.md", "../throughput/tiny_trained_cuda_batch_effect.json"),
            main_path=True,
        ),
        Step(
            "main_path_tests",
            [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu/test_run_on_gpu.py"],
            300,
            main_path=True,
        ),
        Step(
            "efficiency_13b",
            [python, "-m", "globalcom2.perf.efficiency", "--random-init", "13b", "--device", "cuda", "--compile",
             "--images", str(images), "--attention", "sdpa"],
            240,
            ("llava_next_13b_random_init_cuda.md", "llava_next_13b_random_init_cuda.json"),
        ),
    ]  # fmt: skip
    if (
        carried is not None
    ):  # by path: the check imports nothing of the package (globalcom2/carry.py says why)
        verify = [python, str(PROJECT_ROOT / "globalcom2" / "carry.py"), "--verify", str(carried.resolve())]
        plan.insert(0, Step("carried_wheels", verify, 30))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_checklist_out")))
    parser.add_argument(
        "--budget-s", type=int, default=540, help="stop starting steps after this many seconds"
    )
    parser.add_argument("--images", type=int, default=10, help="efficiency images per table")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument(
        "--carried",
        type=Path,
        default=None,
        help="first check the environment against the wheels made here"
        " by `make carry-wheels` (their folder, with carry.json)",
    )
    args = parser.parse_args(argv)
    plan = steps(args.images, args.carried)
    if args.dry_run:
        for step in plan:
            print(f"{step.name} (<= {step.limit_s} s): {' '.join(step.command)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "checklist.log"  # one log for every step: the device tool returns few files
    started, failed, wheels_failed = time.monotonic(), 0, False
    for step in plan:
        left = args.budget_s - (time.monotonic() - started)
        if left < 30:
            print(f"[skip] {step.name}: {left:.0f} s of the budget left", flush=True)
            continue
        if step.main_path and wheels_failed:  # known to fail: its minutes go to the steps that can run
            print(f"[skip] {step.name}: the carried wheels failed their check", flush=True)
            failed += 1
            continue
        began = time.monotonic()
        try:
            with log.open("a") as handle:
                handle.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
                handle.flush()
                done = subprocess.run(
                    step.command,
                    cwd=PROJECT_ROOT,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=min(step.limit_s, left),
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = "timed out"
        failed += status != "ok"
        wheels_failed |= step.name == "carried_wheels" and status != "ok"
        for name in step.outputs:
            if (RESULTS / name).is_file():
                shutil.copy(RESULTS / name, args.out / Path(name).name)
        print(f"[{status}] {step.name}: {time.monotonic() - began:.0f} s, log {log}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
