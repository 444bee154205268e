"""GlobalCom² harness: training-free visual-token compression for LLaVA-NeXT, and its benchmarks.

Public API::

    from globalcom2 import attach, list_methods, load_llava_next
    handle = attach(model, "random", retention_ratio=0.25)
    model.generate(**inputs)
    handle.remove()
"""

from globalcom2.hooks.attach import attach
from globalcom2.methods import list_methods
from globalcom2.models.loader import load_llava_next

__version__ = "0.1.0"
__all__ = ["__version__", "attach", "list_methods", "load_llava_next"]
