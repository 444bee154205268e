"""``visionzip``: VisionZip, a few dominant tokens per view plus contextual tokens merged from the rest.

Paper: S. Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025,
arXiv 2412.04467). Reference code: github.com/dvlab-research/VisionZip @ ``3151f6d`` (``visionzip/*.py`` is
unchanged since the first commit). No reference code is copied; below is a vectorised re-implementation
of what it computes, with the lines it follows.

Per 336 px view (``visionzip/clip_encoder.py`` lines 42-85), with ``dominant`` counting [CLS]
(``visionzip/main.py`` line 7 asks the top-k for ``dominant - 1`` patches):

1. Inputs, all from CLIP's second-to-last layer, the one whose output LLaVA feeds to its projector
   (``vision_feature_layer=-2``; ``utils.py`` line 191 stores the metric of layer 22 of 24 only): the layer's
   output with [CLS] and without post-layernorm (``clip_encoder.py`` line 44), its softmax attention
   (line 43) and its keys ``k_proj(layer_norm1(x))`` averaged over heads (``utils.py`` lines 23-24, 89).
   We capture them with forward hooks, SDPA stays on (``globalcom2/scoring/vision_capture.py``).
2. Dominant tokens (lines 50-57): the [CLS] query's attention over the patch keys (the [CLS] column
   dropped after the softmax) summed over heads; [CLS] plus the top ``dominant - 1`` patches, gathered in
   position order (a mask, not score order).
3. Contextual tokens (lines 60-80): the remaining ``n = 577 - dominant`` tokens in position order; metric =
   their head-averaged keys, L2-normalised; targets at ``arange(0, n, step)[:contextual]`` with ``step =
   max(1, n // contextual)``; every other token goes to the target of highest cosine similarity (first on
   ties); contextual token = ``target + mean(its members)`` (a target with no member stays itself).
4. View output (line 83): ``[dominant tokens, contextual tokens]``, still in CLIP space; the projector runs
   on these tokens afterwards (``visionzip/llava_arch.py`` lines 31-40), so merging happens before it.

How it meets AnyRes, as the official LLaVA-NeXT path does (``visionzip/llava_arch.py`` lines 42-80 and
83-135): the thumbnail and every crop are compressed independently (views stacked, lines 91-95). The
thumbnail contributes ``[CLS, dominant patches, contextual]``; the crops contribute their dominant patches
scattered into the *padded* crop grid and read in raster order over the whole grid (lines 52-75), then
each crop's [CLS] (crop order), then every crop's contextual tokens, crop by crop (lines 76-79). No
unpadding and no ``image_newline`` anywhere (line 66 builds one that line 67 discards), so the image
contributes ``(1 + crops) * (dominant + contextual)`` tokens, all patch tokens, no separators.

Budget: VisionZip's budgets are per view (the paper's LLaVA-NeXT "640 / 320 / 160" are 128 / 64 / 32
tokens for each of 5 views; the author's reply in JIA-Lab-research/VisionZip#17). Here ``retention_ratio``
R maps to ``k = floor(576 R)`` tokens per view, split into ``contextual = round_half_up(k *
contextual_fraction)`` (capped at ``k - 1``, so [CLS] always stays) and ``dominant = k - contextual``.
With the default fraction 10/64 this gives the official splits 54+10 (R = 1/9), 108+20 (R = 2/9) and
162+30 (R = 1/3).

Deliberate deviations:

* Realised count: ``(1 + crops) * k`` tokens per image, NOT the harness's ``floor(R * N_patch)`` (N_patch
  counts unpadded crop tokens): VisionZip compresses padded crops and keeps [CLS], so the ratio of kept to
  vanilla tokens differs from R per image. :class:`~globalcom2.methods.base.ImageStats` records the
  realised count; compare methods on it, not on R. At high R it can exceed vanilla's: a 720x1280 image has
  1,948 visual positions unmodified (its crops are mostly padding), and VisionZip feeds 2,160 at R = 0.75 and
  2,590 at R = 0.9, then 1,948 again at R = 1 (no compression), so its token count is not monotone in R.
  This is the official code's behaviour, kept as it is.
* The budget word: R is our word for the per-view fraction ``k / 576``; the official code takes
  ``dominant`` and ``contextual`` counts.
* Float32: scores, normalisation, similarities and the merge run in float32 (official: the model dtype,
  fp16), so fp16 rounding ties do not decide ranks; merged tokens are cast back to the model dtype before
  the projector. Top-k ties break towards the lower patch index (official: ``torch.topk``'s unspecified
  order); the assignment's ties go to the first target, as ``argmax`` does officially.
* The attention row is recomputed from the layer's own query and key projections (:mod:`vision_capture`)
  instead of taken from an eager forward that materialises every layer's attention.
* Batches of any size and several images per prompt (official evaluation: one image, batch size 1):
  every image is compressed from its own views.
* ``contextual = 0`` (tiny R) keeps the dominant tokens only (the official code would divide by zero).
* R = 1 is the unmodified model (no capture, no bypass of unpadding or newlines).
* A model whose ``vision_feature_layer`` is not -2 is refused: the official code keeps the metric of that
  layer only (``utils.py`` line 191), so another feature layer has no official counterpart.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from globalcom2.anyres import PackedLayout
from globalcom2.budget import (
    MAX_PATCH_TOKENS,
    THUMBNAIL_PATCH_TOKENS,
    kept_count,
    validate_retention_ratio,
)
from globalcom2.methods.base import ImageContext, PreLLMMethod, Replacement, register_method
from globalcom2.scoring.ranking import column_tie_break, ranking_keys

#: CLIP layer VisionZip reads: the output LLaVA feeds to its projector (``hidden_states[-2]``).
CAPTURE_LAYER = -2
DEFAULT_CONTEXTUAL_FRACTION = 10 / 64  # the README's 54 + 10 per view


def view_budget(
    retention_ratio: float, contextual_fraction: float, view_tokens: int = 576
) -> tuple[int, int]:
    """``(dominant, contextual)`` tokens per view; ``dominant`` counts [CLS], as the official one does.

    ``k = floor(R * view_tokens)``; ``contextual = round_half_up(k * fraction)``, at most ``k - 1``.
    """
    k = kept_count(view_tokens, retention_ratio)
    contextual = min(math.floor(k * contextual_fraction + 0.5), max(k - 1, 0))
    return k - contextual, contextual


@register_method("visionzip")
class VisionZip(PreLLMMethod):
    """Per view: [CLS] and the patches it attends to most, plus contextual tokens merged from the rest.

    Args:
        retention_ratio: kept fraction of each view's 576 tokens, ``k = floor(576 R)`` per view, in
            [1/576, 1]; 1.0 keeps the unmodified model.
        contextual_fraction: share of ``k`` given to merged contextual tokens, in [0, 1) (default 10/64,
            the official 54 + 10).
    """

    def __init__(
        self, *, retention_ratio: float, contextual_fraction: float = DEFAULT_CONTEXTUAL_FRACTION
    ) -> None:
        if (
            kept_count(THUMBNAIL_PATCH_TOKENS, validate_retention_ratio(retention_ratio)) < 1
        ):  # before the base class warns
            raise ValueError(
                f"visionzip keeps floor(576 * retention_ratio) tokens of each view and needs at least one "
                f"(the [CLS] token): retention_ratio must be in [1/576, 1], got {retention_ratio!r}"
            )
        if (
            isinstance(contextual_fraction, bool)
            or not isinstance(contextual_fraction, numbers.Real)
            or not math.isfinite(contextual_fraction)
            or not 0.0 <= contextual_fraction < 1.0
        ):
            raise ValueError(
                f"contextual_fraction must be a real number in [0, 1) (the share of each view's tokens that "
                f"are merged contextual tokens), got {contextual_fraction!r}"
            )
        super().__init__(retention_ratio=retention_ratio)
        self.contextual_fraction = float(contextual_fraction)

    @property
    def vision_capture_layer(self) -> int | None:
        """The layer LLaVA takes its features from; nothing is captured at R = 1 (the unmodified model)."""
        return None if self.retention_ratio == 1.0 else CAPTURE_LAYER

    @property
    def budget(self) -> tuple[int, int]:
        """``(dominant, contextual)`` per view (:func:`view_budget`)."""
        return view_budget(self.retention_ratio, self.contextual_fraction)

    def nominal_visual_tokens(
        self, num_layers: int, max_visual_tokens: int = MAX_PATCH_TOKENS
    ) -> tuple[int, ...]:
        """``k`` tokens for each 576-token view of the nominal image (2880 = 5 views: ``5 k``), not
        ``floor(R * 2880)``: the two differ when ``576 R`` is not a whole number."""
        if self.retention_ratio == 1.0:
            return super().nominal_visual_tokens(num_layers, max_visual_tokens)
        per_view = kept_count(THUMBNAIL_PATCH_TOKENS, self.retention_ratio)
        return (max_visual_tokens * per_view // THUMBNAIL_PATCH_TOKENS,) * num_layers

    def check_model_config(self, config: Any) -> None:
        super().check_model_config(config)
        if self.vision_capture_layer is not None and config.vision_feature_layer != CAPTURE_LAYER:
            raise ValueError(
                f"visionzip merges the CLIP tokens LLaVA feeds to its projector, hidden_states[{CAPTURE_LAYER}] "
                f"as in the official code; this model uses vision_feature_layer={config.vision_feature_layer!r}"
            )

    def select(self, features: torch.Tensor, ctx: ImageContext) -> Replacement | None:
        if self.retention_ratio == 1.0:
            return None
        if ctx.views is None or ctx.project is None:
            raise RuntimeError(
                "visionzip needs the CLIP layer states of every view and the projector; attach it with "
                "globalcom2.attach"
            )
        views = ctx.views
        side = ctx.layout.side
        if views.hidden.shape[:2] != (ctx.layout.num_views, side * side + 1):
            raise RuntimeError(
                f"visionzip expected [{ctx.layout.num_views}, {side * side + 1}, C] CLIP states for this image, "
                f"got {list(views.hidden.shape)}"
            )
        dominant, contextual = view_budget(self.retention_ratio, self.contextual_fraction, side * side)
        dominant_index, tokens = compress_views(
            views.hidden, views.cls_attention, views.keys, dominant, contextual
        )  # [V, d], [V, d + c, C]
        width = tokens.shape[-1]
        projected = ctx.project(tokens.to(features.dtype).view(-1, width))  # [V * (d + c), D]
        projected = projected.view(tokens.shape[0], dominant + contextual, -1)  # [V, d + c, D]
        packed = pack_next_layout(projected, dominant_index, ctx.layout)  # [(1 + crops) * (d + c), D]
        return Replacement(features=packed, patch_tokens=packed.shape[0], separators=0)


def compress_views(
    hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on a stack of views, all at once (``visionzip/clip_encoder.py`` lines 50-83).

    Args:
        hidden: ``[V, T, C]`` the layer's output, [CLS] at row 0 (``T = 1 + patches``).
        cls_attention: ``[V, T - 1]`` [CLS]->patch softmax attention summed over heads.
        keys: ``[V, T, d]`` the layer's keys averaged over heads (the merge metric).
        dominant: tokens kept as they are, [CLS] included (>= 1).
        contextual: merged tokens (>= 0, < ``T - dominant``).

    Returns:
        ``(dominant_index [V, dominant], tokens [V, dominant + contextual, C])``: positions of the dominant
        tokens (ascending, 0 = [CLS] first) and the view's output tokens, float32.
    """
    views, length, _ = hidden.shape
    device = hidden.device
    # Dominant: [CLS] + the top (dominant - 1) patches; ties go to the lower patch index.
    patch_keys = ranking_keys(cls_attention, column_tie_break(views, length - 1, device))  # [V, T - 1]
    top = patch_keys.topk(dominant - 1, dim=1).indices + 1  # [V, d - 1] positions in 1..T-1
    keep = torch.zeros(views, length, dtype=torch.bool, device=device)
    keep[:, 0] = True
    keep.scatter_(1, top, True)  # [V, T], exactly `dominant` per row
    # One stable sort splits every row into the rest (ascending) and the dominant positions (ascending).
    order = torch.argsort(keep.to(torch.uint8), dim=1, stable=True)  # [V, T]
    rest = length - dominant
    rest_index, dominant_index = order[:, :rest], order[:, rest:]  # [V, n], [V, d]
    hidden32 = hidden.float()
    dominant_tokens = _rows(hidden32, dominant_index)  # [V, d, C]
    if contextual == 0:
        return dominant_index, dominant_tokens

    # Contextual: strided targets over the rest, each other token joins its most similar target.
    rest_hidden = _rows(hidden32, rest_index)  # [V, n, C]
    metric = _rows(keys.float(), rest_index)  # [V, n, d]
    metric = metric / metric.norm(dim=-1, keepdim=True)  # [V, n, d]
    step = max(1, rest // contextual)
    slots = torch.arange(rest, device=device)  # [n]
    is_target = (slots % step == 0) & (slots < step * contextual)  # [n]: arange(0, n, step)[:contextual]
    target = slots[::step][:contextual]  # [c] (a view of slots, no host copy)
    other = torch.argsort(is_target.to(torch.uint8), stable=True)[: rest - contextual]  # [n - c] ascending
    similarity = metric[:, other] @ metric[:, target].transpose(1, 2)  # [V, n - c, c]
    assignment = similarity.argmax(dim=2)  # [V, n - c] first maximum on ties
    members = (assignment[..., None] == torch.arange(contextual, device=device)).float()  # [V, n - c, c]
    sums = members.transpose(1, 2) @ rest_hidden[:, other]  # [V, c, C]
    counts = members.sum(dim=1).clamp(min=1)  # [V, c]
    contextual_tokens = rest_hidden[:, target] + sums / counts[..., None]  # [V, c, C]
    return dominant_index, torch.cat([dominant_tokens, contextual_tokens], dim=1)


def pack_next_layout(
    tokens: torch.Tensor, dominant_index: torch.Tensor, layout: PackedLayout
) -> torch.Tensor:
    """The official LLaVA-NeXT sequence of one image (``visionzip/llava_arch.py`` lines 42-80, 107-121).

    Args:
        tokens: ``[1 + crops, d + c, D]`` each view's output tokens (thumbnail first, crops row-major).
        dominant_index: ``[1 + crops, d]`` their dominant positions (ascending, 0 = [CLS]).
        layout: the image's AnyRes layout (its crop grid).

    Returns:
        ``[(1 + crops) * (d + c), D]``: the thumbnail's tokens; the crops' dominant patches in raster order
        over the padded crop grid; each crop's [CLS]; each crop's contextual tokens.
    """
    views, _, width = tokens.shape
    dominant = dominant_index.shape[1]
    side, (_, cols) = layout.side, layout.grid
    crops = tokens[1:]  # [n, d + c, D]
    patch = dominant_index[1:, 1:] - 1  # [n, d - 1] patch index within its crop
    crop = torch.arange(views - 1, device=tokens.device)[:, None]  # [n, 1]
    row = (crop // cols) * side + patch // side  # [n, d - 1] row on the crop canvas
    col = (crop % cols) * side + patch % side  # [n, d - 1]
    raster = torch.argsort((row * (cols * side) + col).flatten())  # [n * (d - 1)] keys are distinct
    grid_part = crops[:, 1:dominant].reshape(-1, width)[raster]  # [n * (d - 1), D]
    cls_part = crops[:, 0]  # [n, D]
    contextual_part = crops[:, dominant:].reshape(-1, width)  # [n * c, D]
    return torch.cat([tokens[0], grid_part, cls_part, contextual_part])


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[v, index[v]]`` for every view: ``[V, K, C]`` from ``x [V, T, C]`` and ``index [V, K]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
