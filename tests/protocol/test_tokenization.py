"""LLaVA's chunked tokenisation around ``<image>`` (``tokenizer_image_token``) under ``protocol=llava``.

The tiny model's byte-level tokenizer encodes a prompt the same whole or in chunks, so these tests use a
SentencePiece-like tokenizer instead: Metaspace with a dummy prefix on the first word only, as the
non-legacy Llama tokenizers of ``llava-hf`` checkpoints do. There the boundary differs: LLaVA encodes the
text after ``<image>`` as a new text, which starts with ``▁``; the whole-prompt encoding does not.
"""

from __future__ import annotations

import string

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from globalcom2.anyres import packed_layout
from globalcom2.models.tiny import tiny_config, tiny_processor
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.protocol.tokenization import encode_batch, llava_chunk_ids


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, ``▁`` for spaces and as the dummy prefix of the text's first word."""
    chars = ["▁"] + [c for c in string.printable if c not in " \t\r\x0b\x0c"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{c: 4 + i for i, c in enumerate(chars)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return metaspace_tokenizer()


def test_chunks_follow_tokenizer_image_token(tokenizer):
    image = tokenizer.convert_tokens_to_ids("<image>")

    def pieces(ids):
        return [tokenizer.convert_ids_to_tokens(i) if i != image else "IMG" for i in ids]

    # Written by hand from llava/mm_utils.py L185-204: BOS once, each chunk encoded alone (so the second
    # one starts with the dummy prefix), one image id between chunks (repeated here to the feature count).
    ids = llava_chunk_ids(
        tokenizer, "Hi USER: <image>\nWhat? ASSISTANT:", image_token_id=image, image_tokens=[3]
    )
    assert pieces(ids) == [
        "<s>",
        *"▁Hi▁USER:▁",
        "IMG",
        "IMG",
        "IMG",
        *"▁\nWhat?▁ASSISTANT:",
    ]
    # two images, and a prompt that ends with one: the empty last chunk adds nothing
    ids = llava_chunk_ids(tokenizer, "A<image>\n<image>", image_token_id=image, image_tokens=[1, 2])
    assert pieces(ids) == [
        "<s>",
        *"▁A",
        "IMG",
        *"▁\n",
        "IMG",
        "IMG",
    ]
    with pytest.raises(ValueError, match="1 <image> but 2 images"):
        llava_chunk_ids(tokenizer, "A<image>", image_token_id=image, image_tokens=[1, 2])


def test_llava_protocol_feeds_the_chunked_ids_and_lmms_eval_the_processors(tokenizer, images):
    processor = tiny_processor(tokenizer)
    config = tiny_config(tokenizer)
    image_id = config.image_token_id
    prompts = [vicuna_v1_prompt("What is it?"), vicuna_v1_prompt("Is there a cat in the picture?")]
    batch_images = [images[(800, 600)], images[(336, 336)]]
    whole = encode_batch(processor, config, prompts, batch_images, [1, 1], "lmms_eval")
    chunked = encode_batch(processor, config, prompts, batch_images, [1, 1], "llava")
    assert chunked["pixel_values"].equal(whole["pixel_values"])
    assert chunked["image_sizes"].equal(whole["image_sizes"])
    for row, image in enumerate(batch_images):
        ids = chunked["input_ids"][row][chunked["attention_mask"][row].bool()].tolist()
        reference = whole["input_ids"][row][whole["attention_mask"][row].bool()].tolist()
        size = (image.height, image.width)
        features = packed_layout(size, config.image_grid_pinpoints).num_tokens
        end = ids.index(image_id) + features
        assert ids.count(image_id) == reference.count(image_id) == features
        assert tokenizer.convert_ids_to_tokens(ids[end : end + 2]) == ["▁", "\n"], "LLaVA's dummy prefix"
        assert tokenizer.convert_ids_to_tokens(reference[end : end + 1]) == ["\n"], "whole prompt: none"
        assert ids[: ids.index(image_id)] == reference[: reference.index(image_id)]
        assert ids[end + 1 :] == reference[end:], "only the boundary differs"
    # left padding, as the in-LLM methods need
    shorter = int(chunked["attention_mask"].sum(1).argmin())
    assert chunked["attention_mask"][shorter, 0] == 0 and chunked["attention_mask"][shorter, -1] == 1


@pytest.mark.parametrize("protocol", ["lmms_eval", "llava"])
def test_rows_are_cut_to_the_recorded_vicuna_length_before_padding(images, protocol):
    """A random-initialised model's byte-level text is about four times Vicuna's; with ``text_tokens`` every
    row keeps its image and the recorded number of text tokens (BOS first, the prompt's end last), and the
    batch is padded to the longest fitted row, not the longest byte-level one."""
    from globalcom2.models.tiny import byte_level_tokenizer
    from globalcom2.protocol.vicuna_length import PREFIX_TOKENS, VICUNA_TEXT_TOKENS, prompt_text_tokens

    tokenizer = byte_level_tokenizer()
    processor, config = tiny_processor(tokenizer), tiny_config(tokenizer)
    image_id = config.image_token_id
    questions = ["What color is the circle?", "Is the red square on the left or the right side of the image?"]
    prompts = [vicuna_v1_prompt(q) for q in questions]
    batch_images = [images[(800, 600)], images[(336, 336)]]
    plain = encode_batch(processor, config, prompts, batch_images, [1, 1], protocol)
    fitted = encode_batch(
        processor, config, prompts, batch_images, [1, 1], protocol, text_tokens=prompt_text_tokens
    )
    assert fitted["pixel_values"].equal(plain["pixel_values"])
    lengths = []
    for row, (question, image) in enumerate(zip(questions, batch_images, strict=True)):
        ids = fitted["input_ids"][row][fitted["attention_mask"][row].bool()].tolist()
        before = plain["input_ids"][row][plain["attention_mask"][row].bool()].tolist()
        features = packed_layout((image.height, image.width), config.image_grid_pinpoints).num_tokens
        assert ids.count(image_id) == features and len(ids) == features + VICUNA_TEXT_TOKENS[question]
        assert len(before) - features > 3 * VICUNA_TEXT_TOKENS[question]  # what the cut removes
        assert ids.index(image_id) == PREFIX_TOKENS and ids[0] == before[0] == tokenizer.bos_token_id
        after = VICUNA_TEXT_TOKENS[question] - PREFIX_TOKENS
        assert ids[-after:] == before[-after:]  # the prompt still ends in " ASSISTANT:"
        lengths.append(len(ids))
    assert fitted["input_ids"].shape[1] == max(lengths)
    with pytest.raises(ValueError, match="no recorded Vicuna token count for the prompt"):
        encode_batch(
            processor,
            config,
            [vicuna_v1_prompt("Why?")],
            batch_images[:1],
            [1],
            protocol,
            text_tokens=prompt_text_tokens,
        )


def test_every_prompt_a_cell_sends_on_the_efficiency_split_has_a_recorded_vicuna_count():
    """A cell's prompt is lmms-eval's: the question followed by the task's post-prompt. Every prompt of the
    efficiency split, built through lmms-eval's task as a cell builds it, has a recorded count (the bare
    question's plus the post-prompt's), so ``model.vicuna_text=true`` cells run instead of failing."""
    from globalcom2.lmms.show_inputs import show_inputs
    from globalcom2.protocol.vicuna_length import (
        EFFICIENCY_POST_PROMPT,
        POST_PROMPT_TOKENS,
        VICUNA_TEXT_TOKENS,
        prompt_text_tokens,
    )

    rows = list(show_inputs(["globalcom2_efficiency"], 30, "lmms_eval", "tiny"))
    assert len(rows) == 30
    for row in rows:
        text = row["prompt"].split("<image>\n", 1)[1].removesuffix(" ASSISTANT:")
        question = text.removesuffix(EFFICIENCY_POST_PROMPT)
        assert text == question + EFFICIENCY_POST_PROMPT  # the task still appends it
        assert prompt_text_tokens(row["prompt"]) == VICUNA_TEXT_TOKENS[question] + POST_PROMPT_TOKENS
