"""Per-view states of one CLIP layer (output, [CLS] attention row, keys), captured without eager attention.

Some pre-LLM methods work on CLIP's tokens rather than on the projected, packed features: VisionZip
(dvlab-research/VisionZip @ 3151f6d, ``visionzip/clip_encoder.py`` lines 42-45) reads, for every 336 px
view, the output of the layer LLaVA takes its features from (``hidden_states[-2]``, [CLS] included), that
layer's softmax attention and its keys. Its code switches every CLIP attention to an eager one that
returns the full ``[views, heads, 577, 577]`` probabilities of every layer (``visionzip/utils.py`` lines
10-89). We need one row of one layer: forward hooks on that layer's ``q_proj`` and ``k_proj`` read the
projections the attention itself uses (as :class:`~globalcom2.scoring.vision_attention.ClsAttentionCapture`
does), a hook on the layer reads its output, and the extra work is the [CLS] row against all keys,
O(V * 577 * D). SDPA (or FlashAttention) stays on for the real forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from globalcom2.scoring.vision_attention import ClsQueryKeyHooks


@dataclass(frozen=True)
class CapturedViews:
    """What one CLIP layer computed for a stack of views (thumbnail first, then the crops, per image).

    Attributes:
        hidden: ``[V, T, C]`` the layer's output (``T = 1 + patches``, [CLS] at row 0, no post-layernorm),
            in the model's dtype: the tensor LLaVA feeds to its projector when this is its feature layer.
        cls_attention: ``[V, T - 1]`` float32 softmax attention of the [CLS] query over the patch keys,
            summed over heads (the softmax runs over all ``T`` keys; the [CLS] column is then dropped).
        keys: ``[V, T, head_dim]`` float32 keys of the layer (``k_proj`` of the layer-normed input, bias
            included, unscaled), averaged over heads.
    """

    hidden: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor

    @property
    def num_views(self) -> int:
        return self.hidden.shape[0]

    @staticmethod
    def cat(parts: list[CapturedViews]) -> CapturedViews:
        """The views of several forwards, in call order (one part per forward; usually one)."""
        if len(parts) == 1:
            return parts[0]
        return CapturedViews(
            torch.cat([p.hidden for p in parts]),
            torch.cat([p.cls_attention for p in parts]),
            torch.cat([p.keys for p in parts]),
        )

    def split(self, num_views: list[int]) -> list[CapturedViews]:
        """One :class:`CapturedViews` per image of ``num_views[i]`` consecutive views (views, not copies)."""
        return [
            CapturedViews(hidden, attention, keys)
            for hidden, attention, keys in zip(
                torch.split(self.hidden, num_views),
                torch.split(self.cls_attention, num_views),
                torch.split(self.keys, num_views),
                strict=True,
            )
        ]


def cls_attention_and_mean_keys(
    cls_query: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls_attention [V, T - 1], mean keys [V, T, d])`` from the projections of one attention layer.

    Args:
        cls_query: ``[V, D]`` projected query of the [CLS] token (``D = heads * d``).
        keys: ``[V, T, D]`` projected keys of every token.
        num_heads: attention heads.
        scale: the attention's scaling, ``d ** -0.5``.
    """
    views, tokens, dim = keys.shape
    head_dim = dim // num_heads
    k = keys.float().view(views, tokens, num_heads, head_dim).transpose(1, 2)  # [V, h, T, d]
    q = cls_query.float().view(views, num_heads, 1, head_dim)  # [V, h, 1, d]
    logits = torch.matmul(q, k.transpose(2, 3)).mul_(scale)  # [V, h, 1, T], as eager attention orders it
    probabilities = logits.softmax(dim=-1)  # [V, h, 1, T]
    cls_attention = probabilities[:, :, 0, 1:].sum(dim=1)  # [V, T - 1]
    return cls_attention, k.mean(dim=1)  # [V, T - 1], [V, T, d]


class ViewCapture(ClsQueryKeyHooks):
    """Forward hooks on one CLIP encoder layer that record :class:`CapturedViews` while capturing.

    Args:
        vision_tower: transformers' ``CLIPVisionModel`` (``model.model.vision_tower``).
        layer: encoder layer index; negative values count from the end (-2: the layer whose output is
            ``hidden_states[-2]``, LLaVA's default feature layer).
    """

    def __init__(self, vision_tower: nn.Module, layer: int) -> None:
        super().__init__(vision_tower, layer)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles.append(self.layer.register_forward_hook(self._on_output))

    def on_keys(self, cls_query: torch.Tensor, keys: torch.Tensor) -> None:
        self._pending = cls_attention_and_mean_keys(cls_query, keys, self.num_heads, self.scale)

    def reset(self) -> None:
        self._pending = None

    def _on_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> None:
        if self._captured is None:
            return
        if self._pending is None:
            raise RuntimeError(
                "a CLIP layer returned before its attention ran; the view capture cannot follow"
            )
        hidden = output[0] if isinstance(output, tuple) else output  # [V, T, C]
        self._captured.append(CapturedViews(hidden, *self._pending))
        self._pending = None
