"""The training recipe of ``tiny-trained``: its inputs are the model's own, its curriculum keeps what it
says, and a few steps on a handful of items lower the loss and write a checkpoint that loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
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
    asked = set(asked_shapes(item, item.question))
    only_asked = train_tiny.curriculum_keep(image, 0.0, 0.0, rng)
    assert set(image.shape[only_asked].tolist()) == asked
    assert torch.equal(only_asked, torch.nonzero(image.asked).squeeze(1))
    shapes = train_tiny.curriculum_keep(image, 1.0, 0.0, rng)
    assert torch.equal(shapes, torch.nonzero(image.shape != NO_OBJECT).squeeze(1))
    assert (image.view[shapes] != SEPARATOR).all()
    assert torch.equal(train_tiny.curriculum_keep(image, 1.0, 1.0, rng), torch.arange(image.view.numel()))
    half = train_tiny.curriculum_keep(image, 1.0, 0.5, rng)
    assert (half.diff() > 0).all() and shapes.numel() < half.numel() < image.view.numel()


def test_the_schedule_brings_distractors_back_then_background():
    cfg = OmegaConf.create({"curriculum": {"distractors_ramp": [0.2, 0.6], "keep_background_end": 0.3}})
    assert train_tiny.curriculum(0.1, cfg) == (0.0, 0.0)
    assert train_tiny.curriculum(0.4, cfg) == pytest.approx((0.5, 0.0))
    assert train_tiny.curriculum(0.8, cfg) == pytest.approx((1.0, 0.15))
    assert train_tiny.curriculum(0.5, OmegaConf.create({})) == (1.0, 1.0)


def test_a_few_steps_lower_the_loss_and_write_a_checkpoint_that_loads(tmp_path, capsys):
    overrides = [
        f"out={tmp_path / 'ckpt'}",
        "threads=1",
        "data.train_items=14",
        "data.heldout_items=4",
        "vision.images=24",
        "vision.images_per_batch=2",
        "vision.epochs=1",
        "vision.warmup_steps=1",
        "align.steps=12",
        "align.batch_size=4",
        "align.warmup_steps=1",
        "tune.steps=2",
        "tune.batch_size=2",
        "tune.warmup_steps=1",
        "report.every=1000",
        "report.test_items=3",
    ]
    out = train_tiny.train(train_tiny.load_config(train_tiny.DEFAULT_CONFIG, overrides))
    record = json.loads((out / "training_record.json").read_text())
    vision = [sum(step.values()) for step in record["vision"]["losses"]]
    align = [step["loss"] for step in record["align"]["losses"]]
    assert np.mean(vision[-3:]) < np.mean(vision[:3]) and np.mean(align[-3:]) < align[0]
    assert record["test"]["overall"] >= 0 and set(record["wall_seconds"]) >= {
        "vision",
        "align",
        "tune",
        "test",
    }
    assert "held-out first-token accuracy" in capsys.readouterr().out
    model, processor = load_llava_next(str(out))
    assert (
        model.config.text_config.hidden_size == 128
        and len(processor.tokenizer) == model.config.text_config.vocab_size
    )


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown config keys.*'vison'"):
        train_tiny.load_config(train_tiny.DEFAULT_CONFIG, ["vison.images=3"])
