"""Synthetic rows in the real schemas of the ten benchmarks (and the two EvalAI test splits), written in the offline data layout.

For each benchmark, a handful of rows with exactly the columns lmms-eval's task code reads (its
``utils.py``, the YAML's ``doc_to_target``, and our ``process_docs``), with the types the hub datasets
use, and tiny generated images of assorted aspect ratios. They exercise prompt building, answer
extraction and scoring end to end without any download:

* VQAv2 / VizWiz / TextVQA carry ten human answers per question (VQA accuracy needs them);
* GQA is split into its two hub configs (``instructions``, ``images``) joined on ``imageId``;
* POPE rows cover the three COCO splits; MME rows come in the yes/no pairs its aggregation requires,
  in perception and cognition categories;
* MMBench rows include the CircularEval copies (``index + k * 1e6``, options rotated), a question with
  three options and one without a hint;
* ScienceQA answers are option indices; MM-Vet answers use ``<AND>``/``<OR>``.

Every folder gets a ``globalcom2_source.json`` with ``"kind": "synthetic-fixture"``, and the tasks log a
warning when they read one: these numbers test the wiring, they are not results.

``python -m globalcom2.data.fixtures --out DIR`` writes all ten into ``DIR``.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

from globalcom2.atomic import staged_folder
from globalcom2.data.benchmarks import BENCHMARKS
from globalcom2.data.local import SOURCE_FILE, read_source_file

# (width, height): different AnyRes grids (336x672, 672x336, 672x672, 1008x336 canvases).
_SIZES = ((96, 64), (64, 96), (80, 80), (120, 40), (40, 120), (100, 75))
IMAGE = datasets.Image()
STR = datasets.Value("string")
INT = datasets.Value("int64")
STRS = datasets.Sequence(datasets.Value("string"))


def fixture_image(index: int) -> dict[str, Any]:
    """A small PNG (encoded, as the hub parquet files store images): a few coloured rectangles."""
    rng = np.random.default_rng(index)
    width, height = _SIZES[index % len(_SIZES)]
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(150, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        draw.rectangle((x, y, x + 8, y + 8), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _table(rows: list[dict[str, Any]], features: dict[str, Any]) -> datasets.Dataset:
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _ten(answers: list[str]) -> list[str]:
    """Ten annotator answers (VQA accuracy compares each answer against the other nine)."""
    return (answers * 10)[:10]


def vqav2() -> dict[str, datasets.Dataset]:
    answer = datasets.Features(
        {"answer": STR, "answer_confidence": STR, "answer_id": INT}
    )  # the real `answers` items
    questions = [
        ("What color is the square?", ["red"] * 8 + ["orange", "dark red"]),
        ("How many boxes are there?", ["3"] * 6 + ["three", "4", "3", "2"]),
        ("Is there a cat?", ["no"] * 10),
        (
            "What is on the table?",
            ["cup", "mug", "cup", "coffee cup", "cup", "mug", "cup", "cup", "glass", "cup"],
        ),
    ]
    rows = [
        {
            "question_id": 262148000 + i,
            "question": q,
            "image": fixture_image(i),
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
            ],
        }
        for i, (q, answers) in enumerate(questions)
    ]
    features = {"question_id": INT, "question": STR, "image": IMAGE, "answers": [answer]}
    return {"": _table(rows, features)}


def vqav2_testdev() -> dict[str, datasets.Dataset]:
    """Test-dev rows: the val schema with no answers (the split's answers are not public)."""
    answer = datasets.Features({"answer": STR, "answer_confidence": STR, "answer_id": INT})
    questions = ["What color is the bus?", "How many people are there?", "Is it raining?"]
    rows = [
        {"question_id": 1000001 + i, "question": q, "image": fixture_image(90 + i), "answers": None}
        for i, q in enumerate(questions)
    ]
    features = {"question_id": INT, "question": STR, "image": IMAGE, "answers": [answer]}
    return {"": _table(rows, features)}


def gqa() -> dict[str, datasets.Dataset]:
    questions = [
        ("201307251", "n161313", "Is it overcast?", "no"),
        ("201640614", "n235859", "Who is wearing the dress?", "woman"),
        ("202225914", "n161313", "Does the shirt have a different color than the sky?", "yes"),
        ("20968379", "n412462", "Which side is the bag on?", "left"),
    ]
    rows = [{"id": q, "imageId": img, "question": text, "answer": ans} for q, img, text, ans in questions]
    image_ids = sorted({img for _, img, _, _ in questions})
    images = [{"id": img, "image": fixture_image(10 + i)} for i, img in enumerate(image_ids)]
    return {
        "instructions": _table(rows, {"id": STR, "imageId": STR, "question": STR, "answer": STR}),
        "images": _table(images, {"id": STR, "image": IMAGE}),
    }


def vizwiz_vqa() -> dict[str, datasets.Dataset]:
    questions = [
        ("what is this?", ["soup can"] * 6 + ["can", "soup", "unanswerable", "soup can"]),
        ("what color is this shirt?", ["blue"] * 9 + ["navy"]),
        ("what does this say?", ["unanswerable"] * 10),
        (
            "how much is this?",
            ["5 dollars", "5", "$5", "5 dollars", "unanswerable", "5", "5", "5", "five", "5"],
        ),
    ]
    rows = [
        {"question_id": f"VizWiz_val_{i:08d}", "image": fixture_image(20 + i), "question": q, "answers": a}
        for i, (q, a) in enumerate(questions)
    ]
    return {"": _table(rows, {"question_id": STR, "image": IMAGE, "question": STR, "answers": STRS})}


def vizwiz_vqa_test() -> dict[str, datasets.Dataset]:
    """Test rows: the val schema with no answers (the split's answers are not public)."""
    questions = ["what is this?", "is this milk or juice?", "what does the screen say?"]
    rows = [
        {
            "question_id": f"VizWiz_test_{i:08d}",
            "image": fixture_image(95 + i),
            "question": q,
            "answers": None,
        }
        for i, q in enumerate(questions)
    ]
    return {"": _table(rows, {"question_id": STR, "image": IMAGE, "question": STR, "answers": STRS})}


def scienceqa_img() -> dict[str, datasets.Dataset]:
    items = [
        (
            "Which of these states is farthest north?",
            ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
            0,
            "",
        ),
        ("Which animal's feet are also adapted for digging?", ["aardvark", "sugar glider"], 0, "Moles dig."),
        ("What is the capital of Utah?", ["Salt Lake City", "Provo", "Denver"], 0, ""),
        ("Which material is this spoon made of?", ["wood", "rubber"], 1, "Select the best answer."),
    ]
    rows = [
        {"image": fixture_image(30 + i), "question": q, "choices": c, "answer": a, "hint": h}
        for i, (q, c, a, h) in enumerate(items)
    ]
    features = {
        "image": IMAGE,
        "question": STR,
        "choices": STRS,
        "answer": datasets.Value("int8"),
        "hint": STR,
    }
    return {"": _table(rows, features)}


def textvqa() -> dict[str, datasets.Dataset]:
    items = [
        ("what brand is this?", _ten(["nokia"] * 9 + ["nokia phone"]), ["nokia", "5800"]),
        ("what number is on the jersey?", _ten(["23"]), ["23", "bulls"]),
        ("what does the sign say?", _ten(["stop", "stop", "stop sign"]), ["stop"]),
        ("what time is it?", _ten(["10:10", "10:10", "ten past ten"]), []),
    ]
    rows = [
        {
            "question_id": 34602 + i,
            "question": q,
            "image": fixture_image(40 + i),
            "answers": a,
            "ocr_tokens": o,
        }
        for i, (q, a, o) in enumerate(items)
    ]
    features = {"question_id": INT, "question": STR, "image": IMAGE, "answers": STRS, "ocr_tokens": STRS}
    return {"": _table(rows, features)}


def pope() -> dict[str, datasets.Dataset]:
    items = [
        ("adversarial", "Is there a dining table in the image?", "yes"),
        ("adversarial", "Is there a fork in the image?", "no"),
        ("popular", "Is there a person in the image?", "yes"),
        ("popular", "Is there a car in the image?", "no"),
        ("random", "Is there a dog in the image?", "no"),
        ("random", "Is there a chair in the image?", "yes"),
    ]
    rows = [
        {
            "question_id": str(i + 1),
            "question": q,
            "answer": a,
            "image": fixture_image(50 + i // 2),
            "category": c,
        }
        for i, (c, q, a) in enumerate(items)
    ]
    features = {"question_id": STR, "question": STR, "answer": STR, "image": IMAGE, "category": STR}
    return {"": _table(rows, features)}


def mme() -> dict[str, datasets.Dataset]:
    pairs = [  # MME asks two questions per image, one answered Yes and one No
        ("existence", "000000006040.jpg", "Is there a train in this image?", "Is there a bed in this image?"),
        (
            "color",
            "000000012120.jpg",
            "Is there a red coat in the image?",
            "Is there a yellow coat in the image?",
        ),
        (
            "commonsense_reasoning",
            "0001.png",
            "Should I stop when I see this sign?",
            "Should I speed up here?",
        ),
    ]
    rows = []
    for i, (category, image_name, yes_q, no_q) in enumerate(pairs):
        for question, answer in ((yes_q, "Yes"), (no_q, "No")):
            rows.append(
                {
                    "question_id": f"{category}/{image_name}",
                    "question": f"{question} Please answer yes or no.",
                    "answer": answer,
                    "category": category,
                    "image": fixture_image(60 + i),
                }
            )
    features = {"question_id": STR, "question": STR, "answer": STR, "category": STR, "image": IMAGE}
    return {"": _table(rows, features)}


def _mmbench(language: str) -> dict[str, datasets.Dataset]:
    if language == "en":
        base = [
            ("Which category does this image belong to?", "The image shows a scene.", ["oil painting", "sketch", "digital art", "photo"], 3, "image_style", "fine-grained perception (instance)"),
            ("Which object is on the left?", None, ["a box", "a ball", "a cup"], 1, "spatial_relationship", "relation reasoning"),
        ]  # fmt: skip
    else:
        base = [
            ("这张图片属于哪一类？", "图片展示了一个场景。", ["油画", "素描", "数字艺术", "照片"], 3, "image_style", "fine-grained perception (instance)"),
            ("左边是什么物体？", None, ["盒子", "球", "杯子"], 1, "spatial_relationship", "relation reasoning"),
        ]  # fmt: skip
    rows = []
    for q_index, (question, hint, options, answer, category, l2) in enumerate(base):
        letters = "ABCD"[: len(options)]
        for shift in range(len(options)):  # CircularEval: every rotation of the options is a row
            rotated = options[shift:] + options[:shift]
            row = {
                # the real `en` config stores the index as a string, the `cn` one as int64
                "index": str(q_index + shift * 1_000_000)
                if language == "en"
                else q_index + shift * 1_000_000,
                "question": question,
                "hint": hint,
                "answer": letters[rotated.index(options[answer])],
                "category": category,
                "L2-category": l2,
                "source": "synthetic",
                "split": "dev",
                "image": fixture_image(70 + q_index),
            }
            for letter in "ABCD":
                row[letter] = rotated[letters.index(letter)] if letter in letters else None
            rows.append(row)
    features = {
        "index": STR if language == "en" else INT,
        "question": STR,
        "hint": STR,
        "A": STR,
        "B": STR,
        "C": STR,
        "D": STR,
        "answer": STR,
        "category": STR,
        "L2-category": STR,
        "source": STR,
        "split": STR,
        "image": IMAGE,
    }
    return {"": _table(rows, features)}


def mmbench_en() -> dict[str, datasets.Dataset]:
    return _mmbench("en")


def mmbench_cn() -> dict[str, datasets.Dataset]:
    return _mmbench("cn")


def mmvet() -> dict[str, datasets.Dataset]:
    items = [
        ("What is the price of the sandwich?", "4.50<OR>$4.50", "ocr,math"),
        ("What are the two colors of the flag?", "red<AND>white", "rec"),
        ("Explain why the scene is funny.", "A cat sits in a box too small for it.", "rec,know,gen"),
    ]
    rows = [
        {
            "question_id": f"v1_{i}",
            "question": q,
            "answer": a,
            "capability": c,
            "image": fixture_image(80 + i),
        }
        for i, (q, a, c) in enumerate(items)
    ]
    features = {"question_id": STR, "question": STR, "answer": STR, "capability": STR, "image": IMAGE}
    return {"": _table(rows, features)}


FIXTURES: dict[str, Callable[[], dict[str, datasets.Dataset]]] = {
    "vqav2": vqav2,
    "gqa": gqa,
    "vizwiz_vqa": vizwiz_vqa,
    "scienceqa_img": scienceqa_img,
    "textvqa": textvqa,
    "pope": pope,
    "mme": mme,
    "mmbench_en": mmbench_en,
    "mmbench_cn": mmbench_cn,
    "mmvet": mmvet,
    "vqav2_testdev": vqav2_testdev,
    "vizwiz_vqa_test": vizwiz_vqa_test,
}


def write_fixtures(out: str | Path, benchmarks: list[str] | None = None, *, force: bool = False) -> Path:
    """Write the fixtures of ``benchmarks`` (``None``: all, the ten benchmarks and the two EvalAI test
    splits) into ``out`` in the offline layout.

    Each benchmark folder is built whole in a staging folder, its ``globalcom2_source.json``
    (``kind: synthetic-fixture``) included, and renamed into place, so an interruption never leaves
    fixture rows without the record that marks them synthetic.

    Raises:
        ValueError: an unknown benchmark (the message lists the valid ones).
        FileExistsError: a folder holds data downloaded from the hub and ``force`` is not set; fixture rows
            would replace real data.
    """
    out = Path(out)
    keys = list(FIXTURES) if benchmarks is None else list(benchmarks)
    unknown = sorted(set(keys) - set(FIXTURES))
    if unknown:
        raise ValueError(f"unknown fixture benchmarks {unknown}; choose from {sorted(FIXTURES)}")
    for key in keys:
        if read_source_file(out / key).get("kind") == "hub" and not force:
            raise FileExistsError(
                f"{out / key} holds data downloaded from the hub; writing synthetic fixture rows would "
                "replace it. Write the fixtures elsewhere, or pass force=True (--force) to replace it."
            )
        benchmark = BENCHMARKS[key]
        tables = FIXTURES[key]()
        parts = {}
        with staged_folder(out / key) as staging:
            for part in benchmark.parts:
                table = tables[part.subdir]
                target = staging / part.subdir if part.subdir else staging
                datasets.DatasetDict({part.split: table}).save_to_disk(str(target))
                parts[part.subdir or "."] = {
                    "split": part.split,
                    "rows": len(table),
                    "columns": table.column_names,
                }
            record = {
                "benchmark": key,
                "kind": "synthetic-fixture",
                "schema_of": [f"{p.repo}:{p.config or 'default'}:{p.split}" for p in benchmark.parts],
                "parts": parts,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write synthetic real-schema rows for the ten benchmarks and the EvalAI test splits."
    )
    parser.add_argument(
        "--out", required=True, help="data directory to write (use it as GLOBALCOM2_DATA_DIR)"
    )
    parser.add_argument("--benchmarks", default=None, help=f"comma-separated subset of {','.join(FIXTURES)}")
    parser.add_argument("--force", action="store_true", help="replace folders holding downloaded hub data")
    args = parser.parse_args(argv)
    keys = None if args.benchmarks is None else [k for k in args.benchmarks.split(",") if k]
    if keys is not None and not keys:
        parser.error(f"--benchmarks {args.benchmarks!r} names no benchmark; choose from {sorted(FIXTURES)}")
    unknown = sorted(set(keys or []) - set(FIXTURES))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {sorted(FIXTURES)}")
    try:
        print(write_fixtures(args.out, keys, force=args.force))
    except FileExistsError as err:
        parser.exit(2, f"fixtures: {err}\n")


if __name__ == "__main__":
    main()
