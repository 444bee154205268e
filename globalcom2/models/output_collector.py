"""transformers' output collector made readable by dynamo, so that a compiled CLIP layer is one graph.

transformers returns hidden states and attentions through hooks (``transformers/utils/output_capturing.py``,
5.23-5.25): ``capture_outputs`` puts a dict of lists in the module-level ``_active_collector`` (a
``CompileableContextVar`` around a ``ContextVar``) for the length of a forward, and a hook on every module
whose output it can return reads it (``output_capturing_hook``: ``_active_collector.get()``) and appends.
LLaVA-NeXT asks its vision tower for a hidden state, so these hooks sit on every CLIP attention module, inside
the layers :func:`~globalcom2.models.compiled.compile_model` compiles. dynamo cannot trace
``ContextVar.get``: each compiled CLIP layer broke into two graphs around the hook, entered from Python
with guards of their own (two CUDA-graph replays per layer under ``reduce-overhead``), 24 extra graph
entries per vision forward of a 7B. ``CompileableContextVar`` falls back to a plain global only when the
collector itself was set under compilation (a whole model compiled), never for layers compiled one by one.

:class:`TraceableCollector` keeps a plain attribute, ``mirror``, equal to the collector's value in the thread
that last set or reset it, and returns it where dynamo traces a read. Outside tracing every call is the
parent's, so eager behaviour is unchanged. The collector object stays the same (its class is swapped while a
compiled model holds it, :func:`hold`, and swapped back by the last :func:`let_go`), so every module that
imported it sees the change. A graph that read the mirror is guarded on what it read (a dict's keys, or
``None``), as for any global: a new dict with the same keys reuses the graph.

CLIP carries two such hooks: one on each encoder layer (hidden states), which runs around the compiled
``forward``, outside the graph, and one on each attention module (attentions), inside it. In LLaVA-NeXT's
path only hidden states are asked for, so the traced hook reads the collector's keys and returns. Were
attentions asked for too, its append would be traced, and dynamo would guard on the list's length: a graph
per layer position, within the recompile limit :func:`~globalcom2.models.compiled.recompile_limit_for`
allows each vision layer.

Not thread-safe under compilation, as ``CompileableContextVar`` itself is not: two threads running compiled
forwards at the same time would read the mirror of whichever set it last. A model runs its forwards on one
thread here (the plugin's batch threads only prepare inputs).
"""

from __future__ import annotations

from typing import Any

import torch

try:  # transformers 5.23-5.25; another layout leaves the graph break in place (counted by the benchmarks)
    from transformers.utils import output_capturing as _capturing

    _BASE: type | None = getattr(_capturing, "CompileableContextVar", None)
except ImportError:  # pragma: no cover - the pinned transformers has the module
    _capturing, _BASE = None, None


class _Unavailable:  # the base when transformers has no CompileableContextVar: never instantiated
    pass


class TraceableCollector(_BASE or _Unavailable):  # type: ignore[misc]
    """``CompileableContextVar`` whose ``get`` under dynamo reads :attr:`mirror` instead of the context
    variable (unless the collector was itself set under compilation, where the parent's global applies)."""

    mirror: Any = None

    def get(self) -> Any:
        if not self.compiling and torch.compiler.is_compiling():
            return self.mirror
        return super().get()

    def set(self, value: Any) -> Any:
        token = super().set(value)
        if not torch.compiler.is_compiling():
            self.mirror = value
        return token

    def reset(self, token: Any) -> None:
        super().reset(token)
        if not torch.compiler.is_compiling():
            self.mirror = self.context_var.get()  # the value the reset restored, in this thread


_holders = {"count": 0}


def collector() -> Any:
    """transformers' ``_active_collector``, or ``None`` where its layout is not the one this module knows."""
    found = getattr(_capturing, "_active_collector", None) if _capturing is not None else None
    return found if _BASE is not None and isinstance(found, _BASE) else None


def hold() -> bool:
    """Make the collector traceable (the first holder swaps its class); whether it is. Each ``True`` must be
    matched by one :func:`let_go`."""
    target = collector()
    if target is None:
        return False
    if _holders["count"] == 0:
        target.__class__ = TraceableCollector
        target.mirror = target.context_var.get()
    _holders["count"] += 1
    return True


def let_go() -> None:
    """Undo one :func:`hold`; the last restores the collector's own class.

    Raises:
        RuntimeError: nothing holds it (a :func:`hold` that returned ``False``, or one let go of twice).
    """
    if _holders["count"] <= 0:
        raise RuntimeError(
            "let_go() without a hold(): no compiled model holds transformers' output collector"
        )
    _holders["count"] -= 1
    if _holders["count"] == 0:
        target = collector()
        target.__class__ = _BASE
        del target.mirror
