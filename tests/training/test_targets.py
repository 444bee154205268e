"""The free supervision of the demo generator: per-patch object labels and extra questions."""

from __future__ import annotations

import numpy as np
import pytest

from globalcom2.anyres import config_layout
from globalcom2.data import demo
from globalcom2.models.tiny import byte_level_tokenizer, tiny_config, tiny_processor
from globalcom2.training.targets import NO_OBJECT, extra_questions, patch_targets, view_labels


@pytest.fixture(scope="module")
def image_processor():
    return tiny_processor(byte_level_tokenizer()).image_processor


@pytest.mark.parametrize("index", range(0, 30, 3))  # every canvas of the generator
def test_thumbnail_labels_sit_where_the_shapes_are(image_processor, index):
    item = demo.generate_items("test", size=30)[index]
    labels = view_labels(item, image_processor)
    layout = config_layout(tiny_config(byte_level_tokenizer()), (item.height, item.width))
    assert labels.obj.shape == (layout.num_views, 576)
    thumbnail = labels.obj[0].view(24, 24)
    for k, shape in enumerate(item.shapes):
        # The thumbnail squashes the image to 336 x 336: the centre pixel's patch shows shape k.
        row = int(shape.y * 336 / item.height) // 14
        col = int(shape.x * 336 / item.width) // 14
        neighbourhood = thumbnail[max(0, row - 1) : row + 2, max(0, col - 1) : col + 2]
        assert (neighbourhood == k).any(), (index, k, shape)
    # Nothing but the shapes is labelled: far fewer object patches than patches.
    assert 0 < int((labels.obj != NO_OBJECT).sum()) < 0.1 * labels.obj.numel()


def test_crop_labels_cover_every_shape_once_per_view_with_a_centre(image_processor):
    item = next(i for i in demo.generate_items("test", size=30) if (i.width, i.height) == (672, 672))
    labels = view_labels(item, image_processor)
    assert labels.obj.shape == (5, 576)  # thumbnail + 2x2 crops
    crops = labels.obj[1:]
    for k in range(len(item.shapes)):
        assert (crops == k).any()  # at native resolution every shape covers >= 20 px of some patch
        views_with_k = (crops == k).any(dim=1)
        centres = labels.centre[1:] & (crops == k)
        assert int(centres.sum()) <= int(views_with_k.sum())  # at most one centre per view showing it


def test_patch_targets_name_the_colour_and_kind_of_the_labelled_shape(image_processor):
    item = demo.generate_items("test", size=3)[0]
    labels = view_labels(item, image_processor)
    targets = patch_targets(item, labels)
    k = int(labels.obj[labels.obj != NO_OBJECT][0])
    where = labels.obj == k
    assert (targets["color"][where] == 1 + list(demo.COLORS).index(item.shapes[k].color)).all()
    assert (targets["kind"][where] == 1 + demo.SHAPES.index(item.shapes[k].kind)).all()
    assert (targets["color"][labels.obj == NO_OBJECT] == 0).all()
    assert targets["present"].shape == (labels.obj.shape[0], 18)
    assert targets["present"][0].sum() >= 1


def test_extra_questions_have_unique_answers_and_never_repeat_the_item(image_processor):
    items = demo.generate_items("train", size=60)
    rng = np.random.default_rng(0)
    seen_types = set()
    for item in items:
        combos = [(s.color, s.kind) for s in item.shapes]
        for question, answer in extra_questions(item, rng, limit=10):
            assert question != item.question
            if question.startswith("What color"):
                kind = question.removeprefix("What color is the ").removesuffix("?")
                assert [s.kind for s in item.shapes].count(kind) == 1
                assert answer == next(s.color for s in item.shapes if s.kind == kind)
                seen_types.add("color")
            elif question.startswith("How many"):
                color, kinds = question.split()[2:4]
                assert int(answer) == combos.count((color, kinds[:-1])) >= 1
                seen_types.add("count")
            else:
                color, kind = question.split()[2:4]
                assert combos.count((color, kind)) == 1
                shape = next(s for s in item.shapes if (s.color, s.kind) == (color, kind))
                fraction = shape.x / item.width if answer in ("left", "right") else shape.y / item.height
                assert fraction < 0.4 if answer in ("left", "top") else fraction > 0.6
                seen_types.add("position")
    assert seen_types == {"color", "count", "position"}
