"""The one pre-LLM attach point: a per-instance subclass of ``LlavaNextModel``.

How it works (transformers 5.x, ../shared/reference/transformers_llava_next.md §1 and §4):

* ``generate`` encodes images *before* prefill through ``model.model.get_image_features`` and hands the
  result to the prefill forward as ``mm_encoder_outputs``; a plain forward calls the same function.
  Our override runs the parent unchanged, then asks the method which packed positions to keep for each
  image and records that *plan* next to the features. The features themselves stay uncompressed, so
  everything transformers does between encoding and prefill (the placeholder bookkeeping of
  ``_expand_multimodal_outputs`` for beam search, pitfall 6) still sees the lengths it expects.
* The ``forward`` override applies the plans: it gathers the kept features, rebuilds the prompt when
  lengths changed (``hooks/sequence.py``), and remembers a :class:`DecodeState` keyed by the KV cache so
  that later decode steps get positions and masks in compressed coordinates.

Only the attached instance changes class (``model.model.__class__`` becomes a subclass of its own
class); other models in the process are untouched, and ``remove()`` restores the class and deletes the
one attribute we add.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from globalcom2.anyres import PackedLayout, packed_layout
from globalcom2.hooks.sequence import DecodeState, decode_inputs, rebuild_prompt
from globalcom2.methods.base import ImageContext, ImageStats, PreLLMMethod

_ADAPTER_ATTR = "_globalcom2_pre_llm"


@dataclass(frozen=True)
class ImagePlan:
    """The kept positions of one image, tied to the exact feature tensor they index."""

    features: torch.Tensor  # [N, D] identity anchor: plans are looked up by this object
    source: torch.Tensor | None  # [M] packed positions in output order; None keeps all unchanged


@dataclass
class PlannedImageFeatures(BaseModelOutputWithPooling):
    """``get_image_features`` output plus one :class:`ImagePlan` per feature tensor (keyed by ``id``)."""

    plans: dict[int, ImagePlan] | None = None


class PreLLMAdapter:
    """Owns one attached pre-LLM method: planning, prompt surgery and per-generation decode state."""

    def __init__(self, model: LlavaNextForConditionalGeneration, method: PreLLMMethod) -> None:
        self.model = model
        self.method = method
        self.stats: list[ImageStats] = []
        self._decode_states: weakref.WeakKeyDictionary[object, DecodeState] = weakref.WeakKeyDictionary()
        config = model.config
        self._pinpoints = config.image_grid_pinpoints
        self._crop_size = config.vision_config.image_size
        self._patch_size = config.vision_config.patch_size
        self._image_token_id = config.image_token_id
        pad = config.text_config.pad_token_id
        self._pad_token_id = 0 if pad is None else int(pad)
        self._original_class: type | None = None

    # -- installation -------------------------------------------------------------------------------
    def install(self) -> None:
        inner = self.model.model
        if hasattr(inner, _ADAPTER_ATTR):
            raise RuntimeError(
                f"a pre-LLM method ({getattr(inner, _ADAPTER_ATTR).method.name!r}) is already attached to this "
                "model; call .remove() on its handle first"
            )
        self._original_class = type(inner)
        setattr(inner, _ADAPTER_ATTR, self)
        inner.__class__ = _compressing_subclass(self._original_class)

    def uninstall(self) -> None:
        inner = self.model.model
        if getattr(inner, _ADAPTER_ATTR, None) is not self:
            raise RuntimeError("this pre-LLM attachment is not the one installed on the model")
        inner.__class__ = self._original_class
        delattr(inner, _ADAPTER_ATTR)
        self._decode_states.clear()

    # -- planning (inside get_image_features) -------------------------------------------------------
    def layout(self, image_size: torch.Tensor) -> PackedLayout:
        return packed_layout(image_size, self._pinpoints, self._crop_size, self._patch_size)

    def plan(
        self, output: BaseModelOutputWithPooling, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> PlannedImageFeatures:
        """Decide, for every image of this call, which packed positions the LLM will see."""
        features = list(output.pooler_output)  # I x [N_i, D]
        layouts = [self.layout(size) for size in image_sizes]
        views = _views_per_image(pixel_values, [layout.num_views for layout in layouts])
        plans: dict[int, ImagePlan] = {}
        for feats, layout, pixels in zip(features, layouts, views, strict=True):
            if feats.shape[0] != layout.num_tokens:
                raise RuntimeError(
                    f"packed features of an image of size {layout.image_size} have {feats.shape[0]} tokens, "
                    f"the AnyRes geometry predicts {layout.num_tokens}; is this a LLaVA-NeXT AnyRes model?"
                )
            ctx = ImageContext(layout=layout, pixel_values=pixels)
            source = self.method.select(feats, ctx)
            plans[id(feats)] = ImagePlan(features=feats, source=source)
            self.stats.append(self._image_stats(layout, source))
        kept = {f.name: getattr(output, f.name) for f in fields(BaseModelOutputWithPooling)}
        return PlannedImageFeatures(**kept, plans=plans)

    def _image_stats(self, layout: PackedLayout, source: torch.Tensor | None) -> ImageStats:
        if source is None:
            patches, separators = layout.num_patches, layout.num_separators
        else:
            kept_separators = int(layout.is_separator[source.cpu()].sum())
            patches, separators = source.numel() - kept_separators, kept_separators
        return ImageStats(
            method=self.method.name,
            image_size=layout.image_size,
            tokens_before=layout.num_tokens,
            patch_tokens_before=layout.num_patches,
            patch_tokens_kept=patches,
            separators_kept=separators,
        )

    # -- applying plans (inside forward) ------------------------------------------------------------
    def prefill(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: object | None,
        image_output: BaseModelOutputWithPooling,
    ) -> tuple[
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        BaseModelOutputWithPooling,
        DecodeState | None,
    ]:
        """Gather the kept features and, if any image changed length, rebuild the prompt."""
        plans = getattr(image_output, "plans", None)
        if plans is None:
            raise RuntimeError(
                "image features reached the compressed model without a compression plan; compute them with "
                "this (attached) model's get_image_features, or pass pixel_values"
            )
        selected, original, kept = [], [], []
        for feats in image_output.pooler_output:
            plan = plans.get(id(feats))
            if plan is None or plan.features is not feats:
                raise RuntimeError("could not match image features to their compression plan")
            out = feats if plan.source is None else feats.index_select(0, plan.source)
            selected.append(out)
            original.append(feats.shape[0])
            kept.append(out.shape[0])
        compressed = BaseModelOutputWithPooling(pooler_output=selected)
        if original == kept:
            return input_ids, attention_mask, position_ids, compressed, None
        if input_ids is None:
            raise NotImplementedError(
                "compression that changes the token count needs input_ids, not inputs_embeds"
            )
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise NotImplementedError("compressed images must be in the first forward of a KV cache")
        rebuilt = rebuild_prompt(
            input_ids,
            attention_mask,
            position_ids,
            image_token_id=self._image_token_id,
            original_lengths=torch.tensor(original),
            new_lengths=torch.tensor(kept),
            pad_token_id=self._pad_token_id,
        )
        return rebuilt.input_ids, rebuilt.attention_mask, rebuilt.position_ids, compressed, rebuilt.state

    def remember(self, cache: object, state: DecodeState | None) -> None:
        """Tie ``state`` to ``cache`` (or forget a stale one when this prefill needed none)."""
        if cache is None:
            return
        if state is None:
            self._decode_states.pop(cache, None)
        else:
            self._decode_states[cache] = state

    def decode(
        self,
        cache: object | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        query_length: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Positions and mask of a step that continues a compressed prefill (unchanged otherwise)."""
        state = self._decode_states.get(cache) if cache is not None else None
        if state is None:
            return attention_mask, position_ids
        return decode_inputs(
            state, attention_mask, position_ids, past_length=cache.get_seq_length(), query_length=query_length
        )


def _views_per_image(pixel_values: torch.Tensor, num_views: list[int]) -> list[torch.Tensor]:
    """Each image's ``[1 + crops, 3, H, W]`` views from padded 5-D or concatenated 4-D pixel values."""
    if pixel_values.dim() == 5:
        return [pixels[:n] for pixels, n in zip(pixel_values, num_views, strict=True)]
    return list(torch.split(pixel_values, num_views, dim=0))


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
        output = super().get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **kwargs,
        )
        planned = getattr(self, _ADAPTER_ATTR).plan(output, pixel_values, image_sizes)
        return planned if return_dict else planned.to_tuple()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        adapter: PreLLMAdapter = getattr(self, _ADAPTER_ATTR)
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
            input_ids, attention_mask, position_ids, image_output, state = adapter.prefill(
                input_ids, attention_mask, position_ids, past_key_values, image_output
            )
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": image_output}
        else:
            query = input_ids if input_ids is not None else inputs_embeds
            attention_mask, position_ids = adapter.decode(
                past_key_values, attention_mask, position_ids, query.shape[1]
            )

        return_dict = kwargs.pop("return_dict", True)
        outputs = super().forward(
            input_ids=input_ids,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        if image_output is not None:
            adapter.remember(outputs.past_key_values, state)
        return outputs if return_dict else outputs.to_tuple()


_SUBCLASSES: dict[type, type] = {}


def _compressing_subclass(base: type) -> type:
    """``Compressing<Base>``: the mixin in front of ``base``, created once per base class."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Compressing{base.__name__}", (_CompressingMixin, base), {})
    return _SUBCLASSES[base]
