"""Plain single-sample references for the in-LLM methods, written the way the official code reads (full
attention matrices, one image, batch size 1, Python-level steps) to check the vectorised implementation."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def dpc_knn_reference(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-kNN of one group ``x [M, C]`` into ``clusters`` mean-merged tokens (SparseVLMs ``cluster_and_merge``,
    with ties in density broken by position instead of random noise)."""
    x = x.float()
    size, channels = x.shape
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / channels**0.5
    density = torch.exp(-(dist.sort(dim=1).values[:, :clusters] ** 2).mean(dim=1))
    parent = torch.empty(size)
    for i in range(size):
        denser = [j for j in range(size) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        parent[i] = dist[i, denser].min() if denser else dist.max()
    centres = torch.topk(parent * density, clusters).indices
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(clusters)
    return torch.stack([x[assign == c].mean(dim=0) for c in range(clusters)])


def layer_attention(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The full ``[L, L]`` head-averaged causal softmax attention of one decoder layer, batch size 1."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    length = hidden.shape[1]
    q = attn.q_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = q @ k.transpose(2, 3) * attn.scaling
    logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=1)[0]


@torch.no_grad()
def sparsevlm_reference_logits(
    model, inputs, prune_layers, kept_per_stage, recycle: bool = True
) -> torch.Tensor:
    """Next-token logits of SparseVLM v1.5's prefill for one prompt with one image, step by step."""
    language_model = model.model.language_model
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, num_visual = int(visual[0]), visual.numel()
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    hidden = language_model.embed_tokens(ids)
    hidden[start : start + num_visual] = features

    # Raters: text after the image whose mean softmax(V T^T) score is above average.
    after = hidden[start + num_visual :]
    relevance = torch.softmax(hidden[start : start + num_visual] @ after.T, dim=-1).mean(dim=0)
    raters = (relevance > relevance.mean()).nonzero().squeeze(1)

    x = hidden[None]
    for index, layer in enumerate(language_model.layers):
        positions = torch.arange(x.shape[1])[None]  # renumbered contiguously after every stage
        cos, sin = language_model.rotary_emb(x, positions)
        if index in prune_layers:
            attention = layer_attention(layer, x, cos, sin)
            text_start = start + num_visual
            scores = attention[text_start + raters][:, start:text_start].mean(dim=0)  # [num_visual]
        x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
        if index in prune_layers:
            order = torch.sort(scores, descending=True, stable=True).indices
            kept = order[: kept_per_stage[prune_layers.index(index)]].sort().values
            dropped = order[kept.numel() :]  # best first
            parts = [x[0, start + kept]]
            if dropped.numel() and recycle:
                recycled = dropped[: int(dropped.numel() * 0.3) + 1].sort().values
                parts.append(dpc_knn_reference(x[0, start + recycled], recycled.numel() // 10 + 1))
            visual_part = torch.cat(parts)
            x = torch.cat([x[0, :start], visual_part, x[0, start + num_visual :]])[None]
            num_visual = visual_part.shape[0]
    return model.lm_head(language_model.norm(x))[0, -1]
