"""A memo for functions that build constant tensors (geometry, index maps) from hashable arguments.

``functools.lru_cache`` alone is not enough: a tensor first built inside ``torch.inference_mode()`` (as
``lmms-eval`` and the benchmarks run) is an *inference tensor*, and the cached copy would then break every
later grad-enabled forward that touches it ("Inference tensors cannot be saved for backward"). Building
under ``inference_mode(False)`` and ``no_grad`` gives ordinary constant tensors that serve every mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def cached_constants(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``lru_cache(maxsize)`` whose results are built outside inference mode and autograd."""

    def decorate(build: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(build)
        def build_plain(*args, **kwargs) -> T:
            with torch.inference_mode(False), torch.no_grad():
                return build(*args, **kwargs)

        return functools.lru_cache(maxsize=maxsize)(build_plain)

    return decorate
