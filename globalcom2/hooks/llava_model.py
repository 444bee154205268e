"""The per-instance subclass of ``LlavaNextModel`` through which every compression method acts.

How it works (transformers 5.23-5.25, ``models/llava_next/modeling_llava_next.py`` and
``generation/utils.py``; the KV cache's keyword changed in 5.24, ``hooks/cache_keyword.py``):

* ``generate`` encodes images *before* prefill through ``model.model.get_image_features`` and hands the
  result to the prefill forward as ``mm_encoder_outputs``; a plain forward calls the same function. The
  override runs the parent unchanged and lets the pre-LLM stage (if any) attach a keep-plan to each
  image's features. The features themselves stay uncompressed, so everything transformers does between
  encoding and prefill (the placeholder bookkeeping of ``_expand_multimodal_outputs`` for beam search,
  pitfall 6) still sees the lengths it expects.
* The ``forward`` override lets the pre-LLM stage gather kept features and rebuild the prompt, then
  describes the final prompt in a :class:`PromptContext` (which positions are visual, of which image)
  that the in-LLM stage (if any) uses while the language model runs.

Only the attached instance changes class (``model.model.__class__`` becomes a subclass of its own
class), so other models in the process are untouched; when the last method is removed the class is
restored and the one attribute we add is deleted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import LlavaNextForConditionalGeneration

from globalcom2.hooks.cache_keyword import CACHE_KEYWORD, cache_argument, output_cache, without_cache
from globalcom2.hooks.pre_llm_sequence import placeholder_owners
from globalcom2.scoring.ranking import int64_tensor
from globalcom2.stage_timing import stage_section

_ADAPTER_ATTR = "_globalcom2"


@dataclass(frozen=True)
class PromptContext:
    """What the language model is about to process in one forward call (after pre-LLM surgery).

    Attributes:
        input_ids: ``[B, L]`` final token ids, or ``None`` when the caller passed ``inputs_embeds``.
        visual_index: ``[B, L]`` image index (scatter order) of every visual position, -1 elsewhere;
            ``None`` in steps without images (decode) or without ``input_ids``.
        attention_mask: ``[B, L_total]`` 2-D mask the language model receives, or ``None``.
        position_ids: ``[B or 1, L]`` positions the language model receives, or ``None``.
        cache: the KV cache of this generation, or ``None``.
        separator: ``[B, L]`` True at the row separators among the visual positions, when the in-LLM method
            counts its budget in patch tokens (``budget_basis="patches"``); ``None`` otherwise.
        image_lengths: visual positions of each image (scatter order), known on the host from the features'
            shapes; empty in steps without images.
        image_rows: the batch row of each image (scatter order) when a pre-LLM surgery changed the prompt,
            which knows it from the original placeholders; ``None`` otherwise (the in-LLM stage derives it
            from the rows' visual positions, which a pre-LLM method that empties an image leaves ambiguous).
    """

    input_ids: torch.Tensor | None
    visual_index: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cache: Any
    separator: torch.Tensor | None = None
    image_lengths: tuple[int, ...] = ()
    image_rows: tuple[int, ...] | None = None

    @property
    def is_prefill(self) -> bool:
        return self.visual_index is not None


class InLLMStage(Protocol):
    """What the model adapter needs from an in-LLM attachment (``hooks/in_llm.py``)."""

    method: Any  # the attached InLLMMethod (its budget_basis decides whether separators are located)

    def active(self, context: PromptContext) -> Any:
        """A context manager entered around the language model's forward for ``context``."""


class ModelAdapter:
    """All compression attached to one model instance: at most one pre-LLM and one in-LLM stage."""

    def __init__(self, model: LlavaNextForConditionalGeneration) -> None:
        self.model = model
        self.pre_llm: Any = None  # PreLLMAdapter (hooks/pre_llm.py)
        self.in_llm: InLLMStage | None = None
        self._original_class: type | None = None

    @classmethod
    def of(cls, model: LlavaNextForConditionalGeneration) -> ModelAdapter:
        """The adapter installed on ``model``, installing one if there is none."""
        existing = getattr(model.model, _ADAPTER_ATTR, None)
        if existing is not None:
            return existing
        adapter = cls(model)
        inner = model.model
        adapter._original_class = type(inner)
        setattr(inner, _ADAPTER_ATTR, adapter)
        inner.__class__ = _compressing_subclass(adapter._original_class)
        return adapter

    @staticmethod
    def ensure_free(model: LlavaNextForConditionalGeneration, slot: str, method_name: str) -> None:
        """Raise if ``slot`` of ``model`` is taken; installs nothing (so a failed attach leaves no trace)."""
        existing = getattr(model.model, _ADAPTER_ATTR, None)
        current = getattr(existing, slot) if existing is not None else None
        if current is not None:
            raise RuntimeError(
                f"a {slot.replace('_', '-')} method ({current.method.name!r}) is already attached to this model; "
                f"call .remove() on its handle before attaching {method_name!r}"
            )

    def occupy(self, slot: str, stage: Any, method_name: str) -> None:
        self.ensure_free(self.model, slot, method_name)
        setattr(self, slot, stage)

    def release(self, slot: str, stage: Any) -> None:
        """Empty ``slot`` (which must hold ``stage``); uninstall when nothing is attached any more."""
        if getattr(self, slot) is not stage:
            raise RuntimeError(f"this {slot} attachment is not the one installed on the model")
        setattr(self, slot, None)
        if self.pre_llm is None and self.in_llm is None:
            inner = self.model.model
            inner.__class__ = self._original_class
            delattr(inner, _ADAPTER_ATTR)


def visual_index_map(
    input_ids: torch.Tensor, image_token_id: int, lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [B, L], offset [B, L])``: image index (scatter order) and position within that image of every
    placeholder, -1 elsewhere (:func:`~globalcom2.hooks.pre_llm_sequence.placeholder_owners`)."""
    return placeholder_owners(input_ids == image_token_id, int64_tensor(lengths, input_ids.device))


def separator_map(
    image_newline: torch.Tensor,
    features: list[torch.Tensor] | tuple[torch.Tensor, ...],
    visual_index: torch.Tensor,
    visual_offset: torch.Tensor,
) -> torch.Tensor:
    """``[B, L]`` True at the visual positions that hold a row separator.

    ``LlavaNextModel.pack_image_features`` fills every separator row with the learned ``image_newline``
    vector, cast to the features' dtype; no projected patch equals it in every coordinate. Finding the rows
    by that equality works wherever the features came from (``generate`` may compute them before the
    forward, without ``image_sizes``) and after a pre-LLM method reordered or dropped rows.
    """
    flags = torch.cat(
        [(feats == image_newline.to(feats.device, feats.dtype)).all(-1) for feats in features]
    ).to(visual_index.device)  # [sum N] packed order of every image = scatter order
    lengths = [feats.shape[0] for feats in features]
    starts = int64_tensor([sum(lengths[:i]) for i in range(len(lengths))], visual_index.device)  # [I]
    flat = starts[visual_index.clamp(min=0)] + visual_offset.clamp(min=0)  # [B, L] index into flags
    return (visual_index >= 0) & flags[flat]


class _CompressingMixin:
    """Placed in front of the instance's own ``LlavaNextModel`` class; keeps the parent's signatures
    (``generate`` picks arguments by ``inspect.signature``)."""

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        return_dict = kwargs.pop("return_dict", True)
        adapter: ModelAdapter = getattr(self, _ADAPTER_ATTR)
        with adapter.pre_llm.capturing_scores() if adapter.pre_llm is not None else nullcontext():
            output = super().get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
                **kwargs,
            )
        if adapter.pre_llm is not None:
            with stage_section("compression"):
                output = adapter.pre_llm.plan(output, pixel_values, image_sizes)
        return output if return_dict else output.to_tuple()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        adapter: ModelAdapter = getattr(self, _ADAPTER_ATTR)
        # The KV cache comes as ``cache`` (transformers >= 5.24) or ``past_key_values`` (5.23).
        cache = cache if cache is not None else cache_argument(kwargs)
        kwargs = without_cache(kwargs)
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        image_output = (mm_encoder_outputs or {}).get("image")
        if image_output is None and pixel_values is not None and pixel_values.size(0) > 0:
            image_output = self.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
            )

        state = None
        if image_output is not None:
            if adapter.pre_llm is not None:
                with stage_section("compression"):
                    input_ids, attention_mask, position_ids, image_output, state = adapter.pre_llm.prefill(
                        input_ids, attention_mask, position_ids, cache, image_output
                    )
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": image_output}
        elif adapter.pre_llm is not None:
            query = input_ids if input_ids is not None else inputs_embeds
            with stage_section("compression"):
                attention_mask, position_ids = adapter.pre_llm.decode(
                    cache, attention_mask, position_ids, query.shape[1]
                )

        return_dict = kwargs.pop("return_dict", True)
        image_rows = state.image_rows if state is not None else None
        with self._in_llm_stage(
            adapter, input_ids, image_output, attention_mask, position_ids, cache, image_rows
        ):
            outputs = super().forward(
                input_ids=input_ids,
                image_sizes=image_sizes,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                use_cache=use_cache,
                mm_encoder_outputs=mm_encoder_outputs,
                return_dict=True,
                **{CACHE_KEYWORD: cache},
                **kwargs,
            )
        if image_output is not None and adapter.pre_llm is not None:
            adapter.pre_llm.remember(output_cache(outputs), state)
        return outputs if return_dict else outputs.to_tuple()

    @contextmanager
    def _in_llm_stage(
        self, adapter, input_ids, image_output, attention_mask, position_ids, cache, image_rows=None
    ) -> Iterator[None]:
        if adapter.in_llm is None:
            yield
            return
        with stage_section("compression"):
            visual_index, separator, lengths = self._visual_maps(adapter, input_ids, image_output)
        context = PromptContext(
            input_ids, visual_index, attention_mask, position_ids, cache, separator, lengths, image_rows
        )
        with adapter.in_llm.active(context):
            yield

    def _visual_maps(
        self, adapter: ModelAdapter, input_ids: torch.Tensor | None, image_output: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, ...]]:
        """Where the prompt's visual positions are (and its row separators, for a ``"patches"`` budget), with
        each image's length read from its features' shape (host-known)."""
        if image_output is None:
            return None, None, ()
        if input_ids is None:
            raise NotImplementedError(
                f"{adapter.in_llm.method.name!r} needs input_ids to find the visual tokens; "
                "inputs_embeds with images is not supported"
            )
        lengths = tuple(feats.shape[0] for feats in image_output.pooler_output)
        visual_index, visual_offset = visual_index_map(input_ids, self.config.image_token_id, list(lengths))
        separator = None
        if adapter.in_llm.method.budget_basis == "patches":
            separator = separator_map(
                self.image_newline, image_output.pooler_output, visual_index, visual_offset
            )
        return visual_index, separator, lengths


_SUBCLASSES: dict[type, type] = {}


def _compressing_subclass(base: type) -> type:
    """``Compressing<Base>``: the mixin in front of ``base``, created once per base class."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Compressing{base.__name__}", (_CompressingMixin, base), {})
    return _SUBCLASSES[base]
