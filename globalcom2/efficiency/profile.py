"""Measuring one ``model.generate`` call: prefill latency, total latency, stage times, peak memory.

Design (the rules the efficiency tables rely on):

* **Prefill latency** is the time from the start of ``generate`` to the end of the model's *first*
  forward call. In transformers 5.x ``generate`` encodes the images before that call and the call itself
  runs the LLM over the whole prompt, so the interval covers vision encoding, compression and the LLM
  prefill, i.e. the time to the first token's logits. Image preprocessing (PIL resizing in the
  processor) happens before ``generate`` and is not part of it; callers time it separately.
  The end of the first forward is caught by a forward hook on the top-level model, registered only
  while a measurement is open; the hook only records an event or a timestamp, so it cannot change any
  output, and it costs one Python call per decoding step.
* **Stages** (``globalcom2.stage_timing``): the same call split into ``vision`` (vision tower and
  projector), ``compression`` (the attached method's own work: [CLS] scores, selection, prompt surgery, an
  in-LLM method's scoring and pruning at its layers, and the masks and positions its compressed cache needs
  at each decode step), ``llm_prefill`` (the language model and LM head in
  the first forward), ``decode`` (the same in the later forwards) and ``other`` (the rest of the wall time:
  ``generate``'s own host work). Each stage is charged its exclusive time, so the stages add up to the
  total. What the GlobalCom² paper's Tables 8/9 time as prefill is the LLM's first forward *with* the
  method's work inside it, ``Measurement.llm_forward_s``: ``llm_prefill`` plus an in-LLM method's
  compression (``llm_prefill`` alone would credit SparseVLM with a forward that skips its own scoring).
* **Clocks.** On a CUDA device every interval is measured with CUDA events (recorded on the current
  stream, read after ``torch.cuda.synchronize``), so asynchronous kernel launches are not mistaken for
  finished work. On CPU it is ``time.perf_counter``; CPU kernels complete before an operator returns,
  so reading the clock in a hook is already synchronised (``synchronize`` is still called, and is
  a no-op there).
* **Total latency** is the wall time of the whole ``generate`` call, on the same clock.
* **Peak memory** is ``torch.cuda.max_memory_allocated`` (live tensors) and ``max_memory_reserved`` (what the
  caching allocator holds, closer to what ``nvidia-smi`` shows) after ``reset_peak_memory_stats`` at the
  start of every measurement, i.e. **per generate call** (per sample at batch size 1, per batch otherwise).
  A reset sets the reserved peak to what the allocator holds at that moment, so it also counts blocks kept
  from earlier calls: in a cell (one method in its process) that is the run's own footprint, while a process
  that runs several methods in turn measures it from an emptied cache (``perf.efficiency.memory_pass``).
  On CPU torch keeps no allocator peak, and process RSS is not comparable across runs, so the values are
  ``None`` with a reason, never 0.
* **Warm-up** is excluded by construction: :meth:`GenerateProfiler.warmup` runs calls that are not
  measured, and callers run it before their first measured call (lazy initialisation, kernel selection
  and allocator growth would otherwise inflate the first sample); a harness also reports its first
  measured call apart (``SampleRecord.first_call``). A measured call in which ``torch.compile`` compiled
  (a graph the warm-up did not meet) is flagged, ``Measurement.compiled``, so that it too stays out of the
  statistics (``SampleRecord.compiled_in_call``; the efficiency benchmark re-runs it).
* **Device.** On CUDA the measurement runs with the model's device current: events record on the current
  device's stream, so a model on ``cuda:1`` timed with ``cuda:0`` current would time an idle stream.

Throughput (samples per second) is derived from many measurements by :func:`throughput`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from globalcom2.models.compiled import compile_attempts
from globalcom2.stage_timing import OTHER, StageClock, clock_running

CPU_PEAK_MEMORY_NOTE = (
    "unavailable on CPU: torch has no allocator peak statistic for CPU tensors, and process RSS "
    "is not comparable across runs"
)


@dataclass(frozen=True)
class Measurement:
    """Timings and memory of one generate call.

    Attributes:
        prefill_s: start of ``generate`` to the end of the model's first forward call, in seconds.
        total_s: the whole ``generate`` call, in seconds.
        peak_memory_bytes: ``torch.cuda.max_memory_allocated`` during the call; ``None`` when unavailable.
        peak_memory_note: why the peaks are ``None`` (``None`` when they are available).
        clock: ``"cuda_event"`` or ``"perf_counter"``.
        device: the device the model ran on, e.g. ``"cuda:0"`` or ``"cpu"``.
        forward_calls: forward calls of the model during the call (prefill + decoding steps).
        stages: exclusive seconds of every stage of :data:`~globalcom2.stage_timing.STAGES` and ``"other"``
            (the rest of ``total_s``); they add up to ``total_s``.
        peak_memory_reserved_bytes: ``torch.cuda.max_memory_reserved`` during the call; ``None`` when
            unavailable.
        compiled: ``torch.compile`` compiled during the call (``globalcom2.models.compiled.compile_attempts``):
            its times are mostly compilation, not the model's.
        llm_forward_s: the language model's and LM head's first forward *with* the method work inside it
            (an in-LLM method's scoring and pruning, which ``stages`` charges to ``compression``): what the
            GlobalCom² paper's Tables 8/9 time as the LLM's prefill, for every method alike. Equal to
            ``stages["llm_prefill"]`` for vanilla and the pre-LLM methods.
    """

    prefill_s: float
    total_s: float
    peak_memory_bytes: int | None
    peak_memory_note: str | None
    clock: str
    device: str
    forward_calls: int
    stages: dict[str, float] = field(default_factory=dict)
    peak_memory_reserved_bytes: int | None = None
    compiled: bool = False
    llm_forward_s: float | None = None

    @property
    def decode_s(self) -> float:
        """``total_s - prefill_s``: the decoding steps (and generate's own bookkeeping)."""
        return self.total_s - self.prefill_s


class PendingMeasurement:
    """Filled when the ``measure()`` block exits normally; read :attr:`result` after the block."""

    def __init__(self) -> None:
        self._result: Measurement | None = None

    @property
    def result(self) -> Measurement:
        if self._result is None:
            raise RuntimeError("the measurement is not finished (read it after the `with` block)")
        return self._result


class GenerateProfiler:
    """Measures ``generate`` calls of one model on one device.

    Args:
        model: the top-level module whose forward ``generate`` calls once per step.
        device: where the model runs; decides the clock and whether peak memory exists.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)
        weights = next(model.parameters(), None)
        if weights is not None and weights.device.type != self.device.type:
            # a CUDA model timed with device="cpu" would read the host's launch time as the GPU's
            raise ValueError(
                f"the profiler's device {self.device} is not where the model runs ({weights.device}): pass the "
                "model's device, which decides the clock"
            )

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for queued device work (CUDA); a no-op on CPU, whose kernels are synchronous."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def warmup(self, fn: Callable[[], Any], calls: int = 1) -> None:
        """Run ``fn`` ``calls`` times without measuring it (results are discarded)."""
        for _ in range(calls):
            fn()
        self.synchronize()

    def _stage_modules(self) -> list[tuple[torch.nn.Module, str | None]]:
        """The modules whose forward is a stage: ``None`` for the LLM, whose stage depends on the call."""
        inner = getattr(self.model, "model", None)
        named = [
            (getattr(inner, "vision_tower", None), "vision"),
            (getattr(inner, "multi_modal_projector", None), "vision"),
            (getattr(inner, "language_model", None), None),
            (getattr(self.model, "lm_head", None), None),
        ]
        return [(module, stage) for module, stage in named if isinstance(module, torch.nn.Module)]

    @contextmanager
    def measure(self) -> Iterator[PendingMeasurement]:
        """Measure the generate call made inside the block.

        Usage::

            with profiler.measure() as pending:
                model.generate(**inputs)
            pending.result.prefill_s, pending.result.stages

        If the block raises, the exception propagates unchanged and no result is produced.
        """
        device_scope = torch.cuda.device(self.device) if self.is_cuda else contextlib.nullcontext()
        with device_scope:
            yield from self._measure()

    def _measure(self) -> Iterator[PendingMeasurement]:
        """:meth:`measure`'s body, with the model's device current."""
        pending = PendingMeasurement()
        calls = [0]
        attempts = compile_attempts()
        self.synchronize()
        clock = StageClock(self.device)
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start, first, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
        marks: list[float] = []
        t_start = time.perf_counter()

        def before_forward(module: torch.nn.Module, args: Any) -> None:
            calls[0] += 1

        def on_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
            if calls[0] == 1:
                if self.is_cuda:
                    first.record()
                else:
                    marks.append(time.perf_counter())

        opened: dict[int, list[str]] = {}

        def open_stage(stage: str | None) -> Callable[[torch.nn.Module, Any], None]:
            def hook(module: torch.nn.Module, args: Any) -> None:
                name = stage or ("llm_prefill" if calls[0] <= 1 else "decode")
                opened.setdefault(id(module), []).append(name)
                clock.open(name)

            return hook

        def close_stage(module: torch.nn.Module, args: Any, output: Any) -> None:
            clock.close(opened[id(module)].pop())

        handles = [
            self.model.register_forward_pre_hook(before_forward),
            self.model.register_forward_hook(on_forward),
        ]
        for module, stage in self._stage_modules():
            handles.append(module.register_forward_pre_hook(open_stage(stage)))
            handles.append(module.register_forward_hook(close_stage))
        try:
            with clock_running(clock):
                yield pending
        finally:
            for handle in handles:
                handle.remove()
        if calls[0] == 0:
            raise RuntimeError("the measured block never called the model's forward: nothing to time")
        reserved = None
        if self.is_cuda:
            end.record()
            torch.cuda.synchronize(self.device)
            prefill = start.elapsed_time(first) / 1e3
            total = start.elapsed_time(end) / 1e3
            peak, note, clock_name = torch.cuda.max_memory_allocated(self.device), None, "cuda_event"
            reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            t_end = time.perf_counter()
            prefill, total = marks[0] - t_start, t_end - t_start
            peak, note, clock_name = None, CPU_PEAK_MEMORY_NOTE, "perf_counter"
        stages = clock.totals()
        stages[OTHER] = total - sum(stages.values())
        pending._result = Measurement(
            prefill_s=prefill,
            total_s=total,
            peak_memory_bytes=peak,
            peak_memory_note=note,
            clock=clock_name,
            device=str(self.device),
            forward_calls=calls[0],
            stages=stages,
            peak_memory_reserved_bytes=reserved,
            compiled=compile_attempts() != attempts,
            llm_forward_s=clock.inclusive("llm_prefill"),
        )


def throughput(num_samples: int, seconds: Sequence[float]) -> float | None:
    """Samples per second over measured calls: ``num_samples / sum(seconds)``; ``None`` without time."""
    elapsed = float(sum(seconds))
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return num_samples / elapsed if elapsed > 0 else None
