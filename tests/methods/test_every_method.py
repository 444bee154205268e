"""The harness properties every registered method has, checked for each one by name (a new method inherits these
tests): ratio 1 is the unmodified model, a left-padded batch gives each row its single-prompt answer, two calls
give the same answer, and ``remove()`` restores the model bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_batch_equals_single_runs, generate_steps, prompt_inputs

from globalcom2 import attach
from globalcom2.methods import METHODS, list_methods
from globalcom2.methods.params import budget_kwargs
from globalcom2.prompts import vicuna_v1_prompt

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

# A batch row and the same prompt alone run through different kernel paths: the unmodified tiny model already
# differs by up to 1.7e-5 there (tests/hooks/test_pre_llm_attach.py); generated tokens must match exactly.
PATH_ATOL = 1e-4


@pytest.mark.parametrize("method", list_methods())
def test_ratio_one_is_the_unmodified_model_through_generate_and_after_remove(
    model, processor, images, method
):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=4)
    with attach(model, method, **budget_kwargs(method, 1.0)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
        tokens, steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
    if METHODS.get(method).has_budget:
        with attach(model, method, retention_ratio=0.25):
            _, pruned = generate_steps(model, inputs, steps=4)
        assert not torch.allclose(pruned, reference_steps, atol=1e-3), "R = 0.25 must change the logits"
    tokens, steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)


@pytest.mark.parametrize("method", [m for m in list_methods() if METHODS.get(m).has_budget])
def test_left_padded_batch_rows_equal_single_runs_and_repeat_exactly(model, processor, images, method):
    batch_images = [images[(336, 336)], images[(1008, 336)], images[(800, 600)]]
    questions = ["What is it?", "Describe the left side of the picture.", "Colour?"]
    texts = [vicuna_v1_prompt(q) for q in questions]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch must be left-padded"
    with attach(model, method, retention_ratio=0.25) as handle:
        tokens, steps = generate_steps(model, batch, steps=4)
        again_tokens, again_steps = generate_steps(model, batch, steps=4)
        assert torch.equal(tokens, again_tokens) and torch.equal(steps, again_steps)
        batch_stats = handle.stats[: len(texts)]
        for row, (image, text) in enumerate(zip(batch_images, texts, strict=True)):
            alone = processor(images=image, text=text, return_tensors="pt")
            row_tokens, row_steps = generate_steps(model, alone, steps=4)
            torch.testing.assert_close(steps[:, row : row + 1], row_steps, atol=PATH_ATOL, rtol=0)
            assert torch.equal(tokens[row : row + 1], row_tokens)
            assert handle.stats[-1] == batch_stats[row], "the same counts alone as in the batch"


@pytest.mark.parametrize("method", [m for m in list_methods() if METHODS.get(m).has_budget])
def test_a_two_image_prompt_and_a_text_only_prompt_in_one_batch(model, processor, images, method):
    """Every image of a prompt keeps its own budget, and a prompt without an image passes untouched."""
    rows = [[images[(1008, 336)], images[(336, 336)]], [], [images[(800, 600)]]]
    texts = [
        vicuna_v1_prompt("Compare the two pictures.", num_images=2),
        vicuna_v1_prompt("Say something.", num_images=0),
        vicuna_v1_prompt("Colour?"),
    ]
    with attach(model, method, retention_ratio=0.25):
        assert_batch_equals_single_runs(model, processor, rows, texts, atol=PATH_ATOL)


@pytest.mark.parametrize(("pre_llm", "in_llm"), [("visionzip", "pdrop"), ("divprune", "dart")])
def test_a_pre_llm_and_an_in_llm_baseline_together_keep_batch_equal_single(
    model, processor, images, pre_llm, in_llm
):
    rows = [[images[(336, 336)]], [images[(1008, 336)]], [images[(800, 600)]]]
    texts = [
        vicuna_v1_prompt(q) for q in ("What is it?", "Describe the left side of the picture.", "Colour?")
    ]
    with (
        attach(model, pre_llm, retention_ratio=0.5) as first,
        attach(model, in_llm, retention_ratio=0.5) as second,
    ):
        assert_batch_equals_single_runs(model, processor, rows, texts, atol=PATH_ATOL)
        assert second.stats[-1].visual_tokens_before == first.stats[-1].tokens_after
