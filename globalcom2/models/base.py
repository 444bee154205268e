"""What the models package shares, and nothing that builds or loads a model.

The package is layered so that no module needs a function-level import to dodge a cycle::

    base                          names, the AnyRes checks, dtypes, llava-v1.6's grid
    geometry, tiny                the original LLaVA code's AnyRes grid ties and unpadding; the random tiny
                                  model (config, byte-level tokenizer, processor)
    tiny_trained, random_init     the other builders, on tiny's tokenizer and processor recipes
    preload                       a checkpoint's config and the device, checked before any weight loads
    loader                        ``load_llava_next``: the one path from a name to ``(model, processor)``

Each layer imports only the layers above it (``tests/harness/test_layering.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from transformers import LlavaNextForConditionalGeneration

# llava-v1.6 AnyRes canvases as (height, width).
LLAVA_V16_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SUPPORTED_MODEL_TYPE = "llava_next"
SUPPORTED_ARCHITECTURE = "LlavaNextForConditionalGeneration"
SUPPORTED_TEXT_MODEL_TYPE = "llama"  # Vicuna
SUPPORTED_VISION_MODEL_TYPE = "clip_vision_model"
SUPPORTED_CHECKPOINTS = (
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-hf/llava-v1.6-vicuna-13b-hf",
    "tiny (built in code, see globalcom2.models.tiny)",
    "tiny-trained (trained by `make train-tiny`, committed; see globalcom2.models.tiny_trained)",
)
TINY = "tiny"
TINY_TRAINED = "tiny-trained"


#: The transformers releases the attach points are written and tested for: pyproject's pin, which a test keeps
#: equal. Another release installs where the project is not (a checkout run from ``PYTHONPATH`` beside a
#: machine's own transformers), and there the hooks would fail only inside ``generate``, or not at all.
SUPPORTED_TRANSFORMERS = ">=5.23,<5.26"


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaVA-NeXT AnyRes model."""


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is outside :data:`SUPPORTED_TRANSFORMERS`."""


def check_transformers_version(installed: str | None = None) -> None:
    """Refuse a transformers release outside :data:`SUPPORTED_TRANSFORMERS` (``installed``: the imported one).

    A pre-release or source build inside the range (``5.25.1.dev0``, from a checkout of a patch branch) is taken;
    one of the release that ends the range (``5.26.0.dev0``, transformers' main after 5.25) is not: PEP 440's
    ``<5.26`` excludes 5.26's own pre-releases."""
    installed = installed or transformers.__version__
    try:
        supported = SpecifierSet(SUPPORTED_TRANSFORMERS).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedTransformersError(
            f"transformers {installed} is installed; this harness needs transformers{SUPPORTED_TRANSFORMERS} "
            "(its attach points hook internals that other releases name differently). Install the project "
            "(`make install`), or on a prepared machine put the carried wheels first on PYTHONPATH "
            "(README, 'Installing': make carry-wheels)"
        )


def tiny_seed(name: str) -> int | None:
    """``"tiny"`` -> 0, ``"tiny:3"`` -> 3, anything else -> ``None``; ``"tiny:x"`` raises."""
    if name != TINY and not name.startswith(f"{TINY}:"):
        return None
    seed = name.partition(":")[2]
    if seed and not seed.isdigit():
        raise ValueError(
            f"pretrained={name!r}: the tiny model is 'tiny' or 'tiny:<seed>' with an integer seed"
        )
    return int(seed or 0)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = (*_DTYPES, "auto")
#: torch dtype -> its name in :data:`DTYPE_CHOICES`.
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def check_config_type(raw: dict[str, Any], source: str) -> None:
    """Refuse a config whose ``model_type`` or ``architectures`` is not LLaVA-NeXT's."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type != SUPPORTED_MODEL_TYPE or (architectures and SUPPORTED_ARCHITECTURE not in architectures):
        raise UnsupportedModelError(
            f"{source!r} is a {model_type!r} model ({', '.join(architectures) or 'no architectures listed'}); "
            f"only LLaVA-NeXT AnyRes checkpoints are supported (model_type {SUPPORTED_MODEL_TYPE!r}, "
            f"{SUPPORTED_ARCHITECTURE}), e.g. {', '.join(SUPPORTED_CHECKPOINTS)}."
        )


def check_llava_next_config(config: Any, source: str = "the model") -> None:
    """Raise unless ``config`` describes AnyRes crops with [CLS] dropped and one feature layer, on a
    LLaMA (Vicuna) language model and a CLIP vision tower.

    The compression methods reason about LLaVA-NeXT's packed layout (thumbnail + unpadded crops + row
    separators, ``globalcom2.anyres``); other layouts would be silently mis-compressed.
    """
    if not getattr(config, "image_grid_pinpoints", None):
        raise UnsupportedModelError(f"{source}: the config has no image_grid_pinpoints, so no AnyRes crops")
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            f"{source}: vision_feature_select_strategy must be 'default' ([CLS] dropped, 576 patch tokens per "
            f"view), got {config.vision_feature_select_strategy!r}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise UnsupportedModelError(
            f"{source}: a single vision_feature_layer is required, got {config.vision_feature_layer!r}"
        )
    text_type = getattr(config.text_config, "model_type", None)
    vision_type = getattr(config.vision_config, "model_type", None)
    if (text_type, vision_type) != (SUPPORTED_TEXT_MODEL_TYPE, SUPPORTED_VISION_MODEL_TYPE):
        # llava-v1.6-mistral-7b, -34b (Yi, ChatML) and llama3-llava-next-8b pass every check above, but
        # their prompts are not Vicuna's (``globalcom2.prompts``) and the in-LLM methods and FLOPs assume
        # LLaMA's decoder.
        raise UnsupportedModelError(
            f"{source}: a {text_type!r} language model with a {vision_type!r} vision tower; supported are "
            f"LLaVA-NeXT's Vicuna checkpoints ({SUPPORTED_TEXT_MODEL_TYPE!r} with {SUPPORTED_VISION_MODEL_TYPE!r}), "
            f"e.g. {', '.join(SUPPORTED_CHECKPOINTS)}"
        )
    vision = config.vision_config
    if vision.image_size % vision.patch_size:
        raise UnsupportedModelError(
            f"{source}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )


def check_llava_next_anyres(model: Any) -> None:
    """Raise unless ``model`` is a ``LlavaNextForConditionalGeneration`` with AnyRes crops and [CLS] dropped.

    The compression methods reason about LLaVA-NeXT's packed layout (thumbnail + unpadded crops +
    row separators, ``globalcom2.anyres``); other architectures would be silently mis-compressed. Every
    load and every ``attach`` passes here, so the transformers release is checked here too.
    """
    check_transformers_version()
    if not isinstance(model, LlavaNextForConditionalGeneration):
        raise TypeError(
            f"expected a LLaVA-NeXT AnyRes model (transformers LlavaNextForConditionalGeneration), got "
            f"{type(model).__name__}. Supported: {', '.join(SUPPORTED_CHECKPOINTS)}."
        )
    check_llava_next_config(model.config)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"float32" | "float16" | "bfloat16" | "auto" | torch.dtype | None`` -> what ``from_pretrained`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[dtype]
