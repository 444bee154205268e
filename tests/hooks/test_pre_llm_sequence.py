"""Prompt surgery on hand-made token rows (no model)."""

import pytest
import torch

from globalcom2.hooks.pre_llm_sequence import decode_inputs, rebuild_prompt

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

IMG, PAD = 9, 0


def row(*parts):
    out = []
    for p in parts:
        out += [IMG] * p[1] if isinstance(p, tuple) else [p]
    return out


def rebuild(ids, mask, positions, *, old, new):
    """``rebuild_prompt`` with this file's token ids; ``old``/``new`` are per-image lengths."""
    return rebuild_prompt(
        ids,
        mask,
        positions,
        image_token_id=IMG,
        original_lengths=old,
        new_lengths=new,
        pad_token_id=PAD,
    )


def test_two_images_in_one_row_shrink_and_grow():
    ids = torch.tensor([row(1, ("img", 4), 2, ("img", 3), 3)])
    r = rebuild(ids, None, None, old=[4, 3], new=[2, 5])
    assert r.input_ids.tolist() == [row(1, ("img", 2), 2, ("img", 5), 3)]
    assert r.attention_mask is None  # no padding and none given: keeps SDPA's is_causal path
    assert r.position_ids.tolist() == [list(range(10))]
    assert r.state.position_shift.tolist() == [0]  # 10 -> 10 tokens


def test_left_padded_batch_becomes_ragged_and_is_repadded():
    ids = torch.tensor([row(PAD, PAD, 1, ("img", 3), 2), row(1, ("img", 5), 2)])
    mask = (ids != PAD).long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    r = rebuild(ids, mask, pos, old=[3, 5], new=[1, 2])
    assert r.input_ids.tolist() == [[PAD, 1, IMG, 2], [1, IMG, IMG, 2]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert r.position_ids.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]
    assert r.state.position_shift.tolist() == [4 - 2, 6 - 3]
    assert r.state.real_lengths.tolist() == [3, 4]


def test_image_dropped_entirely():
    ids = torch.tensor([row(1, ("img", 3), 2)])
    r = rebuild(ids, None, None, old=[3], new=[0])
    assert r.input_ids.tolist() == [[1, 2]]


def test_decode_translates_positions_and_mask():
    ids = torch.tensor([row(PAD, 1, ("img", 3), 2), row(1, ("img", 4), 2)])
    mask = (ids != PAD).long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # last prompt positions 4 and 5
    r = rebuild(ids, mask, pos, old=[3, 4], new=[1, 2])
    assert r.input_ids.tolist() == [[PAD, 1, IMG, 2], [1, IMG, IMG, 2]]  # ragged again: re-padded
    assert r.state.position_shift.tolist() == [4 - 2, 5 - 3]
    # generate's second decode step: original-coordinate mask of width L + 2 and positions last + 2
    step_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], -1)
    step_pos = pos[:, -1:] + 2
    past = r.input_ids.shape[1] + 1
    new_mask, new_pos = decode_inputs(r.state, step_mask, step_pos, past_length=past, query_length=1)
    assert new_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert new_pos.tolist() == [[4], [5]]
    # without a caller mask or positions (generate drops all-ones masks) the same step comes out
    new_mask2, new_pos2 = decode_inputs(r.state, None, None, past_length=past, query_length=1)
    assert torch.equal(new_mask2, new_mask) and torch.equal(new_pos2, new_pos)


def test_right_padding_is_refused():
    ids = torch.tensor([row(1, ("img", 2), 2, PAD)])
    with pytest.raises(NotImplementedError, match="left padding"):
        rebuild(ids, (ids != PAD).long(), None, old=[2], new=[1])


def test_placeholder_count_mismatch_is_loud():
    ids = torch.tensor([row(1, ("img", 2), 2)])
    with pytest.raises(ValueError, match="2 image placeholders but the images have 3"):
        rebuild(ids, None, None, old=[3], new=[1])
