"""Efficiency of every method on one model, interleaved and stage-resolved: the GlobalCom² Tables 8/9 protocol.

``experiment=efficiency`` runs the same protocol as separate cells (records, sweeps, clusters). On a shared
machine, cells run minutes apart see different speeds, so their latency ratios drift. This benchmark keeps
one model in memory and, for every image, runs every variant in turn (attach, generate, remove), so drift
hits all variants alike. Inputs: the efficiency split (672x672, 2928 visual tokens each), batch size 1,
greedy decoding of 8 tokens (the demo task's), one warm-up pass per variant excluded.

Every row reports, per generate call (medians over the images; ``globalcom2.efficiency.profile``):

* stage times: vision tower + projector, compression (the method's own work), LLM prefill, decode; the LLM
  forward (the LLM prefill with an in-LLM method's work inside it: what the paper's Tables 8/9 time); and the
  whole prefill (everything up to the first token's logits), p25-p75;
* TFLOPs in both conventions with their ratios to vanilla, the KV cache, the host reads a prefill makes
  (``globalcom2.efficiency.host_syncs``, counted once per variant in eager mode under the first attention
  implementation, which the column names), and on a GPU both peak memories;
* with ``--measure-ceilings`` (on by default on CUDA) a roofline floor per row from the bf16 matmul peak and
  copy bandwidth measured at the start (``globalcom2.perf.ceilings``), over the FLOPs the prefill cannot
  avoid: the vision tower's and the LLM's under a causal kernel (``tflops_causal``;
  ``globalcom2.efficiency.flops.causal_attention_surplus``).

``--compile`` adds compiled rows (``globalcom2.models.compiled``) beside the eager ones, one phase per mode of
``--compile-mode`` (several may be named); ``--attention sdpa eager`` (the default on CUDA) repeats the eager
rows under ``attn_implementation=eager``, where peak memory differs most. Each of these is a phase of its own,
run over every image after the eager SDPA phase (:func:`phases`; speed-ups compare rows of one phase), and the
table is rewritten when each phase ends: a phase that fails is recorded in the JSON's ``failures`` and the
exit status, and the others' rows stay. On CUDA each row's peak memories come from one extra untimed call from
an emptied allocator cache (:func:`memory_pass`) on the image where that variant did the most work
(:func:`largest_prompt`); prompts wait on the host and go to the device one at a time (:func:`on_device`).
For ``--random-init`` the byte-level prompt is cut to the text length Vicuna's tokenizer gives it
(``globalcom2.protocol.vicuna_length``).

Warm-up: one untimed call per variant, which compiles in a compiled phase. Under a CUDA-graph mode
(``reduce-overhead``, ``max-autotune``) every distinct sequence length records graphs of its own on its
second call (the first runs eager: torch's CUDA-graph trees warm up, then record), and the prompts' lengths
differ (the questions' texts; GlobalCom²'s kept count follows each image's scores). So there every variant
runs on every image twice, untimed, before the timed pass, which then replays recorded graphs only
(:func:`warmup_calls`). A timed call that compiled all the same (``Measurement.compiled``: a guard or size the
warm-up did not meet) is run again and counted (:func:`timed_call`), and the caption names it.

    python -m globalcom2.perf.efficiency                                   # tiny model, CPU
    python -m globalcom2.perf.efficiency --random-init 7b --device cuda --compile   # the paper's 7B setting

Writes ``results/efficiency/<model>_<device>.{md,csv,json}`` (the JSON carries the settings, the ceilings and
provenance) and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from globalcom2 import attach
from globalcom2.atomic import atomic_write_json, atomic_write_text
from globalcom2.budget import validate_retention_ratio
from globalcom2.data import demo
from globalcom2.efficiency.flops import LlmDims, VisionDims, paper_prefill_flops
from globalcom2.efficiency.host_syncs import HostSyncCounter
from globalcom2.efficiency.profile import GenerateProfiler, Measurement
from globalcom2.efficiency.summary import PromptCounts, quartiles, sample_costs
from globalcom2.efficiency.table import efficiency_display
from globalcom2.methods import METHODS
from globalcom2.methods.params import budget_kwargs
from globalcom2.models.compiled import (
    COMPILE_MODES,
    CUDA_GRAPH_MODES,
    DEFAULT_COMPILE_MODE,
    WARMUP_NEW_TOKENS,
    compile_attempts,
    compile_model,
    compile_problem,
    failed_frames,
    graph_breaks,
)
from globalcom2.models.loader import load_llava_next
from globalcom2.paths import PROJECT_ROOT
from globalcom2.perf.ceilings import measure_ceilings, roofline_floor_ms
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.protocol.vicuna_length import SOURCE as VICUNA_SOURCE
from globalcom2.protocol.vicuna_length import fit_text_tokens, vicuna_text_tokens
from globalcom2.provenance import hardware_label, provenance
from globalcom2.sample_records import visual_token_counts
from globalcom2.stage_timing import STAGES

#: The ratios measured per method. The paper's Tables 8/9 time vanilla and GlobalCom² only (at 25 % and
#: 10 %); this harness's choice adds 0.75 and 0.5 for GlobalCom², random beside it as the selection-free
#: control, and FastV and SparseVLM at the paper's two ratios. A registered method not named here runs at
#: ``OTHER_RATIOS``.
PAPER_RATIOS = {
    "globalcom2": (0.75, 0.5, 0.25, 0.1),
    "random": (0.75, 0.5, 0.25, 0.1),
    "fastv": (0.25, 0.1),
    "sparsevlm": (0.25, 0.1),
}
OTHER_RATIOS = (0.25, 0.1)
Variant = tuple[str, float]


def default_variants() -> list[Variant]:
    """vanilla at 1.0, then every other registered method at its ratios: a newly registered method is
    measured without an edit here."""
    others = [m for m in METHODS.names() if m != "vanilla" and m not in PAPER_RATIOS]
    return [("vanilla", 1.0)] + [
        (method, ratio)
        for method in [*PAPER_RATIOS, *others]
        for ratio in PAPER_RATIOS.get(method, OTHER_RATIOS)
    ]


def parse_variant(text: str) -> Variant:
    """``"globalcom2@0.25"`` -> ``("globalcom2", 0.25)``, checked against the registry and the range."""
    method, sep, ratio = text.partition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD@R, e.g. globalcom2@0.25")
    if method not in METHODS.names():
        raise argparse.ArgumentTypeError(f"unknown method {method!r}; valid: {', '.join(METHODS.names())}")
    try:
        return method, validate_retention_ratio(float(ratio))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def method_params(method: str, ratio: float) -> dict[str, Any]:
    return budget_kwargs(method, ratio)


def run_variant(
    model: Any, inputs: dict, method: str, ratio: float, profiler: GenerateProfiler, new_tokens: int
) -> tuple[Measurement, list]:
    """One measured generate with ``method`` attached; returns the measurement and the row's stats."""
    with attach(model, method, **method_params(method, ratio)) as handle, torch.inference_mode():
        with profiler.measure() as pending:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return pending.result, list(handle.stats)


def count_host_syncs(model: Any, inputs: dict, method: str, ratio: float) -> int:
    """Host reads of one prefill forward with ``method`` attached (after a warm forward), in eager mode: the
    counter sees torch calls as Python makes them, which a compiled graph no longer does."""
    with attach(model, method, **method_params(method, ratio)), torch.inference_mode():
        model(**inputs, use_cache=True)
        with HostSyncCounter() as syncs:
            model(**inputs, use_cache=True)
    return syncs.total


def build_prompts(processor: Any, model: Any, items: list, vicuna_text: bool) -> list[dict]:
    """Processor inputs of every item, kept on the host (:func:`on_device` moves one at a time); with
    ``vicuna_text`` cut to Vicuna's text length."""
    prompts = []
    for item in items:
        inputs = dict(
            processor(images=demo.render(item), text=vicuna_v1_prompt(item.question), return_tensors="pt")
        )
        if vicuna_text:
            inputs = fit_text_tokens(inputs, model.config.image_token_id, vicuna_text_tokens(item.question))
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        prompts.append(inputs)
    return prompts


def on_device(inputs: dict, device: torch.device | str) -> dict:
    """One prompt's tensors on ``device``, copied before a measurement starts. Only the prompt being run is
    on the device, so a peak memory holds its own inputs, not the pixels of every image of the run (about
    3.4 MB each at 672x672 in bf16, 100 MB for 30 images)."""
    return {name: value.to(device) for name, value in inputs.items()}


def summarise(
    samples: list[tuple[Measurement, dict[str, float], int]],
    method: str,
    ratio: float,
    dims: LlmDims,
    weight_bytes: int,
    ceilings: dict[str, Any] | None,
    memory: Measurement | None = None,
) -> dict[str, Any]:
    """One row of the table from a variant's measurements (see :data:`globalcom2.efficiency.table.MEASURED`);
    its peak memories from ``memory`` (:func:`memory_pass`) when given."""
    measurements = [m for m, _, _ in samples]
    costs = [c for _, c, _ in samples]

    def median_ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    prefill = [m.prefill_s * 1e3 for m in measurements]
    prefill_p25, _, prefill_p75 = quartiles(prefill)
    peaked = [memory] if memory is not None else measurements
    peaks = [m.peak_memory_bytes for m in peaked if m.peak_memory_bytes is not None]
    reserved = [m.peak_memory_reserved_bytes for m in peaked if m.peak_memory_reserved_bytes is not None]
    tflops_full = statistics.fmean(c["full_flops"] for c in costs) / 1e12
    tflops_causal = statistics.fmean(c["causal_flops"] for c in costs) / 1e12
    tflops_vision = statistics.fmean(c["vision_flops"] for c in costs) / 1e12
    row = {
        "method": method,
        "method_name": method,
        "retention_ratio": ratio,
        "equivalent_visual_tokens": statistics.fmean(c["equivalent_visual_tokens"] for c in costs),
        "text_tokens": statistics.fmean(text for _, _, text in samples),
        "tflops_paper": paper_prefill_flops(dims, METHODS.create(method, **method_params(method, ratio)))
        / 1e12,
        "tflops_full": tflops_full,
        "tflops_causal": tflops_causal,  # the LLM's work under a causal kernel: what the floor counts
        "tflops_vision": tflops_vision,
        "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
        "peak_memory_reserved_gib": max(reserved) / 2**30 if reserved else None,
        "kv_cache_mb": statistics.fmean(c["kv_cache_bytes"] for c in costs) / 1e6,
        **{f"{stage}_ms": median_ms([m.stages[stage] for m in measurements]) for stage in STAGES},
        "llm_forward_ms": median_ms([m.llm_forward_s for m in measurements]),
        "timed_calls": len(measurements),
        "prefill_ms": statistics.median(prefill),
        "prefill_p25_ms": prefill_p25,
        "prefill_p75_ms": prefill_p75,
        "throughput_samples_per_s": len(measurements) / sum(m.total_s for m in measurements),
    }
    if ceilings is not None:
        row["roofline_floor_ms"] = roofline_floor_ms(
            (tflops_causal + tflops_vision) * 1e12, weight_bytes, ceilings
        )
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="tiny")
    parser.add_argument(
        "--random-init", choices=["7b", "13b"], help="real-size architecture with random weights"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "efficiency")
    parser.add_argument(
        "--variants",
        nargs="+",
        type=parse_variant,
        default=None,
        metavar="METHOD@R",
        help="variants to run, e.g. vanilla@1 globalcom2@0.25 (default: the paper's, and any other registered method at 0.25 and 0.1; vanilla must be one)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add compiled rows (vision tower, LLM prefill, decode except where CUDA graphs replay, GlobalCom²'s selection: globalcom2.models.compiled) beside the eager ones",
    )
    parser.add_argument(
        "--compile-mode",
        nargs="+",
        choices=COMPILE_MODES,
        default=None,
        help=f"one compiled phase per mode named (default: {DEFAULT_COMPILE_MODE})",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=["sdpa", "eager"],
        default=None,
        help="attention implementations to measure (default: sdpa and eager on CUDA, sdpa on CPU)",
    )
    parser.add_argument(
        "--measure-ceilings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure matmul peak and copy bandwidth first, for the roofline floor (default: on CUDA only)",
    )
    parser.add_argument(
        "--vicuna-text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cut the prompt text to Vicuna's token count (default: with --random-init, whose tokenizer is byte-level)",
    )
    args = parser.parse_args(argv)
    args.variants = list(dict.fromkeys(args.variants or default_variants()))  # order kept, repeats dropped
    if ("vanilla", 1.0) not in args.variants:
        parser.error("--variants must include vanilla@1 (the speed-ups are relative to it)")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.attention = list(dict.fromkeys(args.attention or (["sdpa", "eager"] if cuda else ["sdpa"])))
    args.measure_ceilings = cuda if args.measure_ceilings is None else args.measure_ceilings
    args.vicuna_text = bool(args.random_init) if args.vicuna_text is None else args.vicuna_text
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    args.compile_mode = (
        list(dict.fromkeys(args.compile_mode or [DEFAULT_COMPILE_MODE])) if args.compile else []
    )
    for mode in args.compile_mode:
        problem = compile_problem(args.device, mode)
        if problem:
            parser.error(f"--compile: {problem}")
    return args


#: One pass over every image: the attention implementation, and the compile mode (``None``: eager).
Phase = tuple[str, str | None]


def phases(attention: list[str], compile_modes: list[str]) -> list[Phase]:
    """Eager rows under each attention implementation first (the first one's: every target needs them; the
    others': peak memory), then the first implementation's compiled rows, one phase per mode in the order
    named: compiling on a cold cache is the least predictable time here, so it comes last. Each phase is
    written when it ends, so a failure or a time limit costs only the phases after it."""
    first = attention[0]
    return [*((name, None) for name in attention), *((first, mode) for mode in compile_modes)]


def warmup_calls(mode: str | None, device: torch.device | str, prompts: int) -> tuple[int, int]:
    """``(prompts, calls)``: the untimed calls of each variant before the timed pass, on how many of the
    prompts and how many times each (the module docstring says why CUDA graphs need every prompt twice)."""
    if mode in CUDA_GRAPH_MODES and torch.device(device).type == "cuda":
        return prompts, 2
    return 1, 1


def memory_pass(
    model: Any, inputs: dict, method: str, ratio: float, profiler: GenerateProfiler, new_tokens: int
) -> Measurement:
    """One untimed generate from an emptied allocator cache, for the row's peak memories.

    ``reset_peak_memory_stats`` sets the reserved peak to what the caching allocator holds at the reset: in
    a timed call, that is the largest footprint of any variant run before it. Emptying the cache first makes
    ``max_memory_reserved`` this variant's own (CUDA graph pools of a compiled phase stay, being private to
    their graphs). Kept out of the timed calls, which would otherwise time the ``cudaMalloc`` calls."""
    gc.collect()  # a variant's garbage held in reference cycles would otherwise stay in the peak
    torch.cuda.empty_cache()
    return run_variant(model, inputs, method, ratio, profiler, new_tokens)[0]


def memory_passes(
    model: Any,
    prompts: list[dict],
    measured: dict[Variant, list],
    profiler: GenerateProfiler,
    new_tokens: int,
) -> dict[Variant, Measurement]:
    """Each variant's :func:`memory_pass`, on its :func:`largest_prompt`."""
    return {
        variant: memory_pass(
            model,
            on_device(prompts[largest_prompt(samples)], profiler.device),
            *variant,
            profiler,
            new_tokens,
        )
        for variant, samples in measured.items()
    }


def largest_prompt(samples: list[tuple[Measurement, dict[str, float], int]]) -> int:
    """Index of the prompt whose prefill did the most work for this variant (full FLOPs grow with every token
    a layer sees): the one its memory pass runs. Prompts differ in text length, and a method's kept count
    may follow an image's scores (GlobalCom²'s per-crop rounding, SparseVLM's recycling), so the first
    prompt's peak need not be the row's."""
    return max(range(len(samples)), key=lambda index: samples[index][1]["full_flops"])


def dynamo_frames() -> dict[str, int]:
    """What dynamo compiled since its counters were cleared: frames it tried, frames it compiled (a frame it
    gave up on, at a recompile limit or an error, runs eager without a word), distinct graphs, and the graph
    breaks that split a frame into several graphs (each entered from Python, with guards of its own)."""
    from torch._dynamo.utils import counters

    return {
        "frames_total": compile_attempts(),
        "frames_compiled": compile_attempts() - failed_frames(),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": graph_breaks(),
        # graphs a CUDA-graph mode ran without replaying (an input on the host, an op it cannot capture):
        # inductor says so only in its log, and such a row times fused kernels under a CUDA-graphs label
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        # (inductor's cudagraph_partitions counter is not read: it moves only where code is generated, so a
        # graph its FX cache serves, 31 of 32 identical decoder layers' included, would not count)
    }


#: A timed call that compiled is re-run on the same prompt at most this many times: the warm-up runs one
#: prompt per variant, and a later prompt may still meet a guard it did not (a specialised size).
RETIMES = 2


def timed_call(
    model: Any, inputs: dict, method: str, ratio: float, profiler: GenerateProfiler, new_tokens: int
) -> tuple[Measurement, list, int, bool]:
    """:func:`run_variant`, repeated while the call compiled: ``(measurement, stats, retimed, compiled)``.

    A call that compiles (``Measurement.compiled``) was a warm-up call in fact (compilation takes seconds,
    the prefill milliseconds), so it is run again once its graphs are cached and the later call is the
    sample; ``retimed`` counts the calls set aside. ``compiled`` is True when even the last call compiled:
    its time includes compilation, and the row says so."""
    retimed = 0
    measurement, stats = run_variant(model, inputs, method, ratio, profiler, new_tokens)
    while measurement.compiled and retimed < RETIMES:
        retimed += 1
        measurement, stats = run_variant(model, inputs, method, ratio, profiler, new_tokens)
    return measurement, stats, retimed, measurement.compiled


def measure_phase(
    model: Any,
    prompts: list[dict],
    variants: list[Variant],
    mode: str | None,
    profiler: GenerateProfiler,
    new_tokens: int,
    costs_of: Any,
) -> tuple[dict[Variant, list], dict[Variant, Measurement], dict[str, int] | None, dict[Variant, dict]]:
    """Every variant on every image, interleaved: for image ``i`` the order is rotated by ``i`` so no variant
    always runs first. ``mode``: ``None`` (eager) or a compile mode, on for the whole phase. Prompts are on
    the host, and each is copied to the device before its calls. Returns the measurements (in prompt order),
    on CUDA each variant's :func:`memory_pass` on its :func:`largest_prompt`, in a compiled phase
    :func:`dynamo_frames`, and per variant how many timed calls compiled (:func:`timed_call`)."""
    if mode:
        from torch._dynamo.utils import counters

        counters.clear()
    compiled = compile_model(model, mode) if mode else None
    warm_prompts, warm_calls = warmup_calls(mode, profiler.device, len(prompts))
    device = profiler.device
    try:
        warmups: dict[Variant, dict[str, float | int]] = {}
        for method, ratio in variants:  # warm-up (compilation, CUDA-graph recording), excluded
            began, before = time.perf_counter(), dynamo_frames() if mode else None
            for inputs in prompts[:warm_prompts]:
                inputs = on_device(inputs, device)
                for _ in range(warm_calls):
                    run_variant(model, inputs, method, ratio, profiler, WARMUP_NEW_TOKENS)
            warmup = warmups[(method, ratio)] = {"warmup_s": round(time.perf_counter() - began, 2)}
            if before is not None:  # what this variant's warm-up compiled itself, past the variants before it
                after = dynamo_frames()
                warmup["warmup_frames_compiled"] = after["frames_compiled"] - before["frames_compiled"]
                warmup["warmup_graphs"] = after["graphs"] - before["graphs"]
            # printed at once: a step killed while compiling still tells how far it got, and at what cost
            print(f"warm-up {mode or 'eager'} {method}@{ratio:g}: {warmup}", flush=True)
        measured: dict[Variant, list] = {variant: [] for variant in variants}
        compiling = {
            variant: {**warmups[variant], "timed_calls_retimed": 0, "timed_calls_compiling": 0}
            for variant in variants
        }
        for index, host_inputs in enumerate(prompts):
            inputs = on_device(host_inputs, device)
            shift = index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                measurement, stats, retimed, still = timed_call(model, inputs, *variant, profiler, new_tokens)
                compiling[variant]["timed_calls_retimed"] += retimed
                compiling[variant]["timed_calls_compiling"] += still
                measured[variant].append((measurement, *costs_of(host_inputs, stats)))
            del inputs
            print(f"image {index + 1}/{len(prompts)} done", flush=True)
        memory = memory_passes(model, prompts, measured, profiler, new_tokens) if profiler.is_cuda else {}
        frames = dynamo_frames() if mode else None
    finally:
        if compiled is not None:
            compiled.remove()
            if compiled.signature is None:
                # code of its own (CUDA graphs, whose pools a reset frees; freezing; --no-reuse): nothing is
                # kept for later. Shared code's graphs stay for a later model of the same signature (make
                # bench-compile-cost's reloaded run); a phase of another mode or attention has another one
                torch._dynamo.reset()
    return measured, memory, frames, compiling


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pretrained = f"llava-hf/llava-v1.6-vicuna-{args.random_init}-hf" if args.random_init else args.pretrained
    model, processor = load_llava_next(
        pretrained,
        dtype=args.dtype,
        device=args.device,
        random_init=bool(args.random_init),
        attn_implementation=args.attention[0],
    )
    name = (
        f"llava_next_{args.random_init}_random_init"
        if args.random_init
        else str(pretrained).replace("/", "__")
    )
    items = demo.generate_items("efficiency", size=args.images)
    prompts = build_prompts(processor, model, items, args.vicuna_text)
    profiler = GenerateProfiler(model, args.device)
    # the loaded model's objects leave the collector's generations, so that a full collection landing in a
    # timed call does not walk them all
    gc.collect()
    gc.freeze()
    dims, vision = LlmDims.from_config(model.config.text_config), VisionDims.from_config(model.config)
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ceilings = measure_ceilings(args.device, model.dtype) if args.measure_ceilings else None
    image_token = model.config.image_token_id

    def costs_of(inputs: dict, stats: list) -> tuple[dict[str, float], int]:
        before, llm_input, _ = visual_token_counts(stats)
        counts = PromptCounts(
            compression=stats,
            llm_prompt_tokens=inputs["input_ids"].shape[1] - before + llm_input,
            visual_tokens_llm_input=llm_input,
            image_sizes=inputs["image_sizes"].tolist(),
        )
        text = int((inputs["input_ids"] != image_token).sum())
        return sample_costs(counts, dims, vision, model.config.image_grid_pinpoints, bytes_per_value), text

    first_prompt = on_device(prompts[0], args.device)
    syncs = {variant: count_host_syncs(model, first_prompt, *variant) for variant in args.variants}
    del first_prompt
    plan = phases(args.attention, args.compile_mode)
    info = provenance(args.device)
    hardware = hardware_label(info["hardware"], args.device)
    text_note = f", prompt text at Vicuna's length ({VICUNA_SOURCE})" if args.vicuna_text else ""
    caption = (
        f"Efficiency, {name} ({args.dtype}, {args.device}: {hardware}); {len(prompts)} images at 672x672 "
        f"(2928 visual tokens), batch 1, {args.new_tokens} new tokens, variants interleaved per image{text_note}"
    )
    if ceilings:
        caption += (
            f"; ceilings measured here: {ceilings['matmul_tflops']:.3g} TFLOP/s {ceilings['dtype']} matmul, "
            f"{ceilings['bandwidth_tb_s']:.2f} TB/s copy"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{name}_{args.device.replace(':', '')}"
    record = {  # what every write of the JSON carries beside the rows
        "ceilings": ceilings,
        "weight_bytes": weight_bytes,
        "provenance": info,
        "settings": {**vars(args), "out": str(args.out), "pretrained": pretrained},
    }
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    attention = args.attention[0]
    for done, (phase_attention, mode) in enumerate(plan, start=1):
        if phase_attention != attention:
            model.set_attn_implementation(phase_attention)
            attention = phase_attention
        try:
            measured, memory, frames, compiling = measure_phase(
                model, prompts, args.variants, mode, profiler, args.new_tokens, costs_of
            )
        except Exception as error:  # one phase's failure must not lose the other phases' rows
            traceback.print_exc()
            failures.append(
                {
                    "attn_implementation": phase_attention,
                    "compile": mode or "no",
                    "error": f"{type(error).__name__}: {error}",
                }
            )
        else:
            if frames is not None:
                caption += compile_note(mode, frames, profiler.is_cuda)
                record.setdefault("dynamo_frames", {})[f"{phase_attention} {mode}"] = frames
            caption += timed_compile_note(phase_attention, mode, compiling)
            for (method, ratio), samples in measured.items():
                row = summarise(
                    samples, method, ratio, dims, weight_bytes, ceilings, memory.get((method, ratio))
                )
                row.update(
                    compile=mode or "no",
                    attn_implementation=phase_attention,
                    host_syncs=syncs[(method, ratio)],
                    host_syncs_counted_in=f"{args.attention[0]}, eager",
                    **compiling[(method, ratio)],
                )
                rows.append(row)
        write_outputs(stem, caption, rows, failures, plan[done:], record)
    gc.unfreeze()  # this model's objects can be collected again, by a later run in the process (compile_cost)
    if failures:
        raise SystemExit(
            f"{len(failures)} of {len(plan)} phases failed (rows of the others written to {stem}.*): {failures}"
        )


def compile_note(mode: str, frames: dict[str, int], cuda: bool) -> str:
    """The caption's word on a compiled phase: how much dynamo compiled (a frame it gave up on runs eager, so
    a row would time eager layers under a compiled label), warned about on the console too; and, under CUDA
    graphs, what the peak memories miss."""
    note = f"; {mode}: {frames['frames_compiled']} of {frames['frames_total']} dynamo frames compiled, {frames['graphs']} graphs"
    if "graph_breaks" in frames:  # records from before the count have none
        note += f", {frames['graph_breaks']} graph breaks"
    if frames["frames_compiled"] < frames["frames_total"]:
        print(f"WARNING: compile mode {mode}: {frames} (some layers ran eager)", flush=True)
        note += " (THE REST RAN EAGER)"
    if cuda and mode in CUDA_GRAPH_MODES:
        skips = frames.get("cudagraph_skips", 0)
        note += f", {skips} skipped by CUDA graphs"
        if skips:
            print(f"WARNING: compile mode {mode}: {skips} graphs ran without CUDA graphs", flush=True)
            note += " (THOSE RAN WITHOUT REPLAY)"
        note += " (peak allocated may miss the graphs' activations, held in their private pool: see peak reserved)"
    return note


def timed_compile_note(attention: str, mode: str | None, compiling: dict[Variant, dict]) -> str:
    """The caption's word on timed calls that compiled (:func:`timed_call`): those re-run are named, as a
    sign the warm-up missed a graph; those that compiled even when re-run are flagged, as their times include
    compilation. Empty when no timed call compiled."""
    phase = f"{attention} {mode or 'eager'}"

    def named(key: str) -> str:
        return ", ".join(f"{m}@{r:g} {counts[key]}" for (m, r), counts in compiling.items() if counts[key])

    retimed, still = named("timed_calls_retimed"), named("timed_calls_compiling")
    note = f"; {phase}: timed calls that compiled and were re-run: {retimed}" if retimed else ""
    if still:
        print(
            f"WARNING: {phase}: timed calls that compiled on every try (times include compilation): {still}"
        )
        note += f" (TIMES INCLUDE COMPILATION: {still})"
    return note


def write_outputs(
    stem: Path,
    caption: str,
    rows: list[dict[str, Any]],
    failures: list[dict[str, str]],
    pending: list[Phase],
    record: dict[str, Any],
) -> None:
    """The table as it stands (``.md``, ``.csv``; none before a first row) and its JSON, written atomically
    after every phase; the caption names the phases still to run and those that failed."""
    if pending:
        caption += "; PARTIAL, not yet measured: " + ", ".join(f"{a} {m or 'eager'}" for a, m in pending)
    if failures:
        caption += "; FAILED: " + ", ".join(f"{f['attn_implementation']} {f['compile']}" for f in failures)
    atomic_write_json(
        stem.with_suffix(".json"),
        {"caption": caption, "rows": rows, "failures": failures, "complete": not pending, **record},
    )
    if not rows:
        return
    frame = pd.DataFrame(rows)
    table = efficiency_display(frame)
    counted_in = frame["host_syncs_counted_in"].iloc[0]
    table.insert(table.columns.get_loc("R") + 1, f"host reads ({counted_in})", frame["host_syncs"])
    table["warm-up (s)"] = frame["warmup_s"]  # a compiled phase's: its compilation
    if "peak allocated (GiB)" not in table:
        table["peak allocated (GiB)"] = "n/a (CPU)"  # torch keeps no CPU allocator peak: unavailable, not 0
    markdown = f"**{caption}**\n\n{table.to_markdown(index=False, floatfmt='.4g')}\n"
    atomic_write_text(stem.with_suffix(".md"), markdown)
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    print(markdown)
    print(f"written: {stem}.{{md,csv,json}}", flush=True)


if __name__ == "__main__":
    main()
