"""The training recipe of ``tiny-trained``: its inputs are the model's own, its curriculum keeps what it
says, and a few steps on a handful of items lower the loss and write a checkpoint that loads."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import LlavaNextForConditionalGeneration

from globalcom2 import load_llava_next
from globalcom2.anyres import SEPARATOR
from globalcom2.data import demo
from globalcom2.models.tiny import tiny_processor
from globalcom2.models.tiny_trained import tiny_trained_config, train_tokenizer
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.training import train_tiny
from globalcom2.training.targets import NO_OBJECT, asked_shapes


@pytest.fixture(scope="module")
def recipe():
    tokenizer = train_tokenizer(train_tiny.demo_corpus())
    processor = tiny_processor(tokenizer)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_trained_config(tokenizer)).eval()
    return model, processor


@pytest.fixture(scope="module")
def cached(recipe):
    model, processor = recipe
    items = demo.generate_items("train", size=6)
    rng = np.random.default_rng(0)
    return items, train_tiny.cache_images(
        model, processor.image_processor, processor.tokenizer, items, 2, rng
    )


def test_the_tokenizer_makes_every_demo_word_one_token(recipe):
    tokenizer = recipe[1].tokenizer
    for word in [*demo.SHAPES, *demo.COLORS, "left", "right", "top", "bottom"]:
        assert len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) == 1, word
    text = "ünïcode, 12.5% <b>"  # anything still encodes and decodes exactly (ByteLevel)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_the_conversation_tokens_are_the_prompt_the_harness_sends(recipe, cached):
    model, processor = recipe
    items, images = cached
    item, image = items[0], images[0]
    conv = image.conversation
    text = vicuna_v1_prompt(item.question + demo.ANSWER_INSTRUCTION) + f" {item.answer}</s>"
    inputs = processor(images=[demo.render(item)], text=[text], return_tensors="pt")
    first_turn = (
        conv.prefix
        + [model.config.image_token_id] * image.view.numel()
        + conv.turns[: conv.first_turn_length]
    )
    assert inputs["input_ids"][0].tolist() == first_turn
    answer = [t for t in conv.turn_labels[: conv.first_turn_length] if t != train_tiny.IGNORE]
    assert processor.tokenizer.decode(answer) == f" {item.answer}</s>"


def test_grounding_targets_the_answer_at_the_question_s_shape_word(recipe, cached):
    tokenizer = recipe[1].tokenizer
    items, _ = cached
    item = items[0]
    extra = [("How many blue circles are there?", "3"), ("What color is the square?", "red")]
    plain = train_tiny.conversation(tokenizer, item, extra)
    grounded = train_tiny.conversation(tokenizer, item, extra, grounding=True)
    assert grounded.turns == plain.turns and grounded.first_answer == plain.first_answer
    added = [
        i for i, (a, b) in enumerate(zip(plain.turn_labels, grounded.turn_labels, strict=True)) if a != b
    ]
    assert len(added) == 3  # one per turn
    answers = [
        tokenizer(f" {a}", add_special_tokens=False)["input_ids"][0] for a in (item.answer, "3", "red")
    ]
    assert [grounded.turn_labels[i] for i in added] == answers
    words = [tokenizer.decode([grounded.turns[i - 1]]).strip() for i in added]  # predicted at position i - 1
    assert words[1:] == ["circles", "square"] and words[0].rstrip("s") in demo.SHAPES
    assert plain.turns[plain.first_answer] == answers[0]


def test_the_training_forward_is_the_model_forward(recipe, cached):
    """The cached-feature path (projector per token, separators = image_newline, explicit positions) gives
    the logits of ``model(**processor(...))`` on the same conversation."""
    model, processor = recipe
    items, images = cached
    item, image = items[1], images[1]
    conv = image.conversation
    text = processor.tokenizer.decode(conv.prefix[1:]) + "<image>" + processor.tokenizer.decode(conv.turns)
    inputs = processor(images=[demo.render(item)], text=[text], return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits[0]  # [L, vocab]
        captured = {}
        hook = model.lm_head.register_forward_hook(lambda m, a, out: captured.setdefault("logits", out))
        try:
            train_tiny.batch_loss(model, [image], np.random.default_rng(0))
        finally:
            hook.remove()
    ours = captured["logits"][0]
    assert ours.shape == reference.shape
    # The features are cached in float16: the only difference, far below the logits' scale.
    assert (ours - reference).abs().max() < 1e-3 * reference.abs().max()


def test_the_curriculum_keeps_the_asked_shapes_and_grows_to_everything(cached):
    items, images = cached
    item, image = items[0], images[0]
    rng = np.random.default_rng(0)
    asked = {k for question in image.conversation.questions for k in asked_shapes(item, question)}
    assert image.conversation.questions[0] == item.question and len(image.conversation.questions) == 3
    assert set(asked_shapes(item, item.question)) < asked  # every turn's shapes, not only the first's
    only_asked = train_tiny.curriculum_keep(image, 0.0, 0.0, rng)
    assert set(image.shape[only_asked].tolist()) == asked
    assert torch.equal(only_asked, torch.nonzero(image.asked).squeeze(1))
    shapes = train_tiny.curriculum_keep(image, 1.0, 0.0, rng)
    assert torch.equal(shapes, torch.nonzero(image.shape != NO_OBJECT).squeeze(1))
    assert (image.view[shapes] != SEPARATOR).all()
    assert torch.equal(train_tiny.curriculum_keep(image, 1.0, 1.0, rng), torch.arange(image.view.numel()))
    half = train_tiny.curriculum_keep(image, 1.0, 0.5, rng)
    assert (half.diff() > 0).all() and shapes.numel() < half.numel() < image.view.numel()


def test_a_sampled_background_token_weighs_as_the_tokens_it_stands_for(recipe):
    """One background token biased by log(3) is attended to exactly like three copies of it at one position:
    the identity :func:`train_tiny.sampled_background_bias` relies on, through the 4-D mask path. Exact for
    one layer (deeper, the copies attend to each other, which the estimate approximates)."""
    model, _ = recipe
    language = copy.deepcopy(model.model.language_model)
    language.layers = language.layers[:1]
    language.config.num_hidden_layers = 1
    torch.manual_seed(1)
    text, background = torch.randn(5, 128), torch.randn(1, 128)
    copies = torch.cat([text[:2], background.expand(3, -1), text[2:]])[None]  # [1, 8, D]
    copies_pos = torch.tensor([[0, 1, 2, 2, 2, 3, 4, 5]])
    single = torch.cat([text[:2], background, text[2:]])[None]  # [1, 6, D]
    single_pos = torch.tensor([[0, 1, 2, 3, 4, 5]])
    bias = train_tiny.sampled_background_bias(torch.tensor([False, False, True, False, False, False]), 1 / 3)
    assert bias.tolist() == pytest.approx([0, 0, np.log(3), 0, 0, 0])
    mask = train_tiny.additive_mask(torch.ones(1, 6, dtype=torch.long), [bias])
    with torch.no_grad():
        many = language(inputs_embeds=copies, position_ids=copies_pos).last_hidden_state[0, -3:]
        one = language(inputs_embeds=single, position_ids=single_pos, attention_mask=mask).last_hidden_state
        plain = language(inputs_embeds=single, position_ids=single_pos).last_hidden_state
    torch.testing.assert_close(one[0, -3:], many, rtol=1e-5, atol=1e-5)
    assert (plain[0, -3:] - many).abs().max() > 1e-3  # without the bias it is not the same


def test_the_mask_is_causal_and_padded_and_biased_only_when_background_is_sampled(recipe, cached):
    model, _ = recipe
    _, images = cached
    with torch.no_grad():
        plain, _ = train_tiny.batch_loss(model, images[:3], np.random.default_rng(5), 1.0, 0.0)
        sampled, _ = train_tiny.batch_loss(model, images[:3], np.random.default_rng(5), 1.0, 0.2)
        # keep_background = 1e-9 keeps no background and no bias: the plain path, same draws
        none, _ = train_tiny.batch_loss(model, images[:3], np.random.default_rng(5), 1.0, 1e-9)
    assert torch.equal(none, plain) and not torch.equal(sampled, plain)
    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mask = train_tiny.additive_mask(padding, [torch.zeros(3), torch.zeros(4)])
    allowed = mask[:, 0] == 0  # [B, L, L]
    expected = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None] & padding.bool()[:, None, :]
    assert torch.equal(allowed, expected)


def test_the_schedule_brings_distractors_back_then_background():
    cfg = OmegaConf.create({"curriculum": {"distractors_ramp": [0.2, 0.6], "keep_background_end": 0.3}})
    assert train_tiny.curriculum(0.1, cfg) == (0.0, 0.0)
    assert train_tiny.curriculum(0.4, cfg) == pytest.approx((0.5, 0.0))
    assert train_tiny.curriculum(0.8, cfg) == pytest.approx((1.0, 0.15))
    assert train_tiny.curriculum(0.5, OmegaConf.create({})) == (1.0, 1.0)
    assert train_tiny.curriculum(0.3, OmegaConf.create({"keep_background": 0.1})) == (1.0, 0.1)


def small_run(tmp_path, name: str, *extra: str) -> Path:
    overrides = [
        f"out={tmp_path / name}",
        f"vision.checkpoint={tmp_path / 'vision_stage'}",
        "threads=1",
        "data.train_items=14",
        "data.validation_items=6",
        "vision.images=24",
        "vision.images_per_batch=2",
        "vision.epochs=1",
        "vision.warmup_steps=1",
        "align.steps=12",
        "align.batch_size=4",
        "align.warmup_steps=1",
        "sampled.steps=2",
        "sampled.batch_size=2",
        "sampled.warmup_steps=1",
        "tune.steps=2",
        "tune.batch_size=2",
        "tune.warmup_steps=1",
        "report.every=1000",
        "report.progress_items=3",
        *extra,
    ]
    return train_tiny.train(train_tiny.load_config(train_tiny.DEFAULT_CONFIG, overrides))


@pytest.mark.slow
def test_a_few_steps_lower_the_loss_and_write_a_checkpoint_that_loads(tmp_path, capsys):
    out = small_run(tmp_path, "first")
    record = json.loads((out / "training_record.json").read_text())
    vision = [sum(step.values()) for step in record["vision"]["losses"]]
    align = [step["loss"] for step in record["align"]["losses"]]
    assert np.mean(vision[-3:]) < np.mean(vision[:3]) and np.mean(align[-3:]) < align[0]
    assert "reused_from" not in record["vision"] and "test" not in record
    assert (
        record["validation"]["overall"] >= 0
        and sum(record["validation"][qtype]["items"] for qtype in demo.QUESTION_TYPES) == 6
    )
    assert set(record["wall_seconds"]) >= {"vision", "align", "sampled", "tune", "validation"}
    assert "validation first-token accuracy" in capsys.readouterr().out
    model, processor = load_llava_next(str(out))
    assert (
        model.config.text_config.hidden_size == 128
        and len(processor.tokenizer) == model.config.text_config.vocab_size
    )

    # Stage 1 was saved; a second run reuses it and ends with the same weights, bit for bit.
    again = small_run(tmp_path, "second")
    reused = json.loads((again / "training_record.json").read_text())["vision"]
    assert (
        reused["reused_from"] == str(tmp_path / "vision_stage")
        and reused["losses"] == record["vision"]["losses"]
    )
    first, second = (load_file(str(folder / "model.safetensors")) for folder in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # Another stage-1 config is not served the saved tower.
    other = small_run(tmp_path, "third", "vision.lr=1.0e-3")
    assert "reused_from" not in json.loads((other / "training_record.json").read_text())["vision"]


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown config keys.*'vison'"):
        train_tiny.load_config(train_tiny.DEFAULT_CONFIG, ["vison.images=3"])


@pytest.mark.parametrize("override", ["vision.items=100", "tune.stepz=10", "vision.loss_weights.colour=2"])
def test_unknown_nested_config_keys_are_refused(override):
    """Only top-level keys were checked: ``vision.items=100`` (the CLI's own example) was accepted, did
    nothing, and changed stage 1's reuse key, so the 35-minute stage trained again in full."""
    with pytest.raises(ValueError, match=rf"unknown config keys \['{override.split('=')[0]}'\]; valid under"):
        train_tiny.load_config(train_tiny.DEFAULT_CONFIG, [override])
    assert (
        train_tiny.load_config(
            train_tiny.DEFAULT_CONFIG, ["vision.loss_weights.color=2"]
        ).vision.loss_weights.color
        == 2
    )


def test_the_cached_visual_sequence_is_what_the_model_feeds_its_llm(recipe, cached):
    """The training stages build the LLM's visual input from cached CLIP features instead of running the
    tower: it must be the packed sequence the model itself builds (projector, unpadding, ``image_newline``
    separators, in packed order), up to the fp16 the features are cached in."""
    model, processor = recipe
    items, images = cached
    item, image = items[0], images[0]
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"][0]  # [S, D_text]

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        inputs = processor(
            images=demo.render(item), text=vicuna_v1_prompt(item.question), return_tensors="pt"
        )
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    is_image = inputs["input_ids"][0] == model.config.image_token_id  # [S]
    expected = captured["embeds"][is_image]  # [N, D_text]
    with torch.no_grad():
        built = train_tiny.visual_sequence(model, image, torch.arange(image.view.numel()))  # [N, D_text]
    assert built.shape == expected.shape
    torch.testing.assert_close(built, expected, atol=2e-2, rtol=2e-2)  # the fp16 cache's rounding
    with torch.no_grad():  # the same features kept in fp32: the layout and the projection, exactly
        hidden = model.model.vision_tower(
            train_tiny.pixel_values_of(processor.image_processor, item), output_hidden_states=True
        ).hidden_states[model.config.vision_feature_layer]
        exact = dataclasses.replace(image, features=hidden[:, 1:])  # [V, 576, D_vision] without [CLS]
        rebuilt = train_tiny.visual_sequence(model, exact, torch.arange(image.view.numel()))
    torch.testing.assert_close(rebuilt, expected, atol=1e-5, rtol=1e-5)


def test_the_saved_vision_stage_is_keyed_by_what_it_depends_on_beyond_its_settings(monkeypatch):
    """The training heads draw their initial weights after the whole model is built, and the stage trains on
    the demo generator's images: a change to the language model's widths or vocabulary, or to the generator,
    left the key equal and served a stale tower."""
    from globalcom2.models.tiny_trained import tiny_trained_config, train_tokenizer

    cfg = train_tiny.load_config(train_tiny.DEFAULT_CONFIG, [])
    config = tiny_trained_config(train_tokenizer(["a red square"]))
    key = train_tiny.vision_stage_config(cfg, config)
    assert train_tiny.vision_stage_config(cfg, tiny_trained_config(train_tokenizer(["a red square"]))) == key
    wider = tiny_trained_config(train_tokenizer(["a red square"]))
    wider.text_config.vocab_size += 1
    assert train_tiny.vision_stage_config(cfg, wider) != key
    monkeypatch.setattr(train_tiny.demo, "generator_digest", lambda: "another")
    assert train_tiny.vision_stage_config(cfg, config) != key
    assert set(key["depends_on"]) == {"model_config", "demo_generator", "code", "torch", "transformers"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("report.every=0", r"report.every=0: must be an integer >= 1"),
        (
            "align.curriculum.distractors_ramp=[0.2,0.2]",
            r"distractors_ramp=\[0.2, 0.2\]: must be \[start, end\]",
        ),
        ("sampled.keep_background=0", r"sampled.keep_background=0: must be a number > 0 and <= 1"),
        ("data.extra_questions=-1", r"data.extra_questions=-1: must be an integer >= 0"),
        ("threads=1.5", r"threads=1.5: must be an integer >= 1"),
        ("vision.shapes_per_image=[31,20]", r"shapes_per_image=\[31, 20\]: must be \[low, high\]"),
    ],
)
def test_out_of_range_values_are_refused_before_any_training(override, message):
    """report.every=0 divided by zero after stage 1 and the image cache (minutes in); a ramp of zero width
    divided by zero in stage 2; keep_background=0 dropped the background without a word."""
    with pytest.raises(ValueError, match=message):
        train_tiny.load_config(train_tiny.DEFAULT_CONFIG, [override])
    train_tiny.load_config(train_tiny.DEFAULT_CONFIG, [])  # the committed recipe passes
