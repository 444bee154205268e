"""The pre-LLM attach point through forward and generate, on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import generate_steps, prompt_inputs, shortened_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from globalcom2 import attach
from globalcom2.anyres import packed_layout
from globalcom2.hooks.cache_keyword import CACHE_KEYWORD, output_cache
from globalcom2.methods.direct import pre_llm_sources
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.prompts import vicuna_v1_prompt

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

SIZES = [(336, 336), (672, 672), (1008, 336), (336, 1008), (800, 600)]  # (width, height)
RATIOS = [0.75, 0.5, 0.25, 0.1]
# The same computation through a different kernel path (a left-padded batch row vs the sample alone, where
# SDPA gets a padding mask; no-cache vs cached decoding) agrees to float32 rounding, not bitwise. The
# *unmodified* tiny model itself differs by up to 1.4e-5 (batch vs alone) and 1.7e-5 (no cache vs cache)
# on logits up to |5.7| (measured 2026-11-21); compressed runs measured 6e-6..1.3e-5. 1e-4 is ~6x that
# floor and ~2e-5 of the logit range; generated tokens must match exactly.
PATH_ATOL = 1e-4


# --- exactness at retention_ratio = 1.0 ------------------------------------------------------------


@pytest.mark.parametrize("method", ["vanilla", "random"])
def test_ratio_one_is_bit_identical_forward_and_generate(model, processor, images, method):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=5)

    with attach(model, method, retention_ratio=1.0) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
        tokens, steps = generate_steps(model, inputs, steps=5)
        assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
        assert handle.stats[-1].patch_tokens_kept == handle.stats[-1].patch_tokens_before

    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
    tokens, steps = generate_steps(model, inputs, steps=5)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)


def test_remove_restores_the_instance_and_leaves_others_untouched(model, processor, images):
    other, _ = load_tiny_llava_next(seed=1)
    inputs = prompt_inputs(processor, images[(336, 336)])
    with torch.no_grad():
        other_before = other(**inputs).logits
    inner_class, inner_attrs = type(model.model), set(vars(model.model))

    handle = attach(model, "random", retention_ratio=0.5)
    assert type(model.model) is not inner_class and isinstance(model.model, inner_class)
    assert type(other.model) is inner_class  # no class-level patching
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, other_before)
    handle.remove()

    assert type(model.model) is inner_class
    assert set(vars(model.model)) == inner_attrs
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()


def test_second_pre_llm_method_is_refused(model):
    with attach(model, "random", retention_ratio=0.5), pytest.raises(RuntimeError, match="already attached"):
        attach(model, "vanilla")


# --- random: counts and equality with an explicitly shortened input ---------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_matches_shortened_input_on_unmodified_model(model, processor, images, size, ratio):
    inputs = prompt_inputs(processor, images[size])
    with attach(model, "random", retention_ratio=ratio, seed=3) as handle:
        tokens, steps = generate_steps(model, inputs, steps=4)
        stats = handle.stats[-1]
        sources = pre_llm_sources(model, handle.method, inputs)

    width, height = size
    layout = packed_layout((height, width), model.config.image_grid_pinpoints)
    assert stats.patch_tokens_before == layout.num_patches
    assert stats.patch_tokens_kept == math.floor(ratio * layout.num_patches)
    assert stats.separators_kept == layout.num_separators
    assert torch.equal(layout.is_separator[sources[0]].sum(), torch.tensor(layout.num_separators))
    assert bool((sources[0][1:] > sources[0][:-1]).all()), "kept tokens must stay in their original order"

    reference_tokens, reference_steps = generate_steps(
        model, shortened_inputs(model, inputs, sources), steps=4
    )
    assert torch.equal(steps, reference_steps)
    assert torch.equal(tokens, reference_tokens)


def test_random_selection_depends_on_the_seed_and_not_on_the_call(model, processor, images):
    inputs = prompt_inputs(processor, images[(672, 672)])
    with attach(model, "random", retention_ratio=0.25, seed=0) as handle:
        first = pre_llm_sources(model, handle.method, inputs)[0]
        again = pre_llm_sources(model, handle.method, inputs)[0]
    with attach(model, "random", retention_ratio=0.25, seed=1) as handle:
        other_seed = pre_llm_sources(model, handle.method, inputs)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_dropping_tokens_changes_the_output(model, processor, images):
    """Negative control: the comparisons above can fail."""
    inputs = prompt_inputs(processor, images[(672, 672)])
    _, reference_steps = generate_steps(model, inputs, steps=3)
    with attach(model, "random", retention_ratio=0.5):
        _, steps = generate_steps(model, inputs, steps=3)
    assert not torch.allclose(steps, reference_steps, atol=1e-3)


# --- batches, several images, beams, no cache, eager ------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_left_padded_batch_rows_equal_single_runs(model, processor, images, ratio):
    batch_images = [images[(336, 336)], images[(1008, 336)], images[(800, 600)]]
    questions = ["What is it?", "Describe the left side of the picture.", "Colour?"]
    texts = [vicuna_v1_prompt(q) for q in questions]
    batch = processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch must be left-padded"

    with attach(model, "random", retention_ratio=ratio) as handle:
        tokens, steps = generate_steps(model, batch, steps=4)
        assert len(handle.stats) == 3
        for row, (image, text) in enumerate(zip(batch_images, texts, strict=True)):
            alone = processor(images=image, text=text, return_tensors="pt")
            row_tokens, row_steps = generate_steps(model, alone, steps=4)
            torch.testing.assert_close(steps[:, row : row + 1], row_steps, atol=PATH_ATOL, rtol=0)
            assert torch.equal(tokens[row : row + 1], row_tokens)


def test_a_second_turn_on_a_compressed_padded_cache_is_refused_not_garbled(model, processor, images):
    """generate counts a cache's tokens to tell what is new in ``input_ids``; after a compressed prefill the
    cache holds fewer tokens than the prompt, so a second turn would re-feed the prompt's tail, placeholders
    included, at negative positions. With the batch's 2-D mask (padding) the step is recognised and refused."""
    texts = [vicuna_v1_prompt(q) for q in ("What is it?", "Describe the left side of the picture.")]
    batch = processor(
        images=[images[(336, 336)], images[(800, 600)]], text=texts, padding=True, return_tensors="pt"
    )
    with attach(model, "random", retention_ratio=0.3), torch.no_grad():
        first = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        cache = output_cache(first)
        more = processor.tokenizer(
            [" USER: more? ASSISTANT:"] * 2, return_tensors="pt", add_special_tokens=False
        )
        sequences = torch.cat([first.sequences, more["input_ids"]], 1)
        mask = torch.cat(
            [batch["attention_mask"], torch.ones_like(sequences[:, batch["input_ids"].shape[1] :])], 1
        )
        with pytest.raises(ValueError, match="does not continue the compressed prefill"):
            model.generate(
                input_ids=sequences,
                attention_mask=mask,
                **{CACHE_KEYWORD: cache},
                max_new_tokens=2,
                do_sample=False,
            )


def test_a_second_turn_on_a_compressed_unpadded_cache_is_refused_not_garbled(model, processor, images):
    """At batch 1 generate passes no mask, so the mask check above cannot see the restart: the step's length
    does (a generate step is one token)."""
    inputs = prompt_inputs(processor, images[(800, 600)])
    with attach(model, "random", retention_ratio=0.3), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        more = processor.tokenizer(" USER: more? ASSISTANT:", return_tensors="pt", add_special_tokens=False)
        sequences = torch.cat([first.sequences, more["input_ids"]], 1)
        with pytest.raises(
            NotImplementedError, match=r"-token step after a pre-LLM method's compressed prefill"
        ):
            model.generate(
                input_ids=sequences,
                attention_mask=torch.ones_like(sequences),
                **{CACHE_KEYWORD: output_cache(first)},
                max_new_tokens=2,
                do_sample=False,
            )


@pytest.mark.parametrize("method", ["random", "pdrop"])
def test_a_copied_cache_decodes_as_the_original_does(model, processor, images, method):
    """transformers reuses a prompt's cache through ``copy.deepcopy``: the copy must carry the compressed
    prefill's decode state, or its next step runs at the original prompt's positions without a word."""
    inputs = prompt_inputs(processor, images[(800, 600)])
    with attach(model, method, retention_ratio=0.3), torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        cache = output_cache(prefill)
        copied = copy.deepcopy(cache)
        token = prefill.logits[:, -1:].argmax(-1)  # [1, 1]
        step = {
            "input_ids": token,
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1),
            "position_ids": torch.tensor([[inputs["input_ids"].shape[1]]]),
        }
        on_copy = model(**step, **{CACHE_KEYWORD: copied}).logits
        on_original = model(**step, **{CACHE_KEYWORD: cache}).logits
    assert torch.equal(on_copy, on_original)


def test_image_features_planned_by_another_attachment_are_refused(model, processor, images):
    """A plan carries one attachment's selection: another must not apply it without running its own."""
    inputs = prompt_inputs(processor, images[(800, 600)])
    with attach(model, "globalcom2", retention_ratio=0.25), torch.no_grad():
        planned = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    with (
        attach(model, "random", retention_ratio=1.0),
        torch.no_grad(),
        pytest.raises(RuntimeError, match="planned by another attachment"),
    ):
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_sizes=inputs["image_sizes"],
            mm_encoder_outputs={"image": planned},
        )


def test_several_images_in_one_prompt(model, processor, images):
    inputs = prompt_inputs(processor, [images[(1008, 336)], images[(336, 336)]], "Compare the two images.")
    with attach(model, "random", retention_ratio=0.25) as handle:
        tokens, steps = generate_steps(model, inputs, steps=4)
        sources = pre_llm_sources(model, handle.method, inputs)
        assert [s.image_size for s in handle.stats[-2:]] == [(336, 1008), (336, 336)]
    reference_tokens, reference_steps = generate_steps(
        model, shortened_inputs(model, inputs, sources), steps=4
    )
    assert torch.equal(steps, reference_steps) and torch.equal(tokens, reference_tokens)


def test_beam_search(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    beams = {"num_beams": 3, "num_return_sequences": 2, "output_scores": True}
    with attach(model, "random", retention_ratio=0.25) as handle:
        out = model.generate(
            **inputs, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True, **beams
        )
        sources = pre_llm_sources(model, handle.method, inputs)
    short = shortened_inputs(model, inputs, sources)
    ref = model.generate(**short, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True, **beams)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, prompt:], ref.sequences[:, short["input_ids"].shape[1] :])
    assert torch.equal(out.sequences_scores, ref.sequences_scores)


def test_generate_without_cache_matches_cached(model, processor, images):
    inputs = prompt_inputs(processor, images[(672, 672)])
    with attach(model, "random", retention_ratio=0.25):
        tokens, steps = generate_steps(model, inputs, steps=3)
        tokens_nc, steps_nc = generate_steps(model, inputs, steps=3, use_cache=False)
    assert torch.equal(tokens, tokens_nc)
    torch.testing.assert_close(steps_nc, steps, atol=PATH_ATOL, rtol=0)


def test_eager_text_attention(images):
    model, processor = load_tiny_llava_next(
        seed=0, attn_implementation={"text_config": "eager", "vision_config": "sdpa"}
    )
    inputs = prompt_inputs(processor, images[(800, 600)])
    with attach(model, "random", retention_ratio=0.25) as handle:
        tokens, steps = generate_steps(model, inputs, steps=4)
        sources = pre_llm_sources(model, handle.method, inputs)
    reference_tokens, reference_steps = generate_steps(
        model, shortened_inputs(model, inputs, sources), steps=4
    )
    assert torch.equal(steps, reference_steps) and torch.equal(tokens, reference_tokens)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "error", "pattern"),
    [
        (0, ValueError, r"retention_ratio must be in \(0, 1\].*got 0"),
        (-0.1, ValueError, r"retention_ratio must be in \(0, 1\].*got -0.1"),
        (1.5, ValueError, r"retention_ratio must be in \(0, 1\].*got 1.5"),
        (float("nan"), ValueError, r"retention_ratio must be in \(0, 1\].*got nan"),
        ("0.5", TypeError, r"retention_ratio must be a real number in \(0, 1\], got '0.5' of type str"),
    ],
)
def test_bad_ratio(model, ratio, error, pattern):
    with pytest.raises(error, match=pattern):
        attach(model, "random", retention_ratio=ratio)
    assert type(model.model).__name__ == "LlavaNextModel"


def test_unknown_method_lists_choices(model):
    with pytest.raises(
        ValueError, match=r"unknown compression method 'globalcom3'.*Registered: .*random.*vanilla"
    ):
        attach(model, "globalcom3")


def test_vanilla_refuses_a_budget(model):
    with pytest.raises(ValueError, match="vanilla keeps every token"):
        attach(model, "vanilla", retention_ratio=0.5)


def test_model_that_is_not_llava_next_anyres(model):
    text_only = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(TypeError, match=r"expected a LLaVA-NeXT AnyRes model.*got LlamaForCausalLM"):
        attach(text_only, "random", retention_ratio=0.5)
    with pytest.raises(TypeError, match="got str"):
        attach("llava-hf/llava-v1.6-vicuna-7b-hf", "random", retention_ratio=0.5)
    original = model.config.vision_feature_select_strategy
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=r"vision_feature_select_strategy must be 'default'.*got 'full'"):
            attach(model, "random", retention_ratio=0.5)
    finally:
        model.config.vision_feature_select_strategy = original


def test_attach_refuses_a_missing_ratio_and_a_negative_seed_and_warns_about_an_empty_budget(model):
    with pytest.raises(ValueError, match=r"compression method 'globalcom2' needs retention_ratio \(e\.g\."):
        attach(model, "globalcom2")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        attach(model, "random", retention_ratio=0.5, seed=-1)
    with pytest.warns(UserWarning, match=r"retention_ratio=1e-06 keeps floor\(R \* N\) = 0"):
        attach(model, "random", retention_ratio=1e-6).remove()


def test_loading_onto_a_device_this_machine_lacks_is_a_clear_error():
    from globalcom2.models.loader import load_llava_next

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=r"but this machine has"):
        load_llava_next("tiny", device=missing)
