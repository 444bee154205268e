"""The synthetic demo benchmark: deterministic, balanced, answers consistent with the drawings."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from globalcom2.data import demo


@pytest.fixture(scope="module")
def items():
    return demo.generate_items("test")


def test_deterministic_and_prefix_stable(items):
    assert [i.signature() for i in demo.generate_items("test", size=30)] == [
        i.signature() for i in items[:30]
    ]
    assert demo.make_item(0, 17) == items[17]


def test_a_few_hundred_items_balanced_over_types_and_aspect_ratios(items):
    assert len(items) == 300
    assert Counter(i.question_type for i in items) == {t: 100 for t in demo.QUESTION_TYPES}
    sizes = Counter((i.width, i.height) for i in items)
    assert set(sizes) == set(demo.CANVASES) and set(sizes.values()) == {30}
    # the five llava-v1.6 AnyRes canvases (width x height) are all present
    assert {(672, 336), (336, 672), (672, 672), (1008, 336), (336, 1008)} <= set(sizes)


def test_answers_follow_from_the_shapes(items):
    for item in items:
        assert len({(s.x, s.y) for s in item.shapes}) == len(item.shapes)
        assert all(24 <= s.size <= 36 for s in item.shapes)
        target = item.question.split()
        if item.question_type == "color":
            kind = target[-1].rstrip("?")
            (match,) = [s for s in item.shapes if s.kind == kind]
            assert match.color == item.answer
        elif item.question_type == "count":
            color, kind = target[2], target[3][:-1]
            assert str(sum(s.color == color and s.kind == kind for s in item.shapes)) == item.answer
        else:
            color, kind = target[2], target[3]
            (match,) = [s for s in item.shapes if (s.color, s.kind) == (color, kind)]
            along = match.x / item.width if item.answer in {"left", "right"} else match.y / item.height
            assert along < 0.4 if item.answer in {"left", "top"} else along > 0.6


def test_the_train_split_is_disjoint_from_the_test_split(items):
    train = demo.generate_items("train", size=200)
    assert not {i.signature() for i in train} & {i.signature() for i in items}
    with pytest.raises(ValueError, match="seed other than the test seed"):
        demo.generate_items("train", seed=0, size=2)


def test_the_validation_split_is_disjoint_from_test_and_train(items):
    validation = demo.generate_items("validation", size=300)
    train = demo.generate_items("train")
    assert len({i.signature() for i in validation}) == 300
    assert not {i.signature() for i in validation} & (
        {i.signature() for i in train} | {i.signature() for i in items}
    )
    assert [i.question_type for i in validation[:3]] == list(demo.QUESTION_TYPES)
    for seed in (demo.DEFAULT_SEED["test"], demo.DEFAULT_SEED["train"]):
        with pytest.raises(ValueError, match="validation split needs a seed other than"):
            demo.generate_items("validation", seed=seed, size=2)


@pytest.mark.parametrize(("split", "seed"), [("test", 1), ("train", 3), ("efficiency", 0), ("test", 3)])
def test_no_split_is_drawn_with_another_splits_seed(split, seed):
    """``test`` had no guard at all (seed 1 gave the train split's items, 100 of 100) and ``train`` none
    against the validation seed."""
    with pytest.raises(ValueError, match=f"the {split} split needs a seed other than"):
        demo.generate_items(split, seed=seed, size=2)


def test_train_and_validation_skip_items_that_collide_with_the_splits_held_apart(monkeypatch):
    """Force collisions (the real seeds produce none in the first thousands of items, so a disjointness
    check on them alone cannot fail): every other train/validation draw is made to be a test item."""
    real = demo.make_item

    def colliding(seed, index, canvases=demo.CANVASES):
        if seed in (demo.DEFAULT_SEED["train"], demo.DEFAULT_SEED["validation"]) and index % 2 == 0:
            return real(demo.DEFAULT_SEED["test"], index // 2, canvases)
        return real(seed, index, canvases)

    monkeypatch.setattr(demo, "make_item", colliding)
    test = {item.signature() for item in demo.generate_items("test")}
    for split in ("train", "validation"):
        drawn = demo.generate_items(split, size=20)
        assert len(drawn) == 20 and not {item.signature() for item in drawn} & test


def test_an_excluded_item_is_skipped_not_returned():
    first, second, third = (demo.make_item(7, i) for i in range(3))
    kept = demo._items_not_in(7, 2, {second.signature()})
    assert [i.signature() for i in kept] == [first.signature(), third.signature()]


@pytest.mark.parametrize(
    ("answer", "normalized"), [("Three.", "3"), ("  RED ", "red"), ("the left", "left"), ("5", "5")]
)
def test_normalize_answer(answer, normalized):
    assert demo.normalize_answer(answer) == normalized


def test_rendering_draws_the_shape_colours(items):
    item = next(i for i in items if i.question_type == "color")
    pixels = np.asarray(demo.render(item))
    assert pixels.shape == (item.height, item.width, 3)
    for shape in item.shapes:
        assert tuple(pixels[shape.y, shape.x]) == demo.COLORS[shape.color]


def test_the_dataset_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOBALCOM2_CACHE", str(tmp_path))
    path = demo.ensure_demo_dataset("test", size=6)
    assert path.parent == tmp_path / "demo"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached split was built again")

    monkeypatch.setattr(demo, "build_dataset", no_rebuild)
    assert demo.ensure_demo_dataset("test", size=6) == path
    import datasets

    table = datasets.load_from_disk(str(path))["test"]
    assert table.column_names == [
        "id",
        "image",
        "question",
        "answer",
        "question_type",
        "image_width",
        "image_height",
    ]
    assert table[0]["image"].size == (table[0]["image_width"], table[0]["image_height"])


def test_an_edited_generator_never_reads_an_older_generators_cache(tmp_path, monkeypatch):
    """The cache used to be named by ``DEMO_VERSION`` alone: a change to the drawing or rendering code that
    forgot to bump it served the old images."""
    monkeypatch.setenv("GLOBALCOM2_CACHE", str(tmp_path))
    path = demo.ensure_demo_dataset("test", size=2)
    assert demo.generator_digest() in path.name
    monkeypatch.setattr(demo, "generator_digest", lambda: "0" * 12)
    assert demo.ensure_demo_dataset("test", size=2) != path
