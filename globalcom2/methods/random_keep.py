"""``random``: a uniformly random subset of each image's patch tokens, the floor every method must beat.

UniPruneBench (TianfanPeng/VLMUniPruneBench) reports that random pruning is a strong baseline; its
implementation draws from an unseeded ``torch.randperm``, so its numbers change from run to run. Ours is
seeded per image content (:attr:`ImageContext.sample_key`), so a sample keeps the same tokens whatever
batch it is in and however many processes run the evaluation.
"""

from __future__ import annotations

import hashlib

import torch

from globalcom2.anyres import PackedLayout
from globalcom2.budget import kept_count
from globalcom2.methods.base import ImageContext, PreLLMMethod, register_method
from globalcom2.scoring.ranking import host_to_device


@register_method("random")
class RandomKeep(PreLLMMethod):
    """Keep ``floor(R * N_patch)`` patch tokens drawn uniformly without replacement.

    Patch tokens are the thumbnail's plus the unpadded crops'; row separators are structural and all
    stay. Kept tokens stay in their original (packed) order.

    Args:
        retention_ratio: kept fraction of the image's patch tokens, in (0, 1].
        seed: mixed with each image's content key; change it to draw a different subset.
    """

    def __init__(self, *, retention_ratio: float, seed: int = 0) -> None:
        super().__init__(retention_ratio=retention_ratio)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | None:
        layout = ctx.layout
        num_keep = kept_count(layout.num_patches, self.retention_ratio)
        if num_keep == layout.num_patches:
            return None
        # The draw happens on the host (a CPU generator, the same subset on every device); reading the
        # image's content key is the method's one device read, and the indices go back without a wait.
        generator = torch.Generator().manual_seed(_mix(self.seed, ctx.sample_key))
        chosen = torch.randperm(layout.num_patches, generator=generator)[:num_keep]  # [k] patch ranks
        kept = torch.cat([layout.separator_positions, layout.patch_positions[chosen]])  # separators all stay
        source = kept.sort().values  # [M] ascending = original order
        return host_to_device(source, features.device)

    def separators_kept(self, layout: PackedLayout, source: torch.Tensor) -> int:
        return layout.num_separators


def _mix(seed: int, key: str) -> int:
    """A 63-bit generator seed from the user seed and the image key (independent of Python's hash salt)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
