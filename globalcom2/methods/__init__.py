"""Compression methods. Importing this package registers every method in :data:`METHODS`.

Adding a method (the checklist; README "Contributing" has the benchmark and model ones):

1. ``globalcom2/methods/<name>.py``: a class decorated ``@register_method("<name>")``, subclassing
   :class:`PreLLMMethod` (``select``, and ``separators_kept`` when the layout fixes that count) or
   :class:`InLLMMethod` (``stage_layers``, ``stage_counts``, ``select_queries``, ``score``, ``keep``). Store
   each constructor argument under its own name and derive the rest, so ``METHODS.create(name, **m.params())``
   rebuilds it (``tests/methods/test_registry_round_trip.py``). Size every output from host counts (the
   view's tuples, the image size and R) with the fixed-size helpers of ``globalcom2/scoring/selection.py``:
   ``tests/efficiency/test_host_syncs.py`` holds every registered method to at most 3 host reads per
   prefill forward (3 per stage for a multi-stage method).
2. Import the module in the line below, so the decorator runs.
3. ``configs/method/<name>.yaml`` (its Hydra parameters). The sweep (``configs/sweep/methods_x_ratios.yaml``),
   the tables and plots (``report.tables.method_order``) and the efficiency benchmark
   (``perf.efficiency.default_variants``) read the registry, so they need no edit;
   ``tests/harness/test_method_lists.py`` checks the config file and all three lists.
4. ``tests/methods/test_<name>.py``: identity at ratio 1.0, kept count equals the budget, ``remove()``
   restores the model (see ``test_fastv.py``).
"""

from globalcom2.methods import (  # noqa: F401  (registration side effect)
    dart,
    divprune,
    fastv,
    globalcom2,
    pdrop,
    random_keep,
    sparsevlm,
    vanilla,
    visionzip,
)
from globalcom2.methods.base import (
    METHODS,
    CompressionMethod,
    ImageContext,
    ImageStats,
    InLLMMethod,
    LayerStats,
    PreLLMMethod,
    register_method,
)


def list_methods() -> list[str]:
    """Names of the registered compression methods."""
    return METHODS.names()


#: The order sweeps run the paper's methods in: the control first, then the cheap baseline, then the paper's
#: baselines, then the later ones a reviewer asks for.
SWEEP_ORDER = (
    "vanilla",
    "random",
    "globalcom2",
    "fastv",
    "sparsevlm",
    "pdrop",
    "visionzip",
    "dart",
    "divprune",
)


def swept_methods() -> list[str]:
    """Every registered method, in :data:`SWEEP_ORDER` and then by name: what
    ``configs/sweep/methods_x_ratios.yaml`` sweeps (through the ``${registered_methods:}`` resolver of
    ``globalcom2.run``), so a newly registered method is swept without an edit there."""
    known = [name for name in SWEEP_ORDER if name in METHODS]
    return [*known, *(name for name in METHODS.names() if name not in SWEEP_ORDER)]


__all__ = [
    "METHODS",
    "SWEEP_ORDER",
    "CompressionMethod",
    "ImageContext",
    "ImageStats",
    "InLLMMethod",
    "LayerStats",
    "PreLLMMethod",
    "list_methods",
    "register_method",
    "swept_methods",
]
