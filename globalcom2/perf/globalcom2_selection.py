"""Cost of GlobalCom² per image, excluding the vision-tower forward.

Times, on random but realistically shaped inputs, the [CLS] score step (the CLS query row against one
layer's keys, at the tiny model's width and at CLIP-L/14's) and the whole per-image work: scores +
allocation + interpolation + holistic scoring + per-crop selection + layout (``GlobalCom2.select``), for
both layouts, at 672x672 (2x2 crops, no padding; the target case) and 1000x600 (letterboxed). Targets
per 672x672 image (:data:`TARGETS`): on a CPU, scores + allocation + selection <= 1 ms at the tiny width;
on a GPU, <= 0.13 ms at CLIP-L's width in bf16 with the selection compiled as ``compile=true`` compiles it,
where launch overhead, not arithmetic, sets the time (the project's GPU target; the eager selection measured
0.535 ms on an H100, ``results/efficiency/globalcom2_selection_cuda.md``, timed then in fp16 by the host's
clock around device synchronisations, before the bench moved to bf16 and CUDA events, and was reported at 0.38 ms from a
first H200 run whose files are not kept here). Compiled rows (:data:`COMPILED_ROWS`) time the selection in each
compile mode; their first calls compile, inside the discarded warm-up rounds. The reference implementation loops
in Python over tokens.

Every variant runs round-robin (:func:`time_interleaved`), so a change in the machine's speed during the
run affects all rows alike. A calibration row, one elementwise add on 2,880 floats, shows the machine's
per-operation cost at the time: on a shared VM it moves by 2-3x between runs, and a small-tensor pipeline
such as this one moves with it.

    python -m globalcom2.perf.globalcom2_selection [--repeats 500] [--device cpu] [--out DIR]

Writes ``DIR/globalcom2_selection_<device>.{md,json}`` (the JSON carries settings and provenance).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from globalcom2.anyres import packed_layout
from globalcom2.methods.base import ImageContext
from globalcom2.methods.globalcom2 import GlobalCom2
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS
from globalcom2.perf.timing import time_interleaved
from globalcom2.perf.variant_table import markdown_table, summarise, write_table
from globalcom2.provenance import hardware_label, provenance
from globalcom2.scoring.vision_attention import cls_patch_scores

#: Device type -> (the row held to a target, its median's limit in ms). On a GPU the target holds for
#: ``compile=true`` (the efficiency issue's condition), whose selection runs compiled in the default mode.
TARGETS: dict[str, tuple[str, float]] = {
    "cpu": ("scores + selection, 672x672, tiny d=64, clean", 1.0),
    "cuda": ("scores + selection, 672x672, CLIP-L d=1024, clean, compiled (default)", 0.13),
}
#: Device type -> the compile modes of the compiled rows (672x672, clean layout, both widths): what a model
#: compiled in that mode selects with (``GlobalCom2.select`` under ``ImageContext.compile_mode``).
COMPILED_ROWS: dict[str, tuple[str, ...]] = {"cpu": ("default",), "cuda": ("default", "reduce-overhead")}
#: Input dtype per device type: bf16 on a GPU, the dtype of the 7B efficiency runs (the issue's H200 table).
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
WIDTHS = {"tiny d=64": (64, 4), "CLIP-L d=1024": (1024, 16)}  # (hidden width, attention heads)
SIZES = {"672x672": (672, 672), "1000x600": (600, 1000)}  # name -> (height, width)
RETENTION_RATIO = 0.25


def variants(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], object]]:
    """Name -> one timed call, the score inputs in ``dtype``; inputs are built once, outside the timing."""
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randn(5, 576, generator=generator).to(device)
    timed: dict[str, Callable[[], object]] = {"calibration: one add on 5x576 floats": lambda: calibration + 1}
    for width_name, (width, heads) in WIDTHS.items():
        scale = (width // heads) ** -0.5
        for size_name, size in SIZES.items():
            if width_name != "tiny d=64" and size_name != "672x672":
                continue  # the letterboxed case differs in selection only, not in the score step
            layout = packed_layout(size, LLAVA_V16_GRID_PINPOINTS)
            query = torch.randn(layout.num_views, width, generator=generator).to(device, dtype)  # [V, D]
            keys = torch.randn(layout.num_views, 577, width, generator=generator).to(
                device, dtype
            )  # [V, 577, D]
            features = torch.zeros(layout.num_tokens, 1, device=device, dtype=dtype)

            def scores(query=query, keys=keys, heads=heads, scale=scale) -> torch.Tensor:
                return cls_patch_scores(query, keys, heads, scale)

            if size_name == "672x672":
                timed[f"[CLS] scores only, {width_name}"] = scores
            for layout_name in ("clean", "reference"):
                method = GlobalCom2(retention_ratio=RETENTION_RATIO, layout=layout_name)
                modes = (
                    COMPILED_ROWS.get(device.type, ())
                    if (size_name, layout_name) == ("672x672", "clean")
                    else ()
                )
                for mode in (None, *modes):

                    def full(
                        method=method, layout=layout, features=features, scores=scores, mode=mode
                    ) -> object:
                        ctx = ImageContext(
                            layout=layout, pixel_values=features, vision_scores=scores(), compile_mode=mode
                        )
                        return method.select(features, ctx)

                    suffix = f", compiled ({mode})" if mode else ""
                    timed[f"scores + selection, {size_name}, {width_name}, {layout_name}{suffix}"] = full
    return timed


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500, help="interleaved rounds (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="discarded rounds first (default 50)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("results/efficiency"), help="output directory")
    args = parser.parse_args(argv)
    if args.repeats < 4:
        parser.error(f"--repeats must be at least 4 (for quartiles), got {args.repeats}")
    device = torch.device(args.device)
    dtype = DTYPES.get(device.type, torch.float32)

    from torch._dynamo.utils import counters

    from globalcom2.perf.efficiency import dynamo_frames

    counters.clear()
    with torch.inference_mode():
        samples = time_interleaved(
            variants(device, dtype), repeats=args.repeats, warmup=args.warmup, device=device
        )
    # the compiled rows' graphs: a graph break or a fallback to eager would time pieces, not one selection
    frames = dynamo_frames()
    rows = summarise(samples)
    target_row, target_ms = TARGETS.get(device.type, TARGETS["cpu"])
    target = next(row for row in rows if row["variant"] == target_row)
    met = target["median (ms)"] <= target_ms
    info = provenance(device)
    hardware = hardware_label(info["hardware"], device)
    caption = (
        f"GlobalCom² per image, vision tower excluded, R={RETENTION_RATIO} ({args.device}: {hardware}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, inputs in "
        f"{str(dtype).removeprefix('torch.')}); {args.repeats} interleaved rounds. "
        f"Target: '{target_row}' <= {target_ms} ms: {'met' if met else 'NOT met'}. Compiled rows: "
        f"{frames['frames_compiled']} of {frames['frames_total']} dynamo frames compiled, {frames['graphs']} "
        f"graphs, {frames['graph_breaks']} graph breaks"
    )
    markdown = markdown_table(caption, rows)
    record = {
        "caption": caption,
        "rows": rows,
        "target": {"row": target_row, "ms": target_ms, "met": met},
        "dynamo_frames": frames,
        "settings": vars(args) | {"out": str(args.out), "retention_ratio": RETENTION_RATIO},
        "provenance": info,
    }
    write_table(args.out / f"globalcom2_selection_{args.device}", markdown, record)
    return record


if __name__ == "__main__":
    main()
