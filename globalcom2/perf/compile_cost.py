"""What ``compile=true`` costs before its first timed call, at a real model's depth: ``make bench-compile-cost``.

A compiled phase warms every variant up before it times any (``globalcom2.perf.efficiency``), and the first
warm-up compiles the whole model: dynamo traces every layer's frame (each layer runs a private copy of its
code, ``globalcom2.models.compiled``), and inductor generates code for the graphs its FX-graph cache does not
hold yet. How long that takes decides whether the GPU checklist's compiled step fits its limit, and what a
cold ``compile=true`` cell pays once. Depth, not width, sets the tracing: so this benchmark builds the 7B's
(or 13B's) random-init architecture with every depth kept and every width narrowed (:data:`NARROW`), which
runs on a CPU in minutes, and runs the efficiency benchmark's compiled phase on it twice, each in a process
of its own with one inductor cache folder: first empty (cold), then as the first run left it (warm). What
the warm run still pays is dynamo's tracing, AOT autograd and the cache's lookups and loads; the difference
is what the cache spares, inductor's lowering and code generation. The warm run's process then loads the
model anew and runs the phase once more (reloaded), as the next cell of a local sweep does: its layers run
the code the first model's compiled (``globalcom2.models.compiled``, "A later model reuses the graphs"), so
what it pays is what a sweep's later cells pay. ``--no-reuse`` measures the same with every compile on code
of its own (``globalcom2.models.compiled.REUSE_GRAPHS`` off), as before layers shared graphs.

    python -m globalcom2.perf.compile_cost                         # 7B depth, CPU, the checklist's variants
    python -m globalcom2.perf.compile_cost --size 13b --device cuda

Writes ``results/efficiency/compile_cost_<size>_<device>.{md,json}``: per variant and run, the warm-up
seconds and the dynamo frames that variant's warm-up compiled past the variants before it, and per run the
phase's frames and graphs (the JSON carries the settings, the narrowed widths and provenance). Timings of
the narrowed model are not the real model's: only the warm-up columns are reported. Code generation for a GPU (Triton) costs differently from a CPU's (C++), so a CPU figure
bounds the tracing, not the whole cost on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from globalcom2.paths import PROJECT_ROOT
from globalcom2.perf.gpu_checklist import COMPILED_VARIANTS
from globalcom2.perf.variant_table import write_rows_table
from globalcom2.provenance import hardware_label, provenance

#: The widths a narrowed model gets, the language model's and the vision tower's; the depths, the head
#: dimensions (Vicuna's 128, CLIP-L's 64) and everything else stay the real model's.
NARROW: dict[str, dict[str, int]] = {
    "language": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2},
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "projection_dim": 64},
}
#: cold and warm: a process each, on one inductor cache folder; reloaded: the warm run's process, a new model.
RUNS = ("cold", "warm", "reloaded")


def narrow_random_init(size: str) -> None:
    """Narrow the widths :func:`globalcom2.models.random_init.llava_next_config_for` builds ``size`` with, in
    this process only (the benchmark's child processes: nothing else runs in them)."""
    from globalcom2.models import random_init

    random_init.VICUNA[size] = {**random_init.VICUNA[size], **NARROW["language"]}
    random_init.CLIP_L_336 = {**random_init.CLIP_L_336, **NARROW["vision"]}


def child(args: argparse.Namespace, outs: list[Path]) -> None:
    """One compiled phase of the efficiency benchmark on the narrowed model per folder of ``outs``, in turn in
    this process (each loads the model anew), its table into that folder."""
    from globalcom2.models import compiled
    from globalcom2.perf import efficiency

    narrow_random_init(args.size)
    compiled.REUSE_GRAPHS = not args.no_reuse
    for out in outs:
        efficiency.main(
            ["--random-init", args.size, "--device", args.device, "--dtype", args.dtype, "--compile",
             "--attention", "sdpa", "--no-measure-ceilings", "--images", "1", "--new-tokens", "2",
             "--variants", *args.variants, "--out", str(out)]
        )  # fmt: skip


def run_once(args: argparse.Namespace, cache: Path, outs: list[Path]) -> list[dict[str, Any]]:
    """A child process on the inductor cache folder ``cache``, one compiled phase per folder of ``outs``;
    returns the efficiency benchmark's JSON of each."""
    command = [
        sys.executable,
        "-m",
        "globalcom2.perf.compile_cost",
        "--child",
        *map(str, outs),
        *args.forwarded,
    ]
    # Triton's kernels too (torch keeps them under inductor's folder only where TRITON_CACHE_DIR is unset),
    # and no switch that turns the caches off: the warm run must find what the cold one left, and only that
    environment = {
        **{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_FORCE_DISABLE_CACHES"},
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "PYTHONUNBUFFERED": "1",
    }
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=PROJECT_ROOT, env=environment, check=True)
    records = []
    for out in outs:
        (table,) = out.glob("*.json")
        records.append(json.loads(table.read_text()))
    return records


def rows_of(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant of the compiled phase, each run's warm-up seconds and the frames its warm-up compiled; and
    the same warm-up eager in the last run (its eager phase: the same process and model), what a compiled
    warm-up that compiles nothing comes down to."""
    last = list(runs)[-1]
    eager = {(r["method"], r["retention_ratio"]): r for r in runs[last]["rows"] if r["compile"] == "no"}
    compiled = {
        run: {(r["method"], r["retention_ratio"]): r for r in record["rows"] if r["compile"] != "no"}
        for run, record in runs.items()
    }
    rows = []
    for method, ratio in compiled[RUNS[0]]:
        row: dict[str, Any] = {"method": method, "R": ratio}
        for run in runs:
            measured = compiled[run].get((method, ratio), {})
            row[f"warm-up {run} (s)"] = measured.get("warmup_s")
            row[f"frames {run}"] = measured.get("warmup_frames_compiled")
        row[f"eager warm-up {last} (s)"] = eager.get((method, ratio), {}).get("warmup_s")
        rows.append(row)
    return rows


def frames_of(record: dict[str, Any]) -> dict[str, int]:
    """The dynamo frames and graphs the efficiency benchmark's one compiled phase compiled in all."""
    (frames,) = record["dynamo_frames"].values()
    return frames


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["7b", "13b"], default="7b", help="the depths of this model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU (the checklist's)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(COMPILED_VARIANTS), metavar="METHOD@R",
        help="default: the GPU checklist's compiled 7B table's",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "efficiency")
    parser.add_argument(
        "--no-reuse", action="store_true",
        help="every compile gets code of its own (globalcom2.models.compiled.REUSE_GRAPHS off): what a reloaded "
        "model paid before compiled layers shared their graphs; writes compile_cost_<size>_<device>_no_reuse",
    )  # fmt: skip
    parser.add_argument("--child", type=Path, nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.forwarded = [
        "--size", args.size, "--device", args.device, "--dtype", args.dtype, "--variants", *args.variants,
        *(["--no-reuse"] if args.no_reuse else []),
    ]  # fmt: skip
    if args.child is not None:
        child(args, args.child)
        return {}
    info = provenance(args.device)  # the code the children run, before this writes its table
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="globalcom2-compile-cost-") as scratch:
        cache = Path(scratch) / "inductor"  # empty: the first run is cold, the second finds what it left
        (runs["cold"],) = run_once(args, cache, [Path(scratch) / "cold"])
        runs["warm"], runs["reloaded"] = run_once(
            args, cache, [Path(scratch) / "warm", Path(scratch) / "reloaded"]
        )
    rows = rows_of(runs)
    frames = {run: frames_of(record) for run, record in runs.items()}
    hardware = hardware_label(info["hardware"], args.device)
    caption = (
        f"Warm-up of compile=true (default mode) per variant, {args.size}'s depths with narrowed widths "
        f"({args.dtype}, {args.device}: {hardware}, torch {torch.__version__}); one 672x672 image, in the "
        "order run; frames: what a variant's warm-up compiled past the variants before it; cold: an empty "
        "inductor cache, warm: the cache the cold run left (a new process), reloaded: the warm run's process "
        "with the model loaded anew, as a local sweep's next cell"
        + ("; layers share no code (--no-reuse): every compile traces afresh; " if args.no_reuse else "; ")
        + ", ".join(
            f"{run}: {f['frames_compiled']} of {f['frames_total']} dynamo frames compiled, {f['graphs']} graphs"
            for run, f in frames.items()
        )
    )
    stem = (
        args.out
        / f"compile_cost_{args.size}_{args.device.split(':')[0]}{'_no_reuse' if args.no_reuse else ''}"
    )
    return write_rows_table(stem, caption, rows, args, info, dynamo_frames=frames, narrowed=NARROW)


if __name__ == "__main__":
    main()
