"""``vanilla``: the unmodified model, the control every table row is compared with."""

from __future__ import annotations

import torch

from globalcom2.methods.base import ImageContext, PreLLMMethod, register_method


@register_method("vanilla")
class Vanilla(PreLLMMethod):
    """Keeps every visual token. Attaching it must leave every output bit-identical.

    Args:
        retention_ratio: accepted so that sweeps can pass one budget word to every method, but only
            1.0 is meaningful: vanilla keeps everything.
    """

    has_budget = False

    def __init__(self, *, retention_ratio: float = 1.0) -> None:
        super().__init__(retention_ratio=retention_ratio)
        if self.retention_ratio != 1.0:
            raise ValueError(
                f"vanilla keeps every token, so retention_ratio must be 1.0, got {retention_ratio!r}; "
                "use 'random', 'globalcom2', 'fastv' or 'sparsevlm' to compress"
            )

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | None:
        return None
