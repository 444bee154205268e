"""``globalcom2``: GlobalCom², the thumbnail's [CLS] attention commands how much each crop keeps.

Paper: X. Liu et al., "Global Compression Commander: Plug-and-Play Inference Acceleration for
High-Resolution Large Vision-Language Models" (arXiv 2501.05179; v1/v2 titled "Compression with Global
Guidance"). Reference code: github.com/xuyang-liu16/GlobalCom2, spec read at HEAD ``96b2d00``
(algorithm files ``llava/model/llava_arch.py`` @ ``4e544e5``, ``apply_customvit.py`` @ ``a270020``), as
re-stated in ../shared/reference/globalcom2.md §2. No reference code is copied; every step below is a
vectorised re-implementation of that statement.

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
   (:func:`holistic_scores`); keep the top ``floor(N_j r_j)`` of each crop (:func:`top_counts_per_row`,
   which ranks the thumbnail and every crop in one sort).

Two output layouts:

* ``layout="clean"`` (default): kept tokens in their original spatial order, one separator per unpadded
  row exactly as vanilla, R = 1.0 returns the unmodified model (bypass), features in the model's dtype,
  per-image view offsets so batches and several images per prompt are correct.
* ``layout="reference"``: reproduces the reference's token layout position for position (§2.7):
  thumbnail in score order; crops placed in a slot grid by their index in the *unpadded* crop (the
  reference's indexing quirk, which scrambles column-padded images); a separator after every one of the
  ``rows * 24`` canvas rows, padded ones included. Use it to compare with published numbers, not for new
  results.

Deliberate deviations from the reference (all layouts):

* Scores are accumulated in float32 (reference: fp16 logits), so fp16 rounding ties do not decide ranks.
* Ties in every top-k break by score descending, then token index ascending (reference: unspecified
  ``torch.topk``/``argsort`` order, §8.7).
* Batches and several images per prompt use per-image view offsets (the reference reads the thumbnail
  score of image 0 for every image, §3.9), so batch size > 1 is correct.
* No per-token Python loops; block sums run in float64 without ``.item()``.
* Ablations are parameters (``allocation``, ``score``, ``alpha``, ``temperature``, ``score_layer``,
  ``attention``); the defaults are the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from globalcom2.anyres import PackedLayout, packed_provenance
from globalcom2.budget import kept_count
from globalcom2.methods.base import ImageContext, PreLLMMethod, register_method
from globalcom2.tensor_cache import cached_constants

Allocation = Literal["softmax_sum", "uniform", "softmax_max"]
Score = Literal["holistic", "local_only", "global_only"]
Layout = Literal["clean", "reference"]
SOFTMAX_EPS = 1e-8  # the reference adds it to the softmax denominator
L2_EPS = 1e-12  # F.normalize's default, as the reference uses


# --- step functions (pure, vectorised) -------------------------------------------------------------


def ranking_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys that order by score descending, then index ascending, with no two keys equal.

    The float32 bit pattern is mapped to an integer with the same order (negative floats reversed), then
    the inverted index fills the low 16 bits. Any sort or ``topk`` on these keys is deterministic and
    applies the documented tie rule exactly, without a (slow, on CPU) stable sort.
    """
    bits = scores.float().contiguous().view(torch.int32).long()  # [...] in [-2^31, 2^31)
    monotone = torch.where(bits >= 0, bits, -(2**31) - 1 - bits)  # same order as the float values
    return monotone * 65536 + (65535 - index)


def thumbnail_keep(thumbnail_scores: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """``[floor(576 R)]`` thumbnail token indices, best first (ties: lower index first)."""
    count = kept_count(thumbnail_scores.numel(), retention_ratio)
    scores = thumbnail_scores[None]  # [1, 576]
    counts = torch.tensor([count], device=scores.device)
    _, order = top_counts_per_row(scores, torch.ones_like(scores, dtype=torch.bool), counts)  # [1, 576]
    return order[0, :count]  # [k0] best first


@cached_constants(maxsize=64)
def thumbnail_blocks(side: int, grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[side * side]`` crop index of each thumbnail token under the reference's block partition.

    The 24x24 thumbnail grid is cut into ``rows x cols`` blocks of ``side // rows`` x ``side // cols``
    tokens, the last block of each axis absorbing any remainder. The partition ignores letterbox padding,
    as the reference does (globalcom2.md §2.3.6).
    """
    rows, cols = grid
    block_h, block_w = max(side // rows, 1), max(side // cols, 1)
    block_row = torch.clamp(torch.arange(side) // block_h, max=rows - 1)  # [side]
    block_col = torch.clamp(torch.arange(side) // block_w, max=cols - 1)  # [side]
    return (block_row[:, None] * cols + block_col[None, :]).flatten().to(device)  # [side * side]


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
        ``[rows * cols]`` float64 ratios, crops in row-major order.
    """
    rows, cols = grid
    num_crops = rows * cols
    if allocation == "uniform":
        ratios = torch.full((num_crops,), float(retention_ratio), dtype=torch.float64)
    else:
        side = math.isqrt(thumbnail_scores.numel())
        blocks = thumbnail_blocks(side, grid, thumbnail_scores.device)  # [576], cached on the device
        scores = thumbnail_scores.double()  # [576]
        if allocation == "softmax_sum":
            block_scores = torch.zeros(num_crops, dtype=torch.float64, device=scores.device)
            block_scores.index_add_(0, blocks, scores)  # [n]
        elif allocation == "softmax_max":
            block_scores = torch.full((num_crops,), -math.inf, dtype=torch.float64, device=scores.device)
            block_scores.scatter_reduce_(0, blocks, scores, reduce="amax")  # [n]
        else:
            raise ValueError(f"unknown allocation {allocation!r}; valid: softmax_sum, softmax_max, uniform")
        weights = torch.exp((block_scores - block_scores.max()) / temperature)  # [n]
        sigma = weights / (weights.sum() + SOFTMAX_EPS)  # [n]
        ratios = retention_ratio * (1.0 + sigma - sigma.mean())  # [n]
    return ratios.clamp(max=1.0) if clip else ratios


@dataclass(frozen=True)
class CropGeometry:
    """Constants of one image's crop tokens (cached: they depend only on the geometry and the device).

    Crop tokens live in two orders. *Packed* order is the LLM's sequence. The *slot grid* ``[n, W]``
    (``W = 576``) puts crop j's unpadded tokens in row j, row-major over the unpadded rectangle, with the
    unused tail of a letterboxed crop's row marked invalid. Every per-crop step runs on the slot grid, so
    a crop is a row and nothing loops over crops or tokens.

    Attributes:
        positions: ``[Nc]`` packed positions of the crop tokens.
        crop: ``[Nc]`` crop index (row-major over the grid).
        valid_index: ``[Nc]`` index of the token within its crop's unpadded rectangle, row-major.
        grid_index: ``[Nc]`` flat slot of each crop token (``crop * W + valid_index``).
        region: ``(Hv, Wv)``, the unpadded token rectangle.
        tokens_per_crop: ``[n]`` N_j, unpadded tokens of each crop.
        slot_valid: ``[n, W]`` bool, the slot holds a token.
        slot_score_index: ``[n, W]`` flat index of the slot's token into the ``[1 + n, W]`` score map.
        slot_region_index: ``[n, W]`` flat index of the slot's token into the ``[Hv, Wv]`` rectangle.
        packed_slot: ``[N]`` for each packed position, its entry in the flattened ``[1 + n, W]`` keep map
            (thumbnail row first) or ``(1 + n) W`` for a separator (an always-kept extra entry).
    """

    positions: torch.Tensor
    crop: torch.Tensor
    valid_index: torch.Tensor
    grid_index: torch.Tensor
    region: tuple[int, int]
    tokens_per_crop: torch.Tensor
    slot_valid: torch.Tensor
    slot_score_index: torch.Tensor
    slot_region_index: torch.Tensor
    packed_slot: torch.Tensor


@cached_constants(maxsize=1024)
def _geometry(
    side: int,
    grid: tuple[int, int],
    valid_rows: tuple[int, int],
    valid_cols: tuple[int, int],
    device: torch.device,
) -> CropGeometry:
    view, token = packed_provenance(side, grid, valid_rows, valid_cols)  # [N], [N]
    num_crops, cols, width = grid[0] * grid[1], grid[1], side * side
    (r0, r1), (c0, c1) = valid_rows, valid_cols
    positions = (view > 0).nonzero().squeeze(1)  # [Nc]
    crop = view[positions] - 1  # [Nc]
    token = token[positions]  # [Nc]
    canvas_row = (crop // cols) * side + token // side  # [Nc]
    canvas_col = (crop % cols) * side + token % side  # [Nc]
    one_hot = F.one_hot(crop, num_crops)  # [Nc, n]
    # Packed order walks canvas rows, so within one crop it is that crop's unpadded row-major order.
    valid_index = ((one_hot.cumsum(0) - 1) * one_hot).sum(1)  # [Nc]
    grid_index = crop * width + valid_index  # [Nc]

    def on_slots(values: torch.Tensor) -> torch.Tensor:  # [Nc] -> [n, W], 0 in unused slots
        return torch.zeros(num_crops * width, dtype=values.dtype).index_copy_(0, grid_index, values)

    packed_slot = torch.full((view.numel(),), (1 + num_crops) * width)  # [N] separators -> extra entry
    packed_slot[:width] = torch.arange(width)  # thumbnail token t sits at packed position t
    packed_slot[positions] = width + grid_index
    geometry = CropGeometry(
        positions=positions,
        crop=crop,
        valid_index=valid_index,
        grid_index=grid_index,
        region=(r1 - r0, c1 - c0),
        tokens_per_crop=one_hot.sum(0),
        slot_valid=on_slots(torch.ones_like(crop, dtype=torch.bool)).view(num_crops, width),
        slot_score_index=on_slots((crop + 1) * width + token).view(num_crops, width),
        slot_region_index=on_slots((canvas_row - r0) * (c1 - c0) + (canvas_col - c0)).view(num_crops, width),
        packed_slot=packed_slot,
    )
    return CropGeometry(
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(geometry).items()}
    )


def crop_geometry(layout: PackedLayout, device: torch.device | str = "cpu") -> CropGeometry:
    """Crop-token constants of ``layout`` on ``device`` (cached by grid, unpadded region and device)."""
    return _geometry(layout.side, layout.grid, layout.valid_rows, layout.valid_cols, torch.device(device))


def global_crop_scores(thumbnail_scores: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """``[n, W]`` thumbnail scores stretched onto the unpadded crop region, read at each crop slot.

    The 24x24 thumbnail map is resized bilinearly (``align_corners=False``) to the ``Hv x Wv`` token
    rectangle that survives unpadding, so a crop token reads the score of the same image region. Unused
    slots read an arbitrary value; :func:`holistic_scores` masks them.
    """
    side = math.isqrt(thumbnail_scores.numel())
    stretched = F.interpolate(
        thumbnail_scores.float().view(1, 1, side, side),
        size=geometry.region,
        mode="bilinear",
        align_corners=False,
    )  # [1, 1, Hv, Wv]
    return stretched.view(-1).take(geometry.slot_region_index)  # [n, W]


def holistic_scores(
    global_scores: torch.Tensor,
    local_scores: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.5,
    score: Score = "holistic",
) -> torch.Tensor:
    """``[n, W]`` per-crop L2-normalised mix of the global and local scores on the slot grid.

    The reference adds the two L2-normalised vectors, i.e. alpha = 0.5 up to a factor 2 (same ranking);
    normalising per crop makes the mix scale-free, which matters because thumbnail and crop logits have
    different magnitudes (globalcom2.md §3.3). Unused slots (``~valid``) are 0 and count in no norm.
    """
    if score not in ("holistic", "local_only", "global_only"):
        raise ValueError(f"unknown score {score!r}; valid: holistic, local_only, global_only")
    weights = {"holistic": (alpha, 1.0 - alpha), "local_only": (0.0, 1.0), "global_only": (1.0, 0.0)}[score]
    pair = torch.stack([global_scores.float(), local_scores.float()]).masked_fill_(~valid, 0.0)  # [2, n, W]
    normalised = pair / torch.linalg.vector_norm(pair, dim=-1, keepdim=True).clamp_(min=L2_EPS)  # [2, n, W]
    if 0.0 in weights:
        return normalised[0 if weights[0] else 1]
    return torch.lerp(normalised[1], normalised[0], weights[0])  # w0 * global + (1 - w0) * local


def top_counts_per_row(
    scores: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``counts[i]`` best entries of each row ``i`` (ties: lower column first), for all rows at once.

    Args:
        scores: ``[R, W]`` float scores.
        valid: ``[R, W]`` bool; invalid entries rank last and are never kept while ``counts[i]`` does
            not exceed the row's valid entries.
        counts: ``[R]`` int64, entries kept per row.

    Returns:
        ``(kept [R, W] bool, order [R, K])``: the kept mask and each row's best ``K = max(counts)``
        columns, best first.
    """
    rows, width = scores.shape
    column = torch.arange(width, device=scores.device)  # [W]
    keys = ranking_keys(scores, column.expand(rows, -1)).masked_fill_(~valid, torch.iinfo(torch.long).min)
    # keys are distinct, so the order is deterministic; a top-k of the largest count is a partial sort,
    # cheaper than a full one at the usual ratios
    order = keys.topk(int(counts.max()), dim=1).indices  # [R, K] best first
    kept = torch.zeros_like(valid).scatter_(1, order, column[: order.shape[1]] < counts[:, None])  # [R, W]
    return kept, order


def reference_layout_order(
    thumbnail_kept: torch.Tensor, crop_kept: torch.Tensor, layout: PackedLayout
) -> torch.Tensor:
    """Packed positions in the order the reference implementation emits them (globalcom2.md §2.7).

    Thumbnail tokens in score order; then each kept crop token is written to the slot of its crop's
    ``24 x 24`` tile given by its *unpadded* index, the canvas is read row by row, and a separator follows
    every one of the ``rows * 24`` canvas rows.

    Args:
        thumbnail_kept: ``[k0]`` kept thumbnail tokens, best first.
        crop_kept: ``[Nc]`` bool over the crop tokens of :func:`crop_geometry`.
        layout: the image's packed layout.
    """
    geometry = crop_geometry(layout)
    side, (rows, cols) = layout.side, layout.grid
    width = cols * side + 1  # canvas columns plus the separator column
    crop = geometry.crop[crop_kept]  # [K]
    slot = geometry.valid_index[crop_kept]  # [K] unpadded index used as a tile index (the quirk)
    slot_row = (crop // cols) * side + slot // side  # [K] canvas row of the slot
    slot_col = (crop % cols) * side + slot % side  # [K]
    separator = layout.is_separator.nonzero()[0]  # [1] every separator carries the same vector
    canvas_rows = torch.arange(rows * side)  # [H]
    keys = torch.cat([slot_row * width + slot_col, canvas_rows * width + width - 1])  # [K + H]
    sources = torch.cat([geometry.positions[crop_kept], separator.expand(canvas_rows.numel())])  # [K + H]
    return torch.cat([thumbnail_kept, sources[torch.argsort(keys)]])


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
        self.layout = layout
        self.allocation = allocation
        self.score = score
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.score_layer = score_layer
        self.attention = attention
        self.vision_score_layer = score_layer
        self.vision_score_kind = attention

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | None:
        if self.layout == "clean" and self.retention_ratio == 1.0:
            return None  # R = 1 is the unmodified model in the clean layout (the reference is not, §3.7)
        layout, scores = ctx.layout, ctx.vision_scores  # scores: [1 + n, W], W = 576
        if scores is None:
            raise RuntimeError("globalcom2 needs [CLS] scores; attach it with globalcom2.attach")
        thumbnail = scores[0]  # [W]
        geometry = crop_geometry(layout, scores.device)

        ratios = crop_retention_ratios(
            thumbnail, layout.grid, self.retention_ratio, self.temperature, allocation=self.allocation
        )  # [n] float64
        keep_per_crop = torch.floor(geometry.tokens_per_crop * ratios).long()  # [n] k_j
        counts = F.pad(keep_per_crop, (1, 0), value=kept_count(thumbnail.numel(), self.retention_ratio))
        local = scores.take(geometry.slot_score_index)  # [n, W]
        crop_scores = holistic_scores(
            global_crop_scores(thumbnail, geometry), local, geometry.slot_valid, self.alpha, self.score
        )  # [n, W]
        all_scores = torch.cat([thumbnail.float()[None], crop_scores])  # [1 + n, W] thumbnail row first
        all_valid = F.pad(geometry.slot_valid, (0, 0, 1, 0), value=True)  # [1 + n, W]
        kept, order = top_counts_per_row(all_scores, all_valid, counts)  # [1 + n, W] x 2

        if self.layout == "reference":
            thumbnail_kept = order[0, : int(counts[0])].cpu()  # [k0] best first
            crop_kept = kept[1:].reshape(-1).take(geometry.grid_index).cpu()  # [Nc]
            source = reference_layout_order(thumbnail_kept, crop_kept, layout)
        else:
            # one separator per unpadded row, as vanilla: the extra always-kept entry of the keep map
            keep = F.pad(kept.view(-1), (0, 1), value=True).take(geometry.packed_slot)  # [N]
            source = keep.nonzero().squeeze(1)  # spatial (packed) order
        return source.to(features.device)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
