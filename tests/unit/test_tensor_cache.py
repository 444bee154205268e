"""Cached constant tensors built during an inference-mode call must still serve grad-enabled forwards."""

from __future__ import annotations

import torch

from globalcom2.anyres import _cached_layout, packed_layout, packed_provenance
from globalcom2.methods.base import ImageContext
from globalcom2.methods.globalcom2 import GlobalCom2, block_membership, thumbnail_blocks
from globalcom2.methods.globalcom2_geometry import _geometry, crop_geometry
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS as PINPOINTS
from globalcom2.scoring.ranking import column_tie_break


def test_constants_built_in_inference_mode_serve_grad_mode():
    caches = (
        _cached_layout,
        packed_provenance,
        _geometry,
        thumbnail_blocks,
        block_membership,
        column_tie_break,
    )
    for cache in caches:
        cache.cache_clear()  # so that the first build below happens inside inference mode
    method = GlobalCom2(retention_ratio=0.25)
    with torch.inference_mode():
        layout = packed_layout((600, 800), PINPOINTS)
        ctx = ImageContext(layout=layout, pixel_values=torch.zeros(1), vision_scores=torch.randn(5, 576))
        method.select(torch.zeros(layout.num_tokens, 1), ctx)
    geometry = crop_geometry(layout)
    cached = [layout.view, layout.token, thumbnail_blocks(24, layout.grid), column_tie_break(5, 576)]
    cached.append(block_membership(24, layout.grid, torch.device("cpu")))
    cached += [value for value in vars(geometry).values() if isinstance(value, torch.Tensor)]
    assert not any(tensor.is_inference() for tensor in cached)

    scores = torch.randn(5, 576, requires_grad=True)  # as captured from a grad-enabled vision tower
    ctx = ImageContext(layout=layout, pixel_values=torch.zeros(1), vision_scores=scores)
    kept = method.select(torch.zeros(layout.num_tokens, 1), ctx)
    assert kept.numel() < layout.num_tokens
