"""``globalcom2``: GlobalCom², the thumbnail's [CLS] attention commands how much each crop keeps.

Paper: X. Liu et al., "Global Compression Commander: Plug-and-Play Inference Acceleration for
High-Resolution Large Vision-Language Models" (arXiv 2501.05179; v1/v2 titled "Compression with Global
Guidance"). Reference code: github.com/xuyang-liu16/GlobalCom2 at HEAD ``96b2d00`` (algorithm files
``llava/model/llava_arch.py`` @ ``4e544e5``: ``prepare_inputs_labels_for_multimodal`` and the crop selection;
``llava/model/multimodal_encoder/apply_customvit.py`` @ ``a270020``: the scores). No reference code is copied;
every step below is a vectorised re-implementation of what that code computes.

Per image (thumbnail + n crops, R = ``retention_ratio``):

1. Scores: head-averaged pre-softmax [CLS]->patch logits of CLIP's last layer, for every view
   (``globalcom2/scoring/vision_attention.py``).
2. Thumbnail: keep the top ``floor(576 R)`` tokens by score (:func:`thumbnail_keep`).
3. Crop budgets: sum the thumbnail scores over each crop's block of the 24x24 grid, ``sigma =
   softmax(g / tau)`` (with the reference's +1e-8), ``r_j = min(1, R (1 + sigma_j - mean sigma))``
   (:func:`crop_retention_ratios`).
4. Global score of crop tokens: the thumbnail map bilinearly stretched onto the unpadded crop region
   (:func:`global_crop_scores`).
5. Holistic score: ``alpha * global / ||global|| + (1 - alpha) * local / ||local||``, L2 norms per crop
   (:func:`holistic_scores`); keep the top ``floor(N_j r_j)`` of each crop. The thumbnail and every crop
   are ranked in one top-k over the ``[1 + n, 576]`` view grid (``globalcom2/scoring/ranking.py``);
   everything that depends only on the geometry is cached (``globalcom2_geometry.py``).

Two output layouts:

* ``layout="clean"`` (default): kept tokens in their original spatial order, one separator per unpadded
  row exactly as vanilla, R = 1.0 returns the unmodified model (bypass), features in the model's dtype,
  per-image view offsets so batches and several images per prompt are correct.
* ``layout="reference"``: reproduces the reference's token layout position for position (not its hard-coded
  fp16 cast of the crop features, a no-op for the float16 checkpoints it ran; features stay in the model's
  dtype):
  thumbnail in score order; crops placed in a slot grid by their index in the *unpadded* crop (the
  reference's indexing quirk, which scrambles column-padded images); a separator after every one of the
  ``rows * 24`` canvas rows, padded ones included. Use it to compare with published numbers, not for new
  results.

**Kept fraction at high R.** Step 3 caps each crop's ratio at 1 and, as in the reference, gives what a
capped crop cannot keep to no other crop, so the crops keep less than ``R`` of their tokens once
``R (1 + sigma_j - mean sigma) > 1`` for some crop: for 4 crops this can happen from ``R`` near
``1 / (2 - 1/4) ~ 0.57``; how far below depends on how peaked the thumbnail map is (random keeps
``floor(R N)`` whatever the scores), and R = 1 keeps everything (bypass), a jump from just below it. The
records' kept and equivalent tokens and TFLOPs are the realised counts: compare methods at high R by those.

Deliberate deviations from the reference (all layouts):

* Scores are accumulated in float32 (reference: fp16 logits), so fp16 rounding ties do not decide ranks.
* Ties in every top-k break by score descending, then token index ascending (reference: unspecified
  ``torch.topk``/``argsort`` order).
* Batches and several images per prompt use per-image view offsets (the reference reads the thumbnail
  score of image 0 for every image; its evaluation loader asserts batch size 1), so batch size > 1 is correct.
* No per-token or per-crop Python loops. The allocation (at most nine numbers per image) runs on the host
  in float64 after one device read per call (every image of a batch at once), so every device allocates
  alike; the rest stays on the device.
* The stretched thumbnail map is computed as two batched matrix products with the separable bilinear
  weights that ``F.interpolate`` applies (:func:`global_crop_scores`): equal to ``F.interpolate`` up to
  float32 rounding, as ``F.interpolate``'s own CPU and CUDA kernels are.
* Ablations are parameters (``allocation``, ``score``, ``alpha``, ``temperature``, ``score_layer``,
  ``attention``); the defaults are the reference's.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from globalcom2.anyres import PackedLayout
from globalcom2.budget import kept_count
from globalcom2.methods.base import ImageContext, PreLLMMethod, register_method
from globalcom2.methods.globalcom2_geometry import CropGeometry, crop_geometry
from globalcom2.scoring.ranking import (
    column_tie_break,
    int64_tensor,
    ranking_keys,
    top_counts_per_row,
    top_counts_per_row_fixed,
)
from globalcom2.scoring.selection import padded_positions
from globalcom2.tensor_cache import cached_constants

Allocation = Literal["softmax_sum", "uniform", "softmax_max"]
Score = Literal["holistic", "local_only", "global_only"]
Layout = Literal["clean", "reference"]
SOFTMAX_EPS = 1e-8  # the reference adds it to the softmax denominator
L2_EPS = 1e-12  # F.normalize's default, as the reference uses


# --- step functions (pure, vectorised) -------------------------------------------------------------


def thumbnail_keep(thumbnail_scores: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """``[floor(576 R)]`` thumbnail token indices, best first (ties: lower index first)."""
    width = thumbnail_scores.numel()
    tie_break = column_tie_break(1, width, thumbnail_scores.device)  # [1, W]
    count = kept_count(width, retention_ratio)
    _, order = top_counts_per_row(ranking_keys(thumbnail_scores[None], tie_break), [count])  # [1, count]
    return order[0]  # [k0] best first


@cached_constants(maxsize=64)
def thumbnail_blocks(side: int, grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[side * side]`` crop index of each thumbnail token under the reference's block partition.

    The 24x24 thumbnail grid is cut into ``rows x cols`` blocks of ``side // rows`` x ``side // cols``
    tokens, the last block of each axis absorbing any remainder. The partition ignores letterbox padding,
    as the reference does.
    """
    rows, cols = grid
    block_h, block_w = max(side // rows, 1), max(side // cols, 1)
    block_row = torch.clamp(torch.arange(side) // block_h, max=rows - 1)  # [side]
    block_col = torch.clamp(torch.arange(side) // block_w, max=cols - 1)  # [side]
    return (block_row[:, None] * cols + block_col[None, :]).flatten().to(device)  # [side * side]


@cached_constants(maxsize=64)
def block_membership(side: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[n, side * side]`` float64 0/1 matrix of :func:`thumbnail_blocks`: block sums are one ``mv``."""
    return F.one_hot(thumbnail_blocks(side, grid), grid[0] * grid[1]).T.double().contiguous().to(device)


def block_scores(
    thumbnail_scores: torch.Tensor, grid: tuple[int, int], allocation: Allocation
) -> torch.Tensor:
    """``[n]`` float64 sum (``softmax_sum``) or maximum (``softmax_max``) of the thumbnail scores per block."""
    side = math.isqrt(thumbnail_scores.numel())
    scores = thumbnail_scores.double()  # [576]
    if allocation == "softmax_sum":
        return torch.mv(block_membership(side, grid, scores.device), scores)  # [n]
    if allocation == "softmax_max":
        blocks = thumbnail_blocks(side, grid, scores.device)  # [576]
        maxima = torch.full((grid[0] * grid[1],), -math.inf, dtype=torch.float64, device=scores.device)
        return maxima.scatter_reduce_(0, blocks, scores, reduce="amax")  # [n]
    raise ValueError(f"unknown allocation {allocation!r}; valid: softmax_sum, softmax_max, uniform")


def ratios_from_block_scores(block: list[float], retention_ratio: float, temperature: float) -> list[float]:
    """Unclipped ``r_j = R (1 + sigma_j - mean sigma)``, ``sigma = softmax(block / tau)`` with the +1e-8.

    At most nine numbers, so this runs on the host in float64: one device read per call (every image's block
    scores at once, :meth:`GlobalCom2.select_images`), and the same allocation whichever device scored the
    image.
    """
    top = max(block)
    weights = [math.exp((value - top) / temperature) for value in block]
    total = sum(weights) + SOFTMAX_EPS
    sigma = [weight / total for weight in weights]
    mean_sigma = sum(sigma) / len(sigma)
    return [retention_ratio * (1.0 + value - mean_sigma) for value in sigma]


def _host_ratios(
    thumbnail_scores: torch.Tensor,
    grid: tuple[int, int],
    retention_ratio: float,
    temperature: float,
    allocation: Allocation,
    clip: bool,
) -> list[float]:
    """:func:`crop_retention_ratios` as host floats (what :class:`GlobalCom2` uses)."""
    if allocation == "uniform":
        ratios = [float(retention_ratio)] * (grid[0] * grid[1])
    else:
        block = block_scores(thumbnail_scores, grid, allocation).tolist()  # [n] on the host
        ratios = ratios_from_block_scores(block, retention_ratio, temperature)
    return [min(ratio, 1.0) for ratio in ratios] if clip else ratios


def crop_retention_ratios(
    thumbnail_scores: torch.Tensor,
    grid: tuple[int, int],
    retention_ratio: float,
    temperature: float = 10.0,
    *,
    allocation: Allocation = "softmax_sum",
    clip: bool = True,
) -> torch.Tensor:
    """Per-crop retention ratios ``r_j`` from the thumbnail's scores ("adaptive compression adjustment").

    Args:
        thumbnail_scores: ``[576]`` scores of the thumbnail tokens, row-major 24x24.
        grid: ``(rows, cols)`` of crops.
        retention_ratio: the global ratio R in (0, 1].
        temperature: softmax temperature tau (> 0).
        allocation: ``"softmax_sum"`` (reference: block sums), ``"softmax_max"`` (block maxima) or
            ``"uniform"`` (every crop keeps R).
        clip: apply the reference's upper clip at 1.0 (``False`` exposes the unclipped ratios, whose sum
            is exactly ``n R``).

    Returns:
        ``[rows * cols]`` float64 ratios, crops in row-major order, on the scores' device.
    """
    ratios = _host_ratios(thumbnail_scores, grid, retention_ratio, temperature, allocation, clip)
    return torch.tensor(ratios, dtype=torch.float64, device=thumbnail_scores.device)


def global_crop_scores(thumbnail_scores: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """``[n, W]`` global score of each crop tile entry: the thumbnail map, stretched onto the crops.

    The 24x24 thumbnail map is resized bilinearly (``align_corners=False``) to the ``Hv x Wv`` token
    rectangle that survives unpadding, so a crop token reads the score of the same image region. Bilinear
    resizing is separable, so each crop's part of the stretched map is ``rows_j @ T @ cols_j^T`` with the
    crop's blocks of the row and column weight matrices: two batched matrix products, no resized canvas
    and no gather. Values equal ``F.interpolate`` up to float32 rounding (a few ulps of the input scores,
    from another summation order; the CPU and CUDA kernels of ``F.interpolate`` differ at that level too).
    Padded entries are 0.
    """
    return _stretched(thumbnail_scores, geometry.row_weights, geometry.col_weights_t)


def _stretched(
    thumbnail_scores: torch.Tensor, row_weights: torch.Tensor, col_weights_t: torch.Tensor
) -> torch.Tensor:
    """:func:`global_crop_scores` from the geometry's two weight tensors (``[n, s, s]`` each).

    The thumbnail map's side is read from the weights' shape, not as the square root of the scores' size:
    under ``torch.compile(dynamic=True)`` that size is symbolic, and ``math.isqrt`` of it is a graph break
    that cut the compiled selection into six graphs."""
    num_crops, side = row_weights.shape[0], row_weights.shape[-1]
    thumbnail = thumbnail_scores.float().view(1, side, side).expand(num_crops, side, side)  # [n, s, s]
    stretched = torch.bmm(row_weights, torch.bmm(thumbnail, col_weights_t))  # [n, s, s]
    return stretched.flatten(1)  # [n, W]


def holistic_scores(
    global_scores: torch.Tensor,
    local_scores: torch.Tensor,
    invalid: torch.Tensor | None = None,
    global_weight: float = 0.5,
) -> torch.Tensor:
    """``[n, W]`` per-crop ``w * global / ||global_j|| + (1 - w) * local / ||local_j||`` (one ``lerp``).

    The reference adds the two L2-normalised vectors, i.e. w = 0.5 up to a factor 2 (same ranking);
    normalising per crop makes the mix scale-free, which matters because thumbnail and crop logits have
    different magnitudes. ``w = 0`` is local-only (FasterVLM's selection), ``w = 1``
    global-only. Invalid (padded) entries are 0 and count in no norm.

    Args:
        global_scores: ``[n, W]`` from :func:`global_crop_scores`.
        local_scores: ``[n, W]`` the crops' own [CLS] scores.
        invalid: ``[n, W]`` bool, or ``None`` when every entry is a token.
        global_weight: w in [0, 1].
    """
    pair = torch.stack([global_scores.float(), local_scores.float()])  # [2, n, W]
    if invalid is not None:
        pair.masked_fill_(invalid, 0.0)
    norms = torch.linalg.vector_norm(pair, dim=-1, keepdim=True).clamp_(min=L2_EPS)  # [2, n, 1]
    normalised = pair.div_(norms)  # [2, n, W]
    return torch.lerp(normalised[1], normalised[0], global_weight)  # [n, W]


# --- the selection after the allocation: fixed shapes, tensors in, so it can be compiled --------------


class RankingWeights(NamedTuple):
    """The :class:`CropGeometry` tensors the ranking reads, as one argument of the selection functions."""

    tie_break: torch.Tensor  # [1 + n, W] int64
    row_weights: torch.Tensor  # [n, s, s]
    col_weights_t: torch.Tensor  # [n, s, s]
    invalid: torch.Tensor | None  # [n, W] bool, or None when every crop entry is a token

    @classmethod
    def of(cls, geometry: CropGeometry) -> RankingWeights:
        return cls(geometry.tie_break, geometry.row_weights, geometry.col_weights_t, geometry.invalid)


def _kept_view_grid(
    scores: torch.Tensor, counts: torch.Tensor, bound: int, weights: RankingWeights, global_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept [1 + n, W] bool, order [1 + n, bound])``: the thumbnail ranked on its raw scores and each crop
    on its holistic scores, each row keeping ``counts[row]`` (``[1 + n]`` int64 on the device, at most
    ``bound``: :func:`top_counts_per_row_fixed`)."""
    crop_scores = holistic_scores(
        _stretched(scores[0], weights.row_weights, weights.col_weights_t),
        scores[1:],
        weights.invalid,
        global_weight,
    )  # [n, W]
    ranked = torch.cat([scores[:1].float(), crop_scores])  # [1 + n, W], the thumbnail row raw
    return top_counts_per_row_fixed(ranking_keys(ranked, weights.tie_break), counts, bound)


def clean_selection(
    scores: torch.Tensor,
    counts: torch.Tensor,
    bound: int,
    weights: RankingWeights,
    packed_index: torch.Tensor,
    is_separator: torch.Tensor,
    global_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean layout's kept packed positions, ascending, padded with -1 to ``[N]``; and how many there
    are (0-dim), for the caller's check. Every shape follows the geometry (:class:`CropGeometry` fields) and
    ``bound``, none the data: compiled, ``bound`` is the row width and a geometry is one graph."""
    kept, _ = _kept_view_grid(scores, counts, bound, weights, global_weight)
    keep = kept.view(-1).take(packed_index).logical_or_(is_separator)  # [N]; one separator per unpadded row
    return padded_positions(keep), keep.sum()  # [N], []


def reference_selection(
    scores: torch.Tensor,
    counts: torch.Tensor,
    bound: int,
    thumbnail_kept: int,
    weights: RankingWeights,
    view_index: torch.Tensor,
    item_is_separator: torch.Tensor,
    sources: torch.Tensor,
    global_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference layout's sources, padded to ``[k0 + Nc + rows * side]``: the thumbnail's
    ``thumbnail_kept`` best in score order, then the canvas walk restricted to the kept crop tokens (padded
    entries arbitrary); and how many canvas items are kept (0-dim), for the caller's check."""
    kept, order = _kept_view_grid(scores, counts, bound, weights, global_weight)
    keep = kept.view(-1).take(view_index).logical_or_(item_is_separator)  # [Nc + rows * side]
    items = padded_positions(keep)  # [Nc + rows * side]
    return torch.cat([order[0, :thumbnail_kept], sources.take(items.clamp(min=0))]), keep.sum()


@functools.cache
def compiled_selection(layout: Layout, mode: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`clean_selection` or :func:`reference_selection` under ``torch.compile`` in ``mode`` (the
    model's compile mode, ``globalcom2.models.compiled``): its ~45 small kernels fused into a few, which on a
    GPU is launch time saved. Dynamic shapes, so a new image size does not recompile; under a CUDA-graph
    mode a new geometry records a graph of its own; and in every mode the first letterboxed image compiles
    a graph of its own (its padded entries are a tensor where a filled canvas has ``None``).

    It keeps exactly eager's count per crop (the counts are the host's). Its positions are eager's except
    where two tokens' holistic scores tie to within rounding at a crop's threshold: inductor may sum the
    L2 norms in another order, and the float keys then differ in their last bit. The tests' scores have no
    such tie (``tests/methods/test_globalcom2_compiled.py``)."""
    function = reference_selection if layout == "reference" else clean_selection
    return torch.compile(function, mode=mode, dynamic=True)


# --- the method -------------------------------------------------------------------------------------


@register_method("globalcom2")
class GlobalCom2(PreLLMMethod):
    """GlobalCom² with the reference's defaults; every ablation of the paper is a parameter.

    Args:
        retention_ratio: global kept fraction R in (0, 1].
        layout: ``"clean"`` (default) or ``"reference"`` (bit-for-bit reference token layout).
        allocation: crop budget rule: ``"softmax_sum"`` (default), ``"uniform"``, ``"softmax_max"``.
        score: token score inside crops: ``"holistic"`` (default), ``"local_only"`` (FasterVLM's per-crop
            selection), ``"global_only"``.
        alpha: weight of the global score in the holistic mix, in [0, 1] (0.5 = reference).
        temperature: softmax temperature of the allocation, > 0 (10.0 = reference).
        score_layer: CLIP layer of the [CLS] scores (-1 = last layer = reference).
        attention: ``"logits"`` (pre-softmax, reference) or ``"softmax"`` (FasterVLM-style probabilities).
    """

    def __init__(
        self,
        *,
        retention_ratio: float,
        layout: Layout = "clean",
        allocation: Allocation = "softmax_sum",
        score: Score = "holistic",
        alpha: float = 0.5,
        temperature: float = 10.0,
        score_layer: int = -1,
        attention: Literal["logits", "softmax"] = "logits",
    ) -> None:
        super().__init__(retention_ratio=retention_ratio)
        _check_choice("layout", layout, ("clean", "reference"))
        _check_choice("allocation", allocation, ("softmax_sum", "uniform", "softmax_max"))
        _check_choice("score", score, ("holistic", "local_only", "global_only"))
        _check_choice("attention", attention, ("logits", "softmax"))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(score_layer, bool) or not isinstance(score_layer, int):
            raise TypeError(
                f"score_layer must be an integer CLIP layer index (-1: the last), got {score_layer!r}"
            )  # its range is checked against the vision tower's depth when the method meets the model
        # a knob the chosen variant never reads would be recorded as an ablation that did not happen, and
        # would make cells of identical outputs differ in identity
        if score != "holistic" and alpha != 0.5:
            raise ValueError(
                f"alpha={alpha!r} is read only by score='holistic' (it weighs the global score in the mix); "
                f"with score={score!r} leave it at its default, 0.5"
            )
        if allocation == "uniform" and temperature != 10.0:
            raise ValueError(
                f"temperature={temperature!r} is read only by the softmax allocations; with "
                "allocation='uniform' leave it at its default, 10.0"
            )
        self.layout = layout
        self.allocation = allocation
        self.score = score
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.score_layer = score_layer
        self.attention = attention
        self._global_weight = {"holistic": self.alpha, "local_only": 0.0, "global_only": 1.0}[score]

    @property
    def vision_score_layer(self) -> int | None:
        """The [CLS] scores come from ``score_layer`` (a property, so ``params()`` rebuilds the method);
        none at R = 1 in the clean layout, where :meth:`select` keeps everything without reading them."""
        if self.layout == "clean" and self.retention_ratio == 1.0:
            return None
        return self.score_layer

    @property
    def vision_score_kind(self) -> str:
        return self.attention

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | None:
        return self.select_images([features], [ctx])[0]

    def select_images(
        self, features: Sequence[torch.Tensor], contexts: Sequence[ImageContext]
    ) -> list[torch.Tensor | None]:
        """Every image's kept positions. The crop allocations of all the call's images come from one device
        read (their thumbnails' block scores, concatenated): one read per image would make a batched prefill
        wait for the device once per image."""
        if self.layout == "clean" and self.retention_ratio == 1.0:
            # R = 1 is the unmodified model in the clean layout (the reference's is not)
            return [None] * len(contexts)
        scores = [_checked_scores(ctx) for ctx in contexts]  # [1 + n_i, W] each, W = 576
        blocks = self._host_block_scores(scores, [ctx.layout.grid for ctx in contexts])
        return [
            self._select(feats, ctx, image_scores, block)
            for feats, ctx, image_scores, block in zip(features, contexts, scores, blocks, strict=True)
        ]

    def _host_block_scores(
        self, scores: list[torch.Tensor], grids: list[tuple[int, int]]
    ) -> list[list[float] | None]:
        """Per image, its crops' block scores on the host (``None`` under the uniform allocation, which reads
        none), from one ``tolist`` for the whole call."""
        if self.allocation == "uniform" or not scores:
            return [None] * len(scores)
        blocks = [
            block_scores(image[0], grid, self.allocation) for image, grid in zip(scores, grids, strict=True)
        ]
        host = torch.cat(blocks).tolist()  # [sum of n_i]: the call's one device read before the top-k
        starts = list(itertools.accumulate((block.numel() for block in blocks), initial=0))
        return [host[start:end] for start, end in itertools.pairwise(starts)]

    def _select(
        self, features: torch.Tensor, ctx: ImageContext, scores: torch.Tensor, block: list[float] | None
    ) -> torch.Tensor:
        layout = ctx.layout
        thumbnail = scores[0]  # [W]
        geometry = crop_geometry(layout, scores.device)
        crops = layout.grid[0] * layout.grid[1]
        if block is None:  # uniform
            ratios = [float(self.retention_ratio)] * crops
        else:
            ratios = [
                min(r, 1.0) for r in ratios_from_block_scores(block, self.retention_ratio, self.temperature)
            ]
        counts = [kept_count(thumbnail.numel(), self.retention_ratio)] + [
            math.floor(tokens * ratio)
            for tokens, ratio in zip(geometry.tokens_per_crop_host, ratios, strict=True)
        ]  # [k0, k_1 .. k_n]
        crops_kept = sum(counts[1:])  # host-known, so every output below has a fixed size
        on_device = int64_tensor(counts, scores.device)  # [1 + n], queued without a wait
        compiled = ctx.compile_mode is not None
        # compiled: the row width, so the shapes follow the geometry only; eager: the largest count (at least
        # 1: at a tiny R every count can be 0, and a top-k needs a column)
        bound = thumbnail.numel() if compiled else max(1, *counts)
        weights = RankingWeights.of(geometry)
        if self.layout == "reference":
            if layout.num_separators == 0:  # host-known: no device read
                raise ValueError(
                    f"layout='reference' copies the image-newline vector from the packed features, and this "
                    f"{layout.image_size[1]}x{layout.image_size[0]} image unpads its crops to no row, so there is "
                    "none to copy; use layout='clean' (the default)"
                )
            select = compiled_selection("reference", ctx.compile_mode) if compiled else reference_selection
            items = crops_kept + geometry.reference_separators
            padded, found = select(
                scores, on_device, bound, counts[0], weights, geometry.reference_view_index,
                geometry.reference_is_separator, geometry.reference_sources, self._global_weight,
            )  # fmt: skip
            source = padded[: counts[0] + items]
        else:
            select = compiled_selection("clean", ctx.compile_mode) if compiled else clean_selection
            items = counts[0] + crops_kept + layout.num_separators
            padded, found = select(
                scores,
                on_device,
                bound,
                weights,
                geometry.packed_index,
                geometry.is_separator,
                self._global_weight,
            )
            source = padded[:items]  # packed order
        torch._assert_async(found == items, "globalcom2: the kept mask does not have the counted entries")
        if compiled:
            source = source.clone()  # a CUDA graph's output is overwritten by its next replay
        return source if source.device == features.device else source.to(features.device)

    def separators_kept(self, layout: PackedLayout, source: torch.Tensor) -> int:
        """Every row separator stays: one per unpadded row (clean), one per canvas row (reference)."""
        if self.layout == "reference":
            return layout.grid[0] * layout.side
        return layout.num_separators


def _checked_scores(ctx: ImageContext) -> torch.Tensor:
    """``ctx``'s ``[1 + n, side * side]`` [CLS] scores, or an error naming what is missing or misshapen (host
    metadata only: no device read)."""
    layout, scores = ctx.layout, ctx.vision_scores
    if scores is None:
        raise RuntimeError("globalcom2 needs [CLS] scores; attach it with globalcom2.attach")
    if tuple(scores.shape) != (layout.num_views, layout.side * layout.side):
        raise ValueError(
            f"globalcom2: [CLS] scores of shape {list(scores.shape)} for a {layout.num_views}-view image of "
            f"{layout.side}x{layout.side} patches per view; expected [{layout.num_views}, {layout.side**2}]"
        )
    return scores


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
