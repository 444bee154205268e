"""``divprune``: DivPrune, keep the most diverse visual tokens by greedy max-min cosine distance.

Paper: S. R. Alvar, G. Singh, M. Akbari, Y. Zhang, "DivPrune: Diversity-based Visual Token Pruning for
Large Multimodal Models" (CVPR 2025, arXiv 2503.02175). Official code: github.com/vbdi/divprune at
``799e2d950aa01ba7860907f5a6d86061f885dca6``, ``LLaVA/llava/model/llava_arch.py`` (unchanged since the
first upload). No official code is copied; this is a re-implementation of what it computes.

What the official code does (line numbers of that file at that commit):

* Where: in ``prepare_inputs_labels_for_multimodal``, after the prompt embeddings are assembled (L337,
  L352-385), when ``LAYER_INDEX=0`` and ``SUBSET_RATIO=R`` are set. So it prunes the LLM *input
  embeddings* of the image span, i.e. the projector outputs as LLaVA packs them, newline vectors included.
* Count: ``int(round(R * L))`` (L153; Python ``round``, half to even) with ``L`` the length of the image
  span; for LLaVA-1.6 that is the whole packed sequence of the image (L369-370).
* Distance: rows divided by their L2 norm, ``D = 1 - X X^T`` (L147-150, L155), in the model's dtype.
* Greedy max-min (L157-171): the first pick maximises, over the columns of ``D``, the second-smallest
  entry of the column (the distance to the nearest *other* token; the smallest is the ~0 self-distance);
  each later pick maximises the column-wise minimum over the rows of the tokens picked so far. Ties go to
  the lowest index (``torch.argmax``). Picked tokens are not masked: they only score their ~0 self-distance.
* Order: the kept positions are sorted (L377-385), so the survivors keep their packed order. The
  maintainer notes (vbdi/divprune issue #8) that the paper's tables were produced before that sort was
  added, with tokens in selection order; the public code, and this port, sort.
* Positions: the pruned embeddings go to the LLM without position ids, so positions are renumbered
  contiguously; the harness's prompt surgery (``globalcom2/hooks/pre_llm_sequence.py``) does the same.

How it meets AnyRes: under ``budget_basis="positions"`` (the default, the official LLaVA-1.6 path) the
candidates are every packed position of the image (thumbnail, unpadded crops and the row separators, the
``image_newline`` vectors) in one global selection over the whole packed sequence; a separator competes
like any token (being identical vectors, at most one of them normally survives) and a dropped separator is
gone. Under ``"patches"`` (the harness's paper protocol, as ``random`` and ``globalcom2``) only the patch
tokens compete, ``floor(R * N_patch)`` of them are kept, and every separator is kept on top.

Deliberate deviations from the official code:

* Distances are computed in float32 (official: the model's dtype, fp16 in its runs, where distances are
  quantised to ~5e-4 and ties among thousands of tokens are plausible). fp32 picks can differ from fp16
  picks at near-ties.
* Every image is pruned on its own span, located by the image token id (official: a hard-coded 35-token
  prefix, the first image of the first sample only), so batches of any size, left padding and several
  images per prompt work.
* ``budget_basis="patches"`` is an option the official code does not have (see above).
* ``R = 1.0``, or any ratio whose count keeps every candidate (and every separator), returns ``None``:
  the unmodified model, bit for bit. The official code would still run the greedy, and with ``k = N`` it
  re-picks tokens (identical newline vectors are then dropped while other tokens appear twice).
* Degenerate duplicates are kept as in the official code, not masked: once every remaining candidate is a
  (numerical) duplicate of a picked one, the argmax can return an already-picked position, which then
  appears twice in the output (the hook feeds it twice, as the official indexing would). This needs more
  kept tokens than distinct vectors, e.g. a high ratio on the ``positions`` basis with many identical
  separators; masking picked tokens would change nothing before that point.
* An all-zero feature row gives NaN distances in both (no epsilon, as the official code); the projector
  never outputs one in practice.

Work per image: one ``[C, C]`` float32 distance matrix (``C`` candidates, at most 2,928 on LLaVA-NeXT-7B,
34 MB) and a greedy of ``k`` sequential steps with a running minimum-distance vector, sized from host counts
with no device read. On a GPU the greedy of every image of a call runs in lockstep
(``max_min_picks_lockstep``: the matrices padded to the widest, one step picking for all images), so a
batch launches the step's three small kernels ``max(k_i)`` times, not ``sum(k_i)`` times; each image's
picks are bit-identical to its own selection. That choice follows from the launch counts and is not yet
measured on a GPU (``make bench-divprune ARGS="--device cuda"``, a step of the GPU checklist). A batch of
one still launches ``3k`` kernels (about 2,200 at ``R = 0.25`` on the 7B), which on a GPU costs launch
latency, not FLOPs. On a CPU, where each kernel's arithmetic, not its launch, sets the time, the padded
steps do more work than the images' own (8 images at ``R = 0.25``, 1,176-2,928 positions, features of width
64 so that the greedy dominates: 807 ms in lockstep against 668 ms one by one, on one thread of the
project's 2-core VM, ``results/efficiency/divprune_lockstep_cpu.md``), so there each image runs alone (:data:`LOCKSTEP_DEVICE_TYPES`). Memory in lockstep:
every greedy image's matrix of the call is held at once, plus the padded copy of a group (at most
:data:`LOCKSTEP_BYTES`, 1 GiB), so a batch of 16 7B images holds about 1.1 GB more than one image does.
Under ``"positions"`` the kept separators are counted on the device and read with the call's other images,
one wait per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from globalcom2.anyres import PackedLayout
from globalcom2.budget import kept_count
from globalcom2.methods.base import (
    BudgetBasis,
    ImageContext,
    PreLLMMethod,
    check_budget_basis,
    register_method,
)
from globalcom2.scoring.ranking import host_to_device


def official_keep_count(retention_ratio: float, num_tokens: int) -> int:
    """``int(round(R * N))``: the official count over the whole image span (``llava_arch.py`` L153)."""
    return round(retention_ratio * num_tokens)  # Python round: half to even


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``[C, C]`` float32 ``1 - cos`` between the rows of ``features [C, D]`` (official L147-150, L155, but
    in float32: the rows are divided by their norm, no epsilon, then one matrix product)."""
    rows = features.float()  # [C, D]
    unit = rows / rows.norm(dim=1, keepdim=True)  # [C, D]
    return 1.0 - unit @ unit.T  # [C, C], diagonal ~0


#: The most bytes of padded distance matrices one lockstep greedy holds (``I`` images of up to ``W``
#: candidates take ``4 * I * W^2``): 1 GiB runs 31 images of LLaVA-NeXT-7B's 2,928 positions together.
LOCKSTEP_BYTES = 1 << 30
#: Device types on which the images of a call advance in lockstep: where a step's kernels are bound by their
#: launch, not their arithmetic (``python -m globalcom2.perf.divprune_lockstep`` measures both ways).
LOCKSTEP_DEVICE_TYPES = frozenset({"cuda"})


def max_min_picks(distances: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` int64 rows of the greedy max-min selection of one image, in selection order (official
    L157-171); :func:`max_min_picks_lockstep` with one image."""
    return max_min_picks_lockstep([distances], [count])[0]


def max_min_picks_lockstep(
    distances: Sequence[torch.Tensor], counts: Sequence[int], lockstep: bool | None = None
) -> list[torch.Tensor]:
    """Per image, the ``[count_i]`` int64 rows of its greedy max-min selection, in selection order (official
    L157-171), the images of a call advancing in lockstep where that is faster.

    The first pick is the column whose second-smallest distance (to its nearest other candidate) is
    largest; each later one maximises the minimum distance to the picks so far, kept as a running minimum
    over the picked rows (equal to the official minimum over the picked rows at every step, min being
    exact). ``argmax`` returns the first maximum, as in the official code. Picked rows are not masked.

    The greedy is sequential in its picks, but independent across images: every image's matrix is padded
    to the widest with ``-inf`` (a padded column never wins an argmax, nor changes a running minimum over
    real columns) and one step picks for all of them, so a call of ``I`` images launches the ``3`` kernels of
    a step ``max(count_i)`` times instead of ``I * count_i`` times. An image whose count is reached keeps
    stepping and its extra picks are dropped. Every value compared is the one the image alone compares
    (the distances are not recomputed, min and argmax are exact), so the picks are bit-identical to the
    image's own selection. Images are grouped so that no group holds more than :data:`LOCKSTEP_BYTES`.

    Args:
        distances: per image, a ``[C_i, C_i]`` distance matrix, ``C_i >= 2``, all of one dtype and device.
        counts: per image, the picks to make, ``1 <= count_i``.
        lockstep: run the images together (``True``) or one by one (``False``); ``None``: together on the
            device types of :data:`LOCKSTEP_DEVICE_TYPES`. The picks are the same either way.
    """
    if len(distances) != len(counts):
        raise ValueError(f"{len(distances)} distance matrices but {len(counts)} counts")
    if not distances:
        return []
    if lockstep is None:
        lockstep = distances[0].device.type in LOCKSTEP_DEVICE_TYPES
    widths = [d.shape[0] for d in distances]
    groups = _lockstep_groups(widths) if lockstep else [range(i, i + 1) for i in range(len(widths))]
    picks: list[torch.Tensor] = []
    for group in groups:
        picks += _lockstep_group([distances[i] for i in group], [counts[i] for i in group])
    return picks


def _lockstep_groups(widths: list[int]) -> list[range]:
    """Consecutive runs of images whose padded matrices fit :data:`LOCKSTEP_BYTES` together (one at least)."""
    groups: list[range] = []
    start = 0
    for end in range(1, len(widths) + 1):
        widest = max(widths[start:end])
        if end - start > 1 and 4 * (end - start) * widest * widest > LOCKSTEP_BYTES:
            groups.append(range(start, end - 1))
            start = end - 1
    if widths:
        groups.append(range(start, len(widths)))
    return groups


def _lockstep_group(distances: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """:func:`max_min_picks_lockstep` for one group of images (see there)."""
    first_scores = [  # per image [C_i]: distance of each column to its nearest other candidate
        torch.topk(d, 2, dim=0, largest=False).values[1] for d in distances
    ]
    if len(distances) == 1:
        padded = distances[0].unsqueeze(0)  # [1, C, C] a view, no copy
        first = first_scores[0].unsqueeze(0)  # [1, C]
    else:
        width = max(d.shape[0] for d in distances)
        padded = distances[0].new_full((len(distances), width, width), float("-inf"))  # [I, W, W]
        first = distances[0].new_full((len(distances), width), float("-inf"))  # [I, W]
        for image, (d, scores) in enumerate(zip(distances, first_scores, strict=True)):
            padded[image, : d.shape[0], : d.shape[0]] = d
            first[image, : d.shape[0]] = scores
    images = torch.arange(len(distances), device=padded.device)  # [I]
    pick = first.argmax(dim=1)  # [I] first maximum per image, stays on the device
    steps = [pick]
    running = padded[images, pick]  # [I, W] distance of every column to the picked set
    for _ in range(1, max(counts)):
        pick = running.argmax(dim=1)  # [I]
        steps.append(pick)
        running = torch.minimum(running, padded[images, pick])  # [I, W]
    picked = torch.stack(steps, dim=1)  # [I, max count] in selection order
    return [picked[image, :count] for image, count in enumerate(counts)]


@dataclass(frozen=True)
class _Greedy:
    """One image's pending greedy: its candidates' distances, how many to pick, and how picks map back."""

    distances: torch.Tensor  # [C, C] between the candidates
    count: int  # picks to make, 1 <= count < C
    candidates: torch.Tensor | None = None  # [C] packed position of each candidate; None: the positions
    always_kept: torch.Tensor | None = None  # [S] packed positions kept besides the picks (separators)

    def kept(self, picks: torch.Tensor) -> torch.Tensor:
        """``[K]`` the image's kept packed positions, ascending (packed order), from ``picks [count]``."""
        kept = picks if self.candidates is None else self.candidates.index_select(0, picks)  # [count]
        if self.always_kept is not None:
            kept = torch.cat([self.always_kept, kept])  # [S + count]
        return kept.sort().values


@register_method("divprune")
class DivPrune(PreLLMMethod):
    """Keep the visual tokens that are farthest apart in cosine distance (greedy max-min diversity).

    Args:
        retention_ratio: kept fraction, in (0, 1]; of every packed position (``int(round(R * N))``, the
            official count) under ``"positions"``, of the patch tokens (``floor(R * N_patch)``) under
            ``"patches"``.
        budget_basis: ``"positions"`` (default, the official LLaVA-1.6 path: separators are candidates) or
            ``"patches"`` (the paper protocol: only patch tokens compete, every separator stays).
    """

    def __init__(self, *, retention_ratio: float, budget_basis: BudgetBasis = "positions") -> None:
        super().__init__(retention_ratio=retention_ratio)
        self.budget_basis = check_budget_basis(budget_basis)

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | None:
        return self.select_images([features], [ctx])[0]

    def select_images(
        self, features: Sequence[torch.Tensor], contexts: Sequence[ImageContext], lockstep: bool | None = None
    ) -> list[torch.Tensor | None]:
        """Every image's kept positions, the greedy of the call's images run in lockstep where that is faster
        (:func:`max_min_picks_lockstep`; ``lockstep`` forces the choice), each image's picks being those it
        gets alone."""
        plans = [self._plan(feats, ctx.layout) for feats, ctx in zip(features, contexts, strict=True)]
        greedy = [plan for plan in plans if isinstance(plan, _Greedy)]
        distances, counts = [g.distances for g in greedy], [g.count for g in greedy]
        picks = iter(max_min_picks_lockstep(distances, counts, lockstep))
        return [plan.kept(next(picks)) if isinstance(plan, _Greedy) else plan for plan in plans]

    def _plan(self, features: torch.Tensor, layout: PackedLayout) -> torch.Tensor | _Greedy | None:
        """The image's answer when no greedy is needed (``None``: keep all; a tensor: the kept positions),
        else the greedy it needs."""
        device = features.device
        if self.budget_basis == "positions":
            count = official_keep_count(self.retention_ratio, layout.num_tokens)
            if count >= layout.num_tokens:
                return None
            if count == 0:
                return torch.zeros(0, dtype=torch.long, device=device)
            return _Greedy(distances=cosine_distances(features), count=count)  # [N, N] over every position

        count = kept_count(layout.num_patches, self.retention_ratio)
        if count >= layout.num_patches:
            return None
        separators = host_to_device(layout.separator_positions, device)  # [S]
        if count == 0:
            return separators.clone()  # a fresh tensor: the layout's positions are cached
        patches = host_to_device(layout.patch_positions, device)  # [P] packed position of each patch
        distances = cosine_distances(features.index_select(0, patches))  # [P, P]
        return _Greedy(distances=distances, count=count, candidates=patches, always_kept=separators)

    def separators_kept(self, layout: PackedLayout, source: torch.Tensor) -> int | torch.Tensor:
        """Separators among the kept positions.

        Under ``"patches"`` every separator is kept, so the layout gives the count without a device read.
        Under ``"positions"`` separators compete like any token and the count depends on the selection: it
        is counted on the device (the base class's count), and the hook reads every image's count of the
        call in one wait, not one per image (which kept the host from queuing the next image's greedy loop
        until the previous one had finished).
        """
        if self.budget_basis == "patches":
            return layout.num_separators
        return super().separators_kept(layout, source)
