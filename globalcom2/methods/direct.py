"""Ask a pre-LLM method what it keeps, without attaching it: the hook-free reference path.

The hook (:mod:`globalcom2.hooks.pre_llm`) makes the same decision inside ``model.generate``; this module
runs the vision tower once, with a [CLS] capture of its own when the method wants scores, and calls the
method's ``select`` per image. The attach tests compare the two paths, and the kept-token figure
(:mod:`globalcom2.report.visualize`) draws what this returns.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from globalcom2.anyres import config_layout
from globalcom2.methods.base import ImageContext, PreLLMMethod
from globalcom2.scoring.vision_attention import ClsAttentionCapture


def pre_llm_sources(model: Any, method: PreLLMMethod, inputs: dict) -> list[torch.Tensor]:
    """Per image of ``inputs`` (processor outputs), the packed positions ``method`` keeps, in order.

    Returns:
        one ``[K_i]`` int64 tensor per image; every position (``arange(N_i)``) where the method bypasses.
    """
    capture = None
    if method.vision_score_layer is not None:
        capture = ClsAttentionCapture(
            model.model.vision_tower, method.vision_score_layer, method.vision_score_kind
        )
    try:
        with torch.no_grad(), capture.capture() if capture else nullcontext() as captured:
            features = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
    finally:
        if capture:
            capture.remove()
    sizes = [tuple(size.tolist()) for size in inputs["image_sizes"]]
    config = model.config
    layouts = [config_layout(config, size) for size in sizes]
    views = [layout.num_views for layout in layouts]
    scores = torch.split(torch.cat(captured), views) if capture else [None] * len(layouts)
    sources = []
    for feats, layout, pixels, image_scores in zip(
        features, layouts, inputs["pixel_values"], scores, strict=True
    ):  # feats: [N_i, D], pixels: [views, 3, H, W]
        ctx = ImageContext(layout=layout, pixel_values=pixels[: layout.num_views], vision_scores=image_scores)
        source = method.select(feats, ctx)
        sources.append(torch.arange(feats.shape[0], device=feats.device) if source is None else source)
    return sources
