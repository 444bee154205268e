"""Interleaved A/B wall-clock timing with warm-up, for small CPU/GPU benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them round-robin so that drift (thermal, other load)
    affects every variant alike, the order rotated by one each round so that no variant always follows the
    same one (and inherits its cache and allocator state). The first ``warmup`` rounds are discarded.

    On a CUDA ``device`` each call starts on an idle device (that device's synchronisation, outside the timed
    region) and is timed by CUDA events recorded on that device's stream around it: from the moment the
    device reaches the call to the moment it finishes the call's last kernel, launch gaps included (what a
    launch-bound call costs) and without the host's round trip to notice the end. A CPU run on a GPU
    machine waits for no GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fns, repeats, warmup, device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name in rotated(list(fns), round_index):
            fn = fns[name]
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def _time_cuda(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.cuda.device(device):  # events record on the current device's stream: make it this one
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for round_index in range(warmup + repeats):
            for name in rotated(list(fns), round_index):
                fn = fns[name]
                torch.cuda.synchronize(device)
                start.record()
                fn()
                end.record()
                end.synchronize()
                if round_index >= warmup:
                    samples[name].append(start.elapsed_time(end) / 1e3)  # elapsed_time is in ms
    return samples


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` started at position ``shift`` (modulo their number), the others in order after it."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)
