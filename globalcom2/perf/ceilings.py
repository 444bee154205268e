"""The machine's own ceilings, measured at the start of a benchmark: dense matmul throughput and copy bandwidth.

A roofline floor is ``max(bytes that must move / bandwidth, FLOPs / peak)``: no prefill can beat it, so a
measured prefill far above it is overhead (launches, syncs, Python), not work. Peaks from a data sheet are
not reached in practice; measuring them on the GPU at hand, in the dtype of the model, gives a floor this
very machine could approach (on one H200: 796 TFLOP/s bf16 for 8192^3, 4.27 TB/s copy).

* **matmul**: ``n x n @ n x n`` in the model's dtype, ``2 n^3`` FLOPs per product, the median of repeated
  products timed with CUDA events (``perf_counter`` on CPU);
* **bandwidth**: ``dst.copy_(src)`` of a large buffer, counted as read plus write (``2 x bytes``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _median_seconds(lambda: torch.mm(a, b), device, repeats=20 if device.type == "cuda" else 5)


def _time_copy(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), device, repeats=20 if device.type == "cuda" else 5)


def measure_ceilings(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    matmul_size: int | None = None,
    copy_mib: int | None = None,
) -> dict[str, Any]:
    """``{"matmul_tflops", "bandwidth_tb_s", ...}`` measured on ``device`` in ``dtype``.

    Defaults: 8192^3 and 2 GiB on CUDA; 1024^3 and 256 MiB elsewhere (a CPU ceiling is only for testing
    the arithmetic: a CPU prefill is bound by neither).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = matmul_size or (8192 if cuda else 1024)
    copy_bytes = (copy_mib or (2048 if cuda else 256)) * 2**20
    # CUDA events record on the current device's stream: make ``device`` current (it may be cuda:1)
    with torch.cuda.device(device) if cuda else contextlib.nullcontext(), torch.inference_mode():
        matmul_s = _time_matmul(n, dtype, device)
        copy_s = _time_copy(copy_bytes, device)
    if cuda:
        torch.cuda.empty_cache()
    return {
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "bandwidth_tb_s": 2 * copy_bytes / copy_s / 1e12,
        "matmul_size": n,
        "copy_bytes": copy_bytes,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }


def roofline_floor_ms(flops: float, weight_bytes: float, ceilings: dict[str, Any]) -> float:
    """``max(weight_bytes / bandwidth, flops / peak)`` in milliseconds: the weights must be read once and the
    FLOPs done once; neither can go faster than the measured ceilings."""
    memory_s = weight_bytes / (ceilings["bandwidth_tb_s"] * 1e12)
    compute_s = flops / (ceilings["matmul_tflops"] * 1e12)
    return 1e3 * max(memory_s, compute_s)
