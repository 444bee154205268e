"""PyramidDrop: its stage counts, and its prefill and decoding against a plain reference of the official code."""

from __future__ import annotations

import pytest
import torch
from helpers import decoder_config, generate_steps, prompt_inputs
from references import pdrop_reference

import globalcom2.methods.pdrop  # noqa: F401  (registration)
from globalcom2 import attach
from globalcom2.anyres import config_layout
from globalcom2.methods import METHODS
from globalcom2.methods.pdrop import OFFICIAL_LAYERS, default_layers, stage_kept

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness


def test_r_one_eighth_is_the_official_setting_and_counts_floor_the_original_count():
    assert stage_kept(2880, 0.125, 3) == (1440, 720, 360)  # [0.5, 0.25, 0.125] of scripts/v1_6/pdrop_eval
    assert stage_kept(2928, 0.125, 3) == (1464, 732, 366)
    assert stage_kept(2880, 0.1, 3) == (1336, 620, 288)  # lambda = 0.1 ** (1/3); the last stage keeps R
    assert stage_kept(577, 1.0, 3) == (577, 577, 577)
    assert stage_kept(90, 0.7, 1) == (62,) and stage_kept(100, 0.29, 1) == (28,)  # int(N * r), float and all
    assert default_layers(32) == default_layers(40) == OFFICIAL_LAYERS
    assert default_layers(4) == (1, 2, 3) and default_layers(2) == (1,)
    method = METHODS.create("pdrop", retention_ratio=0.125)
    assert method.nominal_visual_tokens(32) == (2880,) * 8 + (1440,) * 8 + (720,) * 8 + (360,) * 8


@pytest.mark.parametrize(("size", "ratio"), [((672, 672), 0.125), ((800, 600), 0.3), ((1008, 336), 0.05)])
def test_prefill_and_decoding_match_a_plain_reference_of_the_official_code(
    model, processor, images, size, ratio
):
    inputs = prompt_inputs(processor, images[size], "What colour is the shape?")
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    kept = stage_kept(num_visual, ratio, 3)
    reference_tokens, reference_logits, reference_kept = pdrop_reference(
        model, inputs, [1, 2, 3], kept, steps=4
    )
    with attach(model, "pdrop", retention_ratio=ratio) as handle:
        tokens, steps = generate_steps(model, inputs, steps=4)
        stats = handle.stats[0]
    assert stats.visual_tokens_per_layer == (num_visual, *kept)
    assert stats.score_layers == (1, 2, 3)  # the pruned layer's own weights rate its input
    torch.testing.assert_close(steps[:, 0], reference_logits, atol=1e-5, rtol=0)
    assert tokens[0].tolist() == reference_tokens.tolist()
    assert [k.numel() for k in reference_kept] == list(kept)


def test_patches_basis_keeps_every_separator_and_budgets_the_patches(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    (size,) = inputs["image_sizes"].tolist()
    layout = config_layout(model.config, tuple(size))
    with attach(model, "pdrop", retention_ratio=0.25, budget_basis="patches") as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats[-1]
    kept = tuple(k + layout.num_separators for k in stage_kept(layout.num_patches, 0.25, 3))
    assert stats.visual_tokens_per_layer == (layout.num_tokens, *kept)
    assert layout.num_separators > 0


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"layers": [2, 2]}, ValueError, r"strictly increasing"),
        ({"layers": [0, 2]}, ValueError, r">= 1"),
        ({"layers": "8,16"}, TypeError, r"sequence of ints"),
        ({"layers": 5}, TypeError, r"layers must be a sequence of ints .*got 5"),
        ({"layers": [1, 9]}, ValueError, r"layers must lie in \[1, 4\)"),
        ({"budget_basis": "tokens"}, ValueError, r"budget_basis must be one of"),
        ({"retention_ratio": 0.0}, ValueError, r"retention_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_parameters_are_refused_before_any_model(params, error, message):
    config = decoder_config(4)
    with pytest.raises(error, match=message):
        METHODS.create("pdrop", **{"retention_ratio": 0.25, **params}).check_model_config(config)


def test_round_trips_through_its_parameters():
    method = METHODS.create("pdrop", retention_ratio=0.3, layers=(1, 3), budget_basis="patches")
    assert METHODS.create("pdrop", **method.params()).params() == method.params()


def _view_ending_with_its_image():
    """Two left-padded rows: row 0 ends with its image (no question after it), row 1 has text after."""
    from globalcom2.methods.base import TokenView

    image = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, 0, 0, 0], [-1, -1, 1, 1, 1, 1, -1, -1, -1, -1]])
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 0] = False
    return TokenView(
        hidden_states=torch.randn(2, 10, 8),
        image=image,
        valid=valid,
        layer=0,
        num_layers=32,
        protected=torch.zeros(2, 10, dtype=torch.bool),
        image_tokens=(7, 4),
        budget_tokens=(7, 4),
        candidates=(7, 4),
        image_row=(0, 1),
        rows=(10, 9),
        text_after=(0, 4),
    )


def test_the_rater_is_the_last_prompt_token_even_when_the_prompt_ends_with_its_image():
    """PyramidDrop's ``prompt_total_len - 1`` and FastV's row ``-1``: the last real row of each prompt. A text
    row before the image would see none of it under causal attention, and every image token would score 0."""
    from globalcom2.methods.fastv import FastV
    from globalcom2.methods.pdrop import PDrop

    view = _view_ending_with_its_image()
    for method in (PDrop(retention_ratio=0.25), FastV(retention_ratio=0.25)):
        query = method.select_queries(view)
        assert query.rows.nonzero().tolist() == [[0, 9], [1, 9]], type(method).__name__
        assert query.count == (1, 1)


def test_sparsevlm_refuses_a_prompt_that_ends_with_its_image():
    """Its raters are the question's tokens after the image: with none, nothing rates the image (the reference
    has no answer for it either), so it says so instead of keeping the earliest tokens."""
    from globalcom2.methods.sparsevlm import SparseVLM

    with pytest.raises(ValueError, match=r"batch row\(s\) \[0\] end with their image"):
        SparseVLM(retention_ratio=0.5).select_queries(_view_ending_with_its_image())
