"""Prefill time and memory of the in-LLM methods, and proof that scoring builds no ``L x L`` matrix.

On the tiny model with one 672x672 image (2928 visual tokens in a 3125-token Vicuna-v1 prompt), one prefill (a
forward over the whole prompt with a KV cache, as ``generate``'s first step, vision tower included) is timed for
the unmodified model, FastV (K=2) and SparseVLM, each at ``retention_ratio=0.25``, on three identical model
instances called round-robin; medians.

Memory is the peak of *live tensor bytes allocated during the call* by torch's CPU allocator, read from
``torch.profiler`` memory events (every allocation and free, in order, summed; the maximum of the running sum).
Weights and inputs allocated before the call do not count, activations, KV cache and temporary buffers do.
It is reported for the whole prefill and for the language model's forward alone (net of what was live when it
started), since the vision tower is the same for every variant.
Process RSS is not used: it is a high-water mark that never goes down, includes the Python heap and the
allocator's cached pages, so it cannot separate one call from the next.

The scoring step is measured the same way, around the exact call the engine makes (``attention_rows`` on the
inputs the scoring layer's attention receives) and, in situ, inside the ``globalcom2.in_llm.score`` profiler
ranges of a real prefill. Its peak is compared with ``L * L * heads * 4`` bytes, the float32 attention matrix
an eager layer with ``output_attentions`` materialises (what the reference implementations use), and with
``L * d * 4`` bytes, one float32 activation of the prompt.

On a 4-layer model SparseVLM cannot reach a layer-input average of 0.25 (layer 0 always sees every token), so it
runs with ``equivalent_tokens="layer_output"`` (the average SparseVLM's own code prints); both averages are shown.

    python -m globalcom2.perf.in_llm_cost [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from globalcom2 import attach
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.perf.timing import median_ms, time_interleaved
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.scoring.text_attention import attention_rows

RATIO = 0.25
VARIANTS: dict[str, dict[str, Any] | None] = {
    "vanilla": None,
    "fastv": {"retention_ratio": RATIO, "K": 2},
    "sparsevlm": {"retention_ratio": RATIO, "equivalent_tokens": "layer_output"},
}
SCORE_RANGE = "globalcom2.in_llm.score"
LLM_RANGE = "language_model"


def _memory_events(prof: profile) -> list[tuple[int, int]]:
    """``(time ns, bytes)`` of every CPU allocation (+) and free (-) recorded by ``prof``, in time order."""
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    return sorted(events)


def _peak(events: list[tuple[int, int]]) -> int:
    """Largest running sum of allocations minus frees (0 if nothing stays allocated at any point)."""
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_allocation(fn: Callable[[], object]) -> tuple[int, profile]:
    """Peak live tensor bytes allocated while ``fn`` runs (CPU allocator, profiler memory events)."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _peak(_memory_events(prof)), prof


def peak_in_ranges(prof: profile, name: str) -> list[int]:
    """Peak live bytes allocated inside each profiler range called ``name``, in call order."""
    events = _memory_events(prof)
    ranges = sorted(
        (e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events() if e.name() == name
    )
    return [_peak([(t, n) for t, n in events if start <= t <= end]) for start, end in ranges]


def mark_language_model(model) -> list[Any]:
    """Open a profiler range ``language_model`` around every forward of ``model``'s language model."""
    language_model = model.model.language_model
    ranges: list[Any] = []

    def enter(module, args, kwargs):
        ranges.append(torch.profiler.record_function(LLM_RANGE))
        ranges[-1].__enter__()

    def leave(module, args, kwargs, output):
        ranges.pop().__exit__(None, None, None)

    return [
        language_model.register_forward_pre_hook(enter, with_kwargs=True),
        language_model.register_forward_hook(leave, with_kwargs=True),
    ]


def capture_attention_inputs(model, inputs: dict, layer: int) -> dict:
    """The kwargs layer ``layer``'s attention module receives in an unmodified prefill."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.update(
            hidden_states=kwargs["hidden_states"], position_embeddings=kwargs["position_embeddings"]
        )

    handle = model.model.language_model.layers[layer].self_attn.register_forward_pre_hook(
        hook, with_kwargs=True
    )
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    return captured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    processor = load_tiny_llava_next(seed=0)[1]
    models = {name: load_tiny_llava_next(seed=0)[0] for name in VARIANTS}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(672, 672, 3), dtype=np.uint8))
    inputs = processor(images=image, text=vicuna_v1_prompt("What is in the image?"), return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    text_config = models["vanilla"].config.text_config
    heads, hidden_size = text_config.num_attention_heads, text_config.hidden_size

    handles = {
        name: attach(models[name], name, **params) for name, params in VARIANTS.items() if params is not None
    }

    def prefill(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                models[name](**inputs, use_cache=True, logits_to_keep=1)

        return run

    samples = time_interleaved({name: prefill(name) for name in VARIANTS}, repeats=args.repeats)
    report: dict[str, Any] = {"prompt_tokens": length, "retention_ratio": RATIO, "variants": {}}
    print(
        f"tiny LLaVA-NeXT (4 text layers, d={hidden_size}, {heads} heads), 672x672 image, prompt {length} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'variant':<11}{'prefill ms':>11}{'p25-p75':>14}{'peak MiB':>9}{'LLM peak MiB':>13}"
        f"   {'visual tokens entering layers 0..3':<36}{'avg in':>8}{'avg out':>9}"
    )
    score_in_situ: dict[str, list[int]] = {}
    for name in VARIANTS:
        marks = mark_language_model(models[name])
        try:
            peak, prof = peak_allocation(prefill(name))
        finally:
            for mark in marks:
                mark.remove()
        (llm_peak,) = peak_in_ranges(prof, LLM_RANGE)
        values = samples[name]
        q25, q75 = (1e3 * float(np.percentile(values, q)) for q in (25, 75))
        row: dict[str, Any] = {
            "median_ms": median_ms(values),
            "p25_ms": q25,
            "p75_ms": q75,
            "peak_alloc_bytes": peak,
            "language_model_peak_alloc_bytes": llm_peak,
        }
        counts, avg_in, avg_out = "(unchanged)", "", ""
        if name in handles:
            stats = handles[name].stats[-1]
            row["stats"] = {
                "visual_tokens_per_layer": stats.visual_tokens_per_layer,
                "equivalent_visual_tokens": stats.equivalent_visual_tokens,
                "equivalent_visual_tokens_after_layer": stats.equivalent_visual_tokens_after_layer,
            }
            counts = str(stats.visual_tokens_per_layer)
            avg_in = f"{stats.equivalent_visual_tokens:.1f}"
            avg_out = f"{stats.equivalent_visual_tokens_after_layer:.1f}"
            score_in_situ[name] = peak_in_ranges(prof, SCORE_RANGE)
        report["variants"][name] = row
        print(
            f"{name:<11}{row['median_ms']:>11.1f}{q25:>7.1f}-{q75:<6.1f}{peak / 2**20:>9.2f}{llm_peak / 2**20:>13.2f}"
            f"   {counts:<36}{avg_in:>8}{avg_out:>9}"
        )

    # The scoring step on its own: the exact call the engine makes at FastV's scoring layer (K-1 = 1).
    attn_inputs = capture_attention_inputs(models["vanilla"], inputs, layer=1)
    attn = models["vanilla"].model.language_model.layers[1].self_attn
    cos, sin = attn_inputs["position_embeddings"]
    last = torch.tensor([[length - 1]])
    score_peak, _ = peak_allocation(
        lambda: attention_rows(
            attn,
            attn_inputs["hidden_states"],
            cos,
            sin,
            last,
            torch.ones(1, 1, dtype=torch.bool),
            torch.ones(1, length, dtype=torch.bool),
        )
    )
    matrix = length * length * heads * 4
    activation = length * hidden_size * 4
    print()
    print(
        f"scoring step, L={length}: eager attention matrix L*L*heads*4 = {matrix / 2**20:.1f} MiB, L*d*4 = {activation / 2**10:.0f} KiB"
    )
    print(
        f"  fastv, isolated attention_rows call (1 query row): peak {score_peak / 2**10:.0f} KiB = {score_peak / activation:.2f} x L*d*4 = {score_peak / matrix:.4f} x the matrix"
    )
    for name, peaks in score_in_situ.items():
        listed = ", ".join(f"{p / 2**10:.0f} KiB" for p in peaks)
        print(
            f"  {name}, in situ per stage (score ranges of the prefill): {listed}; largest = {max(peaks) / matrix:.4f} x the matrix"
        )
    report["scoring"] = {
        "eager_matrix_bytes": matrix,
        "activation_bytes": activation,
        "fastv_isolated_peak_bytes": score_peak,
        "in_situ_peak_bytes": score_in_situ,
    }
    print(json.dumps(report))
    for handle in handles.values():
        handle.remove()


if __name__ == "__main__":
    main()
