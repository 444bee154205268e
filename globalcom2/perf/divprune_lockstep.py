"""DivPrune's greedy for one call of several images: in lockstep or one image at a time.

DivPrune's max-min selection is ``k`` sequential steps of three small kernels per image
(``globalcom2/methods/divprune.py``). Run one image at a time, a call of ``I`` images launches
``3 * sum(k_i)`` kernels; in lockstep (the images' matrices padded to the widest, one step picking for
all) ``3 * max(k_i)``, each over ``I`` times more elements. Which is faster depends on whether a step is
bound by its launch (a GPU) or by its arithmetic (a CPU): this bench times both on one device, on
LLaVA-NeXT-7B's packed geometry (the 672x672, 1008x336, 800x600 and 336x336 images in turn, 1,176 to
2,928 positions, features of the LLM's width 4,096), the whole selection (distances, greedy, kept
positions) of a call of 1, 8 and 16 images at R = 0.25 and 0.1, and checks that both give the same
positions. It decides :data:`globalcom2.methods.divprune.LOCKSTEP_DEVICE_TYPES`.

    python -m globalcom2.perf.divprune_lockstep [--device cuda] [--repeats 20] [--out DIR]

Writes ``DIR/divprune_lockstep_<device>.{md,json}`` (the JSON carries settings and provenance).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import globalcom2.methods.divprune as divprune
from globalcom2.anyres import packed_layout
from globalcom2.methods.base import ImageContext
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS
from globalcom2.perf.timing import time_interleaved
from globalcom2.perf.variant_table import markdown_table, summarise, write_table
from globalcom2.provenance import hardware_label, provenance

SIZES = [(672, 672), (336, 1008), (600, 800), (336, 336)]  # (height, width), repeated to fill a call
CALL_SIZES = (1, 8, 16)
RATIOS = (0.25, 0.1)
LLM_WIDTH = 4096  # LLaVA-NeXT-7B's projector output
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}  # the features as the model holds them


def call_inputs(
    images: int, device: torch.device, width: int
) -> tuple[list[torch.Tensor], list[ImageContext]]:
    """Random packed features ``[N_i, width]`` and contexts of ``images`` images of the 7B geometry."""
    generator = torch.Generator().manual_seed(0)
    layouts = [packed_layout(SIZES[i % len(SIZES)], LLAVA_V16_GRID_PINPOINTS) for i in range(images)]
    dtype = DTYPES.get(device.type, torch.float32)
    features = [
        torch.randn(layout.num_tokens, width, generator=generator).to(device, dtype) for layout in layouts
    ]
    contexts = [ImageContext(layout=layout, pixel_values=torch.zeros(1, device=device)) for layout in layouts]
    return features, contexts


def variants(device: torch.device, width: int) -> dict[str, Callable[[], object]]:
    """Name -> one timed call: the selection of a call, in lockstep or one image at a time."""
    timed: dict[str, Callable[[], object]] = {}
    for images in CALL_SIZES:
        features, contexts = call_inputs(images, device, width)
        for ratio in RATIOS:
            method = divprune.DivPrune(retention_ratio=ratio)
            for mode, lockstep in (("one at a time", False), ("lockstep", True)):

                def select(method=method, features=features, contexts=contexts, lockstep=lockstep) -> object:
                    return _select(method, features, contexts, lockstep)

                timed[f"{images} image(s), R={ratio}, {mode}"] = select
    return timed


def _select(
    method: divprune.DivPrune, features: list[torch.Tensor], contexts: list[ImageContext], lockstep: bool
) -> list[torch.Tensor | None]:
    return method.select_images(features, contexts, lockstep=lockstep)


def check_same_positions(device: torch.device, width: int) -> None:
    """Both ways keep the same positions for every image of the largest call (raises otherwise)."""
    features, contexts = call_inputs(max(CALL_SIZES), device, width)
    for ratio in RATIOS:
        method = divprune.DivPrune(retention_ratio=ratio)
        alone, together = (_select(method, features, contexts, lockstep) for lockstep in (False, True))
        for image, (a, b) in enumerate(zip(alone, together, strict=True)):
            if not torch.equal(a, b):
                raise AssertionError(f"R={ratio}, image {image}: lockstep keeps other positions than alone")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="discarded rounds first (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--width", type=int, default=LLM_WIDTH, help=f"feature width (default {LLM_WIDTH})")
    parser.add_argument("--out", type=Path, default=Path("results/efficiency"), help="output directory")
    args = parser.parse_args(argv)
    if args.repeats < 4:
        parser.error(f"--repeats must be at least 4 (for quartiles), got {args.repeats}")
    device = torch.device(args.device)
    with torch.inference_mode():
        check_same_positions(device, args.width)
        samples = time_interleaved(variants(device, args.width), args.repeats, args.warmup, device)
    rows = summarise(samples)
    info = provenance(device)
    default = "lockstep" if device.type in divprune.LOCKSTEP_DEVICE_TYPES else "one at a time"
    caption = (
        f"DivPrune's selection for a call, 7B geometry, features [N, {args.width}] "
        f"{str(DTYPES.get(device.type, torch.float32)).removeprefix('torch.')} ({args.device}: "
        f"{hardware_label(info['hardware'], device)}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads); {args.repeats} interleaved rounds; same positions both ways (checked). The harness's "
        f"default on this device: {default}."
    )
    markdown = markdown_table(caption, rows, digits=2)
    record = {
        "caption": caption,
        "rows": rows,
        "default": default,
        "settings": vars(args) | {"out": str(args.out), "call_sizes": CALL_SIZES, "ratios": RATIOS},
        "provenance": info,
    }
    write_table(args.out / f"divprune_lockstep_{args.device}", markdown, record)
    return record


if __name__ == "__main__":
    main()
