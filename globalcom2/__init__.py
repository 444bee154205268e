"""GlobalCom² harness: training-free visual-token compression for LLaVA-NeXT, and its benchmarks.

Public API::

    from globalcom2 import attach, list_methods, load_llava_next
    handle = attach(model, "random", retention_ratio=0.25)
    model.generate(**inputs)
    handle.remove()

The three names are imported on first use (PEP 562), not with the package: they pull in torch and
transformers, which the package's light modules (``paths``, ``atomic``, ``carry``, the GPU checklist's
orchestration) must not need. ``make gpu-checklist`` has to start, and report which carried wheels are
wrong, on a machine where transformers does not import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from globalcom2.hooks.attach import attach
    from globalcom2.methods import list_methods
    from globalcom2.models.loader import load_llava_next

__version__ = "0.1.0"
__all__ = ["__version__", "attach", "list_methods", "load_llava_next"]

#: Each public name and the module that defines it.
_PUBLIC = {
    "attach": "globalcom2.hooks.attach",
    "list_methods": "globalcom2.methods",
    "load_llava_next": "globalcom2.models.loader",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'globalcom2' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
