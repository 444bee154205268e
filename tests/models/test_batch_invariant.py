"""The batch-invariant mode (``globalcom2/models/batch_invariant.py``): a left-padded batch gives every row, bit for
bit, the logits and tokens that row gets alone, in bf16, for the unmodified model and every method; its pieces;
and its refusals."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_and_single_runs

from globalcom2.methods import METHODS, list_methods
from globalcom2.models.batch_invariant import (
    DECODE_ROWS,
    FORCE_GQA_VARIABLE,
    PREFILL_ROWS,
    BatchInvariantMode,
    attention_plan,
    batch_invariant,
    in_fixed_blocks,
    sequences_in_blocks,
)
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.run_spec import parse_run

# Rests on transformers' attention code (its GQA switch and masks); the CUDA tests are in tests/gpu.
pytestmark = pytest.mark.exactness


@pytest.fixture(scope="module")
def bf16():
    """The tiny model in bf16 on the CPU, where a batch changes logits by up to 0.7."""
    return load_tiny_llava_next(seed=0, dtype="bfloat16")


def largest_row_difference(tokens, logits, alone) -> float:
    """Largest |logit| difference between a batch row and the prompt alone; tokens must match to compare."""
    worst = 0.0
    for row, (row_tokens, row_logits) in enumerate(alone):
        if not torch.equal(tokens[row : row + 1], row_tokens):
            return float("inf")
        worst = max(worst, (logits[:, row : row + 1].float() - row_logits.float()).abs().max().item())
    return worst


def test_the_unmodified_model_in_bf16_changes_with_the_batch(bf16):
    """The problem the mode solves, on this machine: without it, batch rows differ from their single runs."""
    assert largest_row_difference(*batch_and_single_runs(*bf16, None, invariant=False)) > 0.01


@pytest.mark.parametrize("method", [None, *(m for m in list_methods() if METHODS.get(m).has_budget)])
def test_every_batch_row_equals_its_single_run_bit_for_bit_in_bf16(bf16, method):
    model, processor = bf16
    tokens, logits, alone = batch_and_single_runs(model, processor, method, invariant=True)
    for row, (row_tokens, row_logits) in enumerate(alone):
        assert torch.equal(tokens[row : row + 1], row_tokens)
        assert torch.equal(logits[:, row : row + 1], row_logits), f"row {row} of {method or 'vanilla'}"


def test_the_mode_leaves_nothing_behind():
    before = os.environ.get(FORCE_GQA_VARIABLE)
    with batch_invariant():
        assert os.environ[FORCE_GQA_VARIABLE] == "1"
        inside = F.linear(torch.ones(3, 4), torch.ones(5, 4))
    assert os.environ.get(FORCE_GQA_VARIABLE) == before
    assert torch.equal(inside, torch.full((3, 5), 4.0))
    assert torch._C._is_torch_function_mode_enabled() is False


def test_the_gqa_switch_is_checked_whether_or_not_the_variable_was_set(monkeypatch):
    import globalcom2.models.batch_invariant as module

    checks = []
    monkeypatch.setattr(
        module, "_check_gqa_switch", lambda: checks.append(os.environ.get(FORCE_GQA_VARIABLE))
    )
    monkeypatch.delenv(FORCE_GQA_VARIABLE, raising=False)
    with batch_invariant():
        pass
    monkeypatch.setenv(FORCE_GQA_VARIABLE, "1")  # set by the user's environment
    with batch_invariant():
        pass
    assert checks == ["1", "1"]  # each time with the variable set, as the switch is read


def test_fixed_blocks_give_each_row_the_result_it_gets_among_any_other_rows():
    torch.manual_seed(0)
    weight = torch.randn(96, 300, dtype=torch.bfloat16)
    rows = torch.randn(7, 300, dtype=torch.bfloat16)
    others = torch.randn(PREFILL_ROWS + 5, 300, dtype=torch.bfloat16)

    def blocked(x):
        return in_fixed_blocks(x, lambda part: F.linear(part, weight), PREFILL_ROWS)

    alone = blocked(rows)
    assert alone.shape == (7, 96)
    # the same rows after a block and a half of other rows: other offsets, other neighbours, other calls
    mixed = blocked(torch.cat([others, rows]))[-7:]
    assert torch.equal(alone, mixed)
    torch.testing.assert_close(alone.float(), F.linear(rows, weight).float(), atol=0.1, rtol=0.02)
    assert DECODE_ROWS < PREFILL_ROWS


def test_a_sequence_sits_at_the_same_offsets_of_its_blocks_with_and_without_left_padding():
    """A stand-in for a kernel whose numbers depend on a row's offset in its call: the end-aligned blocks give
    a prompt's rows the same offsets alone and left-padded, flat blocks do not."""

    def offset_dependent(block):  # [C, K] -> [C, K]: each row marked with its offset in the call
        return block * 10 + torch.arange(block.shape[0], dtype=block.dtype)[:, None]

    prompt = torch.rand(1, 300, 4)  # [1, S, K]
    padded = torch.cat([torch.rand(1, 37, 4), prompt], dim=1)  # [1, 37 + S, K]: 37 padding rows in front
    alone = sequences_in_blocks(prompt, offset_dependent, PREFILL_ROWS)
    in_batch = sequences_in_blocks(padded, offset_dependent, PREFILL_ROWS)[:, 37:]
    assert torch.equal(alone, in_batch)
    flat = in_fixed_blocks(padded[0], offset_dependent, PREFILL_ROWS)[37:]
    assert not torch.equal(flat, alone[0]), "flat blocks shift the rows: the stand-in must notice"


def test_the_mode_routes_softmax_layer_norm_and_means_through_blocks(monkeypatch):
    import globalcom2.models.batch_invariant as module

    routed = []
    original = module._last_dim_in_blocks

    def spy(x, fn):
        routed.append(tuple(x.shape))
        return original(x, fn)

    monkeypatch.setattr(module, "_last_dim_in_blocks", spy)
    x = torch.randn(2, 3, 4)
    norm = torch.nn.LayerNorm(4)
    with BatchInvariantMode():
        outputs = [
            norm(x),
            F.softmax(x, dim=-1),
            torch.softmax(x, -1, dtype=torch.float64),
            x.mean(-1),
            x.mean(0),
        ]
    assert len(routed) == 4, "the mean over dimension 0 runs unchanged"
    torch.testing.assert_close(outputs[0], norm(x))
    torch.testing.assert_close(outputs[1], x.softmax(-1))
    assert outputs[2].dtype == torch.float64 and outputs[3].shape == (2, 3) and outputs[4].shape == (3, 4)


def test_attention_plans_read_the_left_padding_of_a_prompt_and_a_decode_step():
    lengths = torch.tensor([5, 3])  # real tokens per row of a left-padded batch of length 5
    keys = torch.arange(5)
    real = keys >= (5 - lengths)[:, None]  # [2, 5]
    prompt = (real[:, None, :] & (keys[None, None, :] <= keys[None, :, None]))[:, None]  # [2, 1, 5, 5]
    assert attention_plan(prompt, 2, 5, 5, is_causal=False) == [(0, 0, True), (2, 2, True)]
    step = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], 1)[:, None, None]  # [2, 1, 1, 6]
    assert attention_plan(step, 2, 1, 6, is_causal=False) == [(0, 0, False), (0, 2, False)]
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~step, torch.finfo(torch.float32).min)
    assert attention_plan(additive, 2, 1, 6, is_causal=False) == [(0, 0, False), (0, 2, False)]
    one_real_token = prompt.clone()
    one_real_token[1] = False
    one_real_token[1, 0, 4, 4] = True
    assert attention_plan(one_real_token, 2, 5, 5, is_causal=False)[1] == (4, 4, False)
    assert attention_plan(None, 2, 5, 5, is_causal=True) == [(0, 0, True), (0, 0, True)]


def test_a_mask_is_read_once_per_call_shape():
    mode = BatchInvariantMode()
    keys = torch.arange(4)
    mask = (keys[None, :] <= keys[:, None])[None, None].expand(2, 1, 4, 4).clone()  # [2, 1, 4, 4]
    first = mode._plan(mask, 2, 4, 4, False)
    assert mode._plan(mask, 2, 4, 4, False) is first, "every layer of a forward reuses the plan"
    with pytest.raises(ValueError, match="a one-query decode step"):
        mode._plan(mask, 2, 1, 4, False)  # the same mask at another shape is read (and refused) again
    del mask
    assert not mode._plans, "a plan goes with its mask"


def test_a_mask_the_mode_cannot_split_by_rows_is_refused():
    keys = torch.arange(4)
    causal = (keys[None, :] <= keys[:, None])[None, None].expand(2, 1, 4, 4).clone()  # [2, 1, 4, 4]
    holed = causal.clone()
    holed[1, 0, 3, 1] = False  # a hole inside row 1's keys
    with pytest.raises(ValueError, match=r"rows \[1\].*left-padded causal prompt"):
        attention_plan(holed, 2, 4, 4, is_causal=False)
    with pytest.raises(ValueError, match=r"prompt \(queries == keys\) or a one-query decode step"):
        attention_plan(causal[:, :, 2:], 2, 2, 4, is_causal=False)
    with pytest.raises(ValueError, match=r"needs a \[batch, 1, queries or 1, 4\] mask"):
        attention_plan(causal[:, 0], 2, 4, 4, is_causal=False)
    with pytest.raises(ValueError, match="one for all heads"):
        attention_plan(causal.expand(2, 3, 4, 4), 2, 4, 4, is_causal=False)


def test_a_run_spec_takes_the_mode_and_refuses_what_it_cannot_run_with():
    assert parse_run(pretrained="tiny", batch_invariant="true").model.batch_invariant is True
    assert parse_run(pretrained="tiny").model.batch_invariant is False
    with pytest.raises(ValueError, match="batch_invariant=true cannot run with compile=True"):
        parse_run(pretrained="tiny", batch_invariant=True, compile=True)
    with pytest.raises(ValueError, match=r"batch_invariant=true needs attn_implementation=sdpa.*eager"):
        parse_run(pretrained="tiny", batch_invariant=True, attn_implementation="eager")
