"""Interleaved A/B wall-clock timing with warm-up, for small CPU/GPU benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _no_synchronize() -> None:
    pass


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them round-robin so that drift (thermal, other load)
    affects every variant alike. The first ``warmup`` rounds are discarded. On a CUDA ``device`` every call
    is bracketed by that device's synchronisations (decided once, outside the timed region); a CPU run on a
    GPU machine waits for no GPU."""
    device = torch.device(device)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else _no_synchronize
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)
