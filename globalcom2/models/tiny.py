"""A tiny LLaVA-NeXT built in code: real geometry, tiny widths, no network.

Geometry is exactly llava-v1.6's: CLIP at 336 px with patch 14 (24 x 24 = 576 tokens per view), the five
v1.6 grid pinpoints, unpadding, one row separator per unpadded row, [CLS] dropped, feature layer -2. Only
the widths and depths are tiny, so every count, index and shape our methods compute is the one they
compute on the 7B/13B checkpoints. The checkpoint is written with ``save_pretrained`` and read back
through :func:`globalcom2.models.loader.load_llava_next`, the loader real checkpoints use.

The config is transformers' ``LlavaNextConfig`` with a ``CLIPVisionConfig`` and a ``LlamaConfig`` of tiny
widths (``num_additional_image_tokens=1`` and ``vision_feature_select_strategy="default"``, as the llava-hf
processors set them, so the processor's placeholder count equals the packed feature count), with a
byte-level tokenizer built from ``tokenizers`` primitives (every string encodes, spaces stay spaces) and the
Vicuna-v1 chat template.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

from globalcom2.atomic import staged_folder
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS
from globalcom2.paths import cache_dir as cache_dir_path
from globalcom2.prompts import VICUNA_V1_CHAT_TEMPLATE

VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 64,
}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, so GQA code paths are exercised too
    "max_position_embeddings": 4096,
}
# Larger than transformers' 0.02 so that attention is far from uniform and a wrong position or a
# dropped token visibly changes the logits (the tests compare logits, not tokens).
INITIALIZER_RANGE = 0.2


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus ``<unk> <s> </s> <pad> <image>``: encodes any text, decodes it back exactly."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return llama_style_tokenizer(core)


def llama_style_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    """``core`` with LLaMA's conventions: ``<s>`` prepended, ``</s>``/``<unk>``/``<pad>``, an ``<image>``
    special token, and left padding (batched generation needs it)."""
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlavaNextConfig:
    """LLaVA-NeXT config with llava-v1.6 geometry and tiny widths."""
    return llava_v16_config(tokenizer, VISION, TEXT, INITIALIZER_RANGE)


def llava_v16_config(
    tokenizer: PreTrainedTokenizerFast, vision: dict, text: dict, initializer_range: float
) -> LlavaNextConfig:
    """llava-v1.6's geometry (336 px CLIP views, the five pinpoints, feature layer -2, [CLS] dropped) with
    the given widths: the one recipe behind both tiny models."""
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision, initializer_range=initializer_range),
        text_config=LlamaConfig(
            **text,
            vocab_size=len(tokenizer),
            initializer_range=initializer_range,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_V16_GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def tiny_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaNextProcessor:
    """The llava-hf processor settings (CLIP preprocessing, AnyRes, 576 tokens per view)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_V16_GRID_PINPOINTS,
        do_center_crop=True,
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )


def save_tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model with weights drawn from ``seed`` and save model + processor to ``path``."""
    path = Path(path)
    tokenizer = byte_level_tokenizer()
    config = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tiny_processor(tokenizer).save_pretrained(path)
    return path


def recipe_digest() -> str:
    """12 hex digits of what builds the tiny model: this module's source, and the grid pinpoints and chat
    template it imports. Any edit to the recipe names another cached folder, so a checkpoint built by an older
    recipe is never reused (a version number bumped by hand was one edit away from a stale model)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps([LLAVA_V16_GRID_PINPOINTS, VICUNA_V1_CHAT_TEMPLATE]).encode())
    return digest.hexdigest()[:12]


def tiny_checkpoint(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Folder of the tiny checkpoint for ``seed``, built on first use.

    The folder name carries the recipe's digest (:func:`recipe_digest`) and the transformers and torch
    versions (which draw the weights); it is written to a temporary sibling and renamed into place, so a
    concurrent or interrupted build never leaves a half-written checkpoint behind.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_dir_path()
    versions = f"tf{transformers.__version__}-torch{torch.__version__.split('+')[0]}"
    target = root / f"tiny-llava-next-{recipe_digest()}-{versions}-seed{seed}"
    if (target / "config.json").exists():
        return target
    with staged_folder(target, complete_marker="config.json") as staging:
        save_tiny_llava_next(staging, seed)
    return target
