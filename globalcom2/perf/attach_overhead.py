"""Prefill overhead of ``attach`` at ``retention_ratio=1.0`` (issue: foundation benchmark).

Times one prefill (a forward over the whole 672x672 prompt, as ``generate``'s first step does) of the
tiny model unattached, and attached with ``vanilla`` and ``random`` at R=1.0, interleaved round-robin,
and reports medians. Target: <= 2 % overhead.

    python -m globalcom2.perf.attach_overhead [--repeats 60]
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
from PIL import Image

from globalcom2 import attach
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.perf.timing import median_ms, time_interleaved
from globalcom2.prompts import vicuna_v1_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()

    model, processor = load_tiny_llava_next(seed=0)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(672, 672, 3), dtype=np.uint8))
    inputs = processor(images=image, text=vicuna_v1_prompt("What is in the image?"), return_tensors="pt")

    def prefill() -> None:
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)

    def attached(method: str):
        # attach() and remove() run inside every timed call: a conservative upper bound on the overhead
        def run() -> None:
            with attach(model, method, retention_ratio=1.0):
                prefill()

        return run

    samples = time_interleaved(
        {"unattached": prefill, "vanilla@1.0": attached("vanilla"), "random@1.0": attached("random")},
        repeats=args.repeats,
    )
    base = median_ms(samples["unattached"])
    print(
        f"tiny LLaVA-NeXT, 672x672 image, prompt {inputs['input_ids'].shape[1]} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'variant':<14}{'median ms':>11}{'p25-p75 ms':>16}{'overhead':>11}   (n={args.repeats}, interleaved)"
    )
    report = {}
    for name, values in samples.items():
        ms = median_ms(values)
        q25, q75 = (1e3 * float(np.percentile(values, q)) for q in (25, 75))
        report[name] = {"median_ms": ms, "p25_ms": q25, "p75_ms": q75, "overhead_pct": 100 * (ms / base - 1)}
        print(f"{name:<14}{ms:>11.2f}{q25:>8.1f}-{q75:<7.1f}{report[name]['overhead_pct']:>10.2f}%")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
