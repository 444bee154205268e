"""Host reads per prefill forward, every method: the calls that would make the host wait for a CUDA device.

Counts them on any device with :class:`globalcom2.efficiency.host_syncs.HostSyncCounter` (a lower bound of
what CUDA's own detector sees, ``torch.cuda.set_sync_debug_mode``), for the tiny model's prefill of one
672x672 image, unattached and with each registered method at R = 0.25 (:func:`method_params`, the settings
the CI budget test holds every method to, ``tests/efficiency/test_host_syncs.py``). A warm-up prefill runs
first, outside the count, so the geometry caches are built. Each row lists the extra reads over the
unattached model's and where they come from (kind at file:line).

    python -m globalcom2.perf.host_syncs [--device cpu] [--out DIR]

Writes ``DIR/host_syncs_<device type>.{md,json}`` (the JSON carries every method's count by kind and by line, the
settings and provenance).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from globalcom2 import attach
from globalcom2.efficiency.host_syncs import HostSyncCounter
from globalcom2.methods import METHODS
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.perf.variant_table import write_table
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.provenance import hardware_label, provenance

RETENTION_RATIO = 0.25
IMAGE_SIZE = (672, 672)  # (height, width)


def method_params(name: str) -> dict[str, Any]:
    """A method's parameters for the host-read counts (this bench, the CPU budget test and the CUDA one)."""
    params: dict[str, Any] = {} if not METHODS.get(name).has_budget else {"retention_ratio": RETENTION_RATIO}
    if name == "sparsevlm":
        params["equivalent_tokens"] = "layer_output"  # the 4-layer tiny model cannot reach 0.25 layer_input
    return params


def count_prefill(model: Any, inputs: dict[str, torch.Tensor]) -> HostSyncCounter:
    """The host reads of one prefill forward, after an uncounted one."""
    with torch.inference_mode():
        model(**inputs, use_cache=True)  # warm: caches of geometry constants are built outside the count
        with HostSyncCounter() as syncs:
            model(**inputs, use_cache=True)
    return syncs


def counts(device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    """``(the unattached prefill's reads, one row per method)``."""
    model, processor = load_tiny_llava_next(seed=0, device=device)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(*IMAGE_SIZE, 3), dtype=np.uint8))
    inputs = processor(images=image, text=vicuna_v1_prompt("What is in the image?"), return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    baseline = count_prefill(model, inputs).total
    rows = []
    for name in METHODS.names():
        with attach(model, name, **method_params(name)):
            syncs = count_prefill(model, inputs)
        rows.append(
            {
                "method": name,
                "params": method_params(name),
                "reads": syncs.total,
                "extra": syncs.total - baseline,
                "by_kind": dict(sorted(syncs.by_kind.items())),
                "by_line": dict(syncs.by_line.most_common()),
            }
        )
    return baseline, rows


def markdown(caption: str, baseline: int, rows: list[dict[str, Any]]) -> str:
    lines = [f"**{caption}**", "", "| method | reads | over unattached | by kind |", "|---|---:|---:|---|"]
    lines.append(f"| (unattached) | {baseline} | 0 | |")
    for row in rows:
        kinds = ", ".join(f"{kind} {n}" for kind, n in row["by_kind"].items())
        lines.append(f"| {row['method']} | {row['reads']} | {row['extra']:+d} | {kinds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("results/efficiency"), help="output directory")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    baseline, rows = counts(device)
    info = provenance(device)
    caption = (
        f"Host reads per prefill forward (calls that wait for a CUDA device, counted by HostSyncCounter), tiny "
        f"model, one {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} image, R = {RETENTION_RATIO} ({args.device}: "
        f"{hardware_label(info['hardware'], device)}, torch {torch.__version__})"
    )
    record = {
        "caption": caption,
        "unattached": baseline,
        "rows": rows,
        "settings": {"device": args.device, "out": str(args.out), "image_size": IMAGE_SIZE},
        "provenance": info,
    }
    write_table(args.out / f"host_syncs_{device.type}", markdown(caption, baseline, rows), record)
    return record


if __name__ == "__main__":
    main()
