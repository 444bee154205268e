"""Efficiency of every method on one model, interleaved: the GlobalCom² Tables 8/9 protocol, drift-proof.

``experiment=efficiency`` runs the same protocol as separate cells (records, sweeps, clusters). On a shared
CPU, cells run minutes apart see different machine speeds, so their latency ratios drift. This benchmark
keeps one model in memory and, for every image, runs every variant in turn (attach, generate, remove), so
drift hits all variants alike. Inputs: the efficiency split (672x672, 2928 visual tokens each), batch size
1, greedy decoding of 8 tokens (the demo task's), one warm-up pass per variant excluded.

    python -m globalcom2.perf.efficiency                      # tiny model, CPU (make bench-efficiency)
    python -m globalcom2.perf.efficiency --random-init 7b --device cuda --dtype bfloat16   # real 7B size

Writes ``results/efficiency/<model>_<device>.{md,csv,json}`` (the JSON carries provenance) and prints the
table: TFLOPs in both conventions, peak memory (GPU), KV cache, prefill ms, throughput, speed-ups.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from globalcom2 import attach
from globalcom2.atomic import atomic_write_json, atomic_write_text
from globalcom2.budget import validate_retention_ratio
from globalcom2.data import demo
from globalcom2.efficiency.flops import LlmDims, VisionDims, paper_prefill_flops
from globalcom2.efficiency.profile import GenerateProfiler
from globalcom2.efficiency.summary import PromptCounts, sample_costs
from globalcom2.lmms.sample_records import visual_token_counts
from globalcom2.methods import METHODS
from globalcom2.models.loader import load_llava_next
from globalcom2.paths import PROJECT_ROOT
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.provenance import provenance

#: The ratios the paper's efficiency tables report per method (Tables 8/9): GlobalCom² and random at all
#: four, FastV and SparseVLM at 0.25 and 0.1. A registered method not named here runs at ``OTHER_RATIOS``.
PAPER_RATIOS = {
    "globalcom2": (0.75, 0.5, 0.25, 0.1),
    "random": (0.75, 0.5, 0.25, 0.1),
    "fastv": (0.25, 0.1),
    "sparsevlm": (0.25, 0.1),
}
OTHER_RATIOS = (0.25, 0.1)


def default_variants() -> list[tuple[str, float]]:
    """vanilla at 1.0, then every other registered method at its ratios: a newly registered method is
    measured without an edit here."""
    others = [m for m in METHODS.names() if m != "vanilla" and m not in PAPER_RATIOS]
    return [("vanilla", 1.0)] + [
        (method, ratio)
        for method in [*PAPER_RATIOS, *others]
        for ratio in PAPER_RATIOS.get(method, OTHER_RATIOS)
    ]


def parse_variant(text: str) -> tuple[str, float]:
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


def run_variant(
    model: Any, inputs: dict, method: str, ratio: float, profiler: GenerateProfiler, new_tokens: int
):
    """One measured generate with ``method`` attached; returns the measurement and the row's stats."""
    params = {} if method == "vanilla" else {"retention_ratio": ratio}
    with attach(model, method, **params) as handle, torch.inference_mode():
        with profiler.measure() as pending:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return pending.result, list(handle.stats)


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    variants = list(dict.fromkeys(args.variants or default_variants()))  # order kept, repeats dropped
    if ("vanilla", 1.0) not in variants:
        parser.error("--variants must include vanilla@1 (the speed-ups are relative to it)")

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    pretrained = f"llava-hf/llava-v1.6-vicuna-{args.random_init}-hf" if args.random_init else args.pretrained
    model, processor = load_llava_next(
        pretrained, dtype=dtype, device=args.device, random_init=bool(args.random_init)
    )
    name = (
        f"llava_next_{args.random_init}_random_init"
        if args.random_init
        else str(pretrained).replace("/", "__")
    )
    items = demo.generate_items("efficiency", size=args.images)
    prompts = [
        processor(images=demo.render(item), text=vicuna_v1_prompt(item.question), return_tensors="pt").to(
            args.device
        )
        for item in items
    ]
    profiler = GenerateProfiler(model, args.device)
    dims, vision = LlmDims.from_config(model.config.text_config), VisionDims.from_config(model.config)
    bytes_per_value = torch.finfo(model.dtype).bits // 8

    for method, ratio in variants:  # warm-up, excluded
        run_variant(model, prompts[0], method, ratio, profiler, 2)
    measured: dict[tuple[str, float], list] = {variant: [] for variant in variants}
    for index, inputs in enumerate(prompts):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        for method, ratio in order:  # rotate the order too, so no variant always runs first
            measurement, stats = run_variant(model, inputs, method, ratio, profiler, args.new_tokens)
            before, llm_input, _ = visual_token_counts(stats)
            counts = PromptCounts(
                compression=stats,
                llm_prompt_tokens=inputs["input_ids"].shape[1] - before + llm_input,
                visual_tokens_llm_input=llm_input,
                image_sizes=inputs["image_sizes"].tolist(),
            )
            costs = sample_costs(counts, dims, vision, model.config.image_grid_pinpoints, bytes_per_value)
            measured[(method, ratio)].append((measurement, costs))
        print(f"image {index + 1}/{len(prompts)} done", flush=True)

    rows = []
    for (method, ratio), samples in measured.items():
        params = {} if method == "vanilla" else {"retention_ratio": ratio}
        prefill = [m.prefill_s * 1e3 for m, _ in samples]
        total = [m.total_s for m, _ in samples]
        peaks = [m.peak_memory_bytes for m, _ in samples if m.peak_memory_bytes is not None]
        rows.append(
            {
                "method": method,
                "R": ratio,
                "visual tokens (layer mean)": statistics.fmean(
                    c["equivalent_visual_tokens"] for _, c in samples
                ),
                "TFLOPs (paper)": paper_prefill_flops(dims, METHODS.create(method, **params)) / 1e12,
                "TFLOPs (full)": statistics.fmean(c["full_flops"] for _, c in samples) / 1e12,
                "peak memory (GB)": max(peaks) / 2**30 if peaks else "n/a (CPU)",
                "KV cache (MB)": statistics.fmean(c["kv_cache_bytes"] for _, c in samples) / 1e6,
                "prefill (ms)": statistics.median(prefill),
                "prefill p25-p75 (ms)": "{:.1f}-{:.1f}".format(*statistics.quantiles(prefill, n=4)[::2]),
                "throughput (samples/s)": len(total) / sum(total),
            }
        )
    table = pd.DataFrame(rows)
    vanilla = table[table["method"] == "vanilla"].iloc[0]
    table["prefill speed-up (x)"] = vanilla["prefill (ms)"] / table["prefill (ms)"]
    table["throughput gain (x)"] = table["throughput (samples/s)"] / vanilla["throughput (samples/s)"]

    info = provenance()
    hardware = (
        info["hardware"].get("gpu")
        or f"CPU ({info['hardware']['machine']}, {info['hardware']['cpu_count']} cores)"
    )
    caption = (
        f"Efficiency, {name} ({dtype}, {args.device}: {hardware}); {len(prompts)} images at 672x672 "
        f"(2928 visual tokens), batch 1, {args.new_tokens} new tokens, variants interleaved per image"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{name}_{args.device}"
    markdown = f"**{caption}**\n\n{table.to_markdown(index=False, floatfmt='.4g')}\n"
    atomic_write_text(stem.with_suffix(".md"), markdown)
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    atomic_write_json(
        stem.with_suffix(".json"),
        {
            "caption": caption,
            "rows": rows,
            "provenance": info,
            "settings": vars(args) | {"dtype": dtype, "pretrained": pretrained, "variants": variants},
        },
    )
    print(markdown)
    print(f"written: {stem}.{{md,csv,json}}")


if __name__ == "__main__":
    main()
