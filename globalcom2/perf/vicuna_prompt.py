"""The efficiency prompts at the length Vicuna's tokenizer gives them, for the random-initialised models.

A random-initialised 7B/13B (``globalcom2.models.random_init``) has no checkpoint, so no Vicuna tokenizer: its
processor's tokenizer is byte-level, and it turns the Vicuna-v1 prompt's text into about 200 tokens where the
real tokenizer makes about 50. At R = 0.1 the text would then be a third of the LLM's sequence and the
measured prefill would time text the real model never sees. The counts below are what the real tokenizer
gives each efficiency prompt; :func:`fit_text_tokens` drops tokens from the start of the system prompt until
the byte-level prompt has that many text tokens (the weights are random, so which text tokens stay does not
matter; only how many).

Provenance of the counts: the LLaMA-2 SentencePiece model (32,000 pieces; the tokenizer of Vicuna v1.5 and so
of ``llava-hf/llava-v1.6-vicuna-{7b,13b}-hf``), file ``tokenizer.model`` of github.com/karpathy/llama2.c at
350e04fe35433e6d2941dce5a1f53308f87058eb (git blob 22bccbcb41ec929cf0c9dbe8f41036db82e5e773, 499,723 bytes;
checked: ``encode("Hello world") == [15043, 3186]``), with sentencepiece 0.2.3, and LLaVA's tokenisation of a
prompt with an image (haotian-liu/LLaVA c121f043 ``llava/mm_utils.py`` L185-204 ``tokenizer_image_token``):
each chunk around ``<image>`` tokenised on its own with its dummy-prefix space, one BOS. The count includes
the BOS and excludes the image placeholder: 34 tokens for ``BOS + system prompt + " USER: "``, 8 for the
newline after the image and ``" ASSISTANT:"``, plus the question's own tokens. The llava-hf processor
(``legacy=False``) gives each prompt one token fewer (no dummy prefix after the image). The model file is
not part of this repository; the counts were taken once and are checked here only for coverage.
"""

from __future__ import annotations

from typing import Any

import torch

#: Text tokens (BOS included, image placeholder excluded) of the Vicuna-v1 prompt of each efficiency question.
VICUNA_TEXT_TOKENS: dict[str, int] = {
    "How many blue triangles are there?": 50,
    "How many green squares are there?": 49,
    "How many orange circles are there?": 49,
    "How many orange triangles are there?": 50,
    "How many purple circles are there?": 50,
    "How many purple triangles are there?": 51,
    "How many red circles are there?": 49,
    "How many red squares are there?": 49,
    "How many yellow circles are there?": 49,
    "Is the blue circle at the top or the bottom of the image?": 56,
    "Is the green square on the left or the right side of the image?": 57,
    "Is the orange triangle on the left or the right side of the image?": 57,
    "Is the purple circle at the top or the bottom of the image?": 57,
    "Is the purple triangle at the top or the bottom of the image?": 57,
    "Is the red circle at the top or the bottom of the image?": 56,
    "Is the red square on the left or the right side of the image?": 57,
    "Is the yellow square on the left or the right side of the image?": 57,
    "What color is the circle?": 48,
    "What color is the square?": 48,
    "What color is the triangle?": 48,
}
SOURCE = (
    "LLaMA-2 SentencePiece (karpathy/llama2.c@350e04f tokenizer.model), LLaVA tokenizer_image_token "
    "(haotian-liu/LLaVA@c121f04 llava/mm_utils.py L185-204)"
)


def vicuna_text_tokens(question: str) -> int:
    """The recorded count for ``question`` (an efficiency-split question), or ``KeyError`` naming the known
    ones: a question outside the table has no recorded count, and guessing one would fake the length."""
    if question not in VICUNA_TEXT_TOKENS:
        raise KeyError(
            f"no recorded Vicuna token count for {question!r}; the efficiency split's questions are "
            f"{sorted(VICUNA_TEXT_TOKENS)}"
        )
    return VICUNA_TEXT_TOKENS[question]


def fit_text_tokens(inputs: dict[str, Any], image_token_id: int, target: int) -> dict[str, Any]:
    """``inputs`` (one processor prompt, batch 1, no padding) with ``target`` text tokens.

    Keeps the first token (BOS), the image placeholders and everything after the first of them; drops the
    tokens right after the first one (the start of the system prompt) as needed.

    Raises:
        ValueError: a batch, padding, or a prompt whose text before the image is too short to drop from.
    """
    ids = inputs["input_ids"]
    if ids.shape[0] != 1 or ("attention_mask" in inputs and not bool(inputs["attention_mask"].all())):
        raise ValueError("fit_text_tokens takes one prompt without padding")
    row = ids[0]
    is_image = row == image_token_id
    text = int((~is_image).sum())
    drop = text - target
    first_image = int(is_image.float().argmax())
    if drop < 0 or drop > first_image - 1:
        raise ValueError(
            f"cannot bring {text} text tokens to {target}: {first_image} tokens precede the image, the first "
            "of which (BOS) stays"
        )
    keep = torch.cat([row[:1], row[1 + drop :]])[None]  # [1, L - drop]
    fitted = {**inputs, "input_ids": keep}
    if "attention_mask" in inputs:
        fitted["attention_mask"] = torch.ones_like(keep, dtype=inputs["attention_mask"].dtype)
    return fitted
