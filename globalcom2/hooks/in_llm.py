"""The in-LLM stage: scoring, pruning and KV-cache-consistent decoding between decoder layers.

Written once for every in-LLM method (FastV, SparseVLM, PDrop, DART); methods only choose query rows, score and keep
(``globalcom2/methods/base.py`` :class:`InLLMMethod`). Everything acts through forward pre-hooks on the
language model's decoder layers and on the attention modules of the scoring layers; no class or function of
transformers is replaced, and ``LlamaModel.forward`` runs unchanged (transformers 5.23
``models/llama/modeling_llama.py``: it hands every decoder layer the hidden states, the mask, the position
ids and the rotary ``position_embeddings`` as keyword arguments, which a pre-hook may replace).

Prefill (``PromptContext.is_prefill``), for a stage whose first reduced layer is ``b``:

* a pre-hook on ``layers[b - 1].self_attn`` recomputes the attention of the query rows from the module's own
  inputs (``scoring/text_attention.py``): SDPA stays on, no ``L x L`` matrix is built. A method that rates rows
  with the pruned layer's own weights (``score_layer="pruned_layer"``, PDrop) is scored instead in the pre-hook
  of ``layers[b]``, from that layer's input norm and projections; one that rates rows by their keys
  (``score_signal="keys"``, DART) gets the rotary-embedded keys of every row instead of attention rows;
* a pre-hook on ``layers[b]`` asks the method what to keep, gathers the hidden states, position ids and rotary
  ``cos``/``sin`` of the kept rows (or renumbers positions and recomputes ``cos``/``sin``), inserts merged rows,
  left-pads ragged batch rows again and builds the layer's mask with the model's own mask function;
* pre-hooks on every later layer substitute that layer's position embeddings, position ids and mask.

Layers ``>= b`` therefore only ever see, and cache, the kept rows: the KV cache is pruned by construction.

Decode: the per-stage layout of the prompt (which cached columns are real, and the position shift of
renumbering methods) is stored per KV cache. At every decode step, layers of a stage get a mask whose prompt
columns are that stage's cached rows and, for renumbering methods, positions shifted by the rows removed.
With SDPA and no padding the mask stays ``None`` (the fast path), exactly as in the unmodified model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LlavaNextForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from globalcom2.hooks.cache_keyword import cache_argument
from globalcom2.hooks.cache_state import CacheStates
from globalcom2.hooks.in_llm_sequence import gather_rows, plan_relayout, renumber_positions
from globalcom2.hooks.llava_model import PromptContext
from globalcom2.methods.base import InLLMMethod, KeepPlan, LayerStats, TokenView
from globalcom2.scoring.ranking import int64_tensor
from globalcom2.scoring.selection import compact_rows
from globalcom2.scoring.text_attention import attention_rows, rotated_keys
from globalcom2.stage_timing import stage_section

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class StageLayout:
    """The prompt as the layers of one stage cached it (for decoding).

    Attributes:
        first_layer: first decoder layer of the stage.
        valid: ``[B, P]`` real rows among the stage's ``P`` cached prompt rows.
        position_shift: ``[B]`` original minus stage position of the tokens after the prompt (renumbering
            methods), or ``None`` when positions are unchanged.
        padded: whether any of the ``P`` rows is padding (host-known; without padding a decode step needs no
            mask under SDPA, as in the unmodified model).
    """

    first_layer: int
    valid: torch.Tensor
    position_shift: torch.Tensor | None
    padded: bool


@dataclass(frozen=True)
class InLLMDecodeState:
    """What decode steps of one generation need: the prompt length at layer 0 and each reduced layout."""

    prompt_length: int
    prompt_padded: bool
    stages: tuple[StageLayout, ...]  # only stages whose (cumulative) layout differs from the prompt

    def stage_of(self, layer: int) -> StageLayout | None:
        current = None
        for stage in self.stages:
            if stage.first_layer <= layer:
                current = stage
        return current


@dataclass
class _Rows:
    """The rows entering the current decoder layer during a prefill."""

    valid: torch.Tensor  # [B, L]
    image: torch.Tensor  # [B, L]
    protected: torch.Tensor  # [B, L] visual rows no stage may drop (separators under budget_basis="patches")
    query: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, L]
    cos: torch.Tensor  # [B, L, hd]
    sin: torch.Tensor  # [B, L, hd]
    mask: Any  # what the attention receives (None, 4-D bool or float)
    candidates: tuple[int, ...]  # per image, droppable visual rows (host)
    rows: tuple[int, ...]  # per batch row, real rows (host)
    changed: bool = False


@dataclass(frozen=True)
class _StageCounts:
    """Host counts of one stage, per batch row (for :class:`LayerStats`)."""

    queries: tuple[int, ...]
    keys: tuple[int, ...]
    recycle_candidates: tuple[int, ...]
    recycled: tuple[int, ...]
    similarity_products: tuple[int, ...]


class InLLMAdapter:
    """Owns one attached in-LLM method: hooks on the decoder layers and per-generation decode state."""

    def __init__(self, model: LlavaNextForConditionalGeneration, method: InLLMMethod) -> None:
        language_model = model.model.language_model
        self.method = method
        self.config = language_model.config
        self.layers = language_model.layers
        self.rotary = language_model.rotary_emb
        self.num_layers = len(self.layers)
        implementation = self.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise NotImplementedError(
                f"{method.name!r} supports the text attention implementations {SUPPORTED_ATTENTION}, the model uses "
                f"{implementation!r}; load it with attn_implementation='sdpa' (scores are recomputed, so SDPA is fine)"
            )
        self.output_norm = language_model.norm
        self.stage_layers = method.checked_stage_layers(self.num_layers)
        # "previous_layer": scored by layer b - 1's attention inputs (a hook on that module); "pruned_layer": by
        # layer b's own norm and projections, applied to the rows about to enter it (in the layer's pre-hook).
        self.scores_before_cut = method.score_layer == "previous_layer"
        offset = 1 if self.scores_before_cut else 0
        self.score_layers = tuple(layer - offset for layer in self.stage_layers)
        self.stats: list[LayerStats] = []
        self._decode_states = CacheStates()  # InLLMDecodeState per cache this adapter's prefills reduced
        self._run: _Prefill | _Decode | None = None
        self._hooks: list[Any] = []

    def install(self) -> None:
        for index, layer in enumerate(self.layers):
            hook = functools.partial(self._before_layer, index)
            self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self.scores_before_cut:
            for stage, index in enumerate(self.score_layers):
                hook = functools.partial(self._before_attention, stage)
                self._hooks.append(
                    self.layers[index].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
                )

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @contextmanager
    def active(self, context: PromptContext) -> Iterator[None]:
        """Entered by the model adapter around the language model's forward."""
        run: _Prefill | _Decode | None = None
        if context.is_prefill:
            run = _Prefill(self, context)
        elif context.cache is not None:
            state = self._decode_states.get(context.cache)
            if state is not None:
                run = _Decode(self, context, state)
        self._run = run
        try:
            yield
        finally:
            self._run = None
        if isinstance(run, _Prefill) and run.started:  # reached only when the forward succeeded
            with stage_section("compression"):
                stats, state = run.finish()
            self.stats.extend(stats)
            self._decode_states.put(run.cache, state)

    def _before_layer(self, index: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        return None if self._run is None else self._run.before_layer(index, args, kwargs)

    def _before_attention(self, stage: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if isinstance(self._run, _Prefill):
            with stage_section("compression"):
                self._run.score(stage, module, kwargs)

    def layer_mask(self, hidden_states: torch.Tensor, kv_length: int, key_valid: torch.Tensor | None) -> Any:
        """The mask the model's attention expects for queries at the end of ``kv_length`` keys, built by the
        model's own mask function.

        ``key_valid`` (``[B, kv_length]``) is given only when some key is padding (the host knows); without it
        the function returns SDPA's ``is_causal`` fast path (``None``) or the plain causal mask (eager), as the
        unmodified model does, and never inspects a mask on the device.
        """
        batch, query_length = hidden_states.shape[:2]
        return ALL_MASK_ATTENTION_FUNCTIONS[self.config._attn_implementation](
            batch_size=batch,
            q_length=query_length,
            kv_length=kv_length,
            q_offset=kv_length - query_length,
            kv_offset=0,
            mask_function=causal_mask_function,
            attention_mask=None if key_valid is None else key_valid.bool(),
            allow_is_causal_skip=key_valid is None,
            dtype=hidden_states.dtype,
            config=self.config,
            use_vmap=False,
            device=hidden_states.device,
        )


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden_states: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden_states, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden_states}


def _image_rows(
    visual_per_row: list[int], image_lengths: tuple[int, ...], known: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The batch row of each image: ``known`` (from the pre-LLM surgery, which read the original
    placeholders), checked against each row's visual positions; else derived from them, the images filling
    the rows in scatter order. Derived, an image that a pre-LLM method reduced to no token is ambiguous
    between the row it ends and the next one, and is given to the row being filled."""
    if known is not None:
        per_row = [0] * len(visual_per_row)
        for row, length in zip(known, image_lengths, strict=True):
            per_row[row] += length
        if per_row != list(visual_per_row):
            raise RuntimeError(
                "the visual positions of the prompt do not match the image features' lengths "
                f"{list(image_lengths)} in rows {list(known)} (per row: {visual_per_row})"
            )
        return tuple(known)
    rows, image = [], 0
    for row, visual in enumerate(visual_per_row):
        while image < len(image_lengths) and image_lengths[image] <= visual:
            if image_lengths[image] == 0 and visual == 0 and row + 1 < len(visual_per_row):
                break  # an empty image between rows: the next row takes it
            visual -= image_lengths[image]
            rows.append(row)
            image += 1
        if visual:
            raise RuntimeError(
                "the visual positions of the prompt do not match the image features' lengths "
                f"{list(image_lengths)} (per row: {visual_per_row})"
            )
    if image != len(image_lengths):
        raise RuntimeError(
            f"{len(image_lengths)} images but the prompt has visual positions for {image} (per row: {visual_per_row})"
        )
    return tuple(rows)


class _Prefill:
    """One prefill forward: the layouts, scores and counts of every stage.

    Everything the engine sizes (how many rows each batch row keeps, how many query rows, merged rows) is
    counted on the host: one small device read at layer 0 (per-row counts of the prompt), then each stage's
    counts follow from the method's budgets. Consistency checks run on the device
    (``torch._assert_async``), so a prefill never waits for the device in between.
    """

    def __init__(self, adapter: InLLMAdapter, context: PromptContext) -> None:
        self.adapter = adapter
        self.method = adapter.method
        self.context = context
        self.started = False
        self.cache: object | None = None
        self.rows: _Rows | None = None
        self.scores: dict[int, torch.Tensor] = {}
        self.layer_input: torch.Tensor | None = None
        self.visual_counts: list[list[int]] = []  # per layer, per batch row
        self.token_counts: list[tuple[int, ...]] = []  # per layer, per batch row
        self.stage_counts: dict[int, _StageCounts] = {}
        self.stage_layouts: list[StageLayout] = []

    # -- layer 0 ----------------------------------------------------------------------------------------
    def _start(self, hidden: torch.Tensor, kwargs: dict) -> None:
        cache = cache_argument(kwargs)
        if cache is not None:
            if not isinstance(cache, DynamicCache):
                raise NotImplementedError(
                    f"in-LLM compression needs a DynamicCache (the default of generate), got {type(cache).__name__}"
                )
            if cache.get_seq_length() > 0:
                raise NotImplementedError(
                    "in-LLM compression needs the images in the first forward of a KV cache"
                )
        self.cache = cache
        batch, length = hidden.shape[:2]
        device = hidden.device
        image = self.context.visual_index
        lengths = self.context.image_lengths
        if image is None or image.shape != (batch, length):
            raise RuntimeError(
                "the in-LLM stage got no visual-position map matching the language model's input"
            )
        mask = self.context.attention_mask
        if mask is not None and mask.dim() != 2:
            raise NotImplementedError("in-LLM compression needs a 2-D attention_mask (got a 4-D mask)")
        valid = mask.bool() if mask is not None else torch.ones_like(image, dtype=torch.bool)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=device)[None]
        cos, sin = kwargs["position_embeddings"]
        images = len(lengths)
        visual = image >= 0  # [B, L]
        if self.method.budget_basis == "patches":
            if self.context.separator is None or self.context.separator.shape != image.shape:
                raise RuntimeError("budget_basis='patches' needs the separator map of the prompt")
            protected = self.context.separator & visual
        else:
            protected = torch.zeros_like(visual)
        # The one device read of the prefill: per batch row its real rows, visual rows, rows after its last
        # visual row and whether it is right-padded; per image its protected rows.
        columns = torch.arange(length, device=device)
        last_visual = torch.where(visual, columns, -1).max(dim=1).values  # [B]
        after = valid & (columns[None, :] > last_visual[:, None]) & (last_visual[:, None] >= 0)  # [B, L]
        right_padded = (valid[:, :-1] & ~valid[:, 1:]).any(1)  # [B]
        owners = torch.where(protected, image, images).flatten()  # [B L]; unprotected rows to a scratch slot
        protected_per_image = torch.zeros(images + 1, dtype=torch.long, device=device).scatter_add_(
            0, owners, torch.ones_like(owners)
        )[:images]  # [I]
        summary = torch.cat(
            [valid.sum(1), visual.sum(1), after.sum(1), right_padded.long(), protected_per_image]
        ).tolist()
        real_rows, visual_rows = summary[:batch], summary[batch : 2 * batch]
        text_after, bad_padding = summary[2 * batch : 3 * batch], summary[3 * batch : 4 * batch]
        protected_counts = summary[4 * batch :]
        if any(bad_padding):
            raise NotImplementedError(
                "in-LLM compression needs left padding (or none); set processor.tokenizer.padding_side = 'left'"
            )
        self.image_row = _image_rows(visual_rows, lengths, self.context.image_rows)
        self.image_tokens = tuple(lengths)
        self.protected_tokens = tuple(protected_counts)  # [I] separators per image (0 under "positions")
        self.budget_tokens = tuple(n - p for n, p in zip(lengths, protected_counts, strict=True))
        self.text_after = tuple(text_after)
        self.prompt_length = length
        self.prompt_padded = any(n != length for n in real_rows)
        # [B] position of each row's last token (left padding: the last column is real)
        self.last_position = positions.expand(batch, length)[:, -1]
        rows = _Rows(
            valid=valid,
            image=image,
            protected=protected,
            query=torch.zeros_like(valid),
            positions=positions.expand(batch, length),
            cos=cos.expand(batch, -1, -1),
            sin=sin.expand(batch, -1, -1),
            mask=kwargs.get("attention_mask"),
            candidates=self.budget_tokens,
            rows=tuple(real_rows),
        )
        queries = self.method.select_queries(self._view(hidden, rows, layer=0))
        text = valid & ~visual
        torch._assert_async(
            ~(queries.rows & ~text).any(), f"{self.method.name!r} chose query rows that are visual or padding"
        )
        self.rater_candidates = tuple(queries.candidates)
        self.query_count = (
            tuple(queries.count) if queries.count is not None else tuple(queries.rows.sum(1).tolist())
        )
        rows.query = queries.rows
        self.rows = rows
        self.started = True

    def _view(self, hidden: torch.Tensor, rows: _Rows, layer: int) -> TokenView:
        return TokenView(
            hidden_states=hidden,
            image=rows.image,
            valid=rows.valid,
            layer=layer,
            num_layers=self.adapter.num_layers,
            protected=rows.protected,
            image_tokens=self.image_tokens,
            budget_tokens=self.budget_tokens,
            candidates=rows.candidates,
            image_row=self.image_row,
            rows=rows.rows,
            text_after=self.text_after,
            output_norm=self.adapter.output_norm,
        )

    # -- hooks --------------------------------------------------------------------------------------------
    def before_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = _hidden_argument(args, kwargs)
        if index == 0:
            with stage_section("compression"):
                self._start(hidden, kwargs)
        rows = self.rows
        if rows is None:
            return None
        if index in self.adapter.stage_layers:
            stage = self.adapter.stage_layers.index(index)
            with stage_section("compression"):
                if not self.adapter.scores_before_cut:
                    self.layer_input = hidden
                    layer = self.adapter.layers[index]
                    self._score_with(
                        stage, layer.self_attn, layer.input_layernorm(hidden), rows.cos, rows.sin
                    )
                hidden = self._apply_stage(stage, index, hidden)
            rows = self.rows
        self.layer_input = hidden
        visual = [c + p for c, p in zip(rows.candidates, self.protected_tokens, strict=True)]
        self.visual_counts.append(self._view(hidden, rows, index).per_row(visual))
        self.token_counts.append(rows.rows)
        if not rows.changed:
            return None
        kwargs = {
            **kwargs,
            "attention_mask": rows.mask,
            "position_ids": rows.positions,
            "position_embeddings": (rows.cos, rows.sin),
        }
        return _with_hidden(args, kwargs, hidden)

    def score(self, stage: int, module: torch.nn.Module, kwargs: dict) -> None:
        """Scores from the attention module of the layer before the cut (``score_layer="previous_layer"``)."""
        if self.rows is None:
            return
        cos, sin = kwargs["position_embeddings"]
        self._score_with(stage, module, kwargs["hidden_states"], cos, sin)

    def _score_with(
        self, stage: int, module: torch.nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """Ask the method for stage ``stage``'s scores from ``module`` (an attention module) applied to ``normed``
        (``[B, L, D]``, the rows entering the scoring layer after its input norm)."""
        rows = self.rows
        query_index, query_valid = compact_rows(rows.query, max(self.query_count, default=0))  # [B, Q]
        with torch.profiler.record_function("globalcom2.in_llm.score"):
            if self.method.score_signal == "keys":
                signal = rotated_keys(module, normed, cos, sin)  # [B, L, KV * hd]
            else:
                signal = attention_rows(
                    module, normed, cos, sin, query_index, query_valid, rows.valid
                )  # [B, Q, L]
            view = self._view(self.layer_input, rows, self.adapter.score_layers[stage])
            self.scores[stage] = self.method.score(stage, signal, query_valid, view)
        zeros = (0,) * len(rows.rows)
        self.stage_counts[stage] = _StageCounts(self.query_count, rows.rows, zeros, zeros, zeros)

    # -- one stage ----------------------------------------------------------------------------------------
    def _apply_stage(self, stage: int, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        view = self._view(hidden, rows, layer)
        plan: KeepPlan = self.method.keep(stage, self.scores.pop(stage), view)
        images = len(self.image_tokens)
        kept = tuple(plan.kept)
        merged = plan.merged
        merged_count = tuple(merged.count) if merged is not None else (0,) * images
        merged_candidates = tuple(merged.candidates) if merged is not None else (0,) * images
        if len(kept) != images or any(not 0 <= k <= c for k, c in zip(kept, rows.candidates, strict=True)):
            raise RuntimeError(
                f"{self.method.name!r} kept {list(kept)} rows at stage {stage}; each image has "
                f"{list(rows.candidates)} candidates"
            )
        if len(merged_count) != images:
            raise RuntimeError(f"{self.method.name!r} merged rows for {len(merged_count)} of {images} images")
        similarity = tuple(plan.similarity_products) or (0,) * images
        if len(similarity) != images:
            raise RuntimeError(
                f"{self.method.name!r} reported similarity products for {len(similarity)} of {images} images"
            )
        counts = self.stage_counts[stage]
        self.stage_counts[stage] = _StageCounts(
            counts.queries,
            counts.keys,
            tuple(view.per_row(merged_candidates)),
            tuple(view.per_row(merged_count)),
            tuple(view.per_row(similarity)),
        )
        if kept == rows.candidates and not any(merged_count):
            return hidden  # nothing dropped: layout (and bit-identity) unchanged
        if self.method.positions == "original" and any(merged_count):
            raise RuntimeError(
                f"{self.method.name!r} keeps original positions, so it cannot insert merged rows"
            )

        candidate = rows.valid & (rows.image >= 0) & ~rows.protected  # [B, L]
        keep = (plan.keep & candidate) | (rows.valid & ~candidate)  # text and protected rows always stay
        owners = torch.where(plan.keep & candidate, rows.image, images).flatten()  # [B L]
        marked = torch.zeros(images + 1, dtype=torch.long, device=hidden.device).scatter_add_(
            0, owners, torch.ones_like(owners)
        )[:images]  # [I] rows the plan marks per image
        torch._assert_async(
            (marked == int64_tensor(kept, hidden.device)).all(),
            f"{self.method.name!r}: the keep mask of stage {stage} disagrees with its kept counts {list(kept)}",
        )
        dropped = [c - k for c, k in zip(rows.candidates, kept, strict=True)]
        new_rows = [
            r - d + m
            for r, d, m in zip(rows.rows, view.per_row(dropped), view.per_row(merged_count), strict=True)
        ]
        new_length = max(new_rows)
        layout = plan_relayout(keep, rows.image, new_length, merged, self.image_row)
        source, valid = layout.source, layout.valid
        new_hidden = gather_rows(hidden, source, layout.inserted_hidden)
        image = gather_rows(rows.image, source, layout.inserted_image).masked_fill(~valid, -1)
        not_inserted = (
            None
            if layout.inserted_image is None
            else torch.zeros_like(layout.inserted_image, dtype=torch.bool)
        )
        query = gather_rows(rows.query, source, not_inserted) & valid
        protected = gather_rows(rows.protected, source, not_inserted) & valid
        if self.method.positions == "original":
            # Kept rows keep their position ids and rotary embeddings (FastV semantics): gathered, not recomputed.
            positions = gather_rows(rows.positions, source)
            cos, sin = gather_rows(rows.cos, source), gather_rows(rows.sin, source)
            shift = None
        else:
            first = rows.positions.masked_fill(~rows.valid, torch.iinfo(torch.long).max).min(1).values  # [B]
            positions = renumber_positions(valid, first)
            cos, sin = self.adapter.rotary(new_hidden, positions)
            shift = self.last_position - positions[:, -1]  # [B]
        padded = any(n != new_length for n in new_rows)
        mask = self.adapter.layer_mask(new_hidden, new_length, valid if padded else None)
        candidates = tuple(k + m for k, m in zip(kept, merged_count, strict=True))
        self.rows = _Rows(
            valid,
            image,
            protected,
            query,
            positions,
            cos,
            sin,
            mask,
            candidates,
            tuple(new_rows),
            changed=True,
        )
        self.stage_layouts.append(StageLayout(layer, valid, shift, padded))
        return new_hidden

    # -- after the forward --------------------------------------------------------------------------------
    def finish(self) -> tuple[list[LayerStats], InLLMDecodeState | None]:
        batch = len(self.token_counts[0])
        empty = _StageCounts((0,) * batch, (0,) * batch, (0,) * batch, (0,) * batch, (0,) * batch)
        stages = [self.stage_counts.get(s, empty) for s in range(len(self.adapter.stage_layers))]
        targets = self._row_targets()
        stats = [
            LayerStats(
                method=self.method.name,
                visual_tokens_before=self.visual_counts[0][row],
                visual_tokens_per_layer=tuple(layer[row] for layer in self.visual_counts),
                tokens_per_layer=tuple(layer[row] for layer in self.token_counts),
                score_layers=self.adapter.score_layers,
                score_query_tokens=tuple(s.queries[row] for s in stages),
                score_key_tokens=tuple(s.keys[row] for s in stages),
                rater_candidates=int(self.rater_candidates[row]),
                recycle_candidates=tuple(s.recycle_candidates[row] for s in stages),
                recycled_tokens=tuple(s.recycled[row] for s in stages),
                similarity_products=tuple(s.similarity_products[row] for s in stages),
                equivalent_tokens_target=targets[row],
            )
            for row in range(batch)
        ]
        state = None
        if self.stage_layouts:
            state = InLLMDecodeState(self.prompt_length, self.prompt_padded, tuple(self.stage_layouts))
        return stats, state

    def _row_targets(self) -> list[float | None]:
        """Per batch row, the sum of its images' equivalent-token targets (``None`` if the method has none).

        The target counts visual rows, as the realised per-layer counts do: under ``budget_basis="patches"``
        the method's target for the patch tokens plus the separators that always stay."""
        per_row: list[float | None] = [None] * len(self.token_counts[0])
        for count, protected, row in zip(
            self.budget_tokens, self.protected_tokens, self.image_row, strict=True
        ):
            target = self.method.equivalent_tokens_target(count, self.adapter.num_layers)
            if target is not None:
                per_row[row] = (per_row[row] or 0.0) + target + protected
        return per_row


class _Decode:
    """One decode forward after a reduced prefill: masks and positions of the reduced layers."""

    def __init__(self, adapter: InLLMAdapter, context: PromptContext, state: InLLMDecodeState) -> None:
        self.adapter = adapter
        self.context = context
        self.state = state
        self._substitutes: dict[int, dict[str, Any]] = {}  # per stage first layer, computed once per forward

    def before_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        stage = self.state.stage_of(index)
        if stage is None:
            return None
        if stage.first_layer not in self._substitutes:
            with stage_section("compression"):
                self._substitutes[stage.first_layer] = self._substitute(index, stage, args, kwargs)
        return args, {**kwargs, **self._substitutes[stage.first_layer]}

    def _substitute(self, index: int, stage: StageLayout, args: tuple, kwargs: dict) -> dict[str, Any]:
        hidden = _hidden_argument(args, kwargs)
        batch, query_length = hidden.shape[:2]
        if batch != stage.valid.shape[0]:
            raise RuntimeError(
                f"batch size changed from {stage.valid.shape[0]} to {batch} since the reduced prefill"
            )
        if query_length != 1:
            # the method chose its tokens at the prefill, by the prompt's last row: a later forward of several
            # rows means that prefill held only part of the prompt (chunked prefill) or a speculative token
            # (assisted decoding, prompt lookup), and the choice was made on the wrong rows
            raise NotImplementedError(
                f"a {query_length}-token step after an in-LLM method's prefill: in-LLM methods choose their "
                "tokens once, at a prefill of the whole prompt, and support neither chunked prefill "
                "(prefill_chunk_size), assisted decoding (assistant_model, prompt_lookup_num_tokens) nor a "
                "second turn on the cache of a compressed generation"
            )
        cache = cache_argument(kwargs)
        if cache is None:
            raise RuntimeError("a decode step after an in-LLM reduced prefill needs its KV cache")
        kv_length = (
            cache.get_seq_length(index) + query_length
        )  # this layer's cache, before this step's update
        tail_length = kv_length - stage.valid.shape[1]
        mask = self.context.attention_mask
        if mask is not None:
            if mask.dim() != 2:
                raise NotImplementedError("decoding after in-LLM compression needs a 2-D attention_mask")
            tail = mask[:, self.state.prompt_length :].bool()
            if tail.shape[1] != tail_length:
                raise RuntimeError(
                    f"the attention mask covers {tail.shape[1]} tokens after the prompt, the KV cache of layer "
                    f"{index} {tail_length}: this step does not continue the compressed generation"
                )
        else:
            tail = torch.ones(batch, tail_length, dtype=torch.bool, device=hidden.device)
        # Without padding in the prompt (known since the prefill), the model's own fast path applies: no mask.
        # That holds while the generated part of the mask is all ones, as generate builds it; a caller's zero
        # there is refused on the device instead of being silently ignored by the pruned layers.
        padded = stage.padded or self.state.prompt_padded
        key_valid = torch.cat([stage.valid, tail], dim=1) if padded else None
        if not padded:
            torch._assert_async(
                tail.all(),
                "decoding after in-LLM compression of an unpadded prompt needs the generated part of the "
                "attention mask to be all ones (as generate builds it)",
            )
        substitute: dict[str, Any] = {"attention_mask": self.adapter.layer_mask(hidden, kv_length, key_valid)}
        if stage.position_shift is not None:
            positions = kwargs["position_ids"].expand(batch, query_length) - stage.position_shift[:, None]
            substitute["position_ids"] = positions
            substitute["position_embeddings"] = self.adapter.rotary(hidden, positions)
        return substitute
