"""The measurements only a GPU gives, as one command with a time budget: ``make gpu-checklist``.

A GPU is lent for minutes, so the checks run in order of value, each in its own process group with a time
limit, and none is lost to another: a step that fails or runs out of time does not stop the next, its
processes (``globalcom2.run`` cells included) are killed with it so they cannot slow the next step, and the
benchmarks rewrite their tables as they go, so a step cut short still leaves what it measured. Importable
with torch, transformers, pandas and pillow only (no lmms-eval): the GPU machine may have nothing else. Run
from the checkout with ``PYTHONPATH=.``::

    python -m globalcom2.perf.gpu_checklist --out "$OUT" --budget-s 540
    python -m globalcom2.perf.gpu_checklist --dry-run                  # list the steps
    python -m globalcom2.perf.gpu_checklist --only throughput_7b main_path_tests --out "$OUT"

Steps, in order of value (the order of the checklist the project keeps for GPU sessions: the 7B table
with its targets, host syncs, GlobalCom²'s selection, the main path, throughput, 13B). Their limits are
ceilings, not estimates, and add up to far more than one call's 540 s: each later step gets what the earlier
ones left, and a step whose ``min_s`` is not left is skipped, so the rest fall to a second call
(``--only …``) or a longer lease:

1. the 7B table of the targets under ``compile=true`` (``default`` mode), each variant of
   :data:`COMPILED_VARIANTS` eager first and then compiled, in one process and one load, into
   ``results/efficiency/compiled/`` (``globalcom2.perf.efficiency``; ceilings measured in the same run).
   The eager phase is written before compiling starts, so a cold compile cache that runs out the step's
   time still leaves the eager rows, and each variant's warm-up (its compilation) is logged as it ends.
   Measured on the 2-core CPU at the 7B's depths with narrowed widths (``make bench-compile-cost``,
   ``results/efficiency/compile_cost_7b_cpu.md``, 2026-12-07 at 7ed7b37): the first variant's warm-up
   compiles 98 dynamo frames in 98 s from a cold inductor cache and 53 s from a warm one; GlobalCom² at 0.75
   compiles 1 more (6 s cold), and the five other variants, FastV and SparseVLM included, compile none
   (under 1 s each), so the other methods cost the step little and stay in it;
2. GlobalCom²'s selection time per image on the GPU (``globalcom2.perf.globalcom2_selection``);
3. every method's host syncs under CUDA's own detector (``tests/gpu/test_cuda_syncs.py``);
4. the main path's ``gpu`` tests (``tests/gpu/test_run_on_gpu.py``: a cell on CUDA against the CPU, and
   through ``launcher=accelerate`` where there are two GPUs);
5. the full 7B table, eager: every variant under SDPA, then under eager attention (peak memory);
6. compile mode against eager on CUDA (``tests/models/test_compiled.py``, GlobalCom²'s compiled selection in
   ``tests/methods/test_globalcom2_compiled.py``), which the compiled rows rest on;
7. throughput through the real path, 7B random-init in bf16, batch 16, 1 and 8 (``globalcom2.perf.throughput``);
8. how many samples per second the batch preparation supplies with 1, 2, 4 and 8 encoding threads on the
   node's CPU, nothing generating (``globalcom2.lmms.prefetch_threads``): whether step 7's ``wait_s`` is the
   processor's limit, and what ``prefetch_threads`` should be there;
9. DivPrune's selection of a call of 1, 8 and 16 images, in lockstep against one image at a time
   (``globalcom2.perf.divprune_lockstep``), which decides where the harness runs it in lockstep;
10. the other ``gpu``-marked tests (the batch-invariant mode on CUDA, random-init models, the benchmarks' GPU
    columns), verbose, so a step cut short still names each test it finished;
11. the 7B table with its compiled phase under CUDA graphs (``reduce-overhead``), on at most 5 images and four
    variants, into ``results/efficiency/cuda_graphs/``: whether replayed graphs, not only fused kernels, are
    what the prefill targets need (the caption counts the graphs CUDA graphs did not replay);
12. throughput under ``compile=true`` at batch 16, GlobalCom² 0.25 and vanilla, into
    ``results/throughput/compiled/`` (each cell compiles its model first, at 7B not yet timed);
13. the batch effect in bf16 on the trained tiny model, vanilla, GlobalCom² and SparseVLM, batch 1 against 8;
14. the 13B table of the targets' variants (SDPA, eager and compiled), if time is left.

A step starts only with at least its ``min_s`` of the budget left (a step cut short by the budget keeps
only the phases it finished; one that cannot reach its first useful output is better left to a later call).

Steps 4, 7, 12 and 13 run ``globalcom2.run`` and step 8 the plugin, so they need lmms-eval (and the cells
Hydra) (:attr:`Step.main_path`):
``make carry-wheels HAVE=<the machine's pip list> PYTHON_VERSION=<its Python>`` makes the wheels it lacks
(``globalcom2/carry.py``); with ``--carried <their folder>`` a first step checks that the environment holds
them at the versions required, on the Python they were chosen for. If that check fails, the main-path steps
are skipped: they would run lmms-eval, Hydra or their dependencies at versions nothing was tested on. The
other steps still run, since they check their own stack where it matters: every model load and every
``attach`` refuses a transformers outside the pinned range (``globalcom2.models.base``), and transformers
checks its own runtime dependencies (regex, tokenizers, huggingface-hub, safetensors) when it is imported;
the wheel check can fail on a distribution only lmms-eval reads (pyarrow under datasets), which must not
cost the efficiency tables. Without ``--carried`` nothing is checked. A checklist in which no step ran
exits 1.

What comes back: the device tool returns at most 8 files from ``--out``, so there are three, rewritten after
every step: ``checklist.log`` (every step's output), ``checklist.json`` (each step's status and seconds) and
``results.tar.gz`` (the tables the finished steps wrote, under their paths in ``results/``). A table is
taken only if its step wrote it: a committed table from an earlier run is never passed off as new.
``checklist.json`` names a step as ``running`` before it starts, so a checklist killed outright still says
where it stopped. SIGTERM or SIGINT (a time limit, a lease ending) kills the running step's group, packs the
tables it and the steps before it wrote, marks the rest skipped and exits with 128 + the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from globalcom2.atomic import atomic_write_bytes, atomic_write_json
from globalcom2.paths import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "results"
#: The environment every step runs in unless the caller set these (``PYTHONUNBUFFERED=1`` always): nothing
#: may reach a hub (the GPU machine has no network; a cluster node may not either) or a tracking server.
STEP_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
}


def step_environment() -> dict[str, str]:
    """The environment of every step: :data:`STEP_ENVIRONMENT` under the caller's own settings, unbuffered, and
    ``PYTHONPATH`` with each relative entry (an empty one means the current directory) made absolute against
    the caller's directory. The device command runs with ``PYTHONPATH=.:/tmp/site``; a process that a step
    starts in another directory (a test's scratch folder) would otherwise lose the checkout."""
    environment = {**STEP_ENVIRONMENT, **os.environ, "PYTHONUNBUFFERED": "1"}
    if entries := environment.get("PYTHONPATH"):
        environment["PYTHONPATH"] = os.pathsep.join(map(os.path.abspath, entries.split(os.pathsep)))
    return environment


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    limit_s: int  # the most this step may take
    outputs: tuple[str, ...] = ()  # files under RESULTS it writes (packed into results.tar.gz)
    min_s: int = 30  # the least budget worth starting it with (below, it is skipped and the next one tried)
    # runs ``globalcom2.run`` or the plugin (lmms-eval, Hydra): skipped when the carried wheels fail their check
    main_path: bool = False


#: Where the 7B table under CUDA graphs goes (beside, not over, the ``default``-mode table), and its variants:
#: vanilla and the two ratios the targets name, plus random (selection without scores) at the lower one.
CUDA_GRAPHS_DIR = "efficiency/cuda_graphs"
CUDA_GRAPH_VARIANTS = ("vanilla@1", "globalcom2@0.25", "globalcom2@0.1", "random@0.1")
#: Where the 7B throughput under ``compile=true`` goes, beside the eager table.
COMPILED_THROUGHPUT_DIR = "throughput/compiled"
#: Where the 7B table under ``compile=true`` goes, and its variants: vanilla, GlobalCom² at the ratios of the
#: targets and at 0.75 (slower than vanilla when eager), and the other methods at 0.1.
COMPILED_DIR = "efficiency/compiled"
COMPILED_VARIANTS = (
    "vanilla@1", "globalcom2@0.75", "globalcom2@0.25", "globalcom2@0.1", "random@0.1", "fastv@0.1", "sparsevlm@0.1",
)  # fmt: skip


def steps(images: int, carried: Path | None = None) -> list[Step]:
    python = sys.executable
    efficiency_7b = "efficiency/llava_next_7b_random_init_cuda"
    efficiency_13b = "efficiency/llava_next_13b_random_init_cuda"
    plan = [
        Step(
            "efficiency_7b_compiled",
            [python, "-m", "globalcom2.perf.efficiency", "--random-init", "7b", "--device", "cuda", "--compile",
             "--attention", "sdpa", "--images", str(images), "--variants", *COMPILED_VARIANTS,
             "--out", str(RESULTS / COMPILED_DIR)],
            270,
            (f"{COMPILED_DIR}/llava_next_7b_random_init_cuda.md",
             f"{COMPILED_DIR}/llava_next_7b_random_init_cuda.json"),
            min_s=150,
        ),
        Step(
            "selection",
            [python, "-m", "globalcom2.perf.globalcom2_selection", "--device", "cuda"],
            # 10.9 s on the H100 (2026-12-05), before its compiled rows, which compile twice in the warm-up
            # and write nothing until the end: a ceiling, not an estimate
            150,
            ("efficiency/globalcom2_selection_cuda.md", "efficiency/globalcom2_selection_cuda.json"),
            min_s=60,  # its table comes at the end, after both compiled modes' warm-ups
        ),
        Step(
            "cuda_syncs",
            [python, "-m", "pytest", "-v", "--tb=short", "-m", "gpu", "-p", "no:cacheprovider",
             "tests/gpu/test_cuda_syncs.py"],
            90,
        ),
        Step(
            "main_path_tests",
            [python, "-m", "pytest", "-v", "--tb=short", "-m", "gpu", "-p", "no:cacheprovider",
             "tests/gpu/test_run_on_gpu.py"],
            180,
            main_path=True,
        ),
        Step(
            "efficiency_7b",
            [python, "-m", "globalcom2.perf.efficiency", "--random-init", "7b", "--device", "cuda",
             "--attention", "sdpa", "eager", "--images", str(images)],
            200,
            (f"{efficiency_7b}.md", f"{efficiency_7b}.json"),
            # its first write waits for the load, every variant's host syncs, the ceilings and the whole SDPA
            # phase (21 variants): started with less, it would end with nothing where a smaller step fits
            min_s=100,
        ),
        Step(
            "compiled_equivalence",
            [python, "-m", "pytest", "-v", "--tb=short", "-m", "gpu", "-p", "no:cacheprovider",
             "tests/models/test_compiled.py", "tests/methods/test_globalcom2_compiled.py"],
            150,
            min_s=60,
        ),
        Step(
            "throughput_7b",
            [python, "-m", "globalcom2.perf.throughput", "--model", "llava_next_7b", "--random-init",
             "--device", "cuda", "--dtype", "bfloat16", "--batch-sizes", "16", "1", "8", "--prefetch", "on"],
            300,  # 141 s on the H100 (2026-12-05)
            ("throughput/llava_next_7b_cuda_throughput.md", "throughput/llava_next_7b_cuda_throughput.json"),
            min_s=90,
            main_path=True,
        ),
        Step(
            "prefetch_threads",
            [python, "-m", "globalcom2.lmms.prefetch_threads", "--device", "cuda", "--threads", "1", "2", "4",
             "8"],
            # 57 s on the 2-core CPU with three counts and five rounds (three here); the node's cores decide
            # whether four threads (prefetch_threads=auto there) feed the throughput step's targets
            90,
            ("throughput/prefetch_threads_cuda.md", "throughput/prefetch_threads_cuda.json"),
            min_s=45,
            main_path=True,  # the plugin's own feeder: lmms-eval
        ),
        Step(
            "divprune_lockstep",
            [python, "-m", "globalcom2.perf.divprune_lockstep", "--device", "cuda", "--repeats", "10"],
            120,
            ("efficiency/divprune_lockstep_cuda.md", "efficiency/divprune_lockstep_cuda.json"),
            min_s=60,
        ),
        Step(
            "gpu_tests",
            [python, "-m", "pytest", "-v", "--tb=short", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu",
             "tests/models/test_random_init.py", "tests/efficiency", "--ignore=tests/gpu/test_run_on_gpu.py",
             "--ignore=tests/gpu/test_cuda_syncs.py"],
            300,
        ),
        Step(
            "efficiency_7b_cuda_graphs",
            [python, "-m", "globalcom2.perf.efficiency", "--random-init", "7b", "--device", "cuda", "--compile",
             "--compile-mode", "reduce-overhead", "--attention", "sdpa", "--images", str(min(images, 5)),
             "--variants", *CUDA_GRAPH_VARIANTS, "--out", str(RESULTS / CUDA_GRAPHS_DIR)],
            240,
            (f"{CUDA_GRAPHS_DIR}/llava_next_7b_random_init_cuda.md",
             f"{CUDA_GRAPHS_DIR}/llava_next_7b_random_init_cuda.json"),
            min_s=150,
        ),
        Step(
            "throughput_7b_compiled",
            [python, "-m", "globalcom2.perf.throughput", "--model", "llava_next_7b", "--random-init",
             "--device", "cuda", "--dtype", "bfloat16", "--batch-sizes", "16", "--prefetch", "on", "--compile",
             "--variants", "globalcom2@0.25", "vanilla@1", "--out", str(RESULTS / COMPILED_THROUGHPUT_DIR)],
            300,
            (f"{COMPILED_THROUGHPUT_DIR}/llava_next_7b_cuda_throughput.md",
             f"{COMPILED_THROUGHPUT_DIR}/llava_next_7b_cuda_throughput.json"),
            min_s=150,
            main_path=True,
        ),
        Step(
            "batch_effect_bf16",
            [python, "-m", "globalcom2.perf.throughput", "--mode", "batch-effect", "--device", "cuda",
             "--dtype", "bfloat16", "--batch-invariant", "both",
             "--variants", "vanilla@1", "globalcom2@0.25", "sparsevlm@0.25"],
            300,  # 239 s of 240 on the H100 (2026-12-05)
            ("throughput/tiny_trained_cuda_batch_effect_invariant_both.md",
             "throughput/tiny_trained_cuda_batch_effect_invariant_both.json"),
            min_s=90,
            main_path=True,
        ),
        Step(
            "efficiency_13b",
            [python, "-m", "globalcom2.perf.efficiency", "--random-init", "13b", "--device", "cuda", "--compile",
             "--images", str(images), "--attention", "sdpa", "--variants", *COMPILED_VARIANTS],
            240,
            (f"{efficiency_13b}.md", f"{efficiency_13b}.json"),
            min_s=120,
        ),
    ]  # fmt: skip
    if (
        carried is not None
    ):  # by path: the check imports nothing of the package (globalcom2/carry.py says why)
        verify = [python, str(PROJECT_ROOT / "globalcom2" / "carry.py"), "--verify", str(carried.resolve())]
        plan.insert(0, Step("carried_wheels", verify, 30))
    return plan


def select(plan: list[Step], only: list[str] | None, skip: list[str]) -> list[Step]:
    """The steps ``--only`` keeps (all by default) minus ``--skip``, in the plan's order; an unknown name is
    refused with the valid ones."""
    names = [step.name for step in plan]
    unknown = [name for name in [*(only or []), *skip] if name not in names]
    if unknown:
        raise SystemExit(f"unknown step {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    return [
        s
        for s in plan
        if (only is None or s.name in only or s.name == "carried_wheels") and s.name not in skip
    ]


def run_step(step: Step, log: Path, limit_s: float) -> str:
    """Run ``step`` in a process group of its own, its output appended to ``log``; on its time limit the whole
    group is killed (a benchmark's ``globalcom2.run`` children too). Returns ``ok``, ``exit N`` or
    ``timed out``."""
    with log.open("a") as handle:
        handle.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
        handle.flush()
        process = subprocess.Popen(
            step.command,
            cwd=PROJECT_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=step_environment(),
            start_new_session=True,
        )
        try:
            returncode: int | None = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # the group goes at the limit, on an interruption, and so do children a step left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if returncode is None:
        return "timed out"
    return "ok" if returncode == 0 else f"exit {returncode}"


#: What ends a checklist early but still packs what its steps have written (the device tool's time limit, a
#: lease ending, Ctrl-C).
INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """One of :data:`INTERRUPTING_SIGNALS` reached the checklist while a step ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class Signals:
    """The handler of :data:`INTERRUPTING_SIGNALS` while the checklist runs: it remembers the first signal and
    ignores any later one (a second must not cut the packing of what is finished short); while a step runs
    (``raising``) it also raises :class:`Interrupted`, so the step's group is killed at once. Between steps the
    loop reads ``received`` and starts no further step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.raising = False

    def __call__(self, signum: int, frame: object) -> None:
        for handled in INTERRUPTING_SIGNALS:
            signal.signal(handled, signal.SIG_IGN)
        self.received = signum
        if self.raising:
            raise Interrupted(signum)


def output_states(step: Step) -> dict[str, tuple[int, int] | None]:
    """Each output file's (inode, mtime in ns), or ``None`` where there is none yet."""
    states: dict[str, tuple[int, int] | None] = {}
    for name in step.outputs:
        path = RESULTS / name
        stat = path.stat() if path.is_file() else None
        states[name] = None if stat is None else (stat.st_ino, stat.st_mtime_ns)
    return states


def fresh_outputs(step: Step, before: dict[str, tuple[int, int] | None]) -> list[str]:
    """The step's output files that it wrote (every write here is a new file renamed into place, so a new
    inode or time): a table left from an earlier run, committed or not, is not this run's measurement."""
    after = output_states(step)
    return [name for name, state in after.items() if state is not None and state != before[name]]


def pack(names: list[str]) -> bytes:
    """``results.tar.gz`` of ``names`` (paths under ``results/``), in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in names:
            archive.add(RESULTS / name, arcname=f"results/{name}")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_checklist_out")))
    parser.add_argument(
        "--budget-s", type=int, default=540, help="stop starting steps after this many seconds"
    )
    parser.add_argument("--images", type=int, default=5, help="efficiency images per table")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument(
        "--carried",
        type=Path,
        default=None,
        help="first check the environment against the wheels made here"
        " by `make carry-wheels` (their folder, with carry.json)",
    )
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STEP", help="leave these steps out")
    args = parser.parse_args(argv)
    plan = select(steps(args.images, args.carried), args.only, args.skip)
    if args.dry_run:
        for step in plan:
            print(f"{step.name} (<= {step.limit_s} s): {' '.join(step.command)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "checklist.log"  # one log for every step: the device tool returns few files
    started, wheels_failed, failed, measured = time.monotonic(), False, 0, 0
    signals = Signals()
    report: list[dict[str, object]] = []
    tables: list[str] = []

    def write_report(steps: list[dict[str, object]]) -> None:
        atomic_write_json(args.out / "checklist.json", {"budget_s": args.budget_s, "steps": steps})

    previous = {handled: signal.signal(handled, signals) for handled in INTERRUPTING_SIGNALS}
    try:
        for step in plan:
            left = args.budget_s - (time.monotonic() - started)
            if signals.received is not None:
                status, seconds = f"skipped: the checklist was interrupted (signal {signals.received})", 0.0
            elif left < step.min_s:  # not a failure: the budget was spent on the steps before it
                status = f"skipped: {max(0, math.floor(left))} s of the budget left, it needs {step.min_s} s"
                seconds = 0.0
            elif wheels_failed and step.main_path:  # lmms-eval or Hydra at a version nothing was tested on
                status, seconds = "skipped: the carried wheels failed their check (see the log)", 0.0
                failed += 1
            else:
                began, before = time.monotonic(), output_states(step)
                # a checklist killed outright (SIGKILL) still says where it was
                write_report([*report, {"step": step.name, "status": "running", "seconds": 0.0}])
                try:
                    signals.raising = True
                    status = run_step(step, log, min(step.limit_s, left))
                    if status == "timed out" and left < step.limit_s:  # not the step's own ceiling
                        status = (
                            f"timed out: the budget ended ({math.floor(left)} s left of its {step.limit_s} s)"
                        )
                except Interrupted as err:  # run_step has killed the step's group
                    status = f"interrupted ({err})"
                finally:
                    signals.raising = False
                seconds = time.monotonic() - began
                measured += step.name != "carried_wheels"
                failed += status != "ok"
                wheels_failed |= step.name == "carried_wheels" and status != "ok"
                tables += fresh_outputs(step, before)  # what a phase of an interrupted step finished
                atomic_write_bytes(args.out / "results.tar.gz", pack(tables))
            report.append({"step": step.name, "status": status, "seconds": round(seconds, 1)})
            write_report(report)
            if status.startswith("skipped: "):
                print(f"[skip] {step.name}: {status.removeprefix('skipped: ')}", flush=True)
            else:
                print(f"[{status}] {step.name}: {seconds:.0f} s, log {log}", flush=True)
    finally:
        for handled, handler in previous.items():
            signal.signal(handled, handler)
    if signals.received is not None:
        return 128 + signals.received
    if not measured:
        print("[fail] no step ran: nothing was measured", flush=True)
    return 1 if failed or not measured else 0


if __name__ == "__main__":
    raise SystemExit(main())
