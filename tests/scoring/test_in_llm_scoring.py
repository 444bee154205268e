"""Pure pieces of the in-LLM stage: attention-row recompute, per-group top-k, relayout, clustering."""

from __future__ import annotations

import pytest
import torch
from references import dpc_knn_reference
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from globalcom2.hooks.in_llm_sequence import gather_rows, plan_relayout, renumber_positions
from globalcom2.methods.base import LayerStats, MergedTokens
from globalcom2.scoring.clustering import dpc_knn_merge
from globalcom2.scoring.selection import compact_rows, masked_positions, top_k_per_group
from globalcom2.scoring.text_attention import attention_rows


def test_attention_rows_equal_the_full_eager_matrix_with_gqa_and_padding():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=8)
    attn = LlamaAttention(config, layer_idx=0).eval()
    torch.nn.init.normal_(attn.q_proj.weight, std=0.5)
    torch.nn.init.normal_(attn.k_proj.weight, std=0.5)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    hidden = torch.randn(2, 7, 32)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, positions)

    # Reference: the whole [B, H, L, L] eager matrix with transformers' own RoPE and repeat_kv.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    q = attn.q_proj(hidden).view(2, 7, 4, 8).transpose(1, 2)
    k = attn.k_proj(hidden).view(2, 7, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    logits = q @ repeat_kv(k, 2).transpose(2, 3) * attn.scaling
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    full = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).mean(1)  # [B, L, L]

    query_index = torch.tensor([[6, 3], [6, 4]])
    query_valid = torch.tensor([[True, True], [True, False]])
    rows = attention_rows(attn, hidden, cos, sin, query_index, query_valid, valid)
    torch.testing.assert_close(rows[0], full[0, [6, 3]], atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[1, 0], full[1, 6], atol=1e-6, rtol=0)
    assert torch.equal(rows[1, 1], torch.zeros(7)), "an unused query slot scores nothing"
    assert torch.equal(rows[1, 0, :2], torch.zeros(2)), "padding gets no attention"


def test_top_k_per_group_matches_a_loop_and_breaks_ties_by_position():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (3, 20), generator=generator).float()  # many ties
    group = torch.randint(-1, 4, (3, 20), generator=generator)
    k = torch.tensor([2, 0, 5, 100])
    chosen = top_k_per_group(scores, group, k)
    expected = torch.zeros_like(chosen)
    flat_scores, flat_group = scores.flatten().tolist(), group.flatten().tolist()
    for g in range(4):
        members = [i for i, owner in enumerate(flat_group) if owner == g]
        members.sort(key=lambda i: (-flat_scores[i], i))
        for i in members[: int(k[g])]:
            expected.view(-1)[i] = True
    assert torch.equal(chosen, expected)


def test_compact_rows():
    index, valid = compact_rows(
        torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool), width=2
    )
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
    assert index[0].tolist() == [1, 3] and index[1, 0] == 0


def test_masked_positions_equals_nonzero_and_refuses_a_short_count():
    mask = torch.rand(50, generator=torch.Generator().manual_seed(3)) > 0.6
    count = int(mask.sum())
    assert torch.equal(masked_positions(mask, count), mask.nonzero().squeeze(1))
    assert masked_positions(torch.zeros(4, dtype=torch.bool), 0).numel() == 0
    assert masked_positions(torch.zeros(0, dtype=torch.bool), 0).numel() == 0  # an empty mask
    with pytest.raises(RuntimeError, match="does not have 1 entries"):
        masked_positions(torch.zeros(0, dtype=torch.bool), 1)
    for wrong in (count - 1, count + 1):  # never a silent cut or an unfilled slot
        with pytest.raises(RuntimeError, match=f"does not have {wrong} entries"):
            masked_positions(mask, wrong)


def test_relayout_keeps_order_inserts_after_each_image_and_left_pads():
    #            0   1   2   3   4   5
    image = torch.tensor([[-1, 0, 0, 0, -1, -1], [-1, -1, -1, 1, 1, -1]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    keep = valid.clone()
    keep[0, 2] = keep[1, 3] = False
    merged = MergedTokens(
        hidden_states=torch.tensor([[[10.0], [11.0]], [[20.0], [0.0]]]),  # image 0: two rows, image 1: one
        count=(2, 1),
        candidates=(1, 1),
    )
    layout = plan_relayout(keep, image, 7, merged, image_row=(0, 1))
    values = torch.arange(12, dtype=torch.float).view(2, 6, 1)
    rows = gather_rows(values, layout.source, layout.inserted_hidden).squeeze(-1)
    assert layout.valid.tolist() == [[True] * 7, [False] * 3 + [True] * 4]
    assert rows[0].tolist() == [0, 1, 3, 10, 11, 4, 5]
    assert rows[1, 3:].tolist() == [8, 10, 20, 11]
    assert gather_rows(image, layout.source, layout.inserted_image)[1, 3:].tolist() == [-1, 1, 1, -1]
    positions = renumber_positions(layout.valid, torch.tensor([0, 5]))
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 5, 6, 7, 8]]


def test_relayout_places_merged_rows_after_their_own_image_in_a_row_with_two_images():
    image = torch.tensor([[-1, 0, 0, -1, 1, 1, -1]])
    keep = torch.tensor([[1, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    merged = MergedTokens(torch.tensor([[[10.0]], [[20.0]]]), count=(1, 1), candidates=(1, 1))
    layout = plan_relayout(keep, image, 7, merged, image_row=(0, 0))
    rows = gather_rows(torch.arange(7.0).view(1, 7, 1), layout.source, layout.inserted_hidden).squeeze(-1)
    assert rows.tolist() == [[0, 2, 10, 3, 4, 20, 6]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpc_knn_merge_matches_the_single_group_reference(dtype):
    generator = torch.Generator().manual_seed(1)
    sizes, clusters = [37, 5, 1, 0, 60], [4, 1, 1, 0, 6]
    tokens = torch.randn(len(sizes), max(sizes), 16, generator=generator)
    tokens[:, :, :4] += 3 * torch.randint(0, 3, (len(sizes), max(sizes), 1), generator=generator)  # blobs
    tokens = tokens.to(dtype)
    merged = dpc_knn_merge(tokens, torch.tensor(sizes), torch.tensor(clusters), max(clusters))
    assert merged.shape == (5, 6, 16) and merged.dtype == dtype
    for g, (size, k) in enumerate(zip(sizes, clusters, strict=True)):
        if k:
            torch.testing.assert_close(
                merged[g, :k].float(), dpc_knn_reference(tokens[g, :size], k).to(dtype).float()
            )
        assert not merged[g, k:].any()
    # Padding rows never influence a group.
    noisy = tokens.clone()
    noisy[1, 5:] = 1e3
    assert torch.equal(
        dpc_knn_merge(noisy, torch.tensor(sizes), torch.tensor(clusters), max(clusters)), merged
    )


def test_layer_stats_averages():
    stats = LayerStats("fastv", 100, (100, 100, 25, 25), (140, 140, 65, 65))
    assert stats.equivalent_visual_tokens == 62.5
    assert stats.equivalent_visual_tokens_after_layer == (100 + 25 + 25 + 25) / 4
