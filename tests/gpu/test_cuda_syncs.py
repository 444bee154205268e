"""On a GPU, CUDA's own sync detector holds every method to the budget the CPU counter checks in CI, and
checks that the counter sees every wait a method adds.

``torch.cuda.set_sync_debug_mode("warn")`` warns at every call that makes the host wait for the device
(reading a value, a data-dependent size, a blocking copy). A prefill of each method may add at most 3 such
waits to the unmodified model's own (SparseVLM: 3 per pruning stage), as ``tests/efficiency/test_host_syncs.py``
asserts with the CPU counter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import prompt_inputs, sync_budget_params

from globalcom2 import attach
from globalcom2.efficiency.host_syncs import HostSyncCounter
from globalcom2.methods import METHODS, InLLMMethod

pytestmark = pytest.mark.gpu
PER_FORWARD = 3


def both_counts(model, inputs) -> tuple[int, int]:
    """``(CUDA's waits, the CPU counter's reads)`` of one warm prefill forward, counted in the same call."""
    with torch.inference_mode():
        model(**inputs, use_cache=True)  # warm: constant caches are built outside the count
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, HostSyncCounter() as counter:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(**inputs, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught), counter.total


def cuda_syncs(model, inputs) -> int:
    return both_counts(model, inputs)[0]


@pytest.fixture(scope="module")
def cuda_model():
    from globalcom2.models.loader import load_tiny_llava_next

    return load_tiny_llava_next(seed=0, device="cuda", dtype="bfloat16")


def cuda_inputs(processor, images):
    inputs = prompt_inputs(processor, images[(672, 672)]).to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


@pytest.mark.parametrize("name", METHODS.names())
def test_prefill_waits_for_the_device_at_most_its_budget(cuda_model, images, name):
    model, processor = cuda_model
    inputs = cuda_inputs(processor, images)
    baseline = cuda_syncs(model, inputs)
    with attach(model, name, **sync_budget_params(name)) as handle:
        syncs = cuda_syncs(model, inputs)
        stages = (
            len(handle.method.checked_stage_layers(model.config.text_config.num_hidden_layers))
            if isinstance(handle.method, InLLMMethod)
            else 1
        )
    assert syncs - baseline <= PER_FORWARD * stages, f"{name}: {syncs} waits vs vanilla's {baseline}"


@pytest.mark.parametrize("name", [m for m in METHODS.names() if m != "vanilla"])
def test_the_cpu_counter_sees_every_wait_a_method_adds(cuda_model, images, name):
    """CI holds the methods to their budgets with the CPU counter only; that is sound while every wait a method
    adds on CUDA is one the counter also sees (it may see more). The unmodified model's own waits (CUDA sees
    one the counter does not, inside transformers or a C++ op) cancel out in the difference."""
    model, processor = cuda_model
    inputs = cuda_inputs(processor, images)
    cuda_base, counter_base = both_counts(model, inputs)
    with attach(model, name, **sync_budget_params(name)):
        cuda, counter = both_counts(model, inputs)
    assert cuda - cuda_base <= counter - counter_base, (
        f"{name}: CUDA waits {cuda_base} -> {cuda}, CPU counter {counter_base} -> {counter}"
    )  # the counter may count more (it judges by pattern, on any device): that only makes CI stricter
