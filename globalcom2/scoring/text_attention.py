"""Attention rows of a few query tokens, recomputed from a decoder layer's inputs (SDPA-compatible).

FastV and SparseVLM rate visual tokens by the softmax attention that some text rows pay them at a decoder
layer. Their reference code gets it by running that layer in eager mode with ``output_attentions`` (FastV
pkunlp-icler/FastV@d165972 ``modeling_llama.py`` ``fastv_forward``; SparseVLM Gumpest/SparseVLMs@v1.5
``modelling_sparse_llama.py``), which materialises an ``[H, L, L]`` matrix and rules out FlashAttention/SDPA
(FastV issue #31). Here the needed rows are recomputed from what the layer's attention module receives (the
normed hidden states and the rotary ``cos``/``sin``): keys for every row, queries only for the ``Q`` query
rows. Extra memory is ``O(L * d + H * Q * L)``; the model's own attention call is untouched.

The arithmetic follows transformers' Llama attention (``apply_rotary_pos_emb``, ``eager_attention_forward``:
scores in the model dtype, softmax in float32). Grouped-query attention is handled by grouping the query heads
per key head instead of materialising ``repeat_kv``: the same products, without copying the keys.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (the Llama/NeoX rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, heads, T, hd]`` with ``cos``/``sin`` ``[B, T, hd]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotated_keys(
    attn: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The layer's keys of every row after the rotary embedding, heads side by side: ``[B, L, KV * hd]``.

    What DART rates its pivots by (the key states a Llama layer caches, its ``layer_outputs[-2]``); the key
    heads are not repeated for grouped-query attention, which scales every row's L1 norm by the same factor.

    Args:
        attn: the layer's attention module (``k_proj``, ``head_dim``).
        hidden_states: ``[B, L, D]`` input of the attention module (after the layer's input norm).
        cos: ``[B or 1, L, hd]`` rotary cosines of the rows.
        sin: ``[B or 1, L, hd]`` rotary sines.
    """
    batch, length, _ = hidden_states.shape
    return (
        key_heads(attn, hidden_states, cos, sin).transpose(1, 2).reshape(batch, length, -1)
    )  # [B, L, KV * hd]


def key_heads(
    attn: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``[B, KV, L, hd]`` the layer's keys of every row, per key head, after the rotary embedding (arguments as
    :func:`rotated_keys`)."""
    batch, length, _ = hidden_states.shape
    keys = attn.k_proj(hidden_states).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # [B, KV, L, hd]
    return apply_rotary(keys, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))


def attention_rows(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged softmax attention of the query rows over all rows, as the layer computes it.

    Causality is by column: row ``q`` attends to columns ``<= q`` that are real (``key_valid``), which is the
    model's own mask for a left-padded prompt processed with an empty cache.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
        hidden_states: ``[B, L, D]`` input of the attention module (after the layer's input norm).
        cos: ``[B or 1, L, hd]`` rotary cosines of the rows (the module's ``position_embeddings[0]``).
        sin: ``[B or 1, L, hd]`` rotary sines.
        query_index: ``[B, Q]`` column of each query row (any column where ``query_valid`` is False).
        query_valid: ``[B, Q]`` which query slots are real.
        key_valid: ``[B, L]`` real (non-padding) rows.

    Returns:
        ``[B, Q, L]`` float32 attention probabilities averaged over heads; 0 at masked columns and for
        unused query slots.
    """
    batch, length, _ = hidden_states.shape
    head_dim = attn.head_dim
    cos = cos.expand(batch, -1, -1)
    sin = sin.expand(batch, -1, -1)

    keys = key_heads(attn, hidden_states, cos, sin)  # [B, KV, L, hd]
    kv_heads = keys.shape[1]

    rows = query_index.unsqueeze(-1)  # [B, Q, 1]
    query_hidden = hidden_states.gather(1, rows.expand(-1, -1, hidden_states.shape[-1]))  # [B, Q, D]
    queries = (
        attn.q_proj(query_hidden).view(batch, rows.shape[1], -1, head_dim).transpose(1, 2)
    )  # [B, H, Q, hd]
    queries = apply_rotary(
        queries, cos.gather(1, rows.expand(-1, -1, head_dim)), sin.gather(1, rows.expand(-1, -1, head_dim))
    )
    heads, num_queries = queries.shape[1], queries.shape[2]
    groups = heads // kv_heads  # query heads per key head (GQA); head h uses key head h // groups
    grouped = queries.reshape(batch, kv_heads, groups * num_queries, head_dim)  # [B, KV, G*Q, hd]
    logits = torch.matmul(grouped, keys.transpose(2, 3)) * attn.scaling  # [B, KV, G*Q, L]
    logits = logits.view(batch, heads, num_queries, length)  # [B, H, Q, L]

    columns = torch.arange(length, device=hidden_states.device)
    allowed = key_valid[:, None, :] & (columns[None, None, :] <= query_index[:, :, None])  # [B, Q, L]
    allowed &= query_valid[:, :, None]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [B, H, Q, L]; NaN only in unused slots
    probs = probs.mean(dim=1)  # [B, Q, L]
    return probs.masked_fill(~allowed, 0.0)
