"""Analytic FLOPs and KV-cache size of LLaVA-NeXT, in the LLM-Viewer convention.

Convention (hahnyuan/LLM-Viewer @ ``472f71f``, ``model_analyzer.py``: per decoder layer, times the layer
count): one multiply-accumulate is 2 FLOPs; a Llama decoder layer has the
q, k, v, o projections (k and v of width ``d_kv = d * kv_heads / heads`` under grouped-query attention),
a SwiGLU MLP counted as three ``d x m`` matrices, and the two attention matmuls (``QK^T`` and ``AV``,
``2 n^2 d`` each). For ``n`` tokens entering a layer::

    prefill FLOPs = 2 n (2 d^2 + 2 d d_kv + 3 d m) + 4 n^2 d

Norms, softmax, activations and residual adds are left out, as GlobalCom² does (they are < 1 % here).
GlobalCom²'s efficiency tables (Tables 8/9) are reproduced exactly by summing this over 32 (7B) or 40 (13B)
layers with ``n`` = visual tokens only (41.65 TFLOPs at 2880 tokens on Vicuna-7B; 3.77 at 288).

Because every function takes the token count *per layer*, methods that prune inside the LLM (FastV at
layer K, SparseVLM at several layers) are counted exactly: pass the counts each layer really saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from globalcom2.budget import MAX_PATCH_TOKENS

if TYPE_CHECKING:
    from globalcom2.methods.base import LayerStats


@dataclass(frozen=True)
class LlmDims:
    """The decoder dimensions the formulas need.

    Attributes:
        hidden_size: d.
        intermediate_size: m, the SwiGLU width.
        num_layers: decoder layers L.
        num_heads: attention heads (query).
        num_kv_heads: key/value heads (``== num_heads`` without GQA).
        vocab_size: V, for the language-model head.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @property
    def kv_width(self) -> int:
        """``d_kv``: the width of the k and v projections."""
        return self.hidden_size * self.num_kv_heads // self.num_heads

    @classmethod
    def from_config(cls, text_config: Any) -> LlmDims:
        """From a transformers ``LlamaConfig`` (``model.config.text_config``)."""
        heads = text_config.num_attention_heads
        return cls(
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_layers=text_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            vocab_size=text_config.vocab_size,
        )


# llava-v1.6-vicuna-{7b,13b}: Vicuna-v1.5 decoders (multi-head attention, vocab 32064 in llava-hf).
VICUNA_7B = LlmDims(4096, 11008, 32, 32, 32, 32064)
VICUNA_13B = LlmDims(5120, 13824, 40, 40, 40, 32064)


def _per_layer(tokens: int | Sequence[int], num_layers: int) -> list[int]:
    """``tokens`` as one count per layer (an int means the same count in every layer)."""
    if isinstance(tokens, int):
        return [tokens] * num_layers
    counts = list(tokens)
    if len(counts) != num_layers:
        raise ValueError(f"need one token count per layer ({num_layers}), got {len(counts)}")
    return counts


def layer_prefill_flops(tokens: int, hidden_size: int, intermediate_size: int, kv_width: int) -> int:
    """FLOPs of one decoder layer processing ``tokens`` tokens at once (projections + MLP + attention)."""
    d, m, n = hidden_size, intermediate_size, tokens
    return 2 * n * (2 * d * d + 2 * d * kv_width + 3 * d * m) + 4 * n * n * d


def prefill_flops(
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    tokens: int | Sequence[int],
    num_kv_heads: int | None = None,
    num_heads: int | None = None,
) -> int:
    """Prefill FLOPs of the decoder stack (LLM-Viewer convention, no LM head).

    Args:
        hidden_size: d.
        intermediate_size: m (SwiGLU, counted as three matrices).
        num_layers: L.
        tokens: tokens entering every layer (int), or one count per layer.
        num_kv_heads: key/value heads under grouped-query attention (with ``num_heads``); ``None`` = MHA.
        num_heads: query heads; needed only with ``num_kv_heads``.

    Returns:
        FLOPs (2 per multiply-accumulate).
    """
    kv_width = hidden_size
    if num_kv_heads is not None or num_heads is not None:
        if num_kv_heads is None or num_heads is None:
            raise ValueError("pass both num_kv_heads and num_heads for grouped-query attention, or neither")
        kv_width = hidden_size * num_kv_heads // num_heads
    return sum(
        layer_prefill_flops(n, hidden_size, intermediate_size, kv_width)
        for n in _per_layer(tokens, num_layers)
    )


def model_prefill_flops(dims: LlmDims, tokens: int | Sequence[int]) -> int:
    """:func:`prefill_flops` for a :class:`LlmDims`."""
    return prefill_flops(
        dims.hidden_size, dims.intermediate_size, dims.num_layers, tokens, dims.num_kv_heads, dims.num_heads
    )


def causal_attention_surplus(dims: LlmDims, tokens: int | Sequence[int]) -> int:
    """FLOPs that :func:`prefill_flops` counts and a causal attention kernel skips.

    The LLM-Viewer convention counts ``QK^T`` and ``AV`` over the whole ``n x n`` score matrix (``4 n^2 d``
    per layer). A causal prefill needs only the ``n (n + 1) / 2`` entries on and below the diagonal
    (``2 n (n + 1) d``), and fused kernels (FlashAttention, SDPA's flash and memory-efficient paths) skip
    the blocks above it. The difference, ``2 n (n - 1) d`` per layer, is about 5 % of vanilla 7B's prefill
    at 2,900 tokens and under 1 % at R = 0.1; subtracting it gives the work no prefill can avoid, which is
    what a roofline floor needs (``globalcom2.perf.ceilings``). The paper columns keep the convention."""
    d = dims.hidden_size
    return sum(2 * n * (n - 1) * d for n in _per_layer(tokens, dims.num_layers))


def decode_flops(dims: LlmDims, cache_lengths: int | Sequence[int], include_lm_head: bool = True) -> int:
    """FLOPs of generating one token when layer l holds ``cache_lengths[l]`` cached tokens.

    Per layer: the projections and MLP for one token, plus ``QK^T`` and ``AV`` against the cache and the new
    token (``4 (c + 1) d``); plus the LM head ``2 d V``.
    """
    d, m, kv = dims.hidden_size, dims.intermediate_size, dims.kv_width
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * m)
    total = sum(per_token + 4 * (c + 1) * d for c in _per_layer(cache_lengths, dims.num_layers))
    return total + (2 * d * dims.vocab_size if include_lm_head else 0)


def kv_cache_bytes(dims: LlmDims, tokens: int | Sequence[int], bytes_per_value: int = 2) -> int:
    """Bytes of the K and V caches when layer l holds ``tokens[l]`` tokens (fp16/bf16: 2 bytes)."""
    return sum(2 * n * dims.kv_width * bytes_per_value for n in _per_layer(tokens, dims.num_layers))


def equivalent_tokens(tokens_per_layer: Sequence[int]) -> float:
    """Layer-averaged token count (SparseVLM's "equivalent tokens"): the constant count with the same
    linear cost."""
    counts = list(tokens_per_layer)
    if not counts:
        raise ValueError("need at least one layer")
    return sum(counts) / len(counts)


@dataclass(frozen=True)
class VisionDims:
    """CLIP vision tower plus LLaVA's two-layer projector.

    Attributes:
        hidden_size: CLIP width (1024 for ViT-L/14).
        intermediate_size: CLIP MLP width (4096; GELU MLP = two matrices).
        num_layers: encoder layers that run (all 24, though LLaVA reads layer -2's output).
        tokens: tokens per view (577 = [CLS] + 24 x 24).
        patch_size: 14.
        channels: 3.
        projector_width: LLM width d (the projector maps 1024 -> d -> d).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    tokens: int
    patch_size: int
    channels: int
    projector_width: int

    @classmethod
    def from_config(cls, config: Any) -> VisionDims:
        """From a transformers ``LlavaNextConfig``."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return cls(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_hidden_layers,
            tokens=side * side + 1,
            patch_size=vision.patch_size,
            channels=vision.num_channels,
            projector_width=config.text_config.hidden_size,
        )


def vision_flops(dims: VisionDims, num_views: int) -> int:
    """FLOPs of encoding ``num_views`` views (thumbnail + crops) and projecting their patch tokens.

    Reported separately from the LLM's: the compression methods here do not change it (GlobalCom² reads
    scores the tower computes anyway; its CLS-row scoring adds ``2 * 577 * d`` per view).
    """
    d, m, n = dims.hidden_size, dims.intermediate_size, dims.tokens
    patches = n - 1
    embed = 2 * patches * dims.channels * dims.patch_size**2 * d  # patch convolution
    encoder = dims.num_layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)
    projector = 2 * patches * (d * dims.projector_width + dims.projector_width**2)
    return num_views * (embed + encoder + projector)


def method_overhead_flops(dims: LlmDims, stats: LayerStats) -> dict[str, int]:
    """FLOPs an in-LLM method spends beyond the decoder layers, per batch row, from its ``LayerStats``.

    * ``score_recompute``: per stage, the scoring rows' attention recomputed at the scoring layer:
      ``k_proj`` over the ``K`` rows entering it, ``q_proj`` over the ``Q`` query rows, and ``QK^T``
      (``2 K d d_kv + 2 Q d^2 + 2 Q K d``). Softmax and RoPE are elementwise and left out, as in the layers.
    * ``raters``: SparseVLM's ``V T^T`` on the embeddings (``2 N_vis T d``).
    * ``recycling``: SparseVLM's pairwise distances among the ``m`` recycling candidates per stage
      (``3 m^2 d``: difference, square, sum); computed elementwise, so torch's FLOP counter does not see it.
    * ``merge``: SparseVLM's cluster means, a product of the ``k x m`` one-hot membership with the ``m``
      candidates (``2 k m d``, ``k`` the recycled rows; ``scoring/clustering.py``).
    * ``duplication``: DART's pivot-to-row cosine similarities, ``2 d`` per dot product (a matmul); the norms are
      elementwise and left out, as in the layers.
    """
    d, kv = dims.hidden_size, dims.kv_width
    score = sum(
        2 * keys * d * kv + 2 * queries * d * d + 2 * queries * keys * d
        for queries, keys in zip(stats.score_query_tokens, stats.score_key_tokens, strict=True)
    )
    raters = 2 * stats.visual_tokens_before * stats.rater_candidates * d
    recycling = sum(3 * m * m * d for m in stats.recycle_candidates)
    merge = sum(2 * k * m * d for m, k in zip(stats.recycle_candidates, stats.recycled_tokens, strict=True))
    duplication = sum(2 * products * d for products in stats.similarity_products)
    return {
        "score_recompute": score,
        "raters": raters,
        "recycling": recycling,
        "merge": merge,
        "duplication": duplication,
    }


def full_prefill_flops(
    dims: LlmDims, tokens_per_layer: int | Sequence[int], stats: LayerStats | None = None
) -> int:
    """The "full" convention for one sample: every (non-padding) token that really entered each layer,
    plus the method's overhead when ``stats`` (its ``LayerStats``) is given."""
    total = model_prefill_flops(dims, tokens_per_layer)
    if stats is not None:
        total += sum(method_overhead_flops(dims, stats).values())
    return total


def paper_prefill_flops(dims: LlmDims, method: Any, max_visual_tokens: int = MAX_PATCH_TOKENS) -> int:
    """The "paper" convention (GlobalCom² Tables 8/9): visual tokens only, at the method's nominal schedule
    for ``max_visual_tokens`` (``method.nominal_visual_tokens``)."""
    return model_prefill_flops(dims, method.nominal_visual_tokens(dims.num_layers, max_visual_tokens))
