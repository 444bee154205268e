"""DivPrune on the tiny model: parity with the plain reference, identity at ratio 1, equality with a
shortened input, batches, counts per budget basis, FLOPs and host reads."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import (
    assert_batch_equals_single_runs,
    generate_steps,
    prompt_inputs,
    shortened_inputs,
    synthetic_image,
)
from references import divprune_keep_count, divprune_reference
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import globalcom2.methods.divprune as divprune_module  # registers "divprune" before the package imports it
from globalcom2 import attach
from globalcom2.anyres import PackedLayout, config_layout
from globalcom2.efficiency.flops import LlmDims, model_prefill_flops
from globalcom2.efficiency.host_syncs import HostSyncCounter
from globalcom2.methods import METHODS
from globalcom2.methods.base import ImageContext
from globalcom2.methods.direct import pre_llm_sources
from globalcom2.methods.divprune import DivPrune, cosine_distances, max_min_picks, max_min_picks_lockstep
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.prompts import vicuna_v1_prompt

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

SIZES = [(336, 336), (800, 600), (1008, 336), (672, 672)]  # (width, height)
RATIOS = [0.1, 0.25, 0.5, 0.9]
BASES = ["positions", "patches"]
PATH_ATOL = 1e-4  # batch row vs the sample alone: float32 rounding (see tests/hooks/test_pre_llm_attach.py)


@pytest.fixture(scope="module")
def packed(tiny):
    """Per size: the image's processor inputs, packed features ``[N, D]`` and layout (computed once)."""
    model, processor = tiny
    out = {}
    for size in SIZES:
        inputs = prompt_inputs(processor, synthetic_image(*size))
        with torch.no_grad():
            (features,) = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
        layout = config_layout(model.config, tuple(inputs["image_sizes"][0].tolist()))
        out[size] = (inputs, features, layout)
    return out


def select(method: DivPrune, features: torch.Tensor, layout: PackedLayout, inputs: dict) -> torch.Tensor:
    ctx = ImageContext(layout=layout, pixel_values=inputs["pixel_values"][0, : layout.num_views])
    source = method.select(features, ctx)
    return torch.arange(layout.num_tokens) if source is None else source


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: the reference's thousands of small gathers and reductions run several times
    faster on one thread than on two contended ones (the shared test machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_source(features: torch.Tensor, layout: PackedLayout, ratio: float, basis: str) -> torch.Tensor:
    """The plain reference's kept positions for one image under ``basis``."""
    if basis == "positions":  # the official path: every packed position competes, int(round(R * N))
        return divprune_reference(features.float(), divprune_keep_count(ratio, layout.num_tokens))
    patches = layout.patch_positions
    chosen = divprune_reference(features[patches].float(), math.floor(ratio * layout.num_patches))
    return torch.cat([layout.separator_positions, patches[chosen]]).sort().values


# --- parity with the plain reference --------------------------------------------------------------


# Every size at the low ratios, the high ones on the 336x336 image: the plain reference recomputes the minimum
# over every pick at every step (O(k^2 N)), seconds per case for R >= 0.5 of a multi-crop image on a busy CPU.
PARITY_CASES = [(size, ratio) for size in SIZES for ratio in (0.1, 0.25)] + [
    ((336, 336), 0.5),
    ((336, 336), 0.9),
    ((800, 600), 0.5),
    ((1008, 336), 0.5),
]


@pytest.mark.slow
@pytest.mark.parametrize("basis", BASES)
def test_kept_positions_equal_the_reference(packed, basis):
    for size, ratio in PARITY_CASES:
        inputs, features, layout = packed[size]
        method = DivPrune(retention_ratio=ratio, budget_basis=basis)
        source = select(method, features, layout, inputs)
        with single_thread():
            expected = reference_source(features, layout, ratio, basis)
        assert torch.equal(source, expected), f"{size} R={ratio} {basis}"
        assert source.dtype == torch.long
        assert bool((source[1:] > source[:-1]).all()), "kept positions ascending and distinct"


def test_counts_that_keep_everything_bypass_and_a_zero_count_keeps_nothing(packed):
    inputs, features, layout = packed[(336, 336)]  # N = 1176 positions, 1152 patches, 24 separators
    ctx = ImageContext(layout=layout, pixel_values=inputs["pixel_values"][0, : layout.num_views])
    assert round(0.9996 * 1176) == 1176  # R < 1 whose official count is every position
    assert DivPrune(retention_ratio=0.9996).select(features, ctx) is None
    assert DivPrune(retention_ratio=1.0, budget_basis="patches").select(features, ctx) is None
    assert DivPrune(retention_ratio=0.9996, budget_basis="patches").select(features, ctx).numel() == 1175
    with pytest.warns(UserWarning, match="keeps floor"):
        tiny_budget = DivPrune(retention_ratio=1e-4)
    assert tiny_budget.select(features, ctx).numel() == 0  # round(0.1176) = 0, as the official count
    with pytest.warns(UserWarning, match="keeps floor"):
        patches_only = DivPrune(retention_ratio=1e-4, budget_basis="patches")
    assert torch.equal(patches_only.select(features, ctx), layout.separator_positions)


def test_direct_path_equals_select(model, packed):
    inputs, features, layout = packed[(800, 600)]
    method = DivPrune(retention_ratio=0.25)
    assert torch.equal(pre_llm_sources(model, method, inputs)[0], select(method, features, layout, inputs))


def test_greedy_on_a_known_configuration():
    """Unit vectors at known angles: the most isolated one first, then the farthest from the picked set."""
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 3.0, 3.05])  # radians on a circle
    features = torch.stack([angles.cos(), angles.sin()], dim=1)  # [6, 2]
    picks = max_min_picks(cosine_distances(features), 3)
    # 1.5 is farthest from its nearest neighbour; then 3.05 (farthest from 1.5: cos(1.55) < cos(1.5)),
    # then 0.0 (min distance to {1.5, 3.05} is largest there).
    assert picks.tolist() == [3, 5, 0]
    assert torch.equal(divprune_reference(features, 3, sort=False), picks)


def test_duplicates_are_not_masked_as_in_the_official_code():
    """Asking for more tokens than distinct vectors re-picks a token, exactly as the reference does."""
    torch.manual_seed(0)
    distinct = torch.randn(4, 8)
    features = distinct[torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])]  # [8, 8] every vector twice
    picks = max_min_picks(cosine_distances(features), 6)
    assert torch.equal(picks, divprune_reference(features, 6, sort=False))
    assert len(set(picks[:4].tolist())) == 4  # the distinct vectors come first


# --- the images of a call in lockstep ------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, by name (``aten.argmax.default`` -> ``argmax``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("group_bytes", [divprune_module.LOCKSTEP_BYTES, 4 * 2 * 40 * 40])
def test_lockstep_picks_equal_the_reference_per_image(monkeypatch, group_bytes):
    """Images of different widths and counts (one pick, every candidate, more than the distinct vectors) pick
    in lockstep what the plain reference picks for each alone, also when the byte bound splits the call."""
    monkeypatch.setattr(divprune_module, "LOCKSTEP_BYTES", group_bytes)
    generator = torch.Generator().manual_seed(0)
    widths_and_counts = [(40, 7), (9, 1), (23, 23), (31, 12), (2, 2), (40, 39)]
    features = [torch.randn(width, 6, generator=generator) for width, _ in widths_and_counts]
    features[3] = features[3][torch.arange(31) % 5]  # five distinct vectors, twelve picks: re-picks
    counts = [count for _, count in widths_and_counts]
    distances = [cosine_distances(f) for f in features]
    together = max_min_picks_lockstep(distances, counts, lockstep=True)
    alone = max_min_picks_lockstep(distances, counts, lockstep=False)
    for f, count, image_picks, own in zip(features, counts, together, alone, strict=True):
        assert torch.equal(image_picks, divprune_reference(f, count, sort=False)), (f.shape[0], count)
        assert torch.equal(own, image_picks)
    with pytest.raises(ValueError, match="2 distance matrices but 1 counts"):
        max_min_picks_lockstep([cosine_distances(features[0])] * 2, [3])


@pytest.mark.parametrize("basis", BASES)
def test_a_call_selects_each_image_as_alone_with_one_greedy_step_per_pick(packed, basis, monkeypatch):
    """``select_images`` on a call of every size gives each image its own selection, and where the images run
    in lockstep (a GPU; here the CPU made one) runs the greedy's argmax ``max(k_i)`` times, not ``sum(k_i)``;
    on a CPU, by default, one image at a time."""
    method = DivPrune(retention_ratio=0.25, budget_basis=basis)
    features, contexts = [], []
    for size in SIZES:
        inputs, feats, layout = packed[size]
        features.append(feats)
        contexts.append(
            ImageContext(layout=layout, pixel_values=inputs["pixel_values"][0, : layout.num_views])
        )
    alone = [method.select(feats, ctx) for feats, ctx in zip(features, contexts, strict=True)]
    with OpCounter() as cpu_ops:
        one_by_one = method.select_images(features, contexts)
    monkeypatch.setattr(divprune_module, "LOCKSTEP_DEVICE_TYPES", frozenset({"cpu"}))
    with OpCounter() as ops:
        together = method.select_images(features, contexts)
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(alone, one_by_one, strict=True))
    counts = [
        source.numel() - (0 if basis == "positions" else ctx.layout.num_separators)
        for source, ctx in zip(alone, contexts, strict=True)
    ]
    assert len(set(counts)) > 1
    assert ops.counts["argmax"] == max(counts) < sum(counts) == cpu_ops.counts["argmax"]


# Ratios at which the 336x336 image needs no greedy (all kept, or no patch kept) while larger images run one.
MIXED_CALL_RATIOS = {"positions": (0.9996, 3e-4), "patches": (5e-4,)}


@pytest.mark.filterwarnings("ignore:.*keeps floor")
@pytest.mark.parametrize("basis", BASES)
def test_a_call_mixing_short_cuts_and_greedy_images_selects_each_as_alone(packed, basis, monkeypatch):
    features = [packed[size][1] for size in SIZES]
    contexts = [
        ImageContext(layout=layout, pixel_values=inputs["pixel_values"][0, : layout.num_views])
        for inputs, _, layout in (packed[size] for size in SIZES)
    ]
    monkeypatch.setattr(divprune_module, "LOCKSTEP_DEVICE_TYPES", frozenset({"cpu"}))  # as on a GPU
    for ratio in MIXED_CALL_RATIOS[basis]:
        method = DivPrune(retention_ratio=ratio, budget_basis=basis)
        alone = [method.select(feats, ctx) for feats, ctx in zip(features, contexts, strict=True)]
        together = method.select_images(features, contexts)
        for one, other in zip(alone, together, strict=True):
            assert (one is None and other is None) or torch.equal(one, other), ratio
        first_kept = contexts[0].layout.num_tokens if alone[0] is None else alone[0].numel()
        assert first_kept in (contexts[0].layout.num_tokens, 0, contexts[0].layout.num_separators), ratio
        assert all(source is not None for source in alone[1:]), ratio


# --- exactness through the model ----------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_ratio_one_is_bit_identical_forward_and_generate(model, processor, images, basis):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=5)

    with attach(model, "divprune", retention_ratio=1.0, budget_basis=basis) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
        tokens, steps = generate_steps(model, inputs, steps=5)
        assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
        stats = handle.stats[-1]
        assert (stats.patch_tokens_kept, stats.separators_kept) == (2304, 36)

    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
    tokens, steps = generate_steps(model, inputs, steps=5)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)


@pytest.mark.parametrize(
    ("size", "ratio", "basis"),
    [((800, 600), 0.25, "positions"), ((1008, 336), 0.1, "patches"), ((672, 672), 0.5, "positions")],
)
def test_hooked_model_equals_shortened_input_on_unmodified_model(
    model, processor, images, size, ratio, basis
):
    inputs = prompt_inputs(processor, images[size])
    with attach(model, "divprune", retention_ratio=ratio, budget_basis=basis) as handle:
        tokens, steps = generate_steps(model, inputs, steps=4)
        sources = pre_llm_sources(model, handle.method, inputs)
    reference_tokens, reference_steps = generate_steps(
        model, shortened_inputs(model, inputs, sources), steps=4
    )
    assert torch.equal(steps, reference_steps)
    assert torch.equal(tokens, reference_tokens)
    _, vanilla_steps = generate_steps(model, inputs, steps=4)
    assert not torch.allclose(steps, vanilla_steps, atol=1e-3), "negative control: pruning changes the output"


@pytest.mark.parametrize("basis", ["patches"])  # the default basis: tests/methods/test_every_method.py
def test_left_padded_batch_rows_equal_single_runs(model, processor, images, basis):
    batch_images = [images[(336, 336)], images[(1008, 336)], images[(800, 600)]]
    texts = [
        vicuna_v1_prompt(q) for q in ["What is it?", "Describe the left side of the picture.", "Colour?"]
    ]
    with attach(model, "divprune", retention_ratio=0.3, budget_basis=basis) as handle:
        assert_batch_equals_single_runs(
            model, processor, [[image] for image in batch_images], texts, steps=4, atol=PATH_ATOL
        )
        assert len(handle.stats) == 3 + 3  # the batch's three images, then each alone


# --- counts, determinism, parameters ------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_stats_match_the_budget(model, packed, basis):
    for size in [(336, 336), (672, 672)]:
        inputs, _, layout = packed[size]
        with attach(model, "divprune", retention_ratio=0.25, budget_basis=basis) as handle:
            with torch.no_grad():
                model(**inputs)
            stats = handle.stats[-1]
            (source,) = pre_llm_sources(model, handle.method, inputs)
        assert (stats.tokens_before, stats.patch_tokens_before) == (layout.num_tokens, layout.num_patches)
        separators = int(layout.is_separator[source].sum())
        assert stats.separators_kept == separators
        if basis == "positions":
            assert stats.tokens_after == round(0.25 * layout.num_tokens) == source.numel()
            assert 1 <= separators < layout.num_separators  # identical newlines: the greedy keeps few
        else:
            assert stats.patch_tokens_kept == math.floor(0.25 * layout.num_patches)
            assert separators == layout.num_separators


def test_selection_is_deterministic_and_the_bases_differ(packed):
    inputs, features, layout = packed[(1008, 336)]
    positions = DivPrune(retention_ratio=0.25)
    first, again = (select(positions, features, layout, inputs) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(
        first, select(DivPrune(retention_ratio=0.25, budget_basis="patches"), features, layout, inputs)
    )


def test_parameters_round_trip_and_bad_ones_fail_clearly():
    method = METHODS.create("divprune", retention_ratio=0.25, budget_basis="patches")
    assert method.params() == {"retention_ratio": 0.25, "budget_basis": "patches"}
    assert METHODS.create("divprune", **method.params()).params() == method.params()
    with pytest.raises(
        ValueError, match=r"budget_basis must be one of \['positions', 'patches'\].*got 'tokens'"
    ):
        METHODS.create("divprune", retention_ratio=0.5, budget_basis="tokens")
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=rf"retention_ratio must be in \(0, 1\].*got {bad}"):
            METHODS.create("divprune", retention_ratio=bad)
    with pytest.raises(ValueError, match=r"'divprune' needs retention_ratio"):
        METHODS.create("divprune")


# --- efficiency -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_analytic_flops_equal_the_flop_counter(basis):
    model, processor = load_tiny_llava_next(
        seed=0, attn_implementation={"text_config": "eager", "vision_config": "sdpa"}
    )
    inputs = processor(images=synthetic_image(800, 600), text=vicuna_v1_prompt("Where?"), return_tensors="pt")
    with attach(model, "divprune", retention_ratio=0.25, budget_basis=basis) as handle:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs, logits_to_keep=1)
        stats = handle.stats[-1]
    counted = sum(
        counter.get_flop_counts()["LlavaNextForConditionalGeneration.model.language_model"].values()
    )
    prompt = inputs["input_ids"].shape[1] - stats.tokens_before + stats.tokens_after
    assert model_prefill_flops(LlmDims.from_config(model.config.text_config), prompt) == counted


@pytest.mark.parametrize("basis", BASES)
def test_prefill_adds_at_most_three_host_reads(model, packed, basis):
    inputs = packed[(672, 672)][0]

    def count() -> int:
        with torch.inference_mode():
            model(**inputs, use_cache=True)  # warm the geometry caches outside the count
            with HostSyncCounter() as syncs:
                model(**inputs, use_cache=True)
        return syncs.total

    baseline = count()
    with attach(model, "divprune", retention_ratio=0.25, budget_basis=basis) as handle:
        extra = count() - baseline
        assert handle.stats
    assert extra <= 3, f"{basis}: {extra} extra host reads"
