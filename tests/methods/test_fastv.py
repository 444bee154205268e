"""FastV on the tiny model: identity at ratio 1, its budget per image, determinism, exact removal."""

from __future__ import annotations

import pytest
import torch
from helpers import decoder_config, prompt_inputs

from globalcom2 import attach
from globalcom2.methods import METHODS

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0, -1]  # [V] the next-token logits of the prompt


@pytest.fixture
def inputs(processor, images):
    return prompt_inputs(processor, [images[(1008, 336)]], "What is in the image?")


def test_ratio_one_is_the_unmodified_model_and_remove_restores_it(model, inputs):
    vanilla = logits(model, inputs)
    with attach(model, "fastv", retention_ratio=1.0, K=2):
        assert torch.equal(logits(model, inputs), vanilla)
    with attach(model, "fastv", retention_ratio=0.25, K=2):
        pruned = logits(model, inputs)
    assert not torch.equal(pruned, vanilla), "a 25% budget must change the prediction's logits"
    assert torch.equal(logits(model, inputs), vanilla), "remove() restores the model bit for bit"


def test_keeps_round_r_n_visual_tokens_from_layer_k_and_is_deterministic(model, inputs):
    with torch.no_grad():
        (features,) = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"]
        ).pooler_output
    visual = features.shape[0]
    with attach(model, "fastv", retention_ratio=0.25, K=2) as handle:
        first, second = logits(model, inputs), logits(model, inputs)
        stats = handle.stats
    assert torch.equal(first, second)
    assert [s.visual_tokens_per_layer for s in stats] == [
        (visual, visual, round(0.25 * visual), round(0.25 * visual))
    ] * 2


@pytest.mark.parametrize(
    ("params", "error"),
    [({"K": 0}, ValueError), ({"K": 2.0}, TypeError), ({"budget_basis": "tokens"}, ValueError)],
)
def test_bad_parameters_fail_before_any_model(params, error):
    with pytest.raises(error):
        METHODS.create("fastv", retention_ratio=0.5, **params).check_model_config(decoder_config(4))
