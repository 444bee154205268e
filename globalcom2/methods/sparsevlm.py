"""``sparsevlm``: text-guided, multi-stage visual-token pruning with recycling, inside the decoder.

SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025, arXiv 2410.04417), following its v1.5 code: Gumpest/SparseVLMs, branch ``v1.5`` @
734d900 (``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``; last changed in
535f8ba). What the reference does, and this implementation with it:

1. **Raters**, once per prompt, on the layer-0 input embeddings: with ``V`` the visual rows and ``T`` every
   row after the image, ``m = mean_over_V(softmax_over_T(V T^T))``; the raters are the rows of ``T`` with
   ``m > mean(m)``.
2. **Pruning** after layers ``[2, 6, 15]`` (``pruning_loc``): the head-averaged softmax attention of the raters
   at that layer, averaged over raters, rates every visual token; the top ``k_s`` stay, text always stays.
   The reference's per-layer counts are fixed for LLaVA-1.5's 576 tokens: 192 -> [300, 200, 110],
   128 -> [303, 110, 36], 64 -> [66, 30, 17].
3. **Recycling**: of the tokens dropped at a stage, the top ``int(0.3 p) + 1`` by relevance are clustered with
   DPC-kNN into ``int(m / 10) + 1`` clusters (``scoring/clustering.py``), each merged by its mean, and inserted
   right after the kept visual tokens. They count as visual tokens and can be dropped again later.
4. **Positions** are renumbered contiguously after each stage (``position_ids[:, :new_len]``), and decode
   steps use each layer's own cache length as position, i.e. positions shifted by the rows removed.

How budgets map to LLaVA-NeXT (the reference has no LLaVA-NeXT setting): ``retention_ratio`` R asks for a
layer-averaged visual-token count of ``R * N_vis`` per image (``N_vis`` = that image's visual positions,
separators included), SparseVLM's "equivalent tokens" (SparseVLMs issue #10). With ``budget_basis="patches"``
(``protocol=llava``) the target is ``R * N_patch`` of the patch tokens and every row separator stays on top,
the GlobalCom² paper's count. The per-stage counts are the
official 576-token schedules as fractions of 576, interpolated linearly in R between the three official
budgets (constant outside them), scaled by one factor that is solved per image so that the layer average,
recycled tokens included, meets the target (:func:`sparsevlm_schedule`); the realised counts are recorded in
:class:`~globalcom2.methods.base.LayerStats`. Which layer average: ``equivalent_tokens="layer_output"`` (default)
averages the tokens *leaving* each layer, SparseVLM's own "equivalent tokens" (the count its code prints and
its tables report); under it the solved schedule at 576 tokens and 32 layers is the official one to within 3
tokens (192 -> [300, 200, 110] exactly, 128 -> [300, 109, 36], 64 -> [64, 29, 16]), so "R = 0.25" means what it
means in the SparseVLM paper. ``"layer_input"`` averages the tokens *entering* each layer (the count FLOPs
follow); it counts one layer more at full length, so it prunes harder for the same R and cannot go below
``(first pruning layer + 1) / layers`` (3/32 on LLaVA-NeXT-7B, 1/4 on the 4-layer tiny model); ``attach`` refuses
such R. ``LayerStats`` records both averages (``equivalent_visual_tokens`` entering,
``equivalent_visual_tokens_after_layer`` leaving).

Default pruning layers: the official [2, 6, 15] when the model has more than 16 decoder layers (LLaVA-NeXT
7B/13B: 32/40); for shallower models (the 4-layer tiny test model) the official layers scaled by
``num_layers / 32``, rounded half up, capped at ``num_layers - 2`` and deduplicated ([0, 1, 2] for 4 layers).

Deviations from the reference code:

* scores are recomputed for the rater rows only from the layer's attention inputs (SDPA on, no ``L x L``
  matrix); the reference materialises the full softmax matrix of the pruning layer;
* raters and recycling are per image and per batch row (the reference handles one image, batch size 1):
  ``V`` is all visual rows of the prompt and ``T`` the rows after its last image; each image keeps its own
  budget and recycles within itself; its merged rows go right after its own kept rows;
* a stage whose budget keeps every token of an image prunes nothing there (the reference always drops at
  least one token, ``min(k, N - 1)``), so R = 1 leaves the model bit-identical;
* if no candidate is strictly above the mean rater score (e.g. a single text row), the best one rates alone
  (the reference would average over no rows);
* rater scores ``V T^T``, the raters' attention softmax (``scoring/text_attention.py``) and the clustering are
  computed in float32 (the reference's softmax and head mean run in fp16, ``modelling_sparse_llama.py`` L578,
  so near-ties among the visual tokens may fall the other way); clustering breaks density ties by position
  instead of random noise and merges by the exact mean (see ``scoring/clustering.py``);
* a prompt that ends with its image has no text to rate it and is refused with a message (the reference would
  average over no rows).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from globalcom2.methods.base import (
    BudgetBasis,
    InLLMMethod,
    KeepPlan,
    MergedTokens,
    QueryRows,
    TokenView,
    check_layer_list,
    register_method,
    scale_official_layers,
)
from globalcom2.scoring.clustering import dpc_knn_merge
from globalcom2.scoring.ranking import int64_tensor
from globalcom2.scoring.selection import compact_rows, masked_positions, top_k_per_group

OFFICIAL_PRUNE_LAYERS = (2, 6, 15)  # score.py layer_dict / LlamaDynamicvitModel(pruning_loc=...)
OFFICIAL_NUM_LAYERS = 32  # LLaVA-1.5-7B, for which the schedules were written
OFFICIAL_VISUAL_TOKENS = 576
OFFICIAL_SCHEDULES = {
    64: (66, 30, 17),
    128: (303, 110, 36),
    192: (300, 200, 110),
}  # score.py sparse_token_list_*
RECYCLE_FRACTION = 0.3  # merge_token_num_stage1 = int(0.3 * dropped) + 1
CLUSTER_DIVISOR = 10  # cluster_num = int(merged / 10) + 1
Convention = Literal["layer_input", "layer_output"]


@dataclass(frozen=True)
class StageBudget:
    """One stage of one image: ``kept`` tokens survive, ``recycled`` merged tokens join them."""

    kept: int
    recycled: int

    @property
    def after(self) -> int:
        return self.kept + self.recycled


def recycled_count(dropped: int) -> tuple[int, int]:
    """``(candidates, clusters)`` the reference recycles when ``dropped`` tokens go at a stage."""
    if dropped <= 0:
        return 0, 0
    candidates = int(dropped * RECYCLE_FRACTION) + 1
    return candidates, candidates // CLUSTER_DIVISOR + 1


def default_prune_layers(num_layers: int) -> tuple[int, ...]:
    """The official [2, 6, 15] when they fit (more than 16 layers), else the same layers scaled to the depth."""
    if num_layers < 2:
        raise ValueError(f"SparseVLM needs a language model with at least 2 decoder layers, got {num_layers}")
    if num_layers > OFFICIAL_PRUNE_LAYERS[-1] + 1:
        return OFFICIAL_PRUNE_LAYERS
    return scale_official_layers(OFFICIAL_PRUNE_LAYERS, OFFICIAL_NUM_LAYERS, num_layers, 0, num_layers - 2)


def schedule_shape(retention_ratio: float) -> tuple[float, ...]:
    """Per-stage kept fractions of the official schedules, linearly interpolated in R (clamped at the ends)."""
    points = sorted(
        (target / OFFICIAL_VISUAL_TOKENS, counts) for target, counts in OFFICIAL_SCHEDULES.items()
    )
    if retention_ratio <= points[0][0]:
        counts = points[0][1]
    elif retention_ratio >= points[-1][0]:
        counts = points[-1][1]
    else:
        (r0, c0), (r1, c1) = next(
            (a, b) for a, b in itertools.pairwise(points) if a[0] <= retention_ratio <= b[0]
        )
        t = (retention_ratio - r0) / (r1 - r0)
        counts = tuple(a + t * (b - a) for a, b in zip(c0, c1, strict=True))
    return tuple(c / OFFICIAL_VISUAL_TOKENS for c in counts)


def _layer_average(
    num_visual: int,
    budgets: tuple[StageBudget, ...],
    stage_layers: tuple[int, ...],
    num_layers: int,
    convention: str,
) -> float:
    """Visual tokens averaged over layers: entering each layer, or leaving it (``layer_output``)."""
    counts = [num_visual, *(b.after for b in budgets)]
    bounds = [0, *stage_layers, num_layers]
    entering = sum(c * (hi - lo) for c, lo, hi in zip(counts, bounds[:-1], bounds[1:], strict=True))
    if convention == "layer_input":
        return entering / num_layers
    return (
        entering - num_visual + counts[-1]
    ) / num_layers  # shift by one layer: drop layer 0, repeat the last


@lru_cache(maxsize=4096)
def sparsevlm_schedule(
    num_visual: int,
    retention_ratio: float,
    num_layers: int,
    stage_layers: tuple[int, ...],
    convention: Convention = "layer_output",
) -> tuple[StageBudget, ...]:
    """Per-stage kept and recycled counts for one image, so that the layer average is ``R * num_visual``.

    The stage counts are ``round(alpha * f_s * num_visual)`` with the official shape ``f_s`` (:func:`schedule_shape`,
    one entry per stage: stages beyond three repeat the last fraction, fewer stages use the first ones), capped
    by the tokens present, plus the tokens the reference would recycle. The layer average grows monotonically
    with ``alpha``; bisection finds the ``alpha`` whose average is closest to the target. When even ``alpha = 0``
    overshoots (too few layers after the first pruning layer), that minimum is returned.

    Args:
        num_visual: ``N_vis`` of the image entering layer 0.
        retention_ratio: R in (0, 1].
        num_layers: decoder layers of the language model.
        stage_layers: first layer of each stage (the pruning layers + 1).
        convention: which layer average (see the module docstring).
    """
    shape = schedule_shape(retention_ratio)
    shape = tuple(shape[min(i, len(shape) - 1)] for i in range(len(stage_layers)))
    target = retention_ratio * num_visual

    def budgets(alpha: float) -> tuple[StageBudget, ...]:
        out, present = [], num_visual
        for fraction in shape:
            kept = min(present, math.floor(alpha * fraction * num_visual + 0.5))
            recycled = recycled_count(present - kept)[1]
            out.append(StageBudget(kept, recycled))
            present = kept + recycled
        return tuple(out)

    def average(alpha: float) -> float:
        return _layer_average(num_visual, budgets(alpha), stage_layers, num_layers, convention)

    low, high = 0.0, 1.0 / min(shape) + 1.0  # at `high` every stage keeps everything
    if average(low) >= target:
        if average(low) > target:  # the stage layers' check passed, yet each stage recycles a cluster
            warnings.warn(
                f"sparsevlm: retention_ratio={retention_ratio} is below what an image of {num_visual} visual "
                f"positions can keep with stages at layers {list(stage_layers)} of {num_layers} (every stage "
                f"recycles at least one cluster): it keeps a {convention} average of "
                f"{average(low) / num_visual:.4f}, which its records show; use a higher ratio or earlier "
                "pruning layers to compare at this one",
                stacklevel=2,
            )
        return budgets(low)
    for _ in range(64):
        middle = (low + high) / 2
        if average(middle) <= target:
            low = middle
        else:
            high = middle
    best = min((low, high), key=lambda alpha: abs(average(alpha) - target))
    return budgets(best)


@register_method("sparsevlm")
class SparseVLM(InLLMMethod):
    """Text-rated pruning at several decoder layers with recycling of dropped tokens (SparseVLM v1.5).

    Args:
        retention_ratio: layer-averaged kept fraction of each image's visual positions, in (0, 1].
        prune_layers: decoder layers whose attention rates the visual tokens and whose output is pruned
            (the reference's ``pruning_loc``); strictly increasing in ``[0, num_layers - 1)``. ``None``:
            :func:`default_prune_layers` for the attached model.
        equivalent_tokens: ``"layer_input"`` or ``"layer_output"``, the layer average R refers to.
        budget_basis: ``"positions"`` (default: R of ``N_vis``, separators included) or ``"patches"`` (R of the
            image's patch tokens ``N_patch``; every row separator stays at every stage and is never recycled,
            the GlobalCom² paper's count, used under ``protocol=llava``).
    """

    positions = "renumber"

    def __init__(
        self,
        *,
        retention_ratio: float,
        prune_layers: tuple[int, ...] | list[int] | None = None,
        equivalent_tokens: Convention = "layer_output",
        budget_basis: BudgetBasis = "positions",
    ) -> None:
        super().__init__(retention_ratio=retention_ratio, budget_basis=budget_basis)
        prune_layers = check_layer_list("prune_layers", prune_layers, lowest=0)
        if equivalent_tokens not in ("layer_input", "layer_output"):
            raise ValueError(
                f"equivalent_tokens must be 'layer_input' or 'layer_output', got {equivalent_tokens!r}"
            )
        self.prune_layers = prune_layers
        self.equivalent_tokens = equivalent_tokens

    # -- where -----------------------------------------------------------------------------------------------
    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The pruning layers used on a model with ``num_layers`` decoder layers."""
        layers = self.prune_layers if self.prune_layers is not None else default_prune_layers(num_layers)
        if layers[-1] >= num_layers - 1:
            raise ValueError(
                f"prune_layers must lie in [0, {num_layers - 1}) for a language model with {num_layers} decoder "
                f"layers (a pruned layer needs a layer after it), got {list(layers)}"
            )
        return layers

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.layers_for(num_layers)
        first = layers[0] + 1 if self.equivalent_tokens == "layer_input" else layers[0]
        floor = first / num_layers
        if self.retention_ratio < 1.0 and self.retention_ratio <= floor:
            raise ValueError(
                f"retention_ratio={self.retention_ratio} cannot be reached with prune_layers={list(layers)} on "
                f"{num_layers} decoder layers: {first} of them see every visual token, so the {self.equivalent_tokens} "
                f"average is above {floor:.3f} * N_vis; use retention_ratio > {floor:.3f}, an earlier pruning layer, "
                "or equivalent_tokens='layer_output'"
            )
        return tuple(layer + 1 for layer in layers)

    def equivalent_tokens_target(self, num_visual: int, num_layers: int) -> float | None:
        return self.retention_ratio * num_visual

    def stage_counts(self, num_visual: int, num_layers: int) -> tuple[int, ...]:
        return tuple(budget.after for budget in self.budgets(num_visual, num_layers))

    def budgets(self, num_visual: int, num_layers: int) -> tuple[StageBudget, ...]:
        """Per-stage budgets of an image with ``num_visual`` positions on a ``num_layers``-layer model."""
        return sparsevlm_schedule(
            num_visual,
            self.retention_ratio,
            num_layers,
            self.stage_layers(num_layers),
            self.equivalent_tokens,
        )

    # -- raters ----------------------------------------------------------------------------------------------
    def select_queries(self, view: TokenView) -> QueryRows:
        ending_with_image = sorted({row for row in view.image_row if view.text_after[row] == 0})
        if ending_with_image:  # host counts: no device read
            raise ValueError(
                f"SparseVLM rates an image's tokens by the prompt text after it (the question), and batch "
                f"row(s) {ending_with_image} end with their image, so nothing would rate them; put the question "
                "after the image, as every LLaVA prompt does"
            )
        visual = view.visual & view.valid  # [B, L]
        after = view.after_last_image  # [B, L]
        # V: the image's tokens; under budget_basis="patches" the separators are structure, not content
        # (the reference's LLaVA-1.5 images have none), so they do not vote on the raters.
        v_index, v_valid = compact_rows(
            visual & ~view.protected, max(view.per_row(view.candidates))
        )  # [B, V]
        t_index, t_valid = compact_rows(after, max(view.text_after))  # [B, T]
        hidden = view.hidden_states.float()
        dim = hidden.shape[-1]
        v = hidden.gather(1, v_index[..., None].expand(-1, -1, dim))  # [B, V, D]
        t = hidden.gather(1, t_index[..., None].expand(-1, -1, dim))  # [B, T, D]
        logits = torch.matmul(v, t.transpose(1, 2)).masked_fill(
            ~t_valid[:, None, :], float("-inf")
        )  # [B, V, T]
        probs = torch.where(t_valid[:, None, :], torch.softmax(logits, dim=-1), 0.0)
        relevance = (probs * v_valid[..., None]).sum(1) / v_valid.sum(1, keepdim=True).clamp(min=1)  # [B, T]
        mean = (relevance * t_valid).sum(1, keepdim=True) / t_valid.sum(1, keepdim=True).clamp(min=1)
        raters = (relevance > mean) & t_valid
        best = torch.where(t_valid, relevance, float("-inf")).argmax(
            dim=1
        )  # [B] fallback: the single best row
        alone = (raters.sum(1) == 0) & t_valid.any(1)  # [B]
        slots = torch.arange(t_index.shape[1], device=visual.device)
        raters |= alone[:, None] & (slots[None, :] == best[:, None])
        # Back to [B, L]; padded slots of t_index point at arbitrary columns but add 0 there.
        rows = torch.zeros(visual.shape, dtype=torch.uint8, device=visual.device)
        rows = rows.scatter_add(1, t_index, raters.to(torch.uint8)).bool()
        # How many raters each row has depends on the scores: the engine reads it (count=None).
        return QueryRows(rows=rows, candidates=view.text_after)

    def score(
        self, stage: int, attention: torch.Tensor, query_valid: torch.Tensor, view: TokenView
    ) -> torch.Tensor:
        weights = query_valid.float()[..., None]  # [B, Q, 1]
        return (attention * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, L] mean over raters

    # -- prune and recycle -----------------------------------------------------------------------------------
    def keep(self, stage: int, scores: torch.Tensor, view: TokenView) -> KeepPlan:
        device = scores.device
        # Every count is known on the host: the schedule's budget, the rows present, what the reference
        # then recycles (recycled_count). Only which rows is decided on the device.
        kept = tuple(
            min(self.budgets(n, view.num_layers)[stage].kept, present)
            for n, present in zip(view.budget_tokens, view.candidates, strict=True)
        )
        recycle = [recycled_count(present - k) for present, k in zip(view.candidates, kept, strict=True)]
        candidates = tuple(c for c, _ in recycle)
        clusters = tuple(k for _, k in recycle)
        candidate = view.candidate_image  # [B, L] protected rows are no candidate
        chosen_kept = top_k_per_group(scores, candidate, int64_tensor(kept, device))
        dropped = (candidate >= 0) & view.valid & ~chosen_kept  # [B, L]
        chosen = top_k_per_group(
            scores, torch.where(dropped, view.image, -1), int64_tensor(candidates, device)
        )  # [B, L]
        packed = _pack_by_image(view.hidden_states, chosen, view.image, candidates)  # [I, M, D]
        merged = dpc_knn_merge(
            packed, int64_tensor(candidates, device), int64_tensor(clusters, device), max(clusters, default=0)
        )  # [I, C, D]
        return KeepPlan(
            keep=chosen_kept,
            kept=kept,
            merged=MergedTokens(hidden_states=merged, count=clusters, candidates=candidates),
        )


def _pack_by_image(
    hidden: torch.Tensor, chosen: torch.Tensor, image: torch.Tensor, count: tuple[int, ...]
) -> torch.Tensor:
    """``[I, max(count), D]``: each image's chosen rows in position order, zero-padded (``count[i]`` of image
    ``i`` are chosen, a host count, so the gather has a fixed size)."""
    total = sum(count)
    flat = masked_positions(chosen.flatten(), total)  # row-major = (image, position): images are contiguous
    owner = image.flatten()[flat]  # [T]
    starts = int64_tensor([sum(count[:i]) for i in range(len(count))], hidden.device)  # [I]
    rank = torch.arange(total, device=hidden.device) - starts[owner]
    packed = hidden.new_zeros(len(count), max(count, default=0), hidden.shape[-1])
    packed[owner, rank] = hidden.flatten(0, 1)[flat]
    return packed
