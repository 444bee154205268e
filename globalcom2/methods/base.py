"""What a compression method is: its stage, its parameters, and the one function it implements.

Pre-LLM methods (``vanilla``, ``random``, ``globalcom2``, ``visionzip``, ``divprune``) see one image's packed
visual features before they are scattered into the prompt and return which packed positions to feed to the
LLM, in order::

    select(features[N, D], ctx) -> source[M] (int64 indices into 0..N-1) or None (= keep all, unchanged)

Expressing every output as indices into the unmodified packed sequence keeps methods pure (no model
access), makes the realised counts exact and auditable, and lets a layout repeat a separator (the
GlobalCom² reference layout, xuyang-liu16/GlobalCom2 @ 96b2d00 ``llava/model/llava_arch.py``, emits a
separator after every canvas row, padded rows included).
The hook in ``globalcom2/hooks/pre_llm.py`` does the gathering and the sequence surgery, once for all
methods.

In-LLM methods (``fastv``, ``sparsevlm``, ``pdrop``, ``dart``) act between decoder layers. They never touch
tensors of the model either; the engine in ``globalcom2/hooks/in_llm.py`` asks them three questions during a
prefill and does all slicing of hidden states, positions, rotary embeddings, masks and the KV-cache
bookkeeping itself::

    select_queries(view at layer 0)           -> which prompt rows rate the visual tokens
    score(stage, attention of those rows)     -> a relevance per position
    keep(stage, relevance, view)              -> which positions go on, plus merged rows to insert
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal, get_args

import torch

from globalcom2.anyres import PackedLayout
from globalcom2.budget import MAX_PATCH_TOKENS, validate_retention_ratio, warn_if_no_patch_token_kept
from globalcom2.registry import Registry
from globalcom2.scoring.ranking import host_to_device
from globalcom2.scoring.vision_attention import check_vision_layer
from globalcom2.scoring.vision_capture import CapturedViews

Stage = Literal["pre_llm", "in_llm"]
#: What an in-LLM method's retention ratio is a fraction of, per image: ``"positions"``, every visual
#: position (patches and row separators, ``N_vis``); ``"patches"``, the patch tokens only (``N_patch``, the
#: count the GlobalCom² paper's "2880" uses), with every row separator kept on top, as the pre-LLM methods do.
BudgetBasis = Literal["positions", "patches"]
BUDGET_BASES: tuple[str, ...] = get_args(BudgetBasis)


def check_budget_basis(value: object) -> BudgetBasis:
    """``value`` if it is a :data:`BudgetBasis`, else ``ValueError`` naming the valid ones."""
    if value not in BUDGET_BASES:
        raise ValueError(
            f"budget_basis must be one of {list(BUDGET_BASES)} (what the retention ratio is a fraction of), "
            f"got {value!r}"
        )
    return value  # type: ignore[return-value]


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
    #: Whether the method takes a budget (``retention_ratio``); ``vanilla`` keeps everything and takes none.
    has_budget: ClassVar[bool] = True

    def __init__(self, *, retention_ratio: float = 1.0) -> None:
        self.retention_ratio = validate_retention_ratio(retention_ratio)
        if self.has_budget:
            warn_if_no_patch_token_kept(self.retention_ratio)

    def check_model_config(self, config: Any) -> None:
        """Raise ``ValueError`` if the parameters do not fit the model ``config`` describes.

        Called with the checkpoint's config before any weight loads (``globalcom2.models.preload``), so a
        layer index past the model's depth fails in a second rather than after the load.
        """

    def params(self) -> dict[str, object]:
        """Hyperparameters as plain values, for records and logs.

        ``METHODS.create(self.name, **self.params())`` rebuilds an equal method (tests/methods/
        test_registry_round_trip.py), so a record's parameters reproduce the method that made it: store
        every constructor argument under its own name, and derive everything else (properties or
        ``_private`` attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def nominal_visual_tokens(
        self, num_layers: int, max_visual_tokens: int = MAX_PATCH_TOKENS
    ) -> tuple[int, ...]:
        """Visual tokens entering each decoder layer for an image of ``max_visual_tokens`` visual tokens.

        The "paper" FLOPs convention (GlobalCom² Tables 8/9) counts only visual tokens, at this nominal
        count (2880 = 5 x 576, separators ignored): a pre-LLM method feeds ``floor(R * 2880)`` to every
        layer; in-LLM methods override this with their per-layer schedule.
        """
        return (math.floor(self.retention_ratio * max_visual_tokens),) * num_layers


@dataclass
class ImageContext:
    """Everything a pre-LLM method may look at for one image, besides its features.

    Attributes:
        layout: provenance of every packed position (view, token, separators).
        pixel_values: ``[1 + crops, 3, 336, 336]`` the image's views as fed to CLIP (thumbnail first).
        vision_scores: ``[1 + crops, 576]`` [CLS]->patch scores, when the method asked for them.
        views: per-view states of one CLIP layer (output, [CLS] attention row, keys), when the method
            asked for them (:attr:`PreLLMMethod.vision_capture_layer`).
        project: the model's multimodal projector (CLIP width -> LLM width), for a method that builds
            new tokens in CLIP space (set by the hook; ``None`` elsewhere).
        compile_mode: the model's compile mode (``globalcom2.models.compiled``), ``None`` when it runs
            eager: a method may compile its own work in the same mode.
    """

    layout: PackedLayout
    pixel_values: torch.Tensor
    vision_scores: torch.Tensor | None = None
    views: CapturedViews | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    compile_mode: str | None = None

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


@dataclass(frozen=True)
class Replacement:
    """A pre-LLM method's full replacement of one image's packed features, for a method whose tokens are
    not a subset of the packed sequence (e.g. VisionZip merges tokens in CLIP space and projects them).

    Attributes:
        features: ``[M, D]`` what the LLM sees for this image, in the packed features' dtype and device.
        patch_tokens: how many of the ``M`` rows count as patch tokens in :class:`ImageStats`.
        separators: how many count as row separators (``patch_tokens + separators == M``).
    """

    features: torch.Tensor
    patch_tokens: int
    separators: int


class PreLLMMethod(CompressionMethod):
    """A method that chooses visual tokens before the LLM sees them.

    The two score properties are derived from the method's own parameters (never stored), so that
    :meth:`CompressionMethod.params` holds constructor arguments only and rebuilds the method.
    """

    stage: ClassVar[Stage] = "pre_llm"

    @property
    def vision_score_layer(self) -> int | None:
        """CLIP layer whose [CLS]->patch scores the method needs (``None``: no scores); negative values
        count from the last layer."""
        return None

    @property
    def vision_score_kind(self) -> str:
        """``"logits"`` (pre-softmax, head-averaged) or ``"softmax"`` (probabilities)."""
        return "logits"

    @property
    def vision_capture_layer(self) -> int | None:
        """CLIP layer whose per-view states (:class:`ImageContext` ``views``) the method needs (``None``:
        none); negative values count from the last layer."""
        return None

    def check_model_config(self, config: Any) -> None:
        for layer in (self.vision_score_layer, self.vision_capture_layer):
            if layer is not None:
                check_vision_layer(layer, config.vision_config.num_hidden_layers)

    def select(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor | Replacement | None:
        """Packed positions to keep, in output order (``[M]`` int64), or ``None`` to keep all unchanged, or a
        :class:`Replacement` of the image's packed features.

        Args:
            features: ``[N, D]`` the image's packed features (patches and separators).
            ctx: layout, pixels and optional scores of this image.
        """
        raise NotImplementedError

    def select_images(
        self, features: Sequence[torch.Tensor], contexts: Sequence[ImageContext]
    ) -> list[torch.Tensor | Replacement | None]:
        """:meth:`select` for every image of one call, in order: what the hook and the hook-free path call.

        This default selects image by image. A method whose per-image work is a long chain of small
        kernels overrides it to advance the images of a call together (DivPrune's greedy), which must give
        each image exactly what :meth:`select` gives it alone.

        Args:
            features: per image, ``[N_i, D]`` its packed features.
            contexts: per image, its :class:`ImageContext`.
        """
        return [self.select(feats, ctx) for feats, ctx in zip(features, contexts, strict=True)]

    def separators_kept(self, layout: PackedLayout, source: torch.Tensor) -> int | torch.Tensor:
        """How many of the positions :meth:`select` returned are row separators (for the record).

        This default counts them on ``source``'s device and returns the count as a 0-dim tensor there; the
        hook reads the counts of every image of a call back together, one wait for the device per call. A
        method whose layout fixes the count (most built-in ones keep every separator) returns it as an int
        instead, so that attaching it adds no wait to a prefill.
        """
        is_separator = host_to_device(layout.is_separator, source.device)  # [N] bool, queued without a wait
        return is_separator.index_select(0, source).sum()  # [] int64 on the device


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


@dataclass(frozen=True)
class TokenView:
    """The prompt entering one decoder layer during a prefill, for the whole batch (left-padded).

    Device tensors describe the rows; the counts a method needs to size its work are given on the host
    (tuples), so that no method has to read them back from the device in the middle of a prefill.

    Attributes:
        hidden_states: ``[B, L, D]`` input of the layer (layer 0: the embeddings with image features scattered in).
        image: ``[B, L]`` image index (scatter order over the batch) of every visual row, -1 for text and padding.
            Rows merged by an earlier stage count as visual rows of their image.
        valid: ``[B, L]`` True for real (non-padding) rows.
        layer: the decoder layer this view enters.
        num_layers: decoder layers of the language model.
        protected: ``[B, L]`` visual rows that always stay and are no candidate for pruning: the row separators
            under the ``"patches"`` budget basis, none under ``"positions"``.
        image_tokens: per image, its visual positions entering layer 0 (``N_vis``, separators included).
        budget_tokens: per image, the count its retention ratio applies to: ``image_tokens`` under
            ``"positions"``, the image's patch tokens (``N_patch``) under ``"patches"``.
        candidates: per image, the visual rows of this view a stage may drop (not protected).
        image_row: per image, the batch row it belongs to.
        rows: per batch row, its real rows in this view.
        text_after: per batch row, the real rows after its last visual row in the layer-0 input (the question).
        output_norm: the language model's final norm (``model.norm``), for methods that compare rows in the space
            the LM head reads (DART's duplication measure).
    """

    hidden_states: torch.Tensor
    image: torch.Tensor
    valid: torch.Tensor
    layer: int
    num_layers: int
    protected: torch.Tensor
    image_tokens: tuple[int, ...]
    budget_tokens: tuple[int, ...]
    candidates: tuple[int, ...]
    image_row: tuple[int, ...]
    rows: tuple[int, ...]
    text_after: tuple[int, ...]
    output_norm: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def visual(self) -> torch.Tensor:
        """``[B, L]`` True at visual rows."""
        return self.image >= 0

    @property
    def after_last_image(self) -> torch.Tensor:
        """``[B, L]`` True at the real rows after each batch row's last visual row (none in a row without an
        image): the question, which SparseVLM's raters and DART's text pivots come from."""
        visual = self.visual & self.valid
        columns = torch.arange(visual.shape[1], device=visual.device)
        last_visual = torch.where(visual, columns, -1).max(dim=1).values  # [B]
        return self.valid & ~visual & (columns[None, :] > last_visual[:, None]) & (last_visual[:, None] >= 0)

    @property
    def candidate_image(self) -> torch.Tensor:
        """``[B, L]`` image index of every visual row a stage may drop, -1 elsewhere (protected rows too)."""
        return self.image.masked_fill(self.protected, -1)

    def per_row(self, per_image: tuple[int, ...] | list[int]) -> list[int]:
        """Sum a per-image count over the images of each batch row."""
        totals = [0] * len(self.rows)
        for row, count in zip(self.image_row, per_image, strict=True):
            totals[row] += count
        return totals


@dataclass(frozen=True)
class QueryRows:
    """Prompt rows whose attention rates the visual tokens, chosen once per prefill on the layer-0 input.

    Attributes:
        rows: ``[B, L]`` True at the query rows (never visual rows, never padding).
        candidates: per batch row, the rows the method examined to choose them (SparseVLM's rater candidates;
            0 when the choice costs nothing, as FastV's last token). Recorded for overhead accounting.
        count: per batch row, how many query rows were chosen, when the method knows it on the host (FastV:
            one); ``None`` makes the engine read it from ``rows`` (one device read per prefill).
    """

    rows: torch.Tensor
    candidates: tuple[int, ...]
    count: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MergedTokens:
    """New rows a stage inserts: per image, merged tokens placed right after that image's kept rows.

    Attributes:
        hidden_states: ``[I, M, D]`` merged rows; row ``j`` of image ``i`` is real when ``j < count[i]``.
        count: merged rows per image.
        candidates: dropped rows per image that were merged into them (the clustering input size).
    """

    hidden_states: torch.Tensor
    count: tuple[int, ...]
    candidates: tuple[int, ...]


@dataclass(frozen=True)
class KeepPlan:
    """What one stage keeps of the candidate rows (text and protected rows always stay, whatever ``keep``
    says of them).

    Attributes:
        keep: ``[B, L]`` bool, True at the candidate rows that go on.
        kept: per image, how many candidate rows ``keep`` marks (the host's copy of the count, which sizes
            the new sequence; the engine checks on the device that the two agree).
        merged: merged rows to insert, or ``None``.
        similarity_products: per image, the ``d``-wide dot products the stage computed between rows of the
            view to decide (DART's pivot-to-row cosines), for the FLOPs of the "full" convention; empty if none.
    """

    keep: torch.Tensor
    kept: tuple[int, ...]
    merged: MergedTokens | None = None
    similarity_products: tuple[int, ...] = ()


def last_prompt_row(view: TokenView) -> QueryRows:
    """One query row per batch row: its last real row, the last prompt token (FastV's ``attn[:, :, -1, :]``,
    PyramidDrop's ``prompt_total_len - 1``), found per row so that left padding does not move it. It is the
    question's last token in every LLaVA prompt, and the image's last token in a prompt that ends with its
    image, as in the references (a text row before the image would see none of it under causal attention)."""
    columns = torch.arange(view.valid.shape[1], device=view.valid.device)
    last = torch.where(view.valid, columns, -1).max(dim=1).values  # [B] last real row
    rows = (columns[None, :] == last[:, None]) & view.valid  # [B, L]
    return QueryRows(rows=rows, candidates=(0,) * len(view.rows), count=tuple(int(n > 0) for n in view.rows))


def check_layer_list(name: str, layers: object, lowest: int) -> tuple[int, ...] | None:
    """``layers`` as a tuple of decoder-layer indices, or ``None``; raise unless it is a non-empty, strictly
    increasing sequence of ints ``>= lowest`` (a method's depth-independent check; the model's depth is checked
    when the method meets it)."""
    if layers is None:
        return None
    if (
        isinstance(layers, (str, bytes))
        or not isinstance(layers, Iterable)
        or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
    ):
        raise TypeError(f"{name} must be a sequence of ints (decoder layer indices), got {layers!r}")
    layers = tuple(layers)
    if not layers or any(b <= a for a, b in itertools.pairwise(layers)):
        raise ValueError(f"{name} must be non-empty and strictly increasing, got {list(layers)}")
    if layers[0] < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {list(layers)}")
    return layers


def scale_official_layers(
    official: tuple[int, ...], official_depth: int, num_layers: int, lowest: int, highest: int
) -> tuple[int, ...]:
    """Layers a reference chose for an ``official_depth``-layer decoder, moved to a ``num_layers``-layer one:
    each scaled by ``num_layers / official_depth``, rounded half up, clamped to ``[lowest, highest]``, deduplicated."""
    scaled = {
        min(max(math.floor(layer * num_layers / official_depth + 0.5), lowest), highest) for layer in official
    }
    return tuple(sorted(scaled))


class InLLMMethod(CompressionMethod):
    """A method that drops visual rows between decoder layers of the language model.

    A method has one or more *stages*. Stage ``s`` recomputes, at decoder layer ``stage_layers(n)[s] - 1`` (by
    default; :attr:`score_layer` and :attr:`score_signal` below name other layers and signals), the attention of
    the query rows over the sequence entering that layer (SDPA stays on everywhere), turns it into a relevance
    per position (:meth:`score`), and decides before layer ``stage_layers(n)[s]`` which rows go on
    (:meth:`keep`). Layers from there on never see the dropped rows, so their KV cache holds only kept rows.

    Attributes:
        positions: ``"original"``: kept rows keep their position ids (FastV); ``"renumber"``: positions are
            renumbered contiguously after every stage and decode positions follow (SparseVLM).
        budget_basis: what ``retention_ratio`` is a fraction of (:data:`BudgetBasis`). ``"positions"``
            treats the row separators as visual tokens like any other, as FastV and SparseVLM treat every
            position of the image span; ``"patches"`` counts patch tokens only and keeps every separator, the
            paper protocol's count (``protocol=llava``, ``globalcom2.protocol.rules``).
    """

    stage: ClassVar[Stage] = "in_llm"
    positions: ClassVar[Literal["original", "renumber"]] = "original"
    #: Which layer's weights rate the rows of stage ``s`` (first reduced layer ``b``): ``"previous_layer"``, the
    #: attention of layer ``b - 1`` on its own input (FastV's and SparseVLM's ``output_attentions`` of the layer
    #: before the cut); ``"pruned_layer"``, layer ``b``'s input norm and q/k projections applied to the rows about
    #: to enter it (PyramidDrop's ``pdrop_rank_drop``).
    score_layer: ClassVar[Literal["previous_layer", "pruned_layer"]] = "previous_layer"
    #: What :meth:`score` receives from the scoring layer: ``"attention"``, the query rows' head-averaged softmax
    #: attention ``[B, Q, L]``; ``"keys"``, the rotary-embedded keys of every row ``[B, L, KV * hd]`` (DART's pivot
    #: norms), for which the method chooses no query rows.
    score_signal: ClassVar[Literal["attention", "keys"]] = "attention"

    def __init__(self, *, retention_ratio: float = 1.0, budget_basis: BudgetBasis = "positions") -> None:
        super().__init__(retention_ratio=retention_ratio)
        self.budget_basis = check_budget_basis(budget_basis)

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """First decoder layer that sees each stage's reduced sequence, strictly increasing in ``[1, num_layers)``.

        Raises:
            ValueError: the method's parameters do not fit a model with ``num_layers`` decoder layers.
        """
        raise NotImplementedError

    def stage_counts(self, num_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens of an image of ``num_visual`` positions after each stage (its schedule)."""
        raise NotImplementedError

    def checked_stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """:meth:`stage_layers`, checked: strictly increasing ints in ``[1, num_layers)``, or ``ValueError``."""
        layers = tuple(self.stage_layers(num_layers))
        if (
            not layers
            or any(isinstance(layer, bool) or not isinstance(layer, int) for layer in layers)
            or any(not 1 <= layer < num_layers for layer in layers)
            or any(b <= a for a, b in itertools.pairwise(layers))
        ):
            raise ValueError(
                f"{self.name!r} gave stage layers {layers}; they must be strictly increasing in [1, {num_layers})"
            )
        return layers

    def check_model_config(self, config: Any) -> None:
        self.checked_stage_layers(config.text_config.num_hidden_layers)

    def nominal_visual_tokens(
        self, num_layers: int, max_visual_tokens: int = MAX_PATCH_TOKENS
    ) -> tuple[int, ...]:
        counts = [max_visual_tokens] * num_layers
        stages = self.stage_counts(max_visual_tokens, num_layers)
        for first, count in zip(self.stage_layers(num_layers), stages, strict=True):
            counts[first:] = [count] * (num_layers - first)
        return tuple(counts)

    def equivalent_tokens_target(self, num_visual: int, num_layers: int) -> float | None:
        """The layer-averaged visual-token count the method aims at for an image of ``num_visual`` positions,
        or ``None`` when its budget is not an average (recorded in :class:`LayerStats`)."""
        return None

    def select_queries(self, view: TokenView) -> QueryRows:
        """Choose the query rows from the layer-0 input (they are text rows, so no stage drops them)."""
        raise NotImplementedError

    def score(
        self, stage: int, attention: torch.Tensor, query_valid: torch.Tensor, view: TokenView
    ) -> torch.Tensor:
        """Relevance ``[B, L]`` of every row of ``view`` from the scoring layer's signal.

        Args:
            stage: index of the stage.
            attention: under ``score_signal="attention"``, ``[B, Q, L]`` head-averaged softmax attention of each
                query row over the rows entering the scoring layer (causal; padding gets 0), float32; under
                ``"keys"``, ``[B, L, KV * hd]`` the scoring layer's rotary-embedded keys of every row (padding
                rows hold arbitrary values), in the model dtype.
            query_valid: ``[B, Q]`` which of the ``Q`` slots hold a real query row.
            view: the rows entering the scoring layer.
        """
        raise NotImplementedError

    def keep(self, stage: int, scores: torch.Tensor, view: TokenView) -> KeepPlan:
        """Which candidate rows of ``view`` (the input of the pruning layer) go on, and merged rows to insert.

        The counts (``KeepPlan.kept``, ``MergedTokens.count``) are host values derived from ``view``'s host
        counts, never read back from the device: the engine sizes the new sequence with them.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class LayerStats:
    """Realised token counts of one batch row in one prefill of an in-LLM method (for FLOPs accounting).

    Per-stage tuples have one entry per stage of the method (FastV: one; SparseVLM: one per pruning layer).

    Attributes:
        method: registry name of the in-LLM method.
        visual_tokens_before: visual positions of the sample entering layer 0 (after any pre-LLM method).
        visual_tokens_per_layer: visual rows entering each decoder layer (merged rows count as visual).
        tokens_per_layer: all non-padding rows entering each decoder layer.
        score_layers: per stage, the decoder layer whose attention was recomputed for scoring.
        score_query_tokens: per stage, query rows recomputed there (q_proj + RoPE; FastV 1, SparseVLM its raters).
        score_key_tokens: per stage, key rows recomputed there (k_proj + RoPE over every row entering the layer).
        rater_candidates: text rows scored against the visual rows to choose the raters (SparseVLM's
            ``softmax(V T^T)`` on the embeddings, ``visual_tokens_before x rater_candidates`` dot products); 0 for FastV.
        recycle_candidates: per stage, dropped visual rows that were clustered (pairwise distances among them).
        recycled_tokens: per stage, merged rows inserted after the kept visual rows.
        similarity_products: per stage, ``d``-wide dot products between rows computed to decide (DART's
            pivot-to-row cosine similarities; 0 for attention-rated methods).
        equivalent_tokens_target: the layer-averaged visual-token count the method's schedule aimed at
            (SparseVLM: ``R * N_vis`` under its ``equivalent_tokens`` convention); ``None`` for methods with a
            fixed keep count (FastV).
    """

    method: str
    visual_tokens_before: int
    visual_tokens_per_layer: tuple[int, ...]
    tokens_per_layer: tuple[int, ...]
    score_layers: tuple[int, ...] = ()
    score_query_tokens: tuple[int, ...] = ()
    score_key_tokens: tuple[int, ...] = ()
    rater_candidates: int = 0
    recycle_candidates: tuple[int, ...] = ()
    recycled_tokens: tuple[int, ...] = ()
    similarity_products: tuple[int, ...] = ()
    equivalent_tokens_target: float | None = None

    @property
    def equivalent_visual_tokens(self) -> float:
        """Mean over decoder layers of the visual rows entering each layer (the count FLOPs follow)."""
        return sum(self.visual_tokens_per_layer) / len(self.visual_tokens_per_layer)

    @property
    def equivalent_visual_tokens_after_layer(self) -> float:
        """The same mean over the rows *leaving* each layer: SparseVLM's own "equivalent tokens", the count its code prints
        (``num_token.append`` after each layer, Gumpest/SparseVLMs v1.5 ``modelling_sparse_llama.py``)."""
        counts = self.visual_tokens_per_layer
        return (sum(counts[1:]) + counts[-1]) / len(counts)


METHODS: Registry[CompressionMethod] = Registry("compression method")


#: What a method records per image (pre-LLM, :class:`ImageStats`) or per batch row (in-LLM, :class:`LayerStats`).
Stats = ImageStats | LayerStats


def register_method(name: str) -> Callable[[type[CompressionMethod]], type[CompressionMethod]]:
    """Class decorator: register a method under ``name`` and record the name on the class."""

    def decorator(cls: type[CompressionMethod]) -> type[CompressionMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator
