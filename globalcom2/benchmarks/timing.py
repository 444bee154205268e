"""Interleaved A/B wall-clock timing with warm-up, for small CPU/GPU benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them round-robin so that drift (thermal, other load)
    affects every variant alike. The first ``warmup`` rounds are discarded."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)
