"""Vanilla accuracy of a trained tiny checkpoint, per question type, beside the best constant answer.

The recipe is judged on the demo's ``validation`` split (:func:`globalcom2.training.train_tiny.train` writes
``validation`` into the training record). The ``test`` split, the one ``make demo`` ranks methods on, is
scored once, after the recipe is frozen: ``python -m globalcom2.training.evaluate --split test`` refuses a
checkpoint whose record has no ``freeze`` entry, and refuses to overwrite a ``test`` entry already there.

The model is loaded and run as the harness runs it: :func:`globalcom2.models.loader.load_llava_next`, the
processor, greedy ``generate`` on the demo task's Vicuna-v1 prompt and answer instruction, the first line of
the answer, the demo's normalised exact match. It runs in batches of 4 with left padding, where ``make demo``
runs batch 1; in float32 a batch gives the answers of its samples one by one (the harness's batch exactness,
``tests/harness``), up to float rounding at an exact tie between two next tokens.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from globalcom2.atomic import atomic_write_text
from globalcom2.data import demo
from globalcom2.models.loader import load_llava_next
from globalcom2.models.tiny_trained import CHECKPOINT_DIR
from globalcom2.prompts import vicuna_v1_prompt

RECORD_FILE = "training_record.json"


def best_constant(answers: list[str]) -> tuple[str, float]:
    """The most frequent answer and the accuracy (%) of always giving it."""
    value, count = Counter(answers).most_common(1)[0]
    return value, round(100 * count / len(answers), 1)


@torch.no_grad()
def answer_hits(model, processor, items: list[demo.DemoItem], batch_size: int = 4) -> list[bool]:
    """Whether greedy ``generate`` answers each item right, prompted as the demo task prompts (Vicuna-v1,
    the task's answer instruction, its ``until="\\n"``) and scored by its normalised exact match."""
    hits = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [vicuna_v1_prompt(item.question + demo.ANSWER_INSTRUCTION) for item in chunk]
        inputs = processor(
            images=[demo.render(it) for it in chunk], text=prompts, return_tensors="pt", padding=True
        )
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        texts = processor.tokenizer.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        hits += [
            demo.normalize_answer(text.split("\n")[0]) == demo.normalize_answer(item.answer)
            for item, text in zip(chunk, texts, strict=True)
        ]
    return hits


def accuracy_by_type(checkpoint: Path, items: list[demo.DemoItem]) -> dict[str, Any]:
    """Vanilla accuracy (%) on ``items`` per question type, with the best constant answer of each type."""
    hits = answer_hits(*load_llava_next(str(checkpoint)), items)
    result: dict[str, Any] = {}
    for qtype in sorted({item.question_type for item in items}):
        of_type = [
            (hit, item.answer) for hit, item in zip(hits, items, strict=True) if item.question_type == qtype
        ]
        constant, constant_accuracy = best_constant([answer for _, answer in of_type])
        result[qtype] = {
            "accuracy": round(100 * float(np.mean([hit for hit, _ in of_type])), 1),
            "best_constant_answer": constant,
            "best_constant_accuracy": constant_accuracy,
            "items": len(of_type),
        }
    result["overall"] = round(100 * float(np.mean(hits)), 1)
    return result


def read_record(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / RECORD_FILE).read_text())


def write_record(checkpoint: Path, record: dict[str, Any]) -> None:
    atomic_write_text(checkpoint / RECORD_FILE, json.dumps(record, indent=1) + "\n")


def evaluate_frozen_test(checkpoint: Path, items: int) -> dict[str, Any]:
    """Score the ``test`` split once, on a frozen checkpoint, and add it to its training record."""
    record = read_record(checkpoint)
    if "freeze" not in record:
        raise ValueError(
            f"{checkpoint / RECORD_FILE} has no 'freeze' entry: the test split is scored only after the "
            "recipe is frozen (judge the recipe on record['validation'])"
        )
    if "test" in record:
        raise ValueError(f"{checkpoint / RECORD_FILE} already has a 'test' entry; it is scored once")
    record["test"] = accuracy_by_type(checkpoint, demo.generate_items("test", size=items))
    write_record(checkpoint, record)
    return record["test"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--split", choices=("test", "validation"), default="validation")
    parser.add_argument("--items", type=int, default=None, help="first N items of the split (default: all)")
    args = parser.parse_args(argv)
    if args.items is not None and args.items < 1:  # 0 read as "all" for the test split
        parser.error(f"--items must be >= 1 (or left out: the whole split), got {args.items}")
    torch.set_num_threads(2)
    if args.split == "test":
        result = evaluate_frozen_test(args.checkpoint, args.items or demo.DEFAULT_SIZE["test"])
    else:
        result = accuracy_by_type(args.checkpoint, demo.generate_items("validation", size=args.items))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
