"""Loading LLaVA-NeXT checkpoints, and checking that a model is one we can compress.

One loader serves ``llava-hf/llava-v1.6-vicuna-7b-hf``, ``-13b-hf`` and the tiny offline model, so tests
exercise exactly the code path real evaluations use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

SUPPORTED_CHECKPOINTS = (
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-hf/llava-v1.6-vicuna-13b-hf",
    "tiny (built in code, see globalcom2.models.tiny)",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_llava_next_anyres(model: Any) -> None:
    """Raise unless ``model`` is a ``LlavaNextForConditionalGeneration`` with AnyRes crops and [CLS] dropped.

    The compression methods reason about LLaVA-NeXT's packed layout (thumbnail + unpadded crops +
    row separators, ``globalcom2.anyres``); other architectures would be silently mis-compressed.
    """
    if not isinstance(model, LlavaNextForConditionalGeneration):
        raise TypeError(
            f"expected a LLaVA-NeXT AnyRes model (transformers LlavaNextForConditionalGeneration), got "
            f"{type(model).__name__}. Supported: {', '.join(SUPPORTED_CHECKPOINTS)}."
        )
    config = model.config
    if not config.image_grid_pinpoints:
        raise ValueError("the model config has no image_grid_pinpoints: it does not use AnyRes crops")
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            "vision_feature_select_strategy must be 'default' ([CLS] dropped, 576 patch tokens per view), "
            f"got {config.vision_feature_select_strategy!r}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"a single vision_feature_layer is required, got {config.vision_feature_layer!r}")
    vision = config.vision_config
    if vision.image_size % vision.patch_size:
        raise ValueError(
            f"image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"float32" | "float16" | "bfloat16" | "auto" | torch.dtype | None`` -> what ``from_pretrained`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}, auto")
    return _DTYPES[dtype]


def resolve_checkpoint(pretrained: str | Path) -> str:
    """``"tiny"`` or ``"tiny:<seed>"`` -> the tiny model's folder (built on first use); anything else as is."""
    name = str(pretrained)
    if name == "tiny" or name.startswith("tiny:"):
        from globalcom2.models.tiny import tiny_checkpoint

        seed = int(name.partition(":")[2] or 0)
        return str(tiny_checkpoint(seed))
    return name


def load_llava_next(
    pretrained: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | dict[str, str] = "sdpa",
    random_init: bool = False,
) -> tuple[LlavaNextForConditionalGeneration, Any]:
    """Load a LLaVA-NeXT checkpoint and its processor, ready for left-padded batched generation.

    Args:
        pretrained: a hub id or local folder (``llava-hf/llava-v1.6-vicuna-7b-hf``), or ``"tiny[:seed]"``.
        dtype: weights dtype; transformers 5 otherwise loads the checkpoint's own dtype.
        device: where to put the model.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, or a per-sub-config dict.
        random_init: build ``pretrained``'s architecture (7B or 13B, read from its name) with random
            weights instead of loading it: for speed and memory measurements without the checkpoint.

    Returns:
        ``(model, processor)``; the model is in eval mode and passes :func:`check_llava_next_anyres`.
    """
    if random_init:
        from globalcom2.models.random_init import build_random_llava_next, size_from_name

        resolved = "float16" if dtype in (None, "auto") else dtype  # the llava-hf checkpoints' dtype
        return build_random_llava_next(
            size_from_name(str(pretrained)),
            dtype=resolved,
            device=device,
            attn_implementation=attn_implementation,
        )
    path = resolve_checkpoint(pretrained)
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load a LLaVA-NeXT checkpoint from {path!r}: {err}. Pass a local folder, download it first "
            "(e.g. `hf download llava-hf/llava-v1.6-vicuna-7b-hf`), or use pretrained='tiny'."
        ) from err
    model = model.to(device).eval()
    check_llava_next_anyres(model)
    # Pin the PIL image processor: it exists on every machine (no torchvision needed), and the
    # torchvision backend gives slightly different pixels, so one backend keeps numbers comparable.
    processor = AutoProcessor.from_pretrained(path, backend="pil")
    processor.tokenizer.padding_side = "left"  # not serialised by tokenizers; batched generation needs it
    return model, processor
