"""Deterministic per-row top-k: the tie rule, negative and signed-zero scores, invalid entries, zero counts."""

from __future__ import annotations

import gc

import pytest
import torch

from globalcom2.scoring.ranking import (
    INVALID_TIE_BREAK,
    column_tie_break,
    int64_tensor,
    ranking_keys,
    top_counts_per_row,
    top_counts_per_row_fixed,
)
from globalcom2.scoring.selection import padded_positions


def loop_top(row: list[float], count: int, valid: list[bool]) -> list[int]:
    """The rule, literally: valid entries by score descending, then column ascending."""
    candidates = [column for column in range(len(row)) if valid[column]]
    return sorted(candidates, key=lambda column: (-row[column], column))[:count]


def tied_scores(rows: int, width: int, seed: int) -> torch.Tensor:
    """Scores with many exact ties, both signs, zeros and large magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([-3e38, -7.5, -1.0, -1e-30, 0.0, 1e-30, 0.5, 2.0, 1e20])
    return values[torch.randint(0, values.numel(), (rows, width), generator=generator)]


@pytest.mark.parametrize("seed", range(5))
def test_top_counts_follow_the_tie_rule_on_tied_scores(seed):
    scores = tied_scores(4, 50, seed)
    generator = torch.Generator().manual_seed(100 + seed)
    valid = torch.rand(4, 50, generator=generator) > 0.2
    valid[0] = True
    tie_break = column_tie_break(4, 50).masked_fill(~valid, INVALID_TIE_BREAK)
    counts = [min(int(valid[i].sum()), c) for i, c in enumerate([50, 17, 3, 30])]
    kept, order = top_counts_per_row(ranking_keys(scores, tie_break), counts)
    for i, count in enumerate(counts):
        expected = loop_top(scores[i].tolist(), count, valid[i].tolist())
        assert order[i, :count].tolist() == expected  # the best count columns, best first
        assert kept[i].nonzero().squeeze(1).tolist() == sorted(expected)


@pytest.mark.parametrize("seed", range(3))
def test_the_fixed_shape_top_counts_follow_the_tie_rule_at_every_bound(seed):
    """Counts on the device (zeros included), bound the row width (a compiled caller), the largest count (an
    eager one) or 1 with every count 0 (a ratio that keeps no patch token): each row keeps what the literal
    rule keeps, best first, in shapes that follow the bound only."""
    scores = tied_scores(4, 50, seed)
    generator = torch.Generator().manual_seed(200 + seed)
    valid = torch.rand(4, 50, generator=generator) > 0.2
    tie_break = column_tie_break(4, 50).masked_fill(~valid, INVALID_TIE_BREAK)
    keys = ranking_keys(scores, tie_break)
    for counts, bounds in (
        ([min(int(valid[i].sum()), c) for i, c in enumerate([0, 17, 3, 30])], (50, None)),
        ([0, 0, 0, 0], (50, 1)),
    ):
        for bound in bounds:
            bound = bound or max(counts)
            kept, order = top_counts_per_row_fixed(keys, torch.tensor(counts), bound)
            assert kept.shape == (4, 50) and order.shape == (4, bound)
            for i, count in enumerate(counts):
                expected = loop_top(scores[i].tolist(), count, valid[i].tolist())
                assert order[i, :count].tolist() == expected
                assert kept[i].nonzero().squeeze(1).tolist() == sorted(expected)


def test_padded_positions_are_the_true_indices_then_minus_one():
    generator = torch.Generator().manual_seed(3)
    for density in (0.0, 0.3, 1.0):
        mask = torch.rand(97, generator=generator) < density
        count = int(mask.sum())
        padded = padded_positions(mask)
        assert padded.shape == (97,) and torch.equal(padded[:count], mask.nonzero().squeeze(1))
        assert (padded[count:] == -1).all()


def test_zero_counts_keep_nothing_in_their_row():
    scores = tied_scores(3, 40, seed=9)
    keys = ranking_keys(scores, column_tie_break(3, 40))
    kept, _ = top_counts_per_row(keys, [0, 5, 0])
    assert kept.sum(1).tolist() == [0, 5, 0]
    assert kept[1].nonzero().squeeze(1).tolist() == sorted(loop_top(scores[1].tolist(), 5, [True] * 40))
    kept, order = top_counts_per_row(keys, [0, 0, 0])
    assert not kept.any() and order.shape == (3, 0)


def test_keys_order_negative_numbers_and_signed_zeros():
    scores = torch.tensor([[-2.0, -1.0, -0.0, 0.0, 1.0, 2.0, float("-inf"), float("inf")]])
    keys = ranking_keys(scores, column_tie_break(1, 8))[0]
    # ascending key order = ascending score; -0.0 sorts just below +0.0
    assert keys.argsort().tolist() == [6, 0, 1, 2, 3, 4, 5, 7]
    assert keys.unique().numel() == keys.numel()


def test_int64_tensor_equals_torch_tensor_and_owns_its_memory():
    values = [143, 0, 2**40, -5]
    tensor = int64_tensor(values, torch.device("cpu"))
    gc.collect()
    assert tensor.dtype == torch.int64 and tensor.tolist() == values
