"""What a compression method is: its stage, its parameters, and the one function it implements.

Pre-LLM methods (``vanilla``, ``random``, ``globalcom2``) see one image's packed visual features before
they are scattered into the prompt and return which packed positions to feed to the LLM, in order::

    select(features[N, D], ctx) -> source[M] (int64 indices into 0..N-1) or None (= keep all, unchanged)

Expressing every output as indices into the unmodified packed sequence keeps methods pure (no model
access), makes the realised counts exact and auditable, and lets a layout repeat a separator (the
GlobalCom² reference layout emits more separators than vanilla, ../shared/reference/globalcom2.md §2.7).
The hook in ``globalcom2/hooks/pre_llm.py`` does the gathering and the sequence surgery, once for all
methods.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch

from globalcom2.anyres import PackedLayout
from globalcom2.budget import validate_retention_ratio
from globalcom2.registry import Registry

Stage = Literal["pre_llm", "in_llm"]


class CompressionMethod:
    """Base of every registered method. Subclasses hold only their hyperparameters.

    Attributes:
        name: the registry name, set by :func:`register_method`.
        stage: where the method acts: before the LLM or inside its decoder.
        supported_attn_implementations: the transformers ``attn_implementation`` values the method works
            with. Harnesses check it before loading a model; a method that needs attention weights
            from a kernel that cannot return them (e.g. flash attention) narrows it.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage]
    supported_attn_implementations: ClassVar[frozenset[str]] = frozenset({"sdpa", "eager"})

    def __init__(self, *, retention_ratio: float = 1.0) -> None:
        self.retention_ratio = validate_retention_ratio(retention_ratio)

    def params(self) -> dict[str, object]:
        """Hyperparameters as plain values, for records and logs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


@dataclass
class ImageContext:
    """Everything a pre-LLM method may look at for one image, besides its features.

    Attributes:
        layout: provenance of every packed position (view, token, separators).
        pixel_values: ``[1 + crops, 3, 336, 336]`` the image's views as fed to CLIP (thumbnail first).
        vision_scores: ``[1 + crops, 576]`` [CLS]->patch scores, when the method asked for them.
    """

    layout: PackedLayout
    pixel_values: torch.Tensor
    vision_scores: torch.Tensor | None = None

    @cached_property
    def sample_key(self) -> str:
        """A stable key of this image's content: the same image gets the same key in any batch,
        process or position, so seeded choices never depend on batch composition or world size."""
        return image_content_key(self.pixel_values, self.layout.image_size)


def image_content_key(pixel_values: torch.Tensor, image_size: tuple[int, int]) -> str:
    """Hex digest of the thumbnail's pixels (as the model receives them) and the original size."""
    thumbnail = pixel_values[0].detach().contiguous().cpu()  # [3, 336, 336]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(image_size)).encode())
    digest.update(str(thumbnail.dtype).encode())
    digest.update(thumbnail.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PreLLMMethod(CompressionMethod):
    """A method that chooses visual tokens before the LLM sees them.

    Attributes:
        vision_score_layer: CLIP layer whose [CLS]->patch scores the method needs (``None``: no scores).
    """

    stage: ClassVar[Stage] = "pre_llm"
    vision_score_layer: int | None = None

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | None:
        """Packed positions to keep, in output order (``[M]`` int64), or ``None`` to keep all unchanged.

        Args:
            features: ``[N, D]`` the image's packed features (patches and separators).
            ctx: layout, pixels and optional scores of this image.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class ImageStats:
    """Realised token counts of one image in one call, recorded for every compressed image."""

    method: str
    image_size: tuple[int, int]
    tokens_before: int  # packed length N (patches + separators)
    patch_tokens_before: int
    patch_tokens_kept: int
    separators_kept: int

    @property
    def tokens_after(self) -> int:
        return self.patch_tokens_kept + self.separators_kept


METHODS: Registry[CompressionMethod] = Registry("compression method")


def register_method(name: str) -> Callable[[type[CompressionMethod]], type[CompressionMethod]]:
    """Class decorator: register a method under ``name`` and record the name on the class."""

    def decorator(cls: type[CompressionMethod]) -> type[CompressionMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator
