"""DART: its keep count, and its prefill against a plain reference of the official code."""

from __future__ import annotations

import pytest
import torch
from helpers import decoder_config, prompt_inputs
from references import dart_reference_logits

import globalcom2.methods.dart  # noqa: F401  (registration)
from globalcom2 import attach
from globalcom2.anyres import config_layout
from globalcom2.methods import METHODS

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness


def test_the_official_llava_next_budget_keeps_324_tokens():
    """``retain_token_num_for_llava_next = 320``: 40 per pivot, plus the 4 image pivots."""
    dart = METHODS.create("dart", retention_ratio=1 / 9)
    assert round(2880 / 9) == 320 and dart.per_pivot(2880, 4) == 40
    assert dart.stage_counts(2880, 32) == (324,)
    assert dart.nominal_visual_tokens(32) == (2880,) * 2 + (324,) * 30
    assert METHODS.create("dart", retention_ratio=1.0).stage_counts(2928, 32) == (
        2928,
    )  # whole: R = 1 is vanilla


@pytest.mark.parametrize(("size", "ratio"), [((672, 672), 1 / 9), ((800, 600), 0.25), ((1008, 336), 0.05)])
def test_prefill_matches_a_plain_reference_of_the_official_code(model, processor, images, size, ratio):
    inputs = prompt_inputs(processor, images[size], "What colour is the shape on the left?")
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with attach(model, "dart", retention_ratio=ratio, K=2) as handle, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        stats = handle.stats[-1]
    per_pivot = handle.method.per_pivot(num_visual, 4)
    reference, kept = dart_reference_logits(model, inputs, pruned_layer=2, per_pivot=per_pivot)
    assert stats.visual_tokens_per_layer == (num_visual,) * 2 + (kept.numel(),) * 2
    assert kept.numel() == 4 + 8 * per_pivot
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_the_kept_tokens_are_the_references(model, processor, images):
    """Same kept indices, read from the prefill's keep plan (not only close logits)."""
    inputs = prompt_inputs(processor, images[(800, 600)], "Where is the red circle?")
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    with attach(model, "dart", retention_ratio=0.2) as handle, torch.no_grad():
        keeps = []
        original = handle.method.keep
        handle.method.keep = lambda *a: keeps.append(original(*a)) or keeps[-1]
        model(**inputs)
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    _, kept = dart_reference_logits(model, inputs, 2, handle.method.per_pivot(num_visual, 4))
    (plan,) = keeps
    assert torch.equal(plan.keep[0].nonzero().squeeze(1) - start, kept)


def test_patches_basis_keeps_every_separator(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    (size,) = inputs["image_sizes"].tolist()
    layout = config_layout(model.config, tuple(size))
    with attach(model, "dart", retention_ratio=0.25, budget_basis="patches") as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats[-1]
    kept = handle.method.kept_tokens(layout.num_patches, 4) + layout.num_separators
    assert stats.visual_tokens_per_layer == (layout.num_tokens,) * 2 + (kept,) * 2
    assert stats.similarity_products == (8 * stats.tokens_per_layer[0],)  # 8 pivots, each against every row


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"K": 0}, ValueError, r"K must be >= 1"),
        ({"K": 4}, ValueError, r"K must be in \[1, 4\)"),
        ({"K": 2.0}, TypeError, r"K must be an int"),
        ({"pivot_image_tokens": 0}, ValueError, r"pivot_image_tokens must be >= 1"),
        ({"pivot_text_tokens": -1}, ValueError, r"pivot_text_tokens must be >= 0"),
        ({"budget_basis": "tokens"}, ValueError, r"budget_basis must be one of"),
    ],
)
def test_bad_parameters_are_refused_before_any_model(params, error, message):
    config = decoder_config(4)
    with pytest.raises(error, match=message):
        METHODS.create("dart", **{"retention_ratio": 0.25, **params}).check_model_config(config)
