"""The in-LLM attach point (FastV, SparseVLM) through forward and generate, on the tiny model."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from helpers import assert_batch_equals_single_runs, generate_steps, prompt_inputs, shortened_inputs
from transformers import LlavaNextForConditionalGeneration

from globalcom2 import attach
from globalcom2.anyres import packed_layout, unpad_rounding
from globalcom2.hooks.cache_keyword import CACHE_KEYWORD, output_cache
from globalcom2.methods.base import PreLLMMethod
from globalcom2.methods.direct import pre_llm_sources
from globalcom2.methods.sparsevlm import default_prune_layers
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.models.tiny import byte_level_tokenizer, tiny_config
from globalcom2.prompts import vicuna_v1_prompt

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

# A left-padded batch row and the sample alone, or cached and uncached decoding, run through different kernel
# paths: the unmodified tiny model itself differs by up to 1.7e-5 there (tests/hooks/test_pre_llm_attach.py).
# 1e-4 is the tolerance used for such comparisons across the project; generated tokens must match exactly.
PATH_ATOL = 1e-4
# Cached decoding against a full no-cache recompute. In float32 the *unmodified* tiny model already differs by
# up to 1.6e-5 between the two (measured), so these comparisons run the model in float64, where the same
# paths agree to float64 rounding: measured <= 5.3e-7, which is generate's float32 cast of the step logits.
CACHE_ATOL = 1e-5
EAGER_TEXT = {"text_config": "eager", "vision_config": "sdpa"}


@pytest.fixture(scope="module")
def eager_model():
    model, _ = load_tiny_llava_next(seed=0, attn_implementation=EAGER_TEXT)
    return model


@functools.cache
def float64_model(attention: str) -> LlavaNextForConditionalGeneration:
    implementation = EAGER_TEXT if attention == "eager" else "sdpa"
    model, _ = load_tiny_llava_next(seed=0, dtype=torch.float64, attn_implementation=implementation)
    return model


def float64_inputs(inputs):
    return {**inputs, "pixel_values": inputs["pixel_values"].double()}


def capture(method, name):
    """Wrap ``method.<name>`` so that every call's arguments and result are recorded (test-only)."""
    calls = []
    original = getattr(method, name)

    @functools.wraps(original)
    def wrapped(*args):
        result = original(*args)
        calls.append((args, result))
        return result

    setattr(method, name, wrapped)
    return calls


def visual_columns(model, inputs):
    return inputs["input_ids"][0] == model.config.image_token_id  # [L]


# --- identity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_ratio_one_is_bit_identical_through_generate_and_after_remove(model, processor, images, method):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=5)

    with attach(model, method, retention_ratio=1.0) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
        tokens, steps = generate_steps(model, inputs, steps=5)
        assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
        stats = handle.stats[-1]
        assert set(stats.visual_tokens_per_layer) == {int(visual_columns(model, inputs).sum())}

    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
    tokens, steps = generate_steps(model, inputs, steps=5)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)


# --- FastV: KV cache against a masked full recompute ------------------------------------------------------------


def masked_recompute_logits(model, inputs, new_tokens, dropped, first_layer):
    """Logits of every generated step from the *unmodified* model, without a cache: the whole sequence
    (prompt + tokens so far) is recomputed, and from ``first_layer`` on the dropped prompt columns are masked
    out (-inf), with every position unchanged. This is FastV's definition without any sequence surgery."""
    layers = model.model.language_model.layers
    eager = model.config.text_config._attn_implementation == "eager"

    def set_mask(length, module, args, kwargs):
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        allowed[:, : dropped.numel()] &= ~dropped
        mask = allowed[None, None]
        if eager:
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return args, {**kwargs, "attention_mask": mask}

    logits = []
    prompt = inputs["input_ids"]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    for step in range(new_tokens.shape[1]):
        ids = torch.cat([prompt, new_tokens[:, :step]], dim=1)
        hook = functools.partial(set_mask, ids.shape[1])
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[first_layer:]]
        try:
            with torch.no_grad():
                out = model(input_ids=ids, mm_encoder_outputs={"image": features}, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize(("attention", "size"), [("sdpa", (800, 600)), ("eager", (336, 336))])
def test_fastv_cached_generate_equals_masked_full_recompute(processor, images, attention, size):
    model = float64_model(
        attention
    )  # eager materialises [H, L, L] per layer: the smaller prompt keeps it fast
    inputs = float64_inputs(prompt_inputs(processor, images[size]))
    with attach(model, "fastv", retention_ratio=0.4, K=2) as handle:
        keeps = capture(handle.method, "keep")
        out = model.generate(
            **inputs,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        stats = handle.stats[-1]
    assert len(keeps) == 1, "FastV selects once, at prefill"
    (_, _, view), plan = keeps[0]
    dropped = (view.valid & view.visual & ~plan.keep)[0]  # [L] original prompt columns FastV dropped
    visual = visual_columns(model, inputs)
    assert int(dropped.sum()) == int(visual.sum()) - round(0.4 * int(visual.sum()))
    assert not bool((dropped & ~visual).any())

    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = out.sequences[:, prompt_length:]
    steps = torch.stack(out.logits)
    reference = masked_recompute_logits(model, inputs, new_tokens, dropped, first_layer=2)
    torch.testing.assert_close(steps, reference.float(), atol=CACHE_ATOL, rtol=0)
    # Negative control: masking from one layer later is a different model, and the comparison sees it.
    later = masked_recompute_logits(model, inputs, new_tokens[:, :1], dropped, first_layer=3)
    assert not torch.allclose(steps[:1], later.float(), atol=1e-3)

    # Layers >= K cached only the kept rows, and every layer one row per generated token (the last step's
    # token is not cached).
    cache = output_cache(out)
    kept = prompt_length - int(dropped.sum())
    lengths = [cache.get_seq_length(layer) for layer in range(4)]
    assert lengths == [prompt_length + 4] * 2 + [kept + 4] * 2
    assert stats.tokens_per_layer == (prompt_length, prompt_length, kept, kept)


# --- FastV: scores and counts -----------------------------------------------------------------------------------


def test_fastv_scores_equal_eager_attention_row(model, eager_model, processor, images):
    """FastV on the SDPA model rates tokens exactly as the eager model's own attention probabilities do."""
    inputs = prompt_inputs(processor, [images[(1008, 336)], images[(336, 336)]], "Compare the two images.")
    with torch.no_grad():
        eager = eager_model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1: [1, H, L, L]
    eager_row = eager[0, :, -1, :].mean(0)  # [L] the last token's head-averaged attention
    with attach(model, "fastv", retention_ratio=0.3, K=2) as handle:
        scores = capture(handle.method, "score")
        keeps = capture(handle.method, "keep")
        with torch.no_grad():
            model(**inputs)
    (_, attention, query_valid, _), result = scores[0]
    assert attention.shape[:2] == (1, 1) and bool(query_valid.all()), "one query row: the last prompt token"
    torch.testing.assert_close(result[0], eager_row, atol=1e-6, rtol=0)

    (_, _, view), plan = keeps[0]
    for image in range(2):
        columns = (view.image[0] == image).nonzero().squeeze(1)
        budget = round(0.3 * columns.numel())
        expected = columns[eager_row[columns].topk(budget).indices]
        assert set(plan.keep[0, columns].nonzero().squeeze(1).add(columns[0]).tolist()) == set(
            expected.tolist()
        )


@pytest.mark.parametrize("K", [1, 3])
def test_fastv_keeps_round_r_n_of_every_image_from_layer_k(model, processor, images, K):
    inputs = prompt_inputs(processor, [images[(1008, 336)], images[(336, 336)]], "Compare the two images.")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    per_image = [f.shape[0] for f in features]
    with attach(model, "fastv", retention_ratio=0.3, K=K) as handle:
        generate_steps(model, inputs, steps=3)
        assert len(handle.stats) == 1, "one prefill, one record"
        stats = handle.stats[0]
    visual, kept = sum(per_image), sum(round(0.3 * n) for n in per_image)
    length = inputs["input_ids"].shape[1]
    assert stats.visual_tokens_before == visual
    assert stats.visual_tokens_per_layer == (visual,) * K + (kept,) * (4 - K)
    assert stats.tokens_per_layer == (length,) * K + (length - visual + kept,) * (4 - K)
    assert stats.equivalent_visual_tokens == (K * visual + (4 - K) * kept) / 4
    assert (stats.score_layers, stats.score_query_tokens, stats.score_key_tokens) == (
        (K - 1,),
        (1,),
        (length,),
    )
    assert (stats.rater_candidates, stats.recycled_tokens, stats.equivalent_tokens_target) == (0, (0,), None)


# --- SparseVLM ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "convention"), [(0.3, "layer_input"), (0.6, "layer_input"), (0.25, "layer_output")]
)
def test_sparsevlm_counts_follow_its_schedule(model, processor, images, ratio, convention):
    inputs = prompt_inputs(processor, images[(800, 600)])
    visual = int(visual_columns(model, inputs).sum())
    with (
        attach(model, "sparsevlm", retention_ratio=ratio, equivalent_tokens=convention) as handle,
        torch.no_grad(),
    ):
        model(**inputs)
        stats = handle.stats[-1]
        budgets = handle.method.budgets(visual, 4)
    assert stats.score_layers == default_prune_layers(4) == (0, 1, 2)
    assert stats.visual_tokens_per_layer == (visual, *(b.after for b in budgets))
    assert stats.recycled_tokens == tuple(b.recycled for b in budgets)
    present = [visual, *(b.after for b in budgets)]
    dropped = [before - b.kept for before, b in zip(present, budgets, strict=False)]
    assert stats.recycle_candidates == tuple(int(0.3 * d) + 1 for d in dropped)
    assert all(b.kept < before for before, b in zip(present, budgets, strict=False)), "every stage prunes"
    assert stats.equivalent_tokens_target == ratio * visual
    average = (
        stats.equivalent_visual_tokens
        if convention == "layer_input"
        else stats.equivalent_visual_tokens_after_layer
    )
    assert abs(average - ratio * visual) <= 1.0
    assert stats.score_query_tokens[0] == stats.score_query_tokens[-1] > 0, (
        "the same raters rate at every stage"
    )
    assert 0 < stats.score_query_tokens[0] < stats.rater_candidates


def test_sparsevlm_budgets_every_image_of_a_prompt(model, processor, images):
    inputs = prompt_inputs(processor, [images[(1008, 336)], images[(336, 336)]], "Compare the two images.")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    per_image = [f.shape[0] for f in features]
    with attach(model, "sparsevlm", retention_ratio=0.4) as handle:
        generate_steps(model, inputs, steps=2)
        stats = handle.stats[-1]
        budgets = [handle.method.budgets(n, 4) for n in per_image]
    expected = tuple(sum(b[stage].after for b in budgets) for stage in range(3))
    assert stats.visual_tokens_per_layer == (sum(per_image), *expected)
    assert stats.recycled_tokens == tuple(sum(b[stage].recycled for b in budgets) for stage in range(3))
    assert stats.equivalent_tokens_target == pytest.approx(0.4 * sum(per_image))
    # the default is SparseVLM's own convention: the average of the tokens leaving each layer
    assert (
        abs(stats.equivalent_visual_tokens_after_layer - 0.4 * sum(per_image)) <= 2.0
    )  # one token per image


@pytest.fixture(scope="module")
def deep_model():
    """The tiny model with a 32-layer language model, so SparseVLM's official layers [2, 6, 15] apply."""
    config = tiny_config(byte_level_tokenizer())
    config.text_config.num_hidden_layers = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def test_sparsevlm_uses_the_official_layers_on_a_32_layer_model(deep_model, processor, images):
    inputs = prompt_inputs(processor, images[(336, 336)])
    visual = int(visual_columns(deep_model, inputs).sum())
    with attach(deep_model, "sparsevlm", retention_ratio=0.25) as handle, torch.no_grad():
        deep_model(**inputs)
        stats = handle.stats[-1]
        budgets = handle.method.budgets(visual, 32)
    assert stats.score_layers == (2, 6, 15)
    spans = [(0, 3, visual), *zip((3, 7, 16), (7, 16, 32), (b.after for b in budgets), strict=True)]
    assert stats.visual_tokens_per_layer == tuple(count for lo, hi, count in spans for _ in range(lo, hi))
    assert abs(stats.equivalent_visual_tokens_after_layer - 0.25 * visual) <= 1.0


def test_sparsevlm_cached_decode_equals_no_cache_recompute(processor, images):
    """Decode steps (per-stage masks, renumbered positions, pruned caches) against one full forward per step.

    Without a cache every step is a prefill of prompt + generated tokens; with the raters frozen to the
    prompt's (as at the cached prefill) it makes the same choices, since prompt rows never see later tokens.
    """
    model = float64_model("sdpa")
    inputs = float64_inputs(prompt_inputs(processor, images[(336, 336)]))
    prompt_length = inputs["input_ids"].shape[1]
    with attach(model, "sparsevlm", retention_ratio=0.5) as handle:
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=[model.config.image_token_id],  # see helpers.generate_steps
        )
        new_tokens = out.sequences[:, prompt_length:]
        choose_raters = handle.method.select_queries

        def prompt_raters(view):
            columns = torch.arange(view.valid.shape[1])
            return choose_raters(dataclasses.replace(view, valid=view.valid & (columns < prompt_length)))

        handle.method.select_queries = prompt_raters
        with torch.no_grad():
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            reference = [
                model(
                    input_ids=torch.cat([inputs["input_ids"], new_tokens[:, :step]], dim=1),
                    mm_encoder_outputs={"image": features},
                    use_cache=False,
                ).logits[:, -1]
                for step in range(4)
            ]
    torch.testing.assert_close(
        torch.stack(out.logits), torch.stack(reference).float(), atol=CACHE_ATOL, rtol=0
    )
    stats = handle.stats[0]
    lengths = [output_cache(out).get_seq_length(layer) for layer in range(4)]
    assert lengths == [count + 3 for count in stats.tokens_per_layer]


# --- batches, composition, generation modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "attention"),
    [
        ("fastv", {"retention_ratio": 0.3}, "sdpa"),
        ("fastv", {"retention_ratio": 0.3}, "eager"),
        ("sparsevlm", {"retention_ratio": 0.5}, "sdpa"),
        ("sparsevlm", {"retention_ratio": 0.5}, "eager"),
    ],
)
def test_left_padded_batch_rows_equal_single_runs(
    model, eager_model, processor, images, method, params, attention
):
    model = eager_model if attention == "eager" else model
    batch_images = [images[(336, 336)], images[(1008, 336)], images[(800, 600)]]
    questions = ["What is it?", "Describe the left side of the picture.", "Colour?"]
    if attention == "eager":  # eager materialises [B, H, L, L]: two rows are enough there
        batch_images, questions = batch_images[:2], questions[:2]
    texts = [vicuna_v1_prompt(q) for q in questions]
    batch = processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch must be left-padded"

    with attach(model, method, **params) as handle:
        tokens, steps = generate_steps(model, batch, steps=4)
        batch_stats = handle.stats[:]
        assert len(batch_stats) == len(texts)
        assert len({s.visual_tokens_per_layer[-1] for s in batch_stats}) == len(texts), "ragged keep counts"
        for row, (image, text) in enumerate(zip(batch_images, texts, strict=True)):
            alone = processor(images=image, text=text, return_tensors="pt")
            row_tokens, row_steps = generate_steps(model, alone, steps=4)
            torch.testing.assert_close(steps[:, row : row + 1], row_steps, atol=PATH_ATOL, rtol=0)
            assert torch.equal(tokens[row : row + 1], row_tokens)
            alone_stats = handle.stats[-1]
            assert alone_stats.visual_tokens_per_layer == batch_stats[row].visual_tokens_per_layer
            assert alone_stats.tokens_per_layer == batch_stats[row].tokens_per_layer


def test_composition_with_a_pre_llm_method(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    vanilla_tokens, vanilla_steps = generate_steps(model, inputs, steps=4)
    random = attach(model, "random", retention_ratio=0.5)
    random_tokens, random_steps = generate_steps(model, inputs, steps=4)
    sources = pre_llm_sources(model, random.method, inputs)

    fastv = attach(model, "fastv", retention_ratio=0.5)
    tokens, steps = generate_steps(model, inputs, steps=4)
    image_stats, layer_stats = random.stats[-1], fastv.stats[-1]
    kept = image_stats.tokens_after
    assert layer_stats.visual_tokens_before == kept
    assert layer_stats.visual_tokens_per_layer == (kept, kept, round(0.5 * kept), round(0.5 * kept))
    assert not torch.allclose(steps, random_steps, atol=1e-3)
    # The pair is FastV applied to the prompt the pre-LLM method produced.
    random.remove()
    short_tokens, short_steps = generate_steps(model, shortened_inputs(model, inputs, sources), steps=4)
    assert torch.equal(short_steps, steps) and torch.equal(short_tokens, tokens)

    fastv.remove()
    restored_tokens, restored_steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(restored_steps, vanilla_steps) and torch.equal(restored_tokens, vanilla_tokens)

    # SparseVLM attached first, the pre-LLM method second: again the in-LLM method on the shortened prompt,
    # and removing them in the other order restores each stage exactly.
    sparsevlm = attach(model, "sparsevlm", retention_ratio=0.5)
    random = attach(model, "random", retention_ratio=0.5)
    tokens, steps = generate_steps(model, inputs, steps=4)
    assert sparsevlm.stats[-1].visual_tokens_before == random.stats[-1].tokens_after
    random.remove()
    short_tokens, short_steps = generate_steps(model, shortened_inputs(model, inputs, sources), steps=4)
    assert torch.equal(short_steps, steps) and torch.equal(short_tokens, tokens)
    random = attach(model, "random", retention_ratio=0.5)
    sparsevlm.remove()
    again_tokens, again_steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(again_steps, random_steps) and torch.equal(again_tokens, random_tokens)
    random.remove()


def test_generate_without_cache_reselects_at_every_step(model, processor, images):
    """Without a KV cache every step is a new prefill, so FastV re-ranks with the newest token (FastV #13)."""
    inputs = prompt_inputs(processor, images[(336, 336)])
    with attach(model, "fastv", retention_ratio=0.5) as handle:
        generate_steps(model, inputs, steps=3, use_cache=False)
        assert [s.tokens_per_layer[0] for s in handle.stats] == [
            inputs["input_ids"].shape[1] + t for t in range(3)
        ]


def test_beam_search_runs_and_rates_every_beam_alike(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with attach(model, "sparsevlm", retention_ratio=0.5) as handle:
        out = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
        assert out.shape[0] == 2
        assert len({s.visual_tokens_per_layer for s in handle.stats}) == 1 and len(handle.stats) == 3


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "error", "pattern"),
    [
        ("fastv", {"retention_ratio": 0.5, "K": 0}, ValueError, r"K must be in \[1, num_layers\).*got 0"),
        (
            "fastv",
            {"retention_ratio": 0.5, "K": 4},
            ValueError,
            r"K must be in \[1, 4\) .*4 decoder layers.*got 4",
        ),
        ("fastv", {"retention_ratio": 0.5, "K": 2.0}, TypeError, r"K must be an int.*got 2\.0"),
        ("fastv", {"retention_ratio": 0}, ValueError, r"retention_ratio must be in \(0, 1\].*got 0"),
        ("fastv", {"retention_ratio": 1.01}, ValueError, r"retention_ratio must be in \(0, 1\].*got 1\.01"),
        (
            "fastv",
            {"retention_ratio": 0.5, "k": 2},
            ValueError,
            r"does not take 'k'.*Accepted parameters: .*K",
        ),
        (
            "sparsevlm",
            {"retention_ratio": -0.5},
            ValueError,
            r"retention_ratio must be in \(0, 1\].*got -0\.5",
        ),
        (
            "sparsevlm",
            {"retention_ratio": 0.5, "prune_layers": (2, 6, 15)},
            ValueError,
            r"prune_layers must lie in \[0, 3\) .*4 decoder layers.*got \[2, 6, 15\]",
        ),
        (
            "sparsevlm",
            {"retention_ratio": 0.5, "prune_layers": (1, 0)},
            ValueError,
            r"strictly increasing, got \[1, 0\]",
        ),
        (
            "sparsevlm",
            {"retention_ratio": 0.5, "prune_layers": (1, 1)},
            ValueError,
            r"strictly increasing, got \[1, 1\]",
        ),
        (
            "sparsevlm",
            {"retention_ratio": 0.5, "prune_layers": (-1, 2)},
            ValueError,
            r"must be >= 0, got \[-1, 2\]",
        ),
        ("sparsevlm", {"retention_ratio": 0.5, "prune_layers": ()}, ValueError, r"non-empty.*got \[\]"),
        ("sparsevlm", {"retention_ratio": 0.5, "prune_layers": "2,6"}, TypeError, r"sequence of ints.*'2,6'"),
        (
            "sparsevlm",
            {"retention_ratio": 0.2, "equivalent_tokens": "layer_input"},
            ValueError,
            r"retention_ratio=0.2 cannot be reached .*prune_layers=\[0, 1, 2\] on 4 decoder layers.*> 0\.250",
        ),
        (
            "sparsevlm",
            {"retention_ratio": 0.5, "equivalent_tokens": "mean"},
            ValueError,
            r"'layer_input' or 'layer_output', got 'mean'",
        ),
    ],
)
def test_bad_parameters_name_the_value_and_the_range(model, method, params, error, pattern):
    with pytest.raises(error, match=pattern):
        attach(model, method, **params)
    assert type(model.model).__name__ == "LlavaNextModel"


def test_unsupported_attention_implementation_is_refused(model):
    config = model.model.language_model.config
    original = config._attn_implementation
    config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(NotImplementedError, match=r"\('sdpa', 'eager'\).*'flex_attention'"):
            attach(model, "fastv", retention_ratio=0.5)
    finally:
        config._attn_implementation = original
    assert type(model.model).__name__ == "LlavaNextModel"


def test_second_in_llm_method_is_refused(model):
    with (
        attach(model, "fastv", retention_ratio=0.5),
        pytest.raises(RuntimeError, match=r"'fastv'.*already attached"),
    ):
        attach(model, "sparsevlm", retention_ratio=0.5)


# --- budget basis "patches" (protocol=llava): R of the patch tokens, every row separator kept ----------------------


def layouts_of(model, inputs):
    config = model.config
    return [
        packed_layout(size, config.image_grid_pinpoints, rounding=unpad_rounding(config))
        for size in inputs["image_sizes"]
    ]


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_patches_basis_at_ratio_one_is_bit_identical(model, processor, images, method):
    inputs = prompt_inputs(processor, images[(800, 600)])
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=4)
    with attach(model, method, retention_ratio=1.0, budget_basis="patches"):
        tokens, steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)


def test_fastv_patches_basis_keeps_round_r_patches_and_every_separator(model, processor, images):
    inputs = prompt_inputs(processor, [images[(1008, 336)], images[(800, 600)]], "Compare the two images.")
    layouts = layouts_of(model, inputs)
    patches = [layout.num_patches for layout in layouts]
    separators = sum(layout.num_separators for layout in layouts)
    visual = sum(layout.num_tokens for layout in layouts)
    assert visual == int(visual_columns(model, inputs).sum()) and separators > 0
    with attach(model, "fastv", retention_ratio=0.3, K=2, budget_basis="patches") as handle:
        keep_calls = capture(handle.method, "keep")
        generate_steps(model, inputs, steps=2)
        stats = handle.stats[0]
    kept = sum(round(0.3 * n) for n in patches) + separators
    assert stats.visual_tokens_per_layer == (visual, visual, kept, kept)
    # every separator is protected at the stage: no candidate (the kept count above has them all)
    (_, _, view), plan = keep_calls[0]
    separator_rows = view.protected
    assert int(separator_rows.sum()) == separators
    assert not bool((plan.keep[separator_rows]).any())
    assert list(view.budget_tokens) == patches
    # the same ratio on the default basis counts separators as candidates and keeps fewer patches
    with attach(model, "fastv", retention_ratio=0.3, K=2) as handle:
        generate_steps(model, inputs, steps=2)
        positions_stats = handle.stats[0]
    per_image = [layout.num_tokens for layout in layouts]
    assert positions_stats.visual_tokens_per_layer[2] == sum(round(0.3 * n) for n in per_image) != kept


def test_sparsevlm_patches_basis_targets_r_patches_plus_separators(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    (layout,) = layouts_of(model, inputs)
    with attach(model, "sparsevlm", retention_ratio=0.4, budget_basis="patches") as handle, torch.no_grad():
        keep_calls = capture(handle.method, "keep")
        model(**inputs)
        stats = handle.stats[-1]
        budgets = handle.method.budgets(layout.num_patches, 4)
    separators = layout.num_separators
    assert stats.visual_tokens_per_layer == (layout.num_tokens, *(b.after + separators for b in budgets))
    assert stats.equivalent_tokens_target == pytest.approx(0.4 * layout.num_patches + separators)
    assert abs(stats.equivalent_visual_tokens_after_layer - stats.equivalent_tokens_target) <= 1.0
    for (_, _, view), plan in keep_calls:
        assert int(view.protected.sum()) == separators, "separators stay through every stage"
        assert not bool(plan.keep[view.protected].any()), "separators are never candidates"
        assert sum(plan.merged.count) > 0


def test_patches_basis_after_a_pre_llm_method_counts_the_patches_it_kept(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with attach(model, "random", retention_ratio=0.5) as random:
        with attach(model, "fastv", retention_ratio=0.5, budget_basis="patches") as fastv, torch.no_grad():
            model(**inputs)
        image_stats, layer_stats = random.stats[-1], fastv.stats[-1]
    assert image_stats.separators_kept > 0
    assert layer_stats.visual_tokens_before == image_stats.tokens_after
    expected = round(0.5 * image_stats.patch_tokens_kept) + image_stats.separators_kept
    assert layer_stats.visual_tokens_per_layer == (image_stats.tokens_after,) * 2 + (expected,) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separators_are_found_per_row_in_a_mixed_batch(processor, images, dtype):
    """Rows with different grids, a row with two images and a text-only row; in bf16 too, where the
    separator rows are the image_newline vector cast to bf16."""
    model = model_in(dtype)
    rows = [[images[(1008, 336)]], [images[(800, 600)], images[(336, 336)]], []]
    text = [vicuna_v1_prompt("Describe it.", num_images=len(r)) for r in rows]
    inputs = processor(images=[i for r in rows for i in r], text=text, return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    expected = [
        sum(layout.num_separators for layout in layouts_of(model, {"image_sizes": sizes}))
        for sizes in (inputs["image_sizes"][:1], inputs["image_sizes"][1:3], inputs["image_sizes"][:0])
    ]
    with attach(model, "fastv", retention_ratio=0.5, budget_basis="patches") as handle, torch.no_grad():
        keep_calls = capture(handle.method, "keep")
        model(**inputs)
    (_, _, view), plan = keep_calls[0]
    assert view.protected.sum(1).tolist() == expected and expected[2] == 0 < min(expected[:2])
    assert not bool(plan.keep[view.protected].any())
    assert list(view.budget_tokens) == [
        layout.num_patches for layout in layouts_of(model, {"image_sizes": inputs["image_sizes"]})
    ]


@functools.cache
def model_in(dtype: torch.dtype) -> LlavaNextForConditionalGeneration:
    model, _ = load_tiny_llava_next(seed=0, dtype=dtype)
    return model


def test_an_image_a_pre_llm_method_empties_still_gets_its_batch_row(model, processor, images):
    """A pre-LLM method may keep no token of an image (a custom one can; the built-in ones keep the
    separators): the in-LLM stage then assigns that image to a batch row from the host counts alone."""

    class DropSmall(PreLLMMethod):
        name = "drop_small"

        def select(self, features, ctx):  # every token of a 336x336 image goes, the others stay whole
            return torch.zeros(0, dtype=torch.long) if ctx.layout.image_size == (336, 336) else None

        def separators_kept(self, layout, source):
            return 0

    processor.tokenizer.padding_side = "left"
    rows = [[images[(800, 600)], images[(336, 336)]], []]
    text = [vicuna_v1_prompt("Describe it.", num_images=len(r)) for r in rows]
    batch = processor(images=[i for r in rows for i in r], text=text, return_tensors="pt", padding=True)
    with attach(model, DropSmall(retention_ratio=0.5)), attach(model, "fastv", retention_ratio=0.5) as fastv:
        with torch.no_grad():
            model(**batch)
        first, text_only = fastv.stats[-2:]
    assert first.visual_tokens_before > 0 and text_only.visual_tokens_before == 0
    # The emptied image ends the first row: it is that row's, not the text-only row's. SparseVLM rates each
    # image by its own row's text, so it refused this batch ("row(s) [1] end with their image") and a
    # batch row's answer differed from its prompt alone.
    with attach(model, DropSmall(retention_ratio=0.5)), attach(model, "sparsevlm", retention_ratio=0.5):
        assert_batch_equals_single_runs(model, processor, rows, text, steps=3)


def test_a_zero_in_the_generated_part_of_the_mask_is_refused_not_ignored(model, processor, images):
    """Without padding the pruned layers use the fast path (no mask), which holds for generate's masks (ones
    after the prompt); a caller's zero there would be ignored by those layers, so it is refused."""
    from transformers import DynamicCache

    inputs = prompt_inputs(processor, images[(800, 600)])
    length = inputs["input_ids"].shape[1]
    with attach(model, "fastv", retention_ratio=0.5), torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        model(**inputs, **{CACHE_KEYWORD: cache}, use_cache=True)
        step = {CACHE_KEYWORD: cache, "use_cache": True}
        model(
            input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long), **step
        )
        mask = torch.ones(1, length + 2, dtype=torch.long)
        mask[0, length] = 0
        with pytest.raises(RuntimeError, match="generated part of the attention mask to be all ones"):
            model(input_ids=torch.tensor([[7]]), attention_mask=mask, **step)


@pytest.mark.parametrize("mode", ["prompt_lookup_num_tokens", "prefill_chunk_size"])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_assisted_decoding_and_chunked_prefill_are_refused_not_silently_different(
    model, processor, images, method, mode
):
    """An in-LLM method chooses its tokens at the prefill by the prompt's last row: a prefill holding a
    speculative token (prompt lookup) or only part of the prompt (chunked prefill, the images in its first
    chunk) chose them on the wrong rows and changed the answer from the first token, with no word. A
    multi-token step after such a prefill is refused."""
    inputs = processor(images=images[(800, 600)], text=vicuna_v1_prompt("What? " * 20), return_tensors="pt")
    image_token = model.config.image_token_id
    last_image_row = int((inputs["input_ids"][0] == image_token).nonzero().max())
    option = {"prompt_lookup_num_tokens": 4, "prefill_chunk_size": last_image_row + 5}[mode]
    settings = {"do_sample": False, "suppress_tokens": [image_token]}
    with attach(model, method, retention_ratio=0.25), torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, **settings)  # plain greedy decoding runs
        with pytest.raises(NotImplementedError, match="support neither chunked prefill"):
            model.generate(**inputs, max_new_tokens=12, **settings, **{mode: option})
