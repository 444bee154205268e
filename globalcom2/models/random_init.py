"""Real-size LLaVA-NeXT architectures with random weights, for speed and memory measurements.

Efficiency numbers (prefill latency, peak memory, KV cache) depend on shapes, not on trained weights, so
``llava-v1.6-vicuna-7b``/``-13b`` sized models built here measure what the real checkpoints would, on a
machine that has no checkpoint. The architecture is that of ``llava-hf/llava-v1.6-vicuna-{7b,13b}-hf``
(CLIP ViT-L/14-336, 24 layers; mlp2x_gelu projector; Vicuna-v1.5 decoder); the processor is the tiny
model's (same CLIP preprocessing and AnyRes geometry, byte-level tokenizer). Scores from such a model are
meaningless; records mark ``random_init``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS, check_llava_next_anyres, resolve_dtype
from globalcom2.models.tiny import byte_level_tokenizer, tiny_processor

Size = Literal["7b", "13b"]

VICUNA = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    },
}
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
VOCAB_SIZE = 32064  # llava-hf's vicuna checkpoints (32000 + <image> + padding to a multiple of 64)


def size_from_name(pretrained: str) -> Size:
    """``"7b"`` or ``"13b"`` from a checkpoint name such as ``llava-hf/llava-v1.6-vicuna-13b-hf``."""
    name = pretrained.lower().replace("_", "-")
    # LLaVA-NeXT's Vicuna by name: llava-v1.6-mistral-7b-hf, Llama-2-7b-hf, lmsys/vicuna-7b-v1.5 (no vision)
    # or llava-v1.5-vicuna-7b-lora would otherwise build LLaVA-NeXT-Vicuna-7B and record it under their name.
    sizes = [size for size in VICUNA if f"llava-v1.6-vicuna-{size}" in name]
    if len(sizes) != 1:
        raise ValueError(
            f"random_init builds LLaVA-NeXT's Vicuna 7B or 13B, named as such, got {pretrained!r} "
            "(valid: llava-hf/llava-v1.6-vicuna-7b-hf, llava-hf/llava-v1.6-vicuna-13b-hf)"
        )
    return sizes[0]  # type: ignore[return-value]


def llava_next_config(size: Size, image_token_index: int, pad_token_id: int) -> LlavaNextConfig:
    """The ``llava-v1.6-vicuna-{size}`` architecture (token ids from the byte-level tokenizer)."""
    if size not in VICUNA:
        raise ValueError(f"unknown LLaVA-NeXT size {size!r}; valid: {', '.join(VICUNA)}")
    text = {**VICUNA[size], "num_key_value_heads": VICUNA[size]["num_attention_heads"]}
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336),
        text_config=LlamaConfig(
            **text,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            pad_token_id=pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_index=image_token_index,
        image_grid_pinpoints=LLAVA_V16_GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def llava_next_config_for(pretrained: str) -> LlavaNextConfig:
    """The config ``random_init`` builds for a checkpoint name (no weights): for checks before building."""
    tokenizer = byte_level_tokenizer()
    return llava_next_config(
        size_from_name(pretrained), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    )


def build_random_llava_next(
    size: Size,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cuda",
    attn_implementation: str | dict[str, str] = "sdpa",
    seed: int = 0,
) -> tuple[LlavaNextForConditionalGeneration, Any]:
    """``(model, processor)``: a randomly initialised real-size LLaVA-NeXT, allocated directly on ``device``.

    ``device="meta"`` builds the architecture without allocating memory (for shape checks on small hosts).
    """
    tokenizer = byte_level_tokenizer()
    config = llava_next_config(size, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    # The weights are drawn from the generator of the device they are built on, seeded here; the caller's RNG
    # state on that device (and every other generator) is left as it was (``torch.manual_seed`` would reseed
    # every CUDA generator for good).
    target = torch.device(device)
    cuda = (
        [target.index if target.index is not None else torch.cuda.current_device()]
        if target.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        model = LlavaNextForConditionalGeneration._from_config(
            config, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    check_llava_next_anyres(model)
    return model, tiny_processor(tokenizer)
