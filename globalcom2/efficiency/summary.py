"""The ``efficiency`` block of a cell's record: measured latency and memory, analytic FLOPs and KV cache.

Inputs are the plugin's per-sample records (``globalcom2.sample_records``) and the model's
config. Two FLOPs conventions sit side by side (``globalcom2.efficiency.flops``):

* ``paper``: visual tokens only, at the method's nominal schedule for 2880 visual tokens (GlobalCom²'s
  Tables 8/9: one number per method and ratio);
* ``full``: per sample, every token that really entered each decoder layer (text included), plus the
  method's overhead (FastV's score recompute, SparseVLM's raters and recycling); mean over samples.

Latencies are per ``generate`` call (one sample at batch size 1), over calls that were timed (the warm-up
call is not, and each process's first measured call is reported apart), whole and per stage
(``globalcom2.stage_timing``). Peak memory (GiB, allocated and reserved) is unavailable on CPU and then
``None`` with the reason, never 0.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from globalcom2.anyres import packed_layout
from globalcom2.efficiency.flops import (
    LlmDims,
    VisionDims,
    causal_attention_surplus,
    full_prefill_flops,
    kv_cache_bytes,
    model_prefill_flops,
    paper_prefill_flops,
    vision_flops,
)
from globalcom2.methods.base import LayerStats, Stats

if TYPE_CHECKING:
    from globalcom2.sample_records import SampleRecord

TERA = 1e12

#: Tidy efficiency metric -> where it sits in a record's efficiency block (a path of keys; the first
#: path that exists wins, so records written before a key was renamed still read).
EFFICIENCY_METRICS: dict[str, tuple[tuple[str, ...], ...]] = {
    "timed_calls": (("timed_calls",),),
    "prefill_ms": (("prefill_ms", "median"),),
    "prefill_ms_mean": (("prefill_ms", "mean"),),
    "prefill_p25_ms": (("prefill_ms", "p25"),),
    "prefill_p75_ms": (("prefill_ms", "p75"),),
    "total_ms": (("total_ms", "median"),),
    "vision_ms": (("stages_ms", "vision", "median"),),
    "compression_ms": (("stages_ms", "compression", "median"),),
    "llm_prefill_ms": (("stages_ms", "llm_prefill", "median"),),
    "llm_forward_ms": (("llm_forward_ms", "median"),),
    "decode_ms": (("stages_ms", "decode", "median"),),
    "first_call_prefill_ms": (("first_call", "prefill_ms"),),
    "compiled_calls": (("compiled_calls", "calls"),),
    "throughput_samples_per_s": (("throughput_samples_per_s",),),
    "peak_memory_gib": (("peak_memory_gib", "max"), ("peak_memory_gb", "max")),
    "peak_memory_reserved_gib": (("peak_memory_reserved_gib", "max"),),
    "kv_cache_mb": (("kv_cache_mb",),),
    "tflops_paper": (("tflops", "paper"),),
    "tflops_full": (("tflops", "full"),),
    "tflops_vision": (("tflops", "vision_tower"),),
    "text_tokens": (("text_tokens",),),
    "visual_tokens_before": (("visual_tokens", "before"),),
    "visual_tokens_llm_input": (("visual_tokens", "llm_input"),),
    "equivalent_visual_tokens": (("visual_tokens", "equivalent"),),
}


def efficiency_value(block: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> Any:
    """The value at the first of ``paths`` that exists in an efficiency ``block`` (``None`` if none does)."""
    for path in paths:
        value: Any = block
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class PromptCounts:
    """What the analytic cost model needs of one sample: its method stats and its prompt's token counts
    (a :class:`SampleRecord` has them; ``perf/efficiency`` builds them without a record)."""

    compression: Sequence[Stats]
    llm_prompt_tokens: int
    visual_tokens_llm_input: int
    image_sizes: Sequence[Sequence[int]]

    @classmethod
    def of(cls, record: SampleRecord) -> PromptCounts:
        return cls(
            record.compression, record.llm_prompt_tokens, record.visual_tokens_llm_input, record.image_sizes
        )


def sample_costs(
    sample: PromptCounts, dims: LlmDims, vision: VisionDims, pinpoints: list, bytes_per_value: int
) -> dict[str, float]:
    """Analytic costs of one answered sample (prefill of its prompt)."""
    layer_stats = [s for s in sample.compression if isinstance(s, LayerStats)]
    if layer_stats:  # an in-LLM method: the counts each layer really saw, and its overhead
        stats = layer_stats[0]
        tokens: Sequence[int] | int = list(stats.tokens_per_layer)
        visual = list(stats.visual_tokens_per_layer)
        full = full_prefill_flops(dims, tokens, stats)
    else:  # vanilla or a pre-LLM method: every layer sees the (compressed) prompt
        tokens = sample.llm_prompt_tokens
        visual = [sample.visual_tokens_llm_input] * dims.num_layers
        full = model_prefill_flops(dims, tokens)
    views = sum(packed_layout(tuple(size), pinpoints).num_views for size in sample.image_sizes)
    return {
        "full_flops": full,
        "causal_flops": full - causal_attention_surplus(dims, tokens),
        "paper_visual_flops": model_prefill_flops(dims, visual),
        "vision_flops": vision_flops(vision, views),
        "kv_cache_bytes": kv_cache_bytes(dims, tokens, bytes_per_value),
        "equivalent_visual_tokens": sum(visual) / len(visual),
    }


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(p25, median, p75)`` of ``values``, interpolated between the sorted values (``statistics.quantiles``'s
    ``inclusive`` method, numpy's default), so never outside their range. The default ``exclusive`` method
    extrapolates from small samples: two prefills of 50 and 100 ms would get a p25 of 37.5 ms, and a
    benchmark run on two images printed a negative one."""
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def _stats(values: list[float], scale: float = 1.0) -> dict[str, float] | None:
    if not values:
        return None
    scaled = sorted(v * scale for v in values)
    p25, median, p75 = quartiles(scaled)
    # interpolated as the quartiles are (a nearest rank rounded half to even took the 5th of 6 values)
    p90 = statistics.quantiles(scaled, n=10, method="inclusive")[8] if len(scaled) > 1 else scaled[0]
    return {
        "median": median,
        "mean": statistics.fmean(scaled),
        "p25": p25,
        "p75": p75,
        "p90": p90,
        "n": len(scaled),
    }


def _apart(calls: list[SampleRecord]) -> dict[str, float] | None:
    """Calls kept out of the statistics, reported apart: how many, and their mean prefill and total."""
    if not calls:
        return None
    return {
        "calls": len(calls),
        "prefill_ms": statistics.fmean(c.prefill_s for c in calls if c.prefill_s is not None) * 1e3,
        "total_ms": statistics.fmean(c.total_s for c in calls if c.total_s is not None) * 1e3,
    }


#: The batch loop's host stages a record times (``SampleRecord``), per call.
HOST_STAGES = ("load_s", "preprocess_s", "wait_s", "postprocess_s", "loop_s")


def _rates(timed: list[SampleRecord]) -> tuple[float, float] | None:
    """One process's ``(samples/s in generate, samples/s over the batch loop)`` over its timed calls."""
    generate_seconds = sum(c.total_s for c in timed if c.total_s is not None)
    if not generate_seconds:
        return None
    # Wall time of the timed calls' turns of the batch loop; records without it (written before the loop
    # was timed) fall back to generate + preprocessing, which assumes nothing overlapped.
    if all(c.loop_s is not None for c in timed):
        wall_seconds = sum(c.loop_s for c in timed)
    else:
        wall_seconds = generate_seconds + sum(c.preprocess_s for c in timed)
    samples = sum(c.batch_size for c in timed)
    return samples / generate_seconds, samples / wall_seconds


def latency_summary(records: Sequence[SampleRecord]) -> dict[str, Any]:
    """Latency, stage times, throughput and peak memory of ``records``, over ``generate`` calls (a batch's
    samples share one call). The one place these are summarised: the record's efficiency block and
    lmms-eval's log.

    A process's first measured call is left out of every latency and throughput statistic and reported
    apart under ``first_call`` (its one-off costs would otherwise pull the mean and the tail), and so is a
    later call that compiled (``compiled_in_call``), under ``compiled_calls``; peak memory counts every call.
    Latencies are per call, pooled over the processes; throughput is the cell's, the sum of each process's
    own rate (the processes of a data-parallel cell run concurrently).
    """
    calls: dict[tuple[int, int], SampleRecord] = {}
    for r in records:
        calls.setdefault((r.rank, r.batch_id), r)
    timed_all = [c for c in calls.values() if c.total_s is not None]
    timed = [c for c in timed_all if c.in_statistics]
    first = [c for c in timed_all if c.first_call]
    compiled = [c for c in timed_all if c.compiled_in_call and not c.first_call]
    peaks = [c.peak_memory_bytes for c in calls.values() if c.peak_memory_bytes is not None]
    reserved = [
        c.peak_memory_reserved_bytes for c in calls.values() if c.peak_memory_reserved_bytes is not None
    ]
    notes = sorted({c.peak_memory_note for c in calls.values() if c.peak_memory_note})
    ranks = sorted({c.rank for c in timed})
    rates = [_rates([c for c in timed if c.rank == rank]) for rank in ranks]
    measured = bool(rates) and None not in rates  # every process timed some work
    stages = sorted({name for c in timed if c.stages_s for name in c.stages_s})
    return {
        "generate_calls": len(calls),
        "timed_calls": len(timed),
        "clock": timed_all[0].clock if timed_all else None,
        "prefill_ms": _stats([c.prefill_s for c in timed if c.prefill_s is not None], 1e3),
        "total_ms": _stats([c.total_s for c in timed if c.total_s is not None], 1e3),
        "stages_ms": {
            name: _stats([c.stages_s[name] for c in timed if c.stages_s and name in c.stages_s], 1e3)
            for name in stages
        },
        # the LLM's first forward with an in-LLM method's work inside it (not a stage: the stages are exclusive)
        "llm_forward_ms": _stats([c.llm_forward_s for c in timed if c.llm_forward_s is not None], 1e3),
        "first_call": _apart(first),
        "compiled_calls": _apart(compiled),
        "processes": len(ranks),
        # The ranks run at the same time, each on its own device: the cell's rate is the sum of theirs
        # (summing their seconds instead would report one process's rate for N).
        "throughput_samples_per_s": sum(r[0] for r in rates) if measured else None,
        "throughput_samples_per_s_end_to_end": (
            sum(r[1] for r in rates) if measured else None
        ),  # the batch loop's wall time: data loading, preprocessing and answer decoding included
        "host_stages_ms": {
            name.removesuffix("_s"): _stats(
                [getattr(c, name) for c in timed if getattr(c, name) is not None], 1e3
            )
            for name in HOST_STAGES
        },
        "peak_memory_gib": (
            {"max": max(peaks) / 2**30, "mean": statistics.fmean(peaks) / 2**30} if peaks else None
        ),
        "peak_memory_reserved_gib": (
            {"max": max(reserved) / 2**30, "mean": statistics.fmean(reserved) / 2**30} if reserved else None
        ),
        "peak_memory_note": "; ".join(notes) if notes else None,
    }


def efficiency_summary(
    records: Sequence[SampleRecord], model_config: Any, method: Any, bytes_per_value: int
) -> dict[str, Any]:
    """Aggregate ``records`` of one cell into its record's ``efficiency`` block."""
    if not records:
        raise ValueError("no sample records: nothing to summarise")
    dims = LlmDims.from_config(model_config.text_config)
    vision = VisionDims.from_config(model_config)
    costs = [
        sample_costs(PromptCounts.of(r), dims, vision, model_config.image_grid_pinpoints, bytes_per_value)
        for r in records
    ]

    def mean(key: str) -> float:
        return statistics.fmean(c[key] for c in costs)

    return {
        "samples": len(records),
        **latency_summary(records),
        "text_tokens": (
            statistics.fmean(r.text_tokens for r in records)
            if all(r.text_tokens is not None for r in records)
            else None
        ),
        "visual_tokens": {
            "before": statistics.fmean(r.visual_tokens_before for r in records),
            "llm_input": statistics.fmean(r.visual_tokens_llm_input for r in records),
            "equivalent": mean("equivalent_visual_tokens"),
        },
        "tflops": {
            "paper": paper_prefill_flops(dims, method) / TERA,
            "full": mean("full_flops") / TERA,
            "visual_only": mean("paper_visual_flops") / TERA,
            "vision_tower": mean("vision_flops") / TERA,
        },
        "kv_cache_mb": mean("kv_cache_bytes") / 1e6,
        "attn_implementation": records[0].attn_implementation,
    }
