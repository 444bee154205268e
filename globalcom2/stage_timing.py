"""Where the time of one ``generate`` call goes: vision, compression, LLM prefill, decode.

A measured call opens a :class:`StageClock`; forward hooks on the vision tower, the projector, the language
model and the LM head (``globalcom2.efficiency.profile``) and :func:`stage_section` blocks in the compression
hooks mark intervals on it. Intervals nest (the [CLS] scores are computed inside the vision tower, an in-LLM
method prunes inside the language model), and each stage is charged its *exclusive* time: an interval's
length minus the intervals inside it. So the stages never count a moment twice, and their sum is at most the
call's wall time; the rest (``other``) is ``generate``'s own host work: input preparation, feature packing,
logits processing.

On CUDA every mark is a CUDA event recorded on the current stream, read after the call's final
synchronisation, so the times are the device's, not the moments the host launched the work. On CPU, whose
kernels finish before the operator returns, marks are ``time.perf_counter`` readings.

Without an open clock (every unmeasured forward), :func:`stage_section` does nothing but one context-variable
read, so the hooks cost nothing outside measurements.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

#: The stages of a generate call, in the order they run; ``other`` is the remainder of the wall time.
STAGES = ("vision", "compression", "llm_prefill", "decode")
OTHER = "other"


@dataclass
class _Interval:
    name: str
    start: Any  # a CUDA event or a perf_counter reading
    parent: _Interval | None
    end: Any = None
    children: list[_Interval] = field(default_factory=list)


class StageClock:
    """Marks of one measured call on one device (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._open: list[_Interval] = []
        self._closed: list[_Interval] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def open(self, name: str) -> None:
        parent = self._open[-1] if self._open else None
        interval = _Interval(name, self._mark(), parent)
        if parent is not None:
            parent.children.append(interval)
        self._open.append(interval)

    def close(self, name: str) -> None:
        if not self._open or self._open[-1].name != name:
            open_names = [i.name for i in self._open]
            raise RuntimeError(
                f"stage {name!r} closed while {open_names} are open: the stage hooks are unbalanced"
            )
        interval = self._open.pop()
        interval.end = self._mark()
        self._closed.append(interval)

    def _seconds(self, interval: _Interval) -> float:
        if self.cuda:
            return interval.start.elapsed_time(interval.end) / 1e3
        return interval.end - interval.start

    def totals(self) -> dict[str, float]:
        """Exclusive seconds per stage (every stage of :data:`STAGES`, 0.0 when it did not run). On CUDA, call
        it after the device has synchronised."""
        if self._open:
            raise RuntimeError(f"stages {[i.name for i in self._open]} are still open")
        totals = dict.fromkeys(STAGES, 0.0)
        for interval in self._closed:
            own = self._seconds(interval) - sum(self._seconds(child) for child in interval.children)
            totals[interval.name] = totals.get(interval.name, 0.0) + own
        return totals

    def inclusive(self, name: str) -> float:
        """Seconds of the intervals named ``name``, *with* what ran inside them (an in-LLM method's scoring and
        pruning inside ``llm_prefill``); an interval nested in another of the same name is not counted twice.
        Not a stage: :meth:`totals` charges the nested work to its own stage."""
        if self._open:
            raise RuntimeError(f"stages {[i.name for i in self._open]} are still open")
        total = 0.0
        for interval in self._closed:
            if interval.name != name:
                continue
            parent = interval.parent
            while parent is not None and parent.name != name:
                parent = parent.parent
            if parent is None:
                total += self._seconds(interval)
        return total


_ACTIVE: ContextVar[StageClock | None] = ContextVar("globalcom2_stage_clock", default=None)


def active_clock() -> StageClock | None:
    return _ACTIVE.get()


@contextmanager
def clock_running(clock: StageClock) -> Iterator[StageClock]:
    """Make ``clock`` the one :func:`stage_section` marks, for the duration of the block."""
    token = _ACTIVE.set(clock)
    try:
        yield clock
    finally:
        _ACTIVE.reset(token)


@contextmanager
def stage_section(name: str) -> Iterator[None]:
    """Charge the block to stage ``name`` of the running clock (nothing when no clock runs)."""
    clock = _ACTIVE.get()
    if clock is None:
        yield
        return
    clock.open(name)
    try:
        yield
    finally:
        clock.close(name)
