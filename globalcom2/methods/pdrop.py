"""``pdrop``: PyramidDrop, visual tokens dropped stage by stage, rated by the last prompt token.

PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025, arXiv 2410.17247), following its code: Cooperx521/PyramidDrop @ 6444f30
(``llava/model/modeling_llama_pdrop.py`` ``pdrop_forward`` lines 1106-1288 and ``pdrop_rank_drop`` lines
1291-1468; ``llava/model/llava_arch.py`` ``prepare_inputs_labels_for_multimodal_pdrop`` lines 326-527, which
also builds LLaVA-NeXT's AnyRes sequence). What the reference does, and this implementation with it:

1. **Stages.** ``layer_list`` (official ``[8, 16, 24]``, every script, ``scripts/v1_6/pdrop_eval/*.sh``, which
   pass ``--model-path liuhaotian/llava-v1.5-13b`` at that commit: the settings are the README's "Options to
   note", taken here for LLaVA-NeXT unchanged, not a LLaVA-NeXT run of the authors') names
   the first layer of each reduced stage: layers 0-7 see every image token, 8-15 ``int(N * r_1)``, 16-23
   ``int(N * r_2)``, 24-31 ``int(N * r_3)``, with the official ratios ``[0.5, 0.25, 0.125]`` (``lambda =
   0.5``, README "Options to note"). Counts are floors of ``N * r_s`` with the **original** count ``N``
   (``modeling_llama_pdrop.py`` lines 1306-1307).
2. **Rating.** Before stage layer ``b`` runs, the rows entering it go through **layer b's own** input norm,
   ``q_proj``/``k_proj`` and rotary embedding (lines 1321-1342); the last prompt token's softmax attention
   over every key (fp32 softmax, then the mean over heads) is read at the image columns (lines 1389-1401). The
   top ``int(N * r_{s+1})`` image tokens stay, in their original order (lines 1405-1412); text always stays.
3. **Positions** are renumbered contiguously after every drop (line 1446), and decode steps continue each
   stage's renumbered sequence (lines 1259-1268).
4. **AnyRes.** The whole packed image (thumbnail, unpadded crops and their ``image_newline`` rows) is one
   candidate pool (``llava_arch.py`` lines 347-379, 474): the official LLaVA-NeXT path, followed here under
   ``budget_basis="positions"``.

How ``retention_ratio`` maps to PyramidDrop's knobs (the authors publish one setting and no rule for others):
R is the fraction the **last** stage keeps, the ratios are geometric as in the paper (``r_s = lambda ** s``),
so ``lambda = R ** (1 / S)`` for ``S`` stages: R = 0.125 is exactly the official ``[0.5, 0.25, 0.125]``. Like
FastV's R here (the fraction kept from layer K on), it names what the deepest layers see; the layer average is
higher and is what the FLOPs columns show. Every R in (0, 1] is reachable with the official layers, which a
layer-averaged R is not (the first 8 of 32 layers alone hold a quarter of the average).

Deviations from the reference code:

* counts are ``floor(N * R ** (s / S))``, with a product within 1e-9 of an integer taken as that integer
  (float error in the root; R = 0.125 gives the official 1/2, 1/4, 1/8 exactly) and the last stage exactly
  ``floor(N * R)``;
* the rater is each prompt's last real row (text, or the image's last token in a prompt that ends with it, as
  in the reference), found per batch row (the reference computes its index by counting, which assumes right
  padding or none, lines 1390-1392), and padding keys are masked out of its softmax;
* scores are computed in float32 (the reference casts the softmax back to fp16 before the head mean) with the
  model's own grouped-query attention (the reference has no ``repeat_kv``; LLaVA-NeXT's Vicuna is MHA, where
  the two agree);
* batches of any size, per-image budgets for multi-image prompts (the reference handles the first image of a
  sample), left padding, and no truncation of the sequence to ``tokenizer_model_max_length`` (2048 when the
  config lacks it, lines 1419-1423);
* ties go to the earlier position (``torch.topk`` leaves them unspecified);
* with ``budget_basis="patches"`` (``protocol=llava``) ``N`` counts the patch tokens and every row separator
  stays, the GlobalCom² paper's count; the official path counts the separators as candidates;
* default layers on a model too shallow for the official ``[8, 16, 24]`` (24 layers or fewer; the 32/40-layer
  LLaVA-NeXT decoders and any model deeper than 24 layers keep them): the official layers scaled by
  ``num_layers / 32`` (rounded half up, deduplicated, within ``[1, num_layers)``).
"""

from __future__ import annotations

import math

import torch

from globalcom2.budget import kept_count
from globalcom2.methods.base import (
    BudgetBasis,
    InLLMMethod,
    KeepPlan,
    QueryRows,
    TokenView,
    check_layer_list,
    last_prompt_row,
    register_method,
    scale_official_layers,
)
from globalcom2.scoring.ranking import int64_tensor
from globalcom2.scoring.selection import top_k_per_group

OFFICIAL_LAYERS = (8, 16, 24)  # scripts/v1_6/pdrop_eval/*.sh --layer_list
OFFICIAL_NUM_LAYERS = 32  # LLaVA-1.5/NeXT-7B, for which the layers were chosen


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The official ``[8, 16, 24]`` when they fit, else the same layers scaled to the depth."""
    if num_layers < 2:
        raise ValueError(f"PDrop needs a language model with at least 2 decoder layers, got {num_layers}")
    if num_layers > OFFICIAL_LAYERS[-1]:
        return OFFICIAL_LAYERS
    return scale_official_layers(OFFICIAL_LAYERS, OFFICIAL_NUM_LAYERS, num_layers, 1, num_layers - 1)


def stage_ratios(retention_ratio: float, stages: int) -> tuple[float, ...]:
    """``lambda ** s`` for ``s = 1..S`` with ``lambda = R ** (1 / S)``: the kept fraction after each stage."""
    return tuple(retention_ratio ** (s / stages) for s in range(1, stages + 1))


def stage_kept(num_tokens: int, retention_ratio: float, stages: int) -> tuple[int, ...]:
    """Tokens of an image of ``num_tokens`` candidates left after each stage: the reference's ``int(N * r_s)``.

    The last stage's ratio is R itself, so its count is exactly ``floor(N * R)``. An earlier stage's ratio is a
    root of R, computed with float error; a product within 1e-9 of an integer is taken as that integer, so that
    R = 0.125 gives the official 1/2 and 1/4 exactly, and any other product is floored.
    """
    counts = []
    for ratio in stage_ratios(retention_ratio, stages)[:-1]:
        product = num_tokens * ratio
        nearest = round(product)
        counts.append(
            nearest if math.isclose(product, nearest, rel_tol=0.0, abs_tol=1e-9) else math.floor(product)
        )
    counts.append(kept_count(num_tokens, retention_ratio))
    return tuple(min(num_tokens, count) for count in counts)


@register_method("pdrop")
class PDrop(InLLMMethod):
    """Keep ``floor(N * R ** (s / S))`` visual tokens of each image after stage ``s`` of ``S``.

    Args:
        retention_ratio: fraction of each image's visual tokens the last stage keeps, in (0, 1]; 0.125 with the
            default layers is the official setting.
        layers: first decoder layer of each reduced stage (the reference's ``layer_list``), strictly increasing
            in ``[1, num_layers)``; ``None``: :func:`default_layers` for the attached model.
        budget_basis: ``"positions"`` (default: ``N`` counts every visual position, separators included, the
            official LLaVA-NeXT path) or ``"patches"`` (``N`` counts patch tokens, every row separator stays; the
            GlobalCom² paper's count, used under ``protocol=llava``).
    """

    positions = "renumber"
    score_layer = "pruned_layer"

    def __init__(
        self,
        *,
        retention_ratio: float,
        layers: tuple[int, ...] | list[int] | None = None,
        budget_basis: BudgetBasis = "positions",
    ) -> None:
        super().__init__(retention_ratio=retention_ratio, budget_basis=budget_basis)
        self.layers = check_layer_list("layers", layers, lowest=1)  # first layer of each reduced stage

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else default_layers(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"layers must lie in [1, {num_layers}) for a language model with {num_layers} decoder layers, "
                f"got {list(layers)}"
            )
        return layers

    def stage_counts(self, num_visual: int, num_layers: int) -> tuple[int, ...]:
        return stage_kept(num_visual, self.retention_ratio, len(self.stage_layers(num_layers)))

    def select_queries(self, view: TokenView) -> QueryRows:
        return last_prompt_row(view)

    def score(
        self, stage: int, attention: torch.Tensor, query_valid: torch.Tensor, view: TokenView
    ) -> torch.Tensor:
        return attention[:, 0]  # [B, L] the last prompt token's row

    def keep(self, stage: int, scores: torch.Tensor, view: TokenView) -> KeepPlan:
        kept = tuple(
            min(self.stage_counts(n, view.num_layers)[stage], present)
            for n, present in zip(view.budget_tokens, view.candidates, strict=True)
        )
        chosen = top_k_per_group(scores, view.candidate_image, int64_tensor(kept, scores.device))
        return KeepPlan(keep=chosen, kept=kept)
