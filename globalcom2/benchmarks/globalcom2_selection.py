"""Cost of GlobalCom² per 672x672 image, excluding the vision-tower forward (issue 3 benchmark).

Times, on random but realistically shaped inputs: the [CLS] score step (one query row against the
layer's keys, at the tiny model's width and at CLIP-L/14's real width), and allocation + interpolation +
holistic scoring + per-crop selection + layout (``GlobalCom2.select``) for both layouts. Target: <= 1 ms
per image for scoring + allocation + selection. The reference implementation loops in Python over tokens.

    python -m globalcom2.benchmarks.globalcom2_selection [--repeats 500]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from globalcom2.anyres import packed_layout
from globalcom2.methods.base import ImageContext
from globalcom2.methods.globalcom2 import GlobalCom2
from globalcom2.models.tiny import LLAVA_V16_GRID_PINPOINTS
from globalcom2.scoring.vision_attention import cls_patch_scores


def time_us(fn, repeats: int, warmup: int = 50) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile of ``fn``'s wall time in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e6 * (time.perf_counter() - start))
    q25, median, q75 = statistics.quantiles(samples, n=4)
    return median, q25, q75


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)

    layout = packed_layout((672, 672), LLAVA_V16_GRID_PINPOINTS)  # 2x2 crops, 5 views, 2928 tokens
    features = torch.zeros(layout.num_tokens, 1)
    rows = []
    for width, heads, name in [(64, 4, "tiny d=64"), (1024, 16, "CLIP-L d=1024")]:
        q = torch.randn(layout.num_views, width)  # the [CLS] query rows the hook reads
        k = torch.randn(layout.num_views, 577, width)  # the keys the hook reads
        scale = (width // heads) ** -0.5
        rows.append(
            (
                f"[CLS] scores only, {name}",
                time_us(lambda q=q, k=k, h=heads, s=scale: cls_patch_scores(q, k, h, s), args.repeats),
            )
        )
        for layout_name in ("clean", "reference"):
            method = GlobalCom2(retention_ratio=0.25, layout=layout_name)

            def full(q=q, k=k, h=heads, s=scale, m=method) -> None:
                ctx = ImageContext(
                    layout=layout, pixel_values=features, vision_scores=cls_patch_scores(q, k, h, s)
                )
                m.select(features, ctx)

            rows.append(
                (f"scores + allocation + selection, {name}, {layout_name}", time_us(full, args.repeats))
            )

    print(
        f"GlobalCom² per 672x672 image (5 views, 2928 packed tokens), R=0.25, {args.repeats} runs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    )
    print(f"  {'':<58}{'median':>9}{'p25-p75':>17}")
    for name, (median, q25, q75) in rows:
        print(f"  {name:<58}{median / 1000:>7.3f} ms  {q25 / 1000:.3f}-{q75 / 1000:.3f} ms")
    print("  target: scores + allocation + selection <= 1 ms (vision-tower forward excluded)")


if __name__ == "__main__":
    main()
