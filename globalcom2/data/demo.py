"""The synthetic demo benchmark: small shapes in high-resolution images, short exact answers.

Every item is one image at an AnyRes-relevant size (the five llava-v1.6 canvases and letterboxed sizes
between them) on a lightly textured background, with a few small circles, squares and triangles
(24-36 px, about 2 x 2 CLIP patches in a crop; 8-12 px, under one patch, across the 336 px thumbnail of a
1008 px image). Three question types, in equal numbers:

* ``color``: "What color is the triangle?" (exactly one triangle) -> ``red``;
* ``count``: "How many blue circles are there?" -> ``3`` (1 to 5);
* ``position``: "Is the green square on the left or the right side of the image?" -> ``left``
  (top/bottom for tall images; the target is never in the middle fifth).

So the answer depends on small local details that the crops resolve and the thumbnail barely does,
which is what visual-token compression trades away. Answers are one word or one number, scored by exact
match after :func:`normalize_answer`.

Determinism: item ``i`` of a split depends only on ``(seed, i)``, so any prefix of a split is the same
whatever its size. The ``test`` split (seed 0, 300 items) is the default ``make demo`` evaluates.
``train`` uses another seed (1) and never contains an item whose layout equals a test item's, so a
model can be fine-tuned on it. ``validation`` (seed 3, 300 items) is the split a training recipe is judged
by: it never contains an item whose content equals a ``test`` item's or one of the first
``DEFAULT_SIZE["train"]`` ``train`` items' (a trainer that uses more train items checks the rest itself).
``efficiency`` (seed 2, 30 items) has only 672x672 images, 2928 visual
tokens each, for the efficiency benchmark. No split may be drawn with another split's default seed.
Generation takes a few seconds and is cached under ``$GLOBALCOM2_CACHE/demo`` (default
``~/.cache/globalcom2/demo``), in a folder named by the split, seed, size and a digest of this module's
source (:func:`generator_digest`), so an edited generator never reads an older one's images.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from globalcom2.atomic import staged_folder
from globalcom2.paths import cache_dir

# 2: shapes 24-36 px (were 12-21): at 12-21 px a 14-px-patch CLIP tower as small as the tiny model's did not
# learn to tell a circle from a square within the CPU training budget, so no model could.
DEMO_VERSION = 2
DEFAULT_SEED = {"test": 0, "train": 1, "efficiency": 2, "validation": 3}
DEFAULT_SIZE = {"test": 300, "train": 3000, "efficiency": 30, "validation": 300}
# The efficiency benchmark (GlobalCom² Tables 8/9 protocol) uses one canvas only: 672x672 = 2x2 crops,
# 2928 visual tokens, the maximum of llava-v1.6, so every sample costs the same.
EFFICIENCY_CANVAS = (672, 672)
# (width, height): the five llava-v1.6 AnyRes canvases, then letterboxed sizes between them.
CANVASES = (
    (672, 336), (336, 672), (672, 672), (1008, 336), (336, 1008),
    (800, 600), (600, 800), (900, 400), (400, 900), (560, 420),
)  # fmt: skip
COLORS = {
    "red": (215, 38, 38),
    "green": (34, 160, 64),
    "blue": (40, 84, 220),
    "yellow": (238, 200, 24),
    "purple": (136, 58, 190),
    "orange": (245, 128, 24),
}
SHAPES = ("circle", "square", "triangle")
# The instruction tasks/demo/globalcom2_demo.yaml appends to every question (its ``post_prompt``); the
# training recipe (globalcom2.training) builds its prompts with it, so training and evaluation agree.
ANSWER_INSTRUCTION = "\nAnswer the question using a single word or number."
QUESTION_TYPES = ("color", "count", "position")
SHAPE_SIZES = (24, 37)  # [low, high) in pixels
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: int  # centre
    y: int
    size: int


@dataclass(frozen=True)
class DemoItem:
    """One question: the drawing instructions and the expected answer (the image is rendered from them)."""

    index: int
    width: int
    height: int
    background: int
    question_type: str
    question: str
    answer: str
    shapes: tuple[Shape, ...]

    def signature(self) -> str:
        """Identity of the content (not the index): equal signatures mean equal images and questions."""
        content = asdict(self)
        content.pop("index")
        return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, number words -> digits: ``"Three."`` -> ``"3"``."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words if w not in {"a", "an", "the"}]
    return " ".join(words)


def _place(rng: np.random.Generator, width: int, height: int, size: int, taken: list[Shape], region=None):
    """A centre for a shape of ``size`` that keeps clear of ``taken`` (within ``region`` if given)."""
    x0, y0, x1, y1 = region or (0, 0, width, height)
    margin = size // 2 + 4
    for _ in range(200):
        x = int(rng.integers(max(x0, margin), min(x1, width - margin)))
        y = int(rng.integers(max(y0, margin), min(y1, height - margin)))
        if all(
            abs(x - s.x) > (size + s.size) // 2 + 6 or abs(y - s.y) > (size + s.size) // 2 + 6 for s in taken
        ):
            return x, y
    raise RuntimeError("could not place a shape without overlap")  # pragma: no cover (sizes leave room)


def make_item(seed: int, index: int, canvases: tuple[tuple[int, int], ...] = CANVASES) -> DemoItem:
    """Item ``index`` of the split drawn with ``seed`` (a pure function of both and of ``canvases``)."""
    rng = np.random.default_rng([seed, index, DEMO_VERSION])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    width, height = canvases[(index // len(QUESTION_TYPES)) % len(canvases)]
    color = str(rng.choice(list(COLORS)))
    kind = str(rng.choice(SHAPES))
    shapes: list[Shape] = []

    def add(k: str, c: str, region=None) -> None:
        size = int(rng.integers(*SHAPE_SIZES))
        x, y = _place(rng, width, height, size, shapes, region)
        shapes.append(Shape(k, c, x, y, size))

    def add_distractors(count: int) -> None:
        """``count`` shapes that never repeat the asked (kind, color), so the answer stays unique."""
        for _ in range(count):
            while True:
                k, c = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
                if (k, c) != (kind, color):
                    break
            add(k, c)

    if qtype == "color":
        add(kind, color)
        others = [s for s in SHAPES if s != kind]
        for _ in range(int(rng.integers(3, 7))):
            add(str(rng.choice(others)), str(rng.choice(list(COLORS))))
        question, answer = f"What color is the {kind}?", color
    elif qtype == "count":
        count = int(rng.integers(1, 6))
        for _ in range(count):
            add(kind, color)
        add_distractors(int(rng.integers(2, 7)))
        question, answer = f"How many {color} {kind}s are there?", str(count)
    else:
        horizontal = width > height or (width == height and bool(rng.integers(0, 2)))
        first = bool(rng.integers(0, 2))  # left / top
        if horizontal:
            region = (0, 0, int(0.4 * width), height) if first else (math.ceil(0.6 * width), 0, width, height)
            question = f"Is the {color} {kind} on the left or the right side of the image?"
            answer = "left" if first else "right"
        else:
            region = (
                (0, 0, width, int(0.4 * height)) if first else (0, math.ceil(0.6 * height), width, height)
            )
            question = f"Is the {color} {kind} at the top or the bottom of the image?"
            answer = "top" if first else "bottom"
        add(kind, color, region)
        add_distractors(int(rng.integers(3, 7)))
    background = int(rng.integers(196, 236))
    return DemoItem(index, width, height, background, qtype, question, answer, tuple(shapes))


def make_crowded_item(seed: int, index: int, shapes: tuple[int, int] = (20, 31)) -> DemoItem:
    """A picture for vision pre-training (``globalcom2.training``): the generator's canvases, sizes, colours,
    kinds and background, with ``shapes[0]`` to ``shapes[1] - 1`` shapes instead of 2-12, so that a training
    step sees several times more shape patches. It carries no question (the vision stage needs none)."""
    rng = np.random.default_rng([seed, index, DEMO_VERSION, 1])
    width, height = CANVASES[index % len(CANVASES)]
    placed: list[Shape] = []
    for _ in range(int(rng.integers(*shapes))):
        size = int(rng.integers(*SHAPE_SIZES))
        try:
            x, y = _place(rng, width, height, size, placed)
        except RuntimeError:  # the canvas is full
            break
        placed.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), x, y, size))
    background = int(rng.integers(196, 236))
    return DemoItem(index, width, height, background, "none", "", "", tuple(placed))


def render(item: DemoItem) -> Image.Image:
    """Draw an item: textured light background, then its shapes."""
    rng = np.random.default_rng(int(item.signature()[:8], 16))
    # 8x8-pixel blocks of grey noise: texture for the crops to resolve, cheap to draw and to compress.
    blocks = rng.normal(item.background, 6.0, size=(-(-item.height // 8), -(-item.width // 8)))
    texture = Image.fromarray(np.clip(blocks, 0, 255).astype(np.uint8))
    image = texture.resize((texture.width * 8, texture.height * 8), Image.Resampling.NEAREST)
    image = image.crop((0, 0, item.width, item.height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for s in item.shapes:
        draw_shape(draw, s, COLORS[s.color])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: tuple[int, int, int] | int) -> None:
    """Draw one shape; also used to paint the per-pixel object masks of ``globalcom2.training.targets``."""
    half = shape.size // 2
    box = (shape.x - half, shape.y - half, shape.x + half, shape.y + half)
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        apex, left, right = (
            (shape.x, shape.y - half),
            (shape.x - half, shape.y + half),
            (shape.x + half, shape.y + half),
        )
        draw.polygon([apex, left, right], fill=fill)


def generate_items(split: str = "test", seed: int | None = None, size: int | None = None) -> list[DemoItem]:
    """The items of ``split``. ``train`` skips any item whose content equals a test item's; ``validation``
    skips those and any equal to one of the default ``train`` split's items. No split is drawn with another
    split's default seed (``ValueError``), which would give it that split's items."""
    if split not in DEFAULT_SEED:
        raise ValueError(f"split must be one of {sorted(DEFAULT_SEED)}, got {split!r}")
    seed = DEFAULT_SEED[split] if seed is None else int(seed)
    size = DEFAULT_SIZE[split] if size is None else int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    for other, other_seed in DEFAULT_SEED.items():
        if other != split and seed == other_seed:
            raise ValueError(
                f"the {split} split needs a seed other than the {other} seed {other_seed} (drawn with it, "
                f"its items would be the {other} split's); the default seeds are {DEFAULT_SEED}"
            )
    if split == "efficiency":
        return [make_item(seed, i, (EFFICIENCY_CANVAS,)) for i in range(size)]
    if split == "test":
        return [make_item(seed, i) for i in range(size)]
    held_apart = {"train": ("test",), "validation": ("test", "train")}[split]
    excluded = {item.signature() for other in held_apart for item in generate_items(other)}
    return _items_not_in(seed, size, excluded)


def _items_not_in(seed: int, size: int, excluded: set[str]) -> list[DemoItem]:
    """The first ``size`` items drawn with ``seed`` whose signature is not in ``excluded``."""
    items, index = [], 0
    while len(items) < size:
        item = make_item(seed, index)
        if item.signature() not in excluded:
            items.append(item)
        index += 1
    return items


def build_dataset(items: list[DemoItem], split: str):
    """A ``DatasetDict`` with one split; images embedded as PNG (fast compression)."""
    import datasets

    def png(item: DemoItem) -> dict:
        buffer = io.BytesIO()
        render(item).save(buffer, format="PNG", compress_level=1)
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "image_width": datasets.Value("int32"),
            "image_height": datasets.Value("int32"),
        }
    )
    columns = {
        "id": [f"demo-{split}-{item.index:05d}" for item in items],
        "image": [png(item) for item in items],
        "question": [item.question for item in items],
        "answer": [item.answer for item in items],
        "question_type": [item.question_type for item in items],
        "image_width": [item.width for item in items],
        "image_height": [item.height for item in items],
    }
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns, features=features)})


def demo_cache_dir() -> Path:
    return cache_dir() / "demo"


def generator_digest() -> str:
    """The first 12 hex digits of the SHA-256 of this module's source: any change to how items are drawn,
    rendered or encoded (even one that forgets to bump ``DEMO_VERSION``, which also seeds the items) names
    another cache folder, so a cached split is never one an older generator wrote."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def split_settings(split: str, seed: int | None = None, size: int | None = None) -> tuple[int, int]:
    """``(seed, size)`` of ``split`` with the defaults filled in, as :func:`ensure_demo_dataset` builds it."""
    seed = DEFAULT_SEED.get(split, 0) if seed is None else int(seed)
    size = DEFAULT_SIZE.get(split, 1) if size is None else int(size)
    return seed, size


def ensure_demo_dataset(split: str = "test", seed: int | None = None, size: int | None = None) -> Path:
    """The cached ``save_to_disk`` folder of the split, generated on first use (atomically)."""
    seed, size = split_settings(split, seed, size)
    target = demo_cache_dir() / f"v{DEMO_VERSION}-{generator_digest()}-{split}-seed{seed}-n{size}"
    if (target / "dataset_dict.json").is_file():
        return target
    with staged_folder(target, complete_marker="dataset_dict.json") as staging:
        build_dataset(generate_items(split, seed, size), split).save_to_disk(str(staging))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic demo benchmark.")
    parser.add_argument("--split", default="test", choices=sorted(DEFAULT_SEED))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--out", default=None, help="write here (save_to_disk) instead of the cache")
    args = parser.parse_args(argv)
    if args.out:
        with staged_folder(args.out) as staging:
            build_dataset(generate_items(args.split, args.seed, args.size), args.split).save_to_disk(
                str(staging)
            )
        print(args.out)
    else:
        print(ensure_demo_dataset(args.split, args.seed, args.size))


if __name__ == "__main__":
    main()
