"""What the demo generator knows and a trainer can use: which object each patch shows, and more questions.

The generator places every shape itself, so two kinds of supervision come for free:

* **Per-patch object labels for every view.** The object masks are painted with the drawing code of
  :func:`globalcom2.data.demo.render` and sent through the image processor's *own* AnyRes geometry
  (``get_image_patches``: best canvas, aspect-preserving resize, centred padding, 336-px crops, plus the
  squashed 336x336 thumbnail) with nearest-neighbour resampling, so a label lands on exactly the patch the
  model sees the shape in.
* **More questions about one image.** Every question the generator could have asked about a training
  image and whose answer is unique (the colour of the only triangle, the number of blue circles, the side
  of the only green square when it is clearly on one side), so one cached image trains several answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers.image_utils import PILImageResampling

from globalcom2.data.demo import COLORS, SHAPES, DemoItem, draw_shape

COLOR_NAMES = tuple(COLORS)
NO_OBJECT = -1
# A patch shows an object when the object covers at least this many of its 14 x 14 pixels (10 %).
MIN_COVERED_PIXELS = 20


def object_mask(item: DemoItem) -> np.ndarray:
    """``[H, W]`` uint8: 0 for background, ``k + 1`` where shape ``k`` is drawn (later shapes on top)."""
    mask = Image.new("L", (item.width, item.height), 0)
    draw = ImageDraw.Draw(mask)
    for k, shape in enumerate(item.shapes):
        draw_shape(draw, shape, k + 1)
    return np.asarray(mask)


@dataclass(frozen=True)
class ViewLabels:
    """Per-patch supervision of one image's views (thumbnail first, then crops row-major).

    Attributes:
        obj: ``[V, 576]`` int64, the index of the shape that covers most of the patch, or ``NO_OBJECT``.
        centre: ``[V, 576]`` bool, the one patch per (view, shape) that holds most of the shape's pixels.
    """

    obj: torch.Tensor
    centre: torch.Tensor


def view_labels(item: DemoItem, image_processor, patch_size: int = 14) -> ViewLabels:
    """Per-patch labels of ``item``'s views, through ``image_processor``'s AnyRes geometry."""
    mask = object_mask(item)
    channels_first = np.repeat(mask[None], 3, axis=0)  # the processor's resize expects an RGB array
    crop = image_processor.crop_size["height"]
    views = image_processor.get_image_patches(
        channels_first,
        image_processor.image_grid_pinpoints,
        size=(crop, crop),
        patch_size=crop,
        resample=PILImageResampling.NEAREST,
    )
    stack = torch.from_numpy(np.stack([v[0] for v in views]).astype(np.int64))  # [V, 336, 336]
    side = crop // patch_size
    num_objects = len(item.shapes)
    # [V, 24, 14, 24, 14] -> pixel counts per (view, patch, object): [V, 576, K]
    patches = stack.view(len(views), side, patch_size, side, patch_size).permute(0, 1, 3, 2, 4)
    patches = patches.reshape(len(views), side * side, patch_size * patch_size)
    counts = torch.stack([(patches == k + 1).sum(-1) for k in range(num_objects)], dim=-1)
    best_count, best = counts.max(dim=-1)  # [V, 576]
    obj = torch.where(best_count >= MIN_COVERED_PIXELS, best, torch.full_like(best, NO_OBJECT))
    centre = torch.zeros_like(obj, dtype=torch.bool)
    peak_count, peak_patch = counts.max(dim=1)  # [V, K]: the patch holding most of each shape
    view_index, shape_index = torch.nonzero(peak_count >= MIN_COVERED_PIXELS, as_tuple=True)
    centre[view_index, peak_patch[view_index, shape_index]] = True
    return ViewLabels(obj=obj, centre=centre)


def patch_targets(item: DemoItem, labels: ViewLabels) -> dict[str, torch.Tensor]:
    """Dense classification targets per patch: ``color`` (0 = none, 1..6), ``kind`` (0 = none, 1..3),
    ``centre`` (0/1), and the [CLS] target ``present`` (``[V, 18]`` multi-hot over (kind, colour))."""
    color_of = torch.tensor([1 + COLOR_NAMES.index(s.color) for s in item.shapes] + [0])
    kind_of = torch.tensor([1 + SHAPES.index(s.kind) for s in item.shapes] + [0])
    index = labels.obj.clone()
    index[index == NO_OBJECT] = len(item.shapes)  # the sentinel row: no object
    present = torch.zeros(labels.obj.shape[0], len(SHAPES) * len(COLOR_NAMES))
    for k, shape in enumerate(item.shapes):
        seen = (labels.obj == k).any(dim=1)  # [V]
        present[seen, SHAPES.index(shape.kind) * len(COLOR_NAMES) + COLOR_NAMES.index(shape.color)] = 1.0
    return {
        "color": color_of[index],
        "kind": kind_of[index],
        "centre": labels.centre.long(),
        "present": present,
    }


def asked_shapes(item: DemoItem, question: str) -> list[int]:
    """Indices of the shapes ``question`` (one of the generator's phrasings) is about."""
    words = question.rstrip("?").split()
    if question.startswith("What color is the "):
        return [k for k, s in enumerate(item.shapes) if s.kind == words[-1]]
    if question.startswith("How many "):
        color, kind = words[2], words[3].removesuffix("s")
    elif question.startswith("Is the "):
        color, kind = words[2], words[3]
    else:
        raise ValueError(f"not a demo question: {question!r}")
    return [k for k, s in enumerate(item.shapes) if (s.color, s.kind) == (color, kind)]


def extra_questions(item: DemoItem, rng: np.random.Generator, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` further (question, answer) pairs about ``item``'s image, each with a unique answer.

    The phrasing is the generator's (``demo.make_item``); the item's own question is excluded.
    """
    pairs: list[tuple[str, str]] = []
    kinds = [s.kind for s in item.shapes]
    combos = [(s.color, s.kind) for s in item.shapes]
    for kind in SHAPES:
        if kinds.count(kind) == 1:
            pairs.append((f"What color is the {kind}?", item.shapes[kinds.index(kind)].color))
    for color, kind in sorted(set(combos)):
        pairs.append((f"How many {color} {kind}s are there?", str(combos.count((color, kind)))))
    horizontal_only = item.width > item.height
    vertical_only = item.height > item.width
    for shape in item.shapes:
        if combos.count((shape.color, shape.kind)) != 1:
            continue
        fx, fy = shape.x / item.width, shape.y / item.height
        if not vertical_only and (fx < 0.4 or fx > 0.6):
            side = "left" if fx < 0.4 else "right"
            pairs.append(
                (f"Is the {shape.color} {shape.kind} on the left or the right side of the image?", side)
            )
        if not horizontal_only and (fy < 0.4 or fy > 0.6):
            side = "top" if fy < 0.4 else "bottom"
            pairs.append((f"Is the {shape.color} {shape.kind} at the top or the bottom of the image?", side))
    pairs = [p for p in pairs if p[0] != item.question]
    order = rng.permutation(len(pairs))[:limit]
    return [pairs[i] for i in order]
