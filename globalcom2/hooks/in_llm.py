"""The in-LLM stage: scoring, pruning and KV-cache-consistent decoding between decoder layers.

Written once for every in-LLM method (FastV, SparseVLM); methods only choose query rows, score and keep
(``globalcom2/methods/base.py`` :class:`InLLMMethod`). Everything acts through forward pre-hooks on the
language model's decoder layers and on the attention modules of the scoring layers; no class or function of
transformers is replaced, and ``LlamaModel.forward`` runs unchanged (../shared/reference/
transformers_llava_next.md §2).

Prefill (``PromptContext.is_prefill``), for a stage whose first reduced layer is ``b``:

* a pre-hook on ``layers[b - 1].self_attn`` recomputes the attention of the query rows from the module's own
  inputs (``scoring/text_attention.py``): SDPA stays on, no ``L x L`` matrix is built;
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
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LlavaNextForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from globalcom2.hooks.in_llm_sequence import gather_rows, plan_relayout, renumber_positions
from globalcom2.hooks.llava_model import PromptContext
from globalcom2.methods.base import InLLMMethod, KeepPlan, LayerStats, TokenView
from globalcom2.scoring.selection import compact_rows
from globalcom2.scoring.text_attention import attention_rows

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class StageLayout:
    """The prompt as the layers of one stage cached it (for decoding).

    Attributes:
        first_layer: first decoder layer of the stage.
        valid: ``[B, P]`` real rows among the stage's ``P`` cached prompt rows.
        position_shift: ``[B]`` original minus stage position of the tokens after the prompt (renumbering
            methods), or ``None`` when positions are unchanged.
    """

    first_layer: int
    valid: torch.Tensor
    position_shift: torch.Tensor | None


@dataclass(frozen=True)
class InLLMDecodeState:
    """What decode steps of one generation need: the prompt length at layer 0 and each reduced layout."""

    prompt_length: int
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
    changed: bool = False


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
        self.stage_layers = method.checked_stage_layers(self.num_layers)
        self.score_layers = tuple(layer - 1 for layer in self.stage_layers)
        self.stats: list[LayerStats] = []
        self._decode_states: weakref.WeakKeyDictionary[object, InLLMDecodeState] = weakref.WeakKeyDictionary()
        self._run: _Prefill | _Decode | None = None
        self._hooks: list[Any] = []

    def install(self) -> None:
        for index, layer in enumerate(self.layers):
            hook = functools.partial(self._before_layer, index)
            self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        for stage, index in enumerate(self.score_layers):
            hook = functools.partial(self._before_attention, stage)
            self._hooks.append(self.layers[index].self_attn.register_forward_pre_hook(hook, with_kwargs=True))

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
        elif context.past_key_values is not None:
            state = self._decode_states.get(context.past_key_values)
            if state is not None:
                run = _Decode(self, context, state)
        self._run = run
        try:
            yield
        finally:
            self._run = None
        if isinstance(run, _Prefill) and run.started:  # reached only when the forward succeeded
            stats, state = run.finish()
            self.stats.extend(stats)
            if run.cache is not None:
                if state is None:
                    self._decode_states.pop(run.cache, None)
                else:
                    self._decode_states[run.cache] = state

    def _before_layer(self, index: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        return None if self._run is None else self._run.before_layer(index, args, kwargs)

    def _before_attention(self, stage: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if isinstance(self._run, _Prefill):
            self._run.score(stage, module, kwargs)

    def layer_mask(self, hidden_states: torch.Tensor, key_valid: torch.Tensor) -> Any:
        """The mask the model's attention expects for queries at the end of ``key_valid`` (causal + padding),
        built by the model's own mask function (``None`` on SDPA's ``is_causal`` fast path)."""
        batch, query_length = hidden_states.shape[:2]
        kv_length = key_valid.shape[1]
        return ALL_MASK_ATTENTION_FUNCTIONS[self.config._attn_implementation](
            batch_size=batch,
            q_length=query_length,
            kv_length=kv_length,
            q_offset=kv_length - query_length,
            kv_offset=0,
            mask_function=causal_mask_function,
            attention_mask=key_valid.bool(),
            allow_is_causal_skip=True,
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


class _Prefill:
    """One prefill forward: the layouts, scores and counts of every stage."""

    def __init__(self, adapter: InLLMAdapter, context: PromptContext) -> None:
        self.adapter = adapter
        self.method = adapter.method
        self.context = context
        self.started = False
        self.cache: object | None = None
        self.rows: _Rows | None = None
        self.scores: dict[int, torch.Tensor] = {}
        self.layer_input: torch.Tensor | None = None
        self.visual_counts: list[torch.Tensor] = []  # per layer, [B]
        self.token_counts: list[torch.Tensor] = []  # per layer, [B]
        num_stages = len(adapter.stage_layers)
        self.score_queries: list[torch.Tensor | None] = [None] * num_stages
        self.score_keys: list[torch.Tensor | None] = [None] * num_stages
        self.recycle_candidates: list[torch.Tensor | None] = [None] * num_stages
        self.recycled: list[torch.Tensor | None] = [None] * num_stages
        self.stage_layouts: list[StageLayout] = []

    # -- layer 0 ----------------------------------------------------------------------------------------
    def _start(self, hidden: torch.Tensor, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
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
        image = self.context.visual_index
        if image is None or image.shape != (batch, length):
            raise RuntimeError(
                "the in-LLM stage got no visual-position map matching the language model's input"
            )
        mask = self.context.attention_mask
        if mask is not None and mask.dim() != 2:
            raise NotImplementedError("in-LLM compression needs a 2-D attention_mask (got a 4-D mask)")
        valid = mask.bool() if mask is not None else torch.ones_like(image, dtype=torch.bool)
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise NotImplementedError(
                "in-LLM compression needs left padding (or none); set processor.tokenizer.padding_side = 'left'"
            )
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=hidden.device)[None]
        cos, sin = kwargs["position_embeddings"]
        self.image_tokens = torch.bincount(image[image >= 0], minlength=int(image.max()) + 1)  # [I]
        if self.method.budget_basis == "patches":
            if self.context.separator is None or self.context.separator.shape != image.shape:
                raise RuntimeError("budget_basis='patches' needs the separator map of the prompt")
            protected = self.context.separator & (image >= 0)
        else:
            protected = torch.zeros_like(image, dtype=torch.bool)
        self.protected_tokens = torch.bincount(
            image[protected], minlength=self.image_tokens.numel()
        )  # [I] separators per image (0 under "positions")
        self.budget_tokens = self.image_tokens - self.protected_tokens  # [I] what R is a fraction of
        self.image_row = torch.zeros_like(self.image_tokens).scatter_reduce(
            0,
            image[image >= 0],
            torch.arange(batch, device=image.device)[:, None].expand_as(image)[image >= 0],
            "amax",
        )  # [I] batch row of each image
        self.prompt_length = length
        # [B] position of each row's last token (left padding: the last column is real)
        self.last_position = positions.expand(batch, length)[:, -1]
        queries = self.method.select_queries(self._view(hidden, image, protected, valid, layer=0))
        if bool((queries.rows & ~(valid & (image < 0))).any()):
            raise RuntimeError(f"{self.method.name!r} chose query rows that are visual or padding")
        self.rater_candidates = queries.candidates
        self.rows = _Rows(
            valid=valid,
            image=image,
            protected=protected,
            query=queries.rows,
            positions=positions.expand(batch, length),
            cos=cos.expand(batch, -1, -1),
            sin=sin.expand(batch, -1, -1),
            mask=kwargs.get("attention_mask"),
        )
        self.started = True

    def _view(
        self,
        hidden: torch.Tensor,
        image: torch.Tensor,
        protected: torch.Tensor,
        valid: torch.Tensor,
        layer: int,
    ) -> TokenView:
        return TokenView(
            hidden,
            image,
            valid,
            self.image_tokens,
            layer,
            self.adapter.num_layers,
            protected=protected,
            budget_tokens=self.budget_tokens,
        )

    # -- hooks --------------------------------------------------------------------------------------------
    def before_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = _hidden_argument(args, kwargs)
        if index == 0:
            self._start(hidden, kwargs)
        rows = self.rows
        if rows is None:
            return None
        if index in self.adapter.stage_layers:
            hidden = self._apply_stage(self.adapter.stage_layers.index(index), index, hidden)
            rows = self.rows
        self.layer_input = hidden
        self.visual_counts.append(((rows.image >= 0) & rows.valid).sum(1))
        self.token_counts.append(rows.valid.sum(1))
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
        rows = self.rows
        if rows is None:
            return
        cos, sin = kwargs["position_embeddings"]
        query_index, query_valid = compact_rows(rows.query)  # [B, Q]
        with torch.profiler.record_function("globalcom2.in_llm.score"):
            attention = attention_rows(
                module, kwargs["hidden_states"], cos, sin, query_index, query_valid, rows.valid
            )  # [B, Q, L]
            view = self._view(
                self.layer_input, rows.image, rows.protected, rows.valid, self.adapter.score_layers[stage]
            )
            self.scores[stage] = self.method.score(stage, attention, query_valid, view)
        self.score_queries[stage] = query_valid.sum(1)
        self.score_keys[stage] = rows.valid.sum(1)

    # -- one stage ----------------------------------------------------------------------------------------
    def _apply_stage(self, stage: int, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        view = self._view(hidden, rows.image, rows.protected, rows.valid, layer)
        plan: KeepPlan = self.method.keep(stage, self.scores.pop(stage), view)
        keep = plan.keep & rows.valid
        if bool((rows.valid & ((rows.image < 0) | rows.protected) & ~keep).any()):
            raise RuntimeError(
                f"{self.method.name!r} dropped text or protected rows at stage {stage}; only candidate visual "
                "rows may go"
            )
        merged = plan.merged
        images = self.image_tokens.numel()
        zeros = torch.zeros(images, dtype=torch.long, device=hidden.device)
        candidates = merged.candidates if merged is not None else zeros
        inserted = merged.count if merged is not None else zeros
        self.recycle_candidates[stage] = self._per_row(candidates)
        self.recycled[stage] = self._per_row(inserted)
        if torch.equal(keep, rows.valid) and int(inserted.sum()) == 0:
            return hidden  # nothing dropped: layout (and bit-identity) unchanged
        if self.method.positions == "original" and int(inserted.sum()) > 0:
            raise RuntimeError(
                f"{self.method.name!r} keeps original positions, so it cannot insert merged rows"
            )

        layout = plan_relayout(keep, rows.image, merged)
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
        mask = self.adapter.layer_mask(new_hidden, valid)
        self.rows = _Rows(valid, image, protected, query, positions, cos, sin, mask, changed=True)
        self.stage_layouts.append(StageLayout(layer, valid, shift))
        return new_hidden

    def _per_row(self, per_image: torch.Tensor) -> torch.Tensor:
        batch = self.rows.valid.shape[0]
        return torch.zeros(batch, dtype=torch.long, device=per_image.device).index_add(
            0, self.image_row, per_image.long()
        )

    # -- after the forward --------------------------------------------------------------------------------
    def finish(self) -> tuple[list[LayerStats], InLLMDecodeState | None]:
        visual = torch.stack(self.visual_counts, 1).tolist()  # [B, layers]
        tokens = torch.stack(self.token_counts, 1).tolist()
        batch = len(visual)

        def per_stage(values: list[torch.Tensor | None]) -> list[tuple[int, ...]]:
            filled = [v if v is not None else torch.zeros(batch, dtype=torch.long) for v in values]
            return [
                tuple(int(x) for x in column) for column in zip(*(v.tolist() for v in filled), strict=True)
            ]

        queries, keys = per_stage(self.score_queries), per_stage(self.score_keys)
        candidates, recycled = per_stage(self.recycle_candidates), per_stage(self.recycled)
        raters = self.rater_candidates.tolist()
        targets = self._row_targets()
        stats = [
            LayerStats(
                method=self.method.name,
                visual_tokens_before=visual[row][0],
                visual_tokens_per_layer=tuple(visual[row]),
                tokens_per_layer=tuple(tokens[row]),
                score_layers=self.adapter.score_layers,
                score_query_tokens=queries[row],
                score_key_tokens=keys[row],
                rater_candidates=int(raters[row]),
                recycle_candidates=candidates[row],
                recycled_tokens=recycled[row],
                equivalent_tokens_target=targets[row],
            )
            for row in range(batch)
        ]
        state = None
        if self.stage_layouts:
            state = InLLMDecodeState(self.prompt_length, tuple(self.stage_layouts))
        return stats, state

    def _row_targets(self) -> list[float | None]:
        """Per batch row, the sum of its images' equivalent-token targets (``None`` if the method has none).

        The target counts visual rows, as the realised per-layer counts do: under ``budget_basis="patches"``
        the method's target for the patch tokens plus the separators that always stay."""
        per_row: list[float | None] = [None] * self.rows.valid.shape[0]
        for count, protected, row in zip(
            self.budget_tokens.tolist(), self.protected_tokens.tolist(), self.image_row.tolist(), strict=True
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
            self._substitutes[stage.first_layer] = self._substitute(index, stage, args, kwargs)
        return args, {**kwargs, **self._substitutes[stage.first_layer]}

    def _substitute(self, index: int, stage: StageLayout, args: tuple, kwargs: dict) -> dict[str, Any]:
        hidden = _hidden_argument(args, kwargs)
        batch, query_length = hidden.shape[:2]
        if batch != stage.valid.shape[0]:
            raise RuntimeError(
                f"batch size changed from {stage.valid.shape[0]} to {batch} since the reduced prefill"
            )
        cache = kwargs.get("past_key_values")
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
        substitute: dict[str, Any] = {
            "attention_mask": self.adapter.layer_mask(hidden, torch.cat([stage.valid, tail], dim=1))
        }
        if stage.position_shift is not None:
            positions = kwargs["position_ids"].expand(batch, query_length) - stage.position_shift[:, None]
            substitute["position_ids"] = positions
            substitute["position_embeddings"] = self.adapter.rotary(hidden, positions)
        return substitute
