"""The pre-LLM stage: per-image keep-plans, feature gathering, and prompt surgery.

``ModelAdapter``'s ``get_image_features`` override calls :meth:`PreLLMAdapter.plan` with the unmodified
packed features of every image; the method returns packed positions to keep (or a
:class:`~globalcom2.methods.base.Replacement` of the image's features), and the plan is stored next
to the features (keyed by the feature tensor itself, so it survives transformers' beam expansion, which
repeats the same tensor objects). At prefill, :meth:`PreLLMAdapter.prefill` gathers the kept features (or
takes the replacement) and, when any image changed length, rebuilds the prompt
(``hooks/pre_llm_sequence.py``); the resulting :class:`DecodeState` is tied to the KV cache so
:meth:`PreLLMAdapter.decode` can translate every later step into compressed coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from globalcom2.anyres import PackedLayout, config_layout
from globalcom2.hooks.cache_state import CacheStates
from globalcom2.hooks.pre_llm_sequence import DecodeState, decode_inputs, rebuild_prompt
from globalcom2.methods.base import ImageContext, ImageStats, PreLLMMethod, Replacement
from globalcom2.models.compiled import compile_mode_of
from globalcom2.scoring.vision_attention import ClsAttentionCapture
from globalcom2.scoring.vision_capture import CapturedViews, ViewCapture


@dataclass(frozen=True)
class ImagePlan:
    """The kept positions of one image, tied to the exact feature tensor they index."""

    features: torch.Tensor  # [N, D] identity anchor: plans are looked up by this object
    # [M] packed positions in output order; a Replacement of all [N, D] features; None keeps all unchanged
    source: torch.Tensor | Replacement | None

    def apply(self) -> torch.Tensor:
        """``[M, D]`` the features the LLM sees for this image."""
        if self.source is None:
            return self.features
        if isinstance(self.source, Replacement):
            return self.source.features
        return self.features.index_select(0, self.source)


@dataclass
class PlannedImageFeatures(BaseModelOutputWithPooling):
    """``get_image_features`` output plus one :class:`ImagePlan` per feature tensor (keyed by ``id``)."""

    plans: dict[int, ImagePlan] | None = None
    # the adapter that planned them: another one (an attachment since removed, or a method attached after)
    # must not apply this one's selection without running its own
    planner: object | None = None


class PreLLMAdapter:
    """Owns one attached pre-LLM method: planning, prompt surgery and per-generation decode state."""

    def __init__(self, model: LlavaNextForConditionalGeneration, method: PreLLMMethod) -> None:
        self.model = model
        self.method = method
        self.stats: list[ImageStats] = []
        self._decode_states = CacheStates()  # DecodeState per cache this adapter's prefills compressed
        config = model.config
        self._image_token_id = config.image_token_id
        pad = config.text_config.pad_token_id
        self._pad_token_id = 0 if pad is None else int(pad)
        self._scores: ClsAttentionCapture | None = None
        self._pending_scores: torch.Tensor | None = None
        if method.vision_score_layer is not None:
            self._scores = ClsAttentionCapture(
                model.model.vision_tower, method.vision_score_layer, method.vision_score_kind
            )
        self._views: ViewCapture | None = None
        self._pending_views: CapturedViews | None = None
        if method.vision_capture_layer is not None:
            self._views = ViewCapture(model.model.vision_tower, method.vision_capture_layer)

    def close(self) -> None:
        """Remove the score and capture hooks (called when the attachment is removed)."""
        if self._scores is not None:
            self._scores.remove()
        if self._views is not None:
            self._views.remove()

    # -- planning (inside get_image_features) -------------------------------------------------------
    @contextmanager
    def capturing_scores(self) -> Iterator[None]:
        """Active around the vision tower's forward: records [CLS] scores and per-view layer states when
        the method needs them."""
        if self._scores is None and self._views is None:
            yield
            return
        with ExitStack() as stack:
            scores = stack.enter_context(self._scores.capture()) if self._scores is not None else None
            views = stack.enter_context(self._views.capture()) if self._views is not None else None
            yield
            if scores is not None:
                self._pending_scores = torch.cat(scores) if scores else None  # [sum of views, 576]
            if views is not None:
                self._pending_views = CapturedViews.cat(views) if views else None  # [sum of views, ...]

    def layout(self, image_size: torch.Tensor | list[int]) -> PackedLayout:
        return config_layout(self.model.config, image_size)

    def plan(
        self, output: BaseModelOutputWithPooling, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> PlannedImageFeatures:
        """Decide, for every image of this call, which packed positions the LLM will see."""
        features = list(output.pooler_output)  # I x [N_i, D]
        layouts = [self.layout(size) for size in image_sizes.tolist()]  # one read of the sizes for all
        num_views = [layout.num_views for layout in layouts]
        views = _views_per_image(pixel_values, num_views)
        scores = self._scores_per_image(num_views)
        captured = self._views_per_image(num_views)
        project = self.model.model.multi_modal_projector
        compile_mode = compile_mode_of(self.model)
        contexts: list[ImageContext] = []
        for feats, layout, pixels, image_scores, image_views in zip(
            features, layouts, views, scores, captured, strict=True
        ):
            layout.check_features(feats)
            contexts.append(
                ImageContext(
                    layout=layout,
                    pixel_values=pixels,
                    vision_scores=image_scores,
                    views=image_views,
                    project=project,
                    compile_mode=compile_mode,
                )
            )
        sources = self.method.select_images(features, contexts)  # every image of the call at once
        if len(sources) != len(features):
            raise RuntimeError(
                f"{self.method.name!r} returned {len(sources)} selections for the {len(features)} images of the call"
            )
        plans: dict[int, ImagePlan] = {}
        selected: list[tuple[PackedLayout, torch.Tensor | Replacement | None]] = []
        for feats, layout, source in zip(features, layouts, sources, strict=True):
            if isinstance(source, Replacement):
                _check_replacement(self.method.name, feats, source)
            plans[id(feats)] = ImagePlan(features=feats, source=source)
            selected.append((layout, source))
        self.stats.extend(self._images_stats(selected))
        kept = {f.name: getattr(output, f.name) for f in fields(BaseModelOutputWithPooling)}
        return PlannedImageFeatures(**kept, plans=plans, planner=self)

    def _scores_per_image(self, num_views: list[int]) -> list[torch.Tensor | None]:
        """Split the captured ``[sum of views, 576]`` scores per image (``None`` if not requested)."""
        if self._scores is None:
            return [None] * len(num_views)
        scores, self._pending_scores = self._pending_scores, None
        if scores is None or scores.shape[0] != sum(num_views):
            raise RuntimeError(
                f"{self.method.name!r} needs [CLS] scores of every view, but the vision tower produced "
                f"{0 if scores is None else scores.shape[0]} for {sum(num_views)} views"
            )
        return list(torch.split(scores, num_views))

    def _views_per_image(self, num_views: list[int]) -> list[CapturedViews | None]:
        """Split the captured per-view layer states per image (``None`` if not requested)."""
        if self._views is None:
            return [None] * len(num_views)
        views, self._pending_views = self._pending_views, None
        if views is None or views.num_views != sum(num_views):
            raise RuntimeError(
                f"{self.method.name!r} needs the CLIP layer states of every view, but the vision tower produced "
                f"{0 if views is None else views.num_views} for {sum(num_views)} views"
            )
        return views.split(num_views)

    def _images_stats(
        self, selected: list[tuple[PackedLayout, torch.Tensor | Replacement | None]]
    ) -> list[ImageStats]:
        """The stats of every image of a call; separator counts the method keeps on the device (a method
        whose selection decides them) are read back together, one wait for the call."""
        counts: list[int | torch.Tensor | None] = [
            self.method.separators_kept(layout, source) if isinstance(source, torch.Tensor) else None
            for layout, source in selected
        ]
        on_device = [i for i, count in enumerate(counts) if isinstance(count, torch.Tensor)]
        if on_device:
            read = torch.stack([counts[i] for i in on_device]).tolist()  # the one device read of the call
            for i, value in zip(on_device, read, strict=True):
                counts[i] = int(value)
        return [
            self._image_stats(layout, source, count)
            for (layout, source), count in zip(selected, counts, strict=True)
        ]

    def _image_stats(
        self, layout: PackedLayout, source: torch.Tensor | Replacement | None, separators_kept: int | None
    ) -> ImageStats:
        if source is None:
            patches, separators = layout.num_patches, layout.num_separators
        elif isinstance(source, Replacement):
            patches, separators = source.patch_tokens, source.separators
        else:
            separators = int(separators_kept)
            patches = source.numel() - separators
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
        cache: object | None,
        image_output: BaseModelOutputWithPooling,
    ) -> tuple[
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        BaseModelOutputWithPooling,
        DecodeState | None,
    ]:
        """Gather the kept features (or take the replacements) and, if any image changed length, rebuild the
        prompt."""
        plans = getattr(image_output, "plans", None)
        if plans is None:
            raise RuntimeError(
                "image features reached the compressed model without a compression plan; compute them with "
                "this (attached) model's get_image_features, or pass pixel_values"
            )
        if getattr(image_output, "planner", None) is not self:
            raise RuntimeError(
                "these image features were planned by another attachment (one removed since, or another "
                f"method), not by the attached {self.method.name!r}, whose selection would not run; compute "
                "them again with this model's get_image_features, or pass pixel_values"
            )
        selected, original, kept = [], [], []
        for feats in image_output.pooler_output:
            plan = plans.get(id(feats))
            if plan is None or plan.features is not feats:
                raise RuntimeError("could not match image features to their compression plan")
            out = plan.apply()
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
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("compressed images must be in the first forward of a KV cache")
        rebuilt = rebuild_prompt(
            input_ids,
            attention_mask,
            position_ids,
            image_token_id=self._image_token_id,
            original_lengths=original,
            new_lengths=kept,
            pad_token_id=self._pad_token_id,
        )
        return rebuilt.input_ids, rebuilt.attention_mask, rebuilt.position_ids, compressed, rebuilt.state

    def remember(self, cache: object, state: DecodeState | None) -> None:
        """Tie ``state`` to ``cache`` (or forget a stale one when this prefill needed none)."""
        self._decode_states.put(cache, state)

    def decode(
        self,
        cache: object | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        query_length: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Positions and mask of a step that continues a compressed prefill (unchanged otherwise)."""
        state = self._decode_states.get(cache)
        if state is None:
            return attention_mask, position_ids
        translated = decode_inputs(
            state, attention_mask, position_ids, past_length=cache.get_seq_length(), query_length=query_length
        )  # with a mask (a padded batch), a step that does not continue the prefill is named there
        if query_length != 1:
            # a generate step is one token; several after a compressed prefill are a second turn whose
            # input_ids restart from the original prompt (its image placeholders fed as text, at shifted
            # positions), a chunked prefill or an assisted step: with no padding generate passes no mask,
            # so decode_inputs' mask check cannot see it
            raise NotImplementedError(
                f"a {query_length}-token step after a pre-LLM method's compressed prefill: it supports neither "
                "a second turn on the cache of a compressed generation (run the new turn without the cache), "
                "chunked prefill (prefill_chunk_size) nor assisted decoding (assistant_model, "
                "prompt_lookup_num_tokens)"
            )
        return translated


def _check_replacement(method: str, features: torch.Tensor, replacement: Replacement) -> None:
    """Raise unless ``replacement`` can stand in for ``features`` (host metadata only: no device read)."""
    new = replacement.features
    if (
        new.dim() != 2
        or new.shape[0] != replacement.patch_tokens + replacement.separators
        or new.shape[1] != features.shape[1]
        or new.dtype != features.dtype
        or new.device != features.device
    ):
        raise RuntimeError(
            f"{method!r} replaced features [{features.shape[0]}, {features.shape[1]}] {features.dtype} on "
            f"{features.device} with {list(new.shape)} {new.dtype} on {new.device}, counted as "
            f"{replacement.patch_tokens} patch tokens + {replacement.separators} separators; a replacement must be "
            f"[patch_tokens + separators, {features.shape[1]}] in the features' dtype and device"
        )


def _views_per_image(pixel_values: torch.Tensor, num_views: list[int]) -> list[torch.Tensor]:
    """Each image's ``[1 + crops, 3, H, W]`` views from padded 5-D or concatenated 4-D pixel values."""
    if pixel_values.dim() == 5:
        return [pixels[:n] for pixels, n in zip(pixel_values, num_views, strict=True)]
    return list(torch.split(pixel_values, num_views, dim=0))
