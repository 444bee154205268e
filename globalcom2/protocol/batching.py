"""The model-free halves of answering a batch: building prompts from requests, decoding answers.

Split out of the plugin so that each half is a small pure function: :func:`prepare_batch` turns lmms-eval
requests into Vicuna-v1 prompts and an image list, :func:`decode_answer` turns generated ids into the
answer lmms-eval scores (cut at EOS, then at the first stop string, stripped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from globalcom2.prompts import IMAGE_TOKEN, vicuna_v1_prompt
from globalcom2.protocol.rules import task_protocol


@dataclass(frozen=True)
class PreparedBatch:
    """Prompts, images (flat, in row order) and images per row of a batch of requests."""

    prompts: list[str]
    images: list[Image.Image]
    images_per_row: list[int]
    keys: list[tuple[str, str, int]]  # (task, split, doc id) per row

    def tag(self) -> str:
        """``task#doc`` of every row, for error messages."""
        return ", ".join(f"{task}#{doc_id}" for task, _, doc_id in self.keys)

    def _row_span(self, row: int) -> slice:
        """Where ``row``'s images are in the flat image list (and the processor's flat ``image_sizes``)."""
        start = sum(self.images_per_row[:row])
        return slice(start, start + self.images_per_row[row])

    def row_images(self, row: int) -> list[Image.Image]:
        """The images of ``row``."""
        return self.images[self._row_span(row)]

    def select(self, rows: Sequence[int]) -> PreparedBatch:
        """The batch of ``rows`` (in that order), each with its own images."""
        return PreparedBatch(
            prompts=[self.prompts[row] for row in rows],
            images=[image for row in rows for image in self.row_images(row)],
            images_per_row=[self.images_per_row[row] for row in rows],
            keys=[self.keys[row] for row in rows],
        )

    def image_sizes_of(self, image_sizes: Any, row: int) -> list[list[int]]:
        """``[[height, width], ...]`` of ``row``'s images, from the processor's flat ``image_sizes``."""
        if image_sizes is None or not self.images_per_row[row]:
            return []
        return [[int(h), int(w)] for h, w in image_sizes[self._row_span(row)].tolist()]


def prepare_batch(
    requests: Sequence[Any], task_dict: dict[str, Any], protocol: str = "lmms_eval"
) -> PreparedBatch:
    """Vicuna-v1 prompts (``<image>\\n`` per image, then the question) and the requests' images.

    Args:
        requests: lmms-eval simple-model requests; ``args`` is
            ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``.
        task_dict: ``lm.task_dict`` (``task -> split -> docs``), which lmms-eval fills before generating.
        protocol: ``lmms_eval`` (the question is the task's context) or ``llava`` (LLaVA's question-file
            text, built from the document: ``globalcom2.protocol.rules``).
    """
    prompts, images, images_per_row, keys = [], [], [], []
    for request in requests:
        context, _, doc_to_visual, doc_id, task, split = request.args
        doc = task_dict[task][split][doc_id]
        question = task_protocol(protocol, task).question(doc, context)
        if IMAGE_TOKEN in question:
            raise ValueError(f"{task} doc {doc_id}: the question already contains {IMAGE_TOKEN!r}")
        visuals = list(doc_to_visual(doc) or [])
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise TypeError(f"{task} doc {doc_id}: expected PIL images, got {type(visual).__name__}")
        prompts.append(vicuna_v1_prompt(question, num_images=len(visuals)))
        images += visuals
        images_per_row.append(len(visuals))
        keys.append((task, split, int(doc_id)))
    return PreparedBatch(prompts, images, images_per_row, keys)


@dataclass(frozen=True)
class DecodedAnswer:
    """What one row generated, and why it stopped (``eos``, ``stop_string`` or ``max_new_tokens``)."""

    token_ids: list[int]  # up to (excluding) the first EOS
    answer: str
    stop_reason: str


def decode_answer(
    tokenizer: Any, generated: list[int], eos_ids: set[int], until: tuple[str, ...]
) -> DecodedAnswer:
    """Ids after the prompt -> the answer: cut at the first EOS (the rest is padding), decode without
    special tokens, cut before the earliest stop string of ``until``, strip whitespace."""
    from globalcom2.protocol.generation import cut_at_stop

    stop_reason, ids = "max_new_tokens", list(generated)
    for position, token in enumerate(ids):
        if token in eos_ids:
            stop_reason, ids = "eos", ids[:position]
            break
    text, stop = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), until)
    return DecodedAnswer(ids, text.strip(), "stop_string" if stop is not None else stop_reason)
