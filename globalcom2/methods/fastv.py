"""``fastv``: drop visual tokens after layer K by the attention the last prompt token pays them.

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764), reference code
pkunlp-icler/FastV@d165972 (``src/transformers/.../modeling_llama.py``, ``fastv_forward``): layers ``0..K-1``
run on the full prompt; the head-averaged softmax attention of the **last** token at layer ``K-1``, restricted
to the image span, ranks the image tokens; the top ``round(N_img * (1 - r))`` stay, everything else (system
prompt, question) stays too, in order; layers ``K..`` run on the shorter sequence and **kept tokens keep their
original position ids** (``position_ids = keep_indexs``).

This implementation (the engine in ``globalcom2/hooks/in_llm.py`` does the slicing and the KV cache):

* ``retention_ratio`` R is the kept fraction: each image keeps ``round(R * N_vis)`` of its ``N_vis`` visual
  positions (Python's ``round``, half to even, as the reference's ``round``), separators included, so
  ``R = 1 - r`` in the reference's terms. Every image of a multi-image prompt keeps its own budget. With
  ``budget_basis="patches"`` (the paper protocol, ``protocol=llava``) it keeps ``round(R * N_patch)`` of its
  patch tokens instead and every row separator on top, the count the GlobalCom² paper's "2880" uses and the
  basis GlobalCom² and ``random`` count in, so every method's R means the same fraction;
* scores are recomputed for the single query row from layer ``K-1``'s attention inputs
  (``scoring/text_attention.py``) instead of running that layer with eager ``output_attentions``: the same
  numbers (tested against eager to 1e-6) with SDPA on and no ``L x L`` matrix;
* with a KV cache the selection is made once, at prefill, and decode steps attend to the kept tokens only
  (the reference's in-place variant re-selects at every step without a cache, FastV issue #13).

Deviations from the reference code:

* the query row is each prompt's last real row, found per batch row (the reference takes row ``-1``, the same
  row without padding);
* batches of any size with left padding and per-row keep counts (the reference reads batch row 0 only);
* ties in the ranking go to the earlier position (``torch.topk`` leaves them unspecified).
"""

from __future__ import annotations

import torch

from globalcom2.methods.base import (
    BudgetBasis,
    InLLMMethod,
    KeepPlan,
    QueryRows,
    TokenView,
    last_prompt_row,
    register_method,
)
from globalcom2.scoring.ranking import int64_tensor
from globalcom2.scoring.selection import top_k_per_group


@register_method("fastv")
class FastV(InLLMMethod):
    """Keep ``round(R * N_vis)`` visual tokens of each image from decoder layer ``K`` on.

    Args:
        retention_ratio: kept fraction of each image's visual positions, in (0, 1].
        K: first decoder layer that sees the pruned sequence (scores come from layer ``K - 1``), in
            ``[1, num_layers)``; the paper's default is 2.
        budget_basis: ``"positions"`` (default, the reference's image span) or ``"patches"`` (``round(R * N_patch)``
            patch tokens, every row separator kept: the GlobalCom² paper's count, used under ``protocol=llava``).
    """

    positions = "original"

    def __init__(
        self, *, retention_ratio: float, K: int = 2, budget_basis: BudgetBasis = "positions"
    ) -> None:
        super().__init__(retention_ratio=retention_ratio, budget_basis=budget_basis)
        if isinstance(K, bool) or not isinstance(K, int):
            raise TypeError(
                f"K must be an int (the first decoder layer that sees the pruned sequence), got {K!r}"
            )
        if K < 1:
            raise ValueError(f"K must be in [1, num_layers) (layer K-1 scores, layer K is pruned), got {K}")
        self.K = K

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        if num_layers <= self.K:
            raise ValueError(
                f"K must be in [1, {num_layers}) for a language model with {num_layers} decoder layers "
                f"(layer K-1 scores, layer K is pruned), got {self.K}"
            )
        return (self.K,)

    def stage_counts(self, num_visual: int, num_layers: int) -> tuple[int, ...]:
        return (round(self.retention_ratio * num_visual),)

    def select_queries(self, view: TokenView) -> QueryRows:
        return last_prompt_row(view)

    def score(
        self, stage: int, attention: torch.Tensor, query_valid: torch.Tensor, view: TokenView
    ) -> torch.Tensor:
        return attention[:, 0]  # [B, L] the last token's row

    def keep(self, stage: int, scores: torch.Tensor, view: TokenView) -> KeepPlan:
        kept = tuple(
            min(round(self.retention_ratio * n), present)
            for n, present in zip(view.budget_tokens, view.candidates, strict=True)
        )
        chosen = top_k_per_group(scores, view.candidate_image, int64_tensor(kept, scores.device))
        return KeepPlan(keep=chosen, kept=kept)
