"""Prompts to model inputs, the way each protocol tokenises them.

``lmms_eval`` lets the checkpoint's processor tokenise the whole prompt, with ``<image>`` expanded to the
image's feature count first (transformers' ``LlavaNextProcessor``).

``llava`` follows LLaVA's ``tokenizer_image_token`` (haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd,
``llava/mm_utils.py`` L185-204): the prompt is split at every ``<image>``, each chunk is tokenised on its
own with the tokenizer's special tokens (so each starts with BOS), the first chunk keeps its BOS and every
later chunk loses it, and one image token goes between chunks. With a SentencePiece (Llama) tokenizer that
matters at the boundary: the chunk after ``<image>`` is encoded as a new text, so it gets the dummy-prefix
``▁`` that a whole-prompt encoding may not give it. We then expand each image token to the image's feature
count, as transformers' model expects (LLaVA's model does the same expansion inside ``prepare_inputs_labels_
for_multimodal``), so the language model receives LLaVA's ids.

Deliberate deviation: LLaVA loads the slow SentencePiece tokenizer (``use_fast=False`` in
``llava/model/builder.py``); we use the checkpoint's tokenizer (``llava-hf``'s fast Llama tokenizer) chunk by
chunk. The two agree on the text of these prompts as far as we know; ``show_inputs`` prints the ids for a
check against a real tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from globalcom2.anyres import config_layout
from globalcom2.prompts import IMAGE_TOKEN
from globalcom2.protocol.vicuna_length import fit_ids


def llava_chunk_ids(
    tokenizer: Any, prompt: str, image_token_id: int, image_tokens: Sequence[int]
) -> list[int]:
    """``tokenizer_image_token``'s ids for ``prompt``, each image token repeated ``image_tokens[i]`` times.

    Raises:
        ValueError: the prompt has a different number of ``<image>`` than ``image_tokens`` has entries.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    if len(chunks) - 1 != len(image_tokens):
        raise ValueError(
            f"the prompt has {len(chunks) - 1} {IMAGE_TOKEN} but {len(image_tokens)} images were given"
        )
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids += [image_token_id] * image_tokens[index - 1]
        ids += chunk[offset:]
    return ids


def encode_batch(
    processor: Any,
    config: Any,
    prompts: list[str],
    images: list[Image.Image],
    images_per_row: list[int],
    protocol: str,
    text_tokens: Callable[[str], int] | None = None,
) -> Any:
    """The processor's ``BatchFeature`` for the batch (left-padded), with ``input_ids`` and ``attention_mask``
    tokenised as ``protocol`` does (``config``: the loaded model's, for the per-image feature counts).

    ``text_tokens``: for a random-initialised model, each prompt's text-token count in Vicuna's tokenizer
    (``globalcom2.protocol.vicuna_length.prompt_text_tokens``); every row is cut to it before padding
    (``fit_ids``), so the byte-level tokenizer's longer text does not inflate the sequence.
    """
    inputs = processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
    if protocol != "llava" and text_tokens is None:
        return inputs
    image_token_id = config.image_token_id
    if protocol == "llava":
        rows = _llava_rows(processor.tokenizer, config, inputs, prompts, images_per_row)
    else:  # the processor's own ids, without its padding
        mask = inputs["attention_mask"].bool()
        rows = [ids[keep].tolist() for ids, keep in zip(inputs["input_ids"], mask, strict=True)]
    if text_tokens is not None:
        rows = [
            fit_ids(row, image_token_id, text_tokens(prompt))
            for row, prompt in zip(rows, prompts, strict=True)
        ]
    inputs["input_ids"], inputs["attention_mask"] = _left_padded(rows, processor.tokenizer.pad_token_id)
    return inputs


def _llava_rows(
    tokenizer: Any, config: Any, inputs: Any, prompts: list[str], images_per_row: list[int]
) -> list[list[int]]:
    """Each prompt's ids as LLaVA tokenises it (:func:`llava_chunk_ids`), image tokens expanded as the
    processor expanded them (checked)."""
    image_token_id = config.image_token_id
    sizes = inputs["image_sizes"].tolist() if "image_sizes" in inputs else []
    counts = [config_layout(config, size).num_tokens for size in sizes]
    rows, start = [], 0
    for prompt, count in zip(prompts, images_per_row, strict=True):
        rows.append(llava_chunk_ids(tokenizer, prompt, image_token_id, counts[start : start + count]))
        start += count
    expanded = (inputs["input_ids"] == image_token_id).sum(1).tolist()  # [B] the processor's expansion
    ours = [row.count(image_token_id) for row in rows]
    if expanded != ours:
        raise RuntimeError(
            f"image tokens per row differ between the processor ({expanded}) and the packed layout ({ours}): "
            "the processor and the model config disagree on the AnyRes geometry"
        )
    return rows


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, max length]`` of ``rows``, left-padded as generate needs."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask
