"""SparseVLM: its budget schedule, and its prefill against a plain reference of the official algorithm."""

from __future__ import annotations

import warnings

import pytest
import torch
from references import sparsevlm_reference_logits

from globalcom2 import attach
from globalcom2.methods.sparsevlm import (
    OFFICIAL_SCHEDULES,
    SparseVLM,
    StageBudget,
    default_prune_layers,
    recycled_count,
    sparsevlm_schedule,
)
from globalcom2.prompts import vicuna_v1_prompt

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [
        (2, (0,)),
        (3, (0, 1)),
        (4, (0, 1, 2)),
        (8, (1, 2, 4)),
        (16, (1, 3, 8)),
        (17, (2, 6, 15)),
        (32, (2, 6, 15)),
        (40, (2, 6, 15)),
    ],
)
def test_default_prune_layers(num_layers, expected):
    assert default_prune_layers(num_layers) == expected


@pytest.mark.parametrize("target", sorted(OFFICIAL_SCHEDULES))
def test_schedule_reproduces_the_official_576_token_schedules(target):
    """At LLaVA-1.5's geometry and under the reference's own (layer-output) average, the solved schedule is the
    official one up to a few tokens: 192 -> [300, 200, 110] exactly, 128 -> [300, 109, 36], 64 -> [64, 29, 16]
    (the official schedules themselves land at 192.0, 128.6 and 64.8 equivalent tokens)."""
    budgets = sparsevlm_schedule(576, target / 576, 32, (3, 7, 16), "layer_output")
    for budget, official in zip(budgets, OFFICIAL_SCHEDULES[target], strict=True):
        assert abs(budget.kept - official) <= max(2, round(0.05 * official)), (
            budgets,
            OFFICIAL_SCHEDULES[target],
        )


def layer_average(num_visual, budgets, stage_layers, num_layers, convention):
    """Visual tokens averaged over layers, entering each layer or leaving it (one layer earlier)."""
    shift = 1 if convention == "layer_output" else 0
    counts = [num_visual] * num_layers
    for budget, first in zip(budgets, stage_layers, strict=True):
        counts[first - shift :] = [budget.after] * (num_layers - first + shift)
    return sum(counts) / num_layers


@pytest.mark.parametrize("convention", ["layer_output", "layer_input"])
@pytest.mark.parametrize("num_visual", [576, 1176, 2340, 2928])
@pytest.mark.parametrize(("num_layers", "stage_layers"), [(32, (3, 7, 16)), (40, (3, 7, 16)), (4, (1, 2, 3))])
def test_schedule_meets_the_target_within_one_token(num_visual, num_layers, stage_layers, convention):
    floor = (stage_layers[0] - (convention == "layer_output")) / num_layers
    for ratio in [r for r in (0.11, 0.15, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.75, 0.9) if r > floor + 0.02]:
        budgets = sparsevlm_schedule(num_visual, ratio, num_layers, stage_layers, convention)
        average = layer_average(num_visual, budgets, stage_layers, num_layers, convention)
        assert abs(average - ratio * num_visual) <= 1.0
        present = num_visual
        for budget in budgets:
            assert 0 <= budget.kept <= present
            assert budget.recycled == recycled_count(present - budget.kept)[1]
            present = budget.after


def test_a_ratio_below_the_least_reachable_warns_with_what_is_kept():
    """Above the stage layers' floor (1/16 on 32 layers) yet below what recycling allows: the least reachable
    schedule runs, and the user is told which average it keeps rather than finding it in the records."""
    sparsevlm_schedule.cache_clear()
    with pytest.warns(UserWarning, match=r"retention_ratio=0.063 is below .* average of 0\.06[6-9]"):
        budgets = sparsevlm_schedule(2928, 0.063, 32, SparseVLM(retention_ratio=0.063).stage_layers(32))
    average = layer_average(2928, budgets, (3, 7, 16), 32, "layer_output") / 2928
    assert average > 0.063
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsevlm_schedule(2928, 0.25, 32, (3, 7, 16))  # reachable: no word


def test_schedule_keeps_everything_at_ratio_one():
    assert sparsevlm_schedule(2340, 1.0, 4, (1, 2, 3)) == (StageBudget(2340, 0),) * 3


def test_recycled_count_matches_the_reference_formula():
    assert [recycled_count(p) for p in (0, 1, 9, 10, 33, 276)] == [
        (0, 0),
        (1, 1),
        (3, 1),
        (4, 1),
        (10, 2),
        (83, 9),
    ]


def test_prefill_matches_a_plain_reference_of_the_official_algorithm(tiny, images):
    model, processor = tiny
    inputs = processor(
        images=images[(336, 336)], text=vicuna_v1_prompt("What is in it?"), return_tensors="pt"
    )
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with attach(model, "sparsevlm", retention_ratio=0.4) as handle, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        kept = [budget.kept for budget in handle.method.budgets(num_visual, 4)]
        stats = handle.stats[-1]
    assert stats.recycled_tokens[0] > 0, "the comparison must exercise recycling"
    reference = sparsevlm_reference_logits(model, inputs, prune_layers=[0, 1, 2], kept_per_stage=kept)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    # Negative control: without recycling the logits are visibly different.
    no_recycling = sparsevlm_reference_logits(model, inputs, [0, 1, 2], kept, recycle=False)
    assert not torch.allclose(logits, no_recycling, atol=1e-2)
