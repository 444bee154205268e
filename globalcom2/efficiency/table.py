"""The efficiency table (GlobalCom² Tables 8/9 layout, stage-resolved), built once for every producer.

``make bench-efficiency`` (``globalcom2.perf.efficiency``, variants interleaved on one model) and
``make tables`` (``globalcom2.report.tables``, from cell records) both reduce their measurements to one row
per method and ratio with the keys of :data:`MEASURED`, and :func:`efficiency_display` turns those rows into
the table: the measured columns, then what is derived against the vanilla row.

The two speed-ups answer different questions. The **LLM prefill** speed-up times the language model's
first forward, with the work an in-LLM method does inside it (``LLM forward ms``; the ``LLM prefill ms``
stage leaves that work to ``compression ms``, so a speed-up on it would credit SparseVLM with a forward
that skips its own scoring): what the paper's Tables 8/9 call prefill and what their FLOPs ratio predicts; the
**prefill** speed-up times everything up to the first token's logits (vision tower, compression, the LLM,
``generate``'s own host work), what a user waits for. Both FLOPs conventions are shown with their ratios:
``paper`` counts visual tokens at the nominal 2880-token schedule, ``full`` every token that entered each
decoder layer plus the method's overhead (``globalcom2.efficiency.flops``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

#: Measured (or analytic) per-row values: key -> display label. Missing keys are left out of the table.
MEASURED: dict[str, str] = {
    "compile": "compiled",
    "attn_implementation": "attention",
    "equivalent_visual_tokens": "visual tokens (layer mean)",
    "text_tokens": "text tokens",
    "tflops_paper": "TFLOPs (paper)",
    "tflops_full": "TFLOPs (full)",
    "peak_memory_gib": "peak allocated (GiB)",
    "peak_memory_reserved_gib": "peak reserved (GiB)",
    "kv_cache_mb": "KV cache (MB)",
    "vision_ms": "vision ms",
    "compression_ms": "compression ms",
    "llm_prefill_ms": "LLM prefill ms",
    "llm_forward_ms": "LLM forward ms",
    "decode_ms": "decode ms",
    "timed_calls": "timed calls",  # what the medians and quartiles are over
    "prefill_ms": "prefill ms",
    "prefill_p25_ms": "prefill p25 ms",
    "prefill_p75_ms": "prefill p75 ms",
    "roofline_floor_ms": "roofline floor ms",
    "throughput_samples_per_s": "throughput (samples/s)",
    "first_call_prefill_ms": "first call prefill ms",
    "compiled_calls": "later calls that compiled",  # shown only where some did: left out of the timings
}
#: Derived against the vanilla row (numerator / denominator keys; "inverse" = vanilla / row).
RATIOS: dict[str, tuple[str, bool]] = {
    "FLOPs ratio (paper)": ("tflops_paper", True),
    "FLOPs ratio (full)": ("tflops_full", True),
    "LLM prefill speed-up (x)": ("llm_forward_ms", True),
    "prefill speed-up (x)": ("prefill_ms", True),
    "throughput gain (x)": ("throughput_samples_per_s", False),
}


#: What a row's ratios hold equal: it is divided by the vanilla row of the same compile mode, attention
#: implementation, hardware and dtype (the last two only in cell records: a benchmark runs on one of each), so a
#: CPU vanilla never makes a GPU row's speed-up.
SAME_KIND = ("compile", "attn_implementation", "hardware", "dtype")


def preferred_vanilla(labels: Iterable[str]) -> str | None:
    """Which of several vanilla variants (method labels whose registry name is ``vanilla``: an ablation's
    ``vanilla_eager`` beside ``vanilla``) every table, ratio and agreement compares with: the one labelled
    ``vanilla``, else the first label in sorted order. One rule, so a table's Avg and its agreement column
    never measure against two different cells."""
    labels = sorted(set(labels))
    if not labels:
        return None
    return "vanilla" if "vanilla" in labels else labels[0]


def vanilla_row(frame: pd.DataFrame) -> pd.Series | None:
    """The row of ``frame`` of its :func:`preferred_vanilla` (``method_name`` ``vanilla``), or ``None``."""
    rows = frame[frame["method_name"] == "vanilla"]
    label = preferred_vanilla(rows["method"]) if "method" in rows else None
    if label is not None:
        rows = rows[rows["method"] == label]
    return rows.iloc[0] if len(rows) else None


def efficiency_display(frame: pd.DataFrame) -> pd.DataFrame:
    """The table: ``method``, ``R``, the measured columns present in ``frame``, then the ratios to vanilla.

    Args:
        frame: one row per variant with ``method`` (display name), ``method_name`` (registry name),
            ``retention_ratio`` and any keys of :data:`MEASURED`. Rows that differ in any of
            :data:`SAME_KIND` present are compared with the vanilla row of their own kind (and a row whose kind
            has no vanilla gets no ratios).
    """
    display = frame[["method", "retention_ratio"]].rename(columns={"retention_ratio": "R"}).copy()
    for key, label in MEASURED.items():
        if key in frame and not frame[key].isna().all():
            display[label] = frame[key]
    if "roofline_floor_ms" in frame and "prefill_ms" in frame:
        display["prefill / floor"] = frame["prefill_ms"] / frame["roofline_floor_ms"]
    kinds = [k for k in SAME_KIND if k in frame]
    groups = frame.groupby(kinds, dropna=False, sort=False) if kinds else [((), frame)]
    for label, (key, inverse) in RATIOS.items():
        if key not in frame:
            continue
        values = pd.Series(math.nan, index=frame.index, dtype=float)
        for _, group in groups:
            vanilla = vanilla_row(group)
            if vanilla is None or pd.isna(vanilla.get(key)):
                continue
            base = float(vanilla[key])
            values[group.index] = base / group[key] if inverse else group[key] / base
        display[label] = values
    return display
