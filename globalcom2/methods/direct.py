"""Ask a pre-LLM method what it keeps, without attaching it: the hook-free reference path.

The hook (:mod:`globalcom2.hooks.pre_llm`) makes the same decision inside ``model.generate``; this module
runs the vision tower once, with a [CLS] capture of its own when the method wants scores, and calls the
method's ``select`` per image. The attach tests compare the two paths, the kept-token figure
(:mod:`globalcom2.report.visualize`) draws what this returns, and :mod:`globalcom2.report.cls_share`
measures where the captured [CLS] attention falls.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from globalcom2.anyres import config_layout
from globalcom2.methods.base import ImageContext, PreLLMMethod
from globalcom2.scoring.vision_attention import ClsAttentionCapture, ScoreKind


def image_features_and_scores(
    model: Any, inputs: dict, layer: int | None, kind: ScoreKind = "logits"
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """One vision-tower forward, as the hook runs it: per image, packed features and [CLS] scores.

    Shared by :func:`pre_llm_sources` and the [CLS]-share measurement (``globalcom2.report.cls_share``),
    so both read the scores a pre-LLM method is given, through the same capture.

    Args:
        model: a LLaVA-NeXT model (``model.model.get_image_features``).
        inputs: processor outputs with ``pixel_values`` ``[I, V_max, 3, H, W]`` and ``image_sizes`` ``[I, 2]``.
        layer: CLIP layer of the scores (negative: from the end); ``None`` captures nothing.
        kind: see :func:`globalcom2.scoring.vision_attention.cls_patch_scores`.

    Returns:
        ``I x [N_i, D]`` packed features and ``I x [V_i, 576]`` scores (thumbnail first; ``None`` when
        ``layer`` is ``None``).
    """
    capture = None if layer is None else ClsAttentionCapture(model.model.vision_tower, layer, kind)
    try:
        with torch.no_grad(), capture.capture() if capture else nullcontext() as captured:
            features = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
    finally:
        if capture:
            capture.remove()
    if capture is None:
        return list(features), [None] * len(features)
    config = model.config
    views = [config_layout(config, tuple(size.tolist())).num_views for size in inputs["image_sizes"]]
    return list(features), list(torch.split(torch.cat(captured), views))  # [sum V_i, 576] -> I x [V_i, 576]


def pre_llm_sources(model: Any, method: PreLLMMethod, inputs: dict) -> list[torch.Tensor]:
    """Per image of ``inputs`` (processor outputs), the packed positions ``method`` keeps, in order.

    Returns:
        one ``[K_i]`` int64 tensor per image; every position (``arange(N_i)``) where the method bypasses.

    Raises:
        TypeError: a method that builds new tokens (a :class:`~globalcom2.methods.base.Replacement`, as
            VisionZip's merged ones) or needs the CLIP layer states the hook captures: it keeps no subset
            of packed positions to return.
    """
    if method.vision_capture_layer is not None:
        raise TypeError(
            f"{method.name!r} builds its tokens from captured CLIP layer states, which this hook-free path "
            "does not capture; attach it with globalcom2.attach and read the hook's stats instead"
        )
    features, scores = image_features_and_scores(
        model, inputs, method.vision_score_layer, method.vision_score_kind
    )
    config = model.config
    layouts = [config_layout(config, tuple(size.tolist())) for size in inputs["image_sizes"]]
    for layout, feats in zip(layouts, features, strict=True):  # as the hook checks them
        layout.check_features(feats)
    contexts = [
        ImageContext(layout=layout, pixel_values=pixels[: layout.num_views], vision_scores=image_scores)
        for layout, pixels, image_scores in zip(layouts, inputs["pixel_values"], scores, strict=True)
    ]  # pixels: [views, 3, H, W]
    sources = []
    for feats, source in zip(
        features, method.select_images(features, contexts), strict=True
    ):  # feats: [N_i, D]
        if source is not None and not isinstance(source, torch.Tensor):
            raise TypeError(
                f"{method.name!r} returned {type(source).__name__}, not kept positions: this path returns "
                "positions of the packed sequence, which a method that builds new tokens does not keep"
            )
        sources.append(torch.arange(feats.shape[0], device=feats.device) if source is None else source)
    return sources
