"""The generate-call profiler: clocks, prefill boundary, peak memory marked unavailable on CPU."""

from __future__ import annotations

import time

import pytest
import torch

from globalcom2.efficiency.profile import CPU_PEAK_MEMORY_NOTE, GenerateProfiler, throughput


class Steps(torch.nn.Module):
    """Stands in for a model whose ``generate`` calls ``forward`` once per step."""

    def forward(self, x: torch.Tensor, delay: float) -> torch.Tensor:
        time.sleep(delay)
        return x + 1


def fake_generate(model: Steps, steps: int, first: float, rest: float) -> None:
    x = torch.zeros(1)
    for step in range(steps):
        x = model(x, first if step == 0 else rest)


def test_prefill_ends_with_the_first_forward_call():
    model = Steps()
    profiler = GenerateProfiler(model, "cpu")
    with profiler.measure() as pending:
        fake_generate(model, steps=4, first=0.05, rest=0.02)
    m = pending.result
    assert m.clock == "perf_counter" and m.device == "cpu" and m.forward_calls == 4
    assert 0.05 <= m.prefill_s < 0.05 + 0.04  # the prefill step, not the decoding steps
    assert m.total_s >= m.prefill_s + 3 * 0.02 and m.decode_s == pytest.approx(m.total_s - m.prefill_s)
    assert not model._forward_hooks  # nothing stays attached after the measurement


def test_peak_memory_on_cpu_is_unavailable_not_zero():
    model = Steps()
    with GenerateProfiler(model, "cpu").measure() as pending:
        fake_generate(model, steps=1, first=0.0, rest=0.0)
    assert pending.result.peak_memory_bytes is None
    assert pending.result.peak_memory_note == CPU_PEAK_MEMORY_NOTE


def test_errors_propagate_and_leave_no_hook():
    model = Steps()
    with pytest.raises(ZeroDivisionError), GenerateProfiler(model, "cpu").measure():
        model(torch.zeros(1), 0.0)
        _ = 1 / 0
    assert not model._forward_hooks


def test_a_block_without_forward_calls_is_an_error():
    with (
        pytest.raises(RuntimeError, match="never called the model's forward"),
        GenerateProfiler(Steps(), "cpu").measure(),
    ):
        pass


def test_warmup_runs_unmeasured_calls():
    calls = []
    GenerateProfiler(Steps(), "cpu").warmup(lambda: calls.append(1), calls=2)
    assert calls == [1, 1]


def test_throughput():
    assert throughput(10, [1.0, 1.5, 2.5]) == 2.0
    assert throughput(3, []) is None


@pytest.mark.parametrize(
    ("method", "params"),
    [
        (None, {}),
        ("globalcom2", {"retention_ratio": 0.25}),
        ("fastv", {"retention_ratio": 0.25}),
        ("sparsevlm", {"retention_ratio": 0.4, "equivalent_tokens": "layer_output"}),
    ],
)
def test_every_stage_is_timed_and_the_stages_add_up_to_the_total(model, processor, images, method, params):
    """Vision, compression, LLM prefill and decode of a real generate call; compression is the method's own
    work (none for the unmodified model), and nested intervals are charged once."""
    from contextlib import nullcontext

    from helpers import prompt_inputs

    from globalcom2 import attach
    from globalcom2.stage_timing import OTHER, STAGES

    inputs = prompt_inputs(processor, images[(672, 672)])
    profiler = GenerateProfiler(model, "cpu")
    attached = attach(model, method, **params) if method else nullcontext()
    with attached, torch.inference_mode(), profiler.measure() as pending:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    m = pending.result
    assert set(m.stages) == {*STAGES, OTHER}
    assert all(m.stages[stage] > 0 for stage in ("vision", "llm_prefill", "decode"))
    assert (m.stages["compression"] > 0) == (method is not None)
    assert m.stages[OTHER] >= 0 and sum(m.stages.values()) == pytest.approx(m.total_s)
    assert m.stages["vision"] + m.stages["llm_prefill"] <= m.prefill_s  # both end before the first logits
    # the LLM's forward with the method's work inside it: more than the stage only for an in-LLM method,
    # whose prefill scoring is inside it (its decode-step masks are not)
    if method in ("fastv", "sparsevlm"):
        assert m.stages["llm_prefill"] < m.llm_forward_s < m.stages["llm_prefill"] + m.stages["compression"]
    else:
        assert m.llm_forward_s == m.stages["llm_prefill"]
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in profiler_modules(model))


def profiler_modules(model) -> list[torch.nn.Module]:
    inner = model.model
    return [model, inner.vision_tower, inner.multi_modal_projector, inner.language_model, model.lm_head]


def test_stage_clock_charges_nested_intervals_once_and_refuses_unbalanced_hooks():
    from globalcom2.stage_timing import StageClock, clock_running, stage_section

    clock = StageClock("cpu")
    with clock_running(clock):
        clock.open("vision")
        time.sleep(0.02)
        with stage_section("compression"):
            time.sleep(0.03)
        clock.close("vision")
    totals = clock.totals()
    assert 0.02 <= totals["vision"] < 0.03 + 0.01 and totals["compression"] >= 0.03
    assert totals["llm_prefill"] == totals["decode"] == 0.0
    with stage_section("compression"):  # no clock running: nothing happens
        pass
    clock.open("vision")
    with pytest.raises(RuntimeError, match="unbalanced"):
        clock.close("decode")


def test_inclusive_time_keeps_the_work_nested_inside_a_stage_once():
    """``inclusive`` is what the paper times as the LLM's prefill for an in-LLM method: the forward with the
    method's pruning inside it, where ``totals`` charges that pruning to compression."""
    from globalcom2.stage_timing import StageClock, clock_running, stage_section

    clock = StageClock("cpu")
    with clock_running(clock):
        clock.open("llm_prefill")
        time.sleep(0.02)
        with stage_section("compression"):
            time.sleep(0.03)
        clock.open("llm_prefill")  # a nested interval of the same stage (the LM head inside a wrapper)
        time.sleep(0.01)
        clock.close("llm_prefill")
        clock.close("llm_prefill")
        clock.open("llm_prefill")  # a second, sibling interval counts too
        time.sleep(0.01)
        clock.close("llm_prefill")
    totals = clock.totals()
    inclusive = clock.inclusive("llm_prefill")
    assert inclusive == pytest.approx(totals["llm_prefill"] + totals["compression"])
    # sleeps never end early, and may end late on a loaded machine: lower bounds only
    assert inclusive >= 0.07 and totals["llm_prefill"] >= 0.04 and inclusive - totals["llm_prefill"] >= 0.03
    assert clock.inclusive("decode") == 0.0


def test_a_call_that_compiles_is_flagged_and_a_cached_one_is_not():
    """A measured call in which ``torch.compile`` compiled times the compilation, not the model: the profiler
    flags it (the harnesses keep such calls out of their statistics), and the same call once its graph is
    cached is not flagged. A new input shape compiles again and is flagged again."""
    step = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)

    class Compiled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return step(x)

    model = Compiled()
    profiler = GenerateProfiler(model, "cpu")
    flags = []
    for shape in ((3,), (3,), (5,), (5,)):
        with profiler.measure() as pending:
            model(torch.zeros(shape))
        flags.append(pending.result.compiled)
    assert flags == [True, False, True, False]
    with profiler.measure() as pending:  # no compiled code at all
        Steps()(torch.zeros(1), 0.0)
        model(torch.zeros(3))
    assert pending.result.compiled is False


def test_the_profiler_refuses_a_device_the_model_is_not_on():
    """The device picks the clock: a CUDA model profiled as "cpu" would time kernel launches, not kernels."""
    on_meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"profiler's device cpu is not where the model runs \(meta\)"):
        GenerateProfiler(on_meta, "cpu")
    GenerateProfiler(torch.nn.Linear(2, 2), "cpu")  # the model's own device
    GenerateProfiler(Steps(), "cpu")  # no weights: nothing to check against
