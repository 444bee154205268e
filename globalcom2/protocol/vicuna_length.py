"""The efficiency prompts at the length Vicuna's tokenizer gives them, for the random-initialised models.

A random-initialised 7B/13B (``globalcom2.models.random_init``) has no checkpoint, so no Vicuna tokenizer: its
processor's tokenizer is byte-level, and it turns the Vicuna-v1 prompt's text into about 200 tokens where the
real tokenizer makes about 50. At R = 0.1 the text would then be a third of the LLM's sequence and the
measured prefill would time text the real model never sees. The counts below are what the real tokenizer
gives each efficiency prompt, and :func:`fit_ids` cuts the byte-level prompt to it on both sides of the
image: :data:`PREFIX_TOKENS` before it, the rest after it (the weights are random, so which text tokens stay
does not matter; how many do, and where the image sits among them). Two users: ``make bench-efficiency
--random-init`` (:func:`fit_text_tokens`, by question) and ``globalcom2.run`` cells with
``model.vicuna_text=true`` (``protocol.tokenization.encode_batch``, by whole prompt: :func:`prompt_text_tokens`),
which ``make bench-throughput --random-init`` runs.

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

A cell's prompt is not the bare question: lmms-eval appends the task's ``post_prompt``
(:data:`EFFICIENCY_POST_PROMPT`, from ``tasks/demo/globalcom2_demo.yaml``, which the efficiency task includes)
before the prompt reaches the model. Counted the same way (same file and rule, 2026-12-06), it adds
:data:`POST_PROMPT_TOKENS` to every one of the twenty questions, so a cell's prompt is looked up with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from globalcom2.prompts import vicuna_v1_prompt

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
#: Vicuna's text tokens before the image in every efficiency prompt: BOS, the system prompt and ``" USER: "``.
PREFIX_TOKENS = 34
#: What lmms-eval appends to every question of the demo and efficiency tasks (their ``post_prompt``).
EFFICIENCY_POST_PROMPT = "\nAnswer the question using a single word or number."
#: Vicuna's tokens that :data:`EFFICIENCY_POST_PROMPT` adds to the prompt of each question above (the same for
#: all twenty, each counted).
POST_PROMPT_TOKENS = 11
#: The counts keyed by the whole prompt (``vicuna_v1_prompt``), for :func:`prompt_text_tokens`: the bare
#: question's, and the question with the post-prompt, as cells send it.
_BY_PROMPT: dict[str, int] = {
    **{vicuna_v1_prompt(q): n for q, n in VICUNA_TEXT_TOKENS.items()},
    **{
        vicuna_v1_prompt(q + EFFICIENCY_POST_PROMPT): n + POST_PROMPT_TOKENS
        for q, n in VICUNA_TEXT_TOKENS.items()
    },
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


def prompt_text_tokens(prompt: str) -> int:
    """The recorded count for a whole Vicuna-v1 prompt with one image (``globalcom2.prompts.vicuna_v1_prompt``
    of an efficiency-split question, with or without :data:`EFFICIENCY_POST_PROMPT`: ``globalcom2.run`` cells
    on the efficiency benchmark send it with).

    Raises:
        ValueError: a prompt without a recorded count (the message names the questions that have one).
    """
    if prompt not in _BY_PROMPT:
        raise ValueError(
            f"no recorded Vicuna token count for the prompt {prompt!r}: counts are recorded for the Vicuna-v1 "
            f"prompts of the efficiency split's questions only ({sorted(VICUNA_TEXT_TOKENS)}), bare or followed "
            f"by {EFFICIENCY_POST_PROMPT!r}; run this "
            "benchmark with vicuna_text=false (the byte-level text, its length recorded as text_tokens)"
        )
    return _BY_PROMPT[prompt]


def fit_ids(ids: Sequence[int], image_token_id: int, target: int, prefix: int = PREFIX_TOKENS) -> list[int]:
    """One prompt's token ids (no padding, one image) with ``target`` text tokens, ``prefix`` of them before
    the image as in Vicuna's prompt.

    Keeps the first token (BOS) and the last ``prefix - 1`` tokens before the image, the image placeholders,
    and the last ``target - prefix`` tokens after them (so the prompt still ends in ``" ASSISTANT:"``). Both
    sides are cut, never grown: a byte-level tokenizer gives every text at least as many tokens as Vicuna's,
    whose pieces are a byte or longer, and a question's bytes alone can outnumber the whole prompt's Vicuna
    count, so cutting before the image alone cannot reach it.

    Raises:
        ValueError: no image or a split one, or a side too short to cut to its count.
    """
    row = list(ids)
    positions = [index for index, token in enumerate(row) if token == image_token_id]
    if not positions or positions[-1] - positions[0] + 1 != len(positions):
        raise ValueError("a prompt fitted to Vicuna's length has one image, its placeholders in one run")
    first, end = positions[0], positions[-1] + 1
    before, after = first, len(row) - end  # text tokens on each side, BOS in `before`
    if not 1 <= prefix <= before or not 0 <= target - prefix <= after:
        raise ValueError(
            f"cannot bring {before} + {after} text tokens (before + after the image) to {prefix} + "
            f"{target - prefix}: a side can only be cut, and the BOS stays"
        )
    tail = len(row) - (target - prefix)  # where the kept text after the image starts
    return row[:1] + row[first - (prefix - 1) : end] + row[tail:]  # [V + target]


def fit_text_tokens(
    inputs: dict[str, Any], image_token_id: int, target: int, prefix: int = PREFIX_TOKENS
) -> dict[str, Any]:
    """``inputs`` (one processor prompt, batch 1, no padding, one image) with its ids cut by :func:`fit_ids`.

    Raises:
        ValueError: a batch or padding, or what :func:`fit_ids` refuses.
    """
    ids = inputs["input_ids"]
    if ids.shape[0] != 1 or ("attention_mask" in inputs and not bool(inputs["attention_mask"].all())):
        raise ValueError("fit_text_tokens takes one prompt without padding")
    keep = torch.tensor([fit_ids(ids[0].tolist(), image_token_id, target, prefix)], dtype=ids.dtype)
    fitted = {**inputs, "input_ids": keep}  # [1, V + target]
    if "attention_mask" in inputs:
        fitted["attention_mask"] = torch.ones_like(keep, dtype=inputs["attention_mask"].dtype)
    return fitted
