"""VisionZip on the tiny model: parity with the plain reference, identity at ratio 1, batches, counts, costs."""

from __future__ import annotations

import pytest
import torch
from helpers import generate_steps, inputs_with_features, prompt_inputs, synthetic_image
from references import reference_clip_states, visionzip_reference_image
from torch.utils.flop_counter import FlopCounterMode

import globalcom2.methods.visionzip  # noqa: F401  (registers "visionzip" before the package imports it)
from globalcom2 import attach
from globalcom2.anyres import config_layout
from globalcom2.efficiency.flops import LlmDims, model_prefill_flops
from globalcom2.efficiency.host_syncs import HostSyncCounter
from globalcom2.methods import METHODS, ImageContext
from globalcom2.methods.visionzip import view_budget
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.scoring.vision_capture import CapturedViews, ViewCapture

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

PARITY_SIZES = [(336, 336), (800, 600), (1008, 336), (672, 672)]  # (width, height)
PARITY_RATIOS = [0.1, 1 / 9, 0.25, 0.5]
ATOL = 1e-5  # float32: the method and the reference sum the merged tokens in another order (measured <= 5e-6)
PATH_ATOL = 1e-4  # a left-padded batch row vs the sample alone (see tests/hooks/test_pre_llm_attach.py)


@pytest.fixture(scope="module")
def eager_tiny():
    """The tiny model (same seed, same weights) with eager attention everywhere: the reference's CLIP returns
    attentions, and torch's FLOP counter sees the text attention's matmuls."""
    return load_tiny_llava_next(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def reference_states(eager_tiny):
    """Per image size: the processor inputs and the eager CLIP states of layer -2 (computed once)."""
    model, processor = eager_tiny
    out = {}
    for size in PARITY_SIZES:
        inputs = prompt_inputs(processor, synthetic_image(*size))
        out[size] = (inputs, reference_clip_states(model, inputs)[0])
    return out


def hooked_features(model, inputs) -> list[torch.Tensor]:
    """The packed features the attached method hands the LLM, per image (through the hook's own path)."""
    with torch.no_grad():
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    return [output.plans[id(feats)].apply() for feats in output.pooler_output]


def sdpa_views(model, inputs) -> CapturedViews:
    """The views the hook sees for the first image of ``inputs``: the SDPA model's layer -2 capture."""
    layout = config_layout(model.config, inputs["image_sizes"][0])
    capture = ViewCapture(model.model.vision_tower, -2)
    try:
        with torch.no_grad(), capture.capture() as captured:
            model.model.vision_tower(inputs["pixel_values"][0][: layout.num_views], output_hidden_states=True)
    finally:
        capture.remove()
    (views,) = captured
    return views


def unit_cosines(keys: torch.Tensor) -> torch.Tensor:
    """[V, T, d] mean keys -> [V, T, T] cosine similarities (VisionZip's merge metric)."""
    unit = keys / keys.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(1, 2)


def near_ties(states: dict, views: CapturedViews, dominant: int, contextual: int) -> list[str]:
    """The decisions VisionZip takes on the reference's inputs whose margin the hook's inputs may reverse.

    The hook recomputes the [CLS] attention row and the mean keys from the SDPA model's projections; they
    differ from the eager forward's by float32 rounding (measured here: scores <= 2e-9 on values ~8e-3,
    cosines <= 5.4e-7, a few ulps). A comparison of two candidates can flip only if its margin is below twice
    the largest perturbation of the compared quantity, measured on these very inputs rather than assumed:
    the [CLS] score of the last dominant patch over the next one, and each merged token's best cosine over
    its second best target. Returns one line per such decision (empty: the outputs must be equal).
    """
    scores = states["attention"][:, :, 0, 1:].sum(1)  # [V, 576]
    score_bound = 2 * float((scores - views.cls_attention).abs().max())
    cosines = unit_cosines(states["keys"].mean(1))  # [V, 577, 577]
    cosine_bound = 2 * float((cosines - unit_cosines(views.keys)).abs().max())
    ties = []
    ranked = scores.sort(dim=1, descending=True)
    score_gaps = ranked.values[:, dominant - 2] - ranked.values[:, dominant - 1]  # [V]
    ties += [f"view {v}: score margin {float(g):.2e}" for v, g in enumerate(score_gaps) if g <= score_bound]
    for v in range(scores.shape[0]):
        keep = torch.zeros(cosines.shape[1], dtype=torch.bool)
        keep[0] = True
        keep[ranked.indices[v, : dominant - 1] + 1] = True
        rest = (~keep).nonzero().squeeze(1)  # [n]
        targets = torch.arange(0, rest.shape[0], max(1, rest.shape[0] // contextual))[:contextual]
        is_target = torch.zeros(rest.shape[0], dtype=torch.bool)
        is_target[targets] = True
        best = cosines[v][rest[~is_target]][:, rest[targets]].topk(2, dim=1).values  # [n - c, 2]
        margin = float((best[:, 0] - best[:, 1]).min())
        if margin <= cosine_bound:
            ties.append(f"view {v}: cosine margin {margin:.2e}")
    return ties


def fed_reference_inputs(method, model, inputs, states) -> torch.Tensor:
    """The method's ``select`` given the reference's own CLIP states (algorithm and layout only)."""
    layout = config_layout(model.config, inputs["image_sizes"][0])
    views = CapturedViews(
        hidden=states["hidden"],
        cls_attention=states["attention"][:, :, 0, 1:].sum(1),
        keys=states["keys"].mean(1),
    )
    ctx = ImageContext(
        layout=layout,
        pixel_values=inputs["pixel_values"][0],
        views=views,
        project=model.model.multi_modal_projector,
    )
    features = torch.zeros(layout.num_tokens, model.config.text_config.hidden_size)
    with torch.no_grad():
        return method.select(features, ctx).features


# --- budget ---------------------------------------------------------------------------------------------


def test_per_view_budget_reproduces_the_official_splits():
    assert view_budget(1 / 9, 10 / 64) == (54, 10)  # README: dominant=54, contextual=10 (64 per view)
    assert view_budget(2 / 9, 10 / 64) == (108, 20)
    assert view_budget(1 / 3, 10 / 64) == (162, 30)
    assert view_budget(0.25, 10 / 64) == (121, 23)  # 144 * 10/64 = 22.5, rounded half up
    assert view_budget(1 / 576, 10 / 64) == (1, 0)  # [CLS] alone
    assert view_budget(0.1, 0.999) == (1, 56)  # contextual at most k - 1: [CLS] always stays
    assert METHODS.create("visionzip", retention_ratio=1 / 9).budget == (54, 10)
    # the paper convention's nominal image (2880 = 5 views) keeps 5 k tokens: 5 x 57 at R = 0.1, not 288
    assert METHODS.create("visionzip", retention_ratio=0.1).nominal_visual_tokens(2) == (285, 285)
    assert METHODS.create("visionzip", retention_ratio=1 / 9).nominal_visual_tokens(1) == (320,)


# --- parity with the reference ---------------------------------------------------------------------------


def test_capture_equals_the_eager_clip_forward(model, reference_states):
    inputs, states = reference_states[(800, 600)]
    views = sdpa_views(model, inputs)
    torch.testing.assert_close(views.hidden, states["hidden"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        views.cls_attention, states["attention"][:, :, 0, 1:].sum(1), atol=1e-8, rtol=0
    )
    torch.testing.assert_close(views.keys, states["keys"].mean(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", PARITY_SIZES)
def test_packed_features_equal_the_reference(model, eager_tiny, reference_states, size):
    eager, _ = eager_tiny
    inputs, states = reference_states[size]
    layout = config_layout(model.config, inputs["image_sizes"][0])
    views = sdpa_views(model, inputs)
    for ratio in PARITY_RATIOS:
        dominant, contextual = view_budget(ratio, 10 / 64)
        reference = visionzip_reference_image(eager, states, dominant, contextual)
        assert reference.shape[0] == layout.num_views * (dominant + contextual)
        with attach(model, "visionzip", retention_ratio=ratio) as handle:
            (features,) = hooked_features(model, inputs)
            fed = fed_reference_inputs(handle.method, model, inputs, states)
            stats = handle.stats[-1]
        torch.testing.assert_close(fed, reference, atol=ATOL, rtol=0)  # same inputs: always equal
        if not torch.allclose(features, reference, atol=ATOL, rtol=0):  # the hook's own inputs (SDPA)
            ties = near_ties(states, views, dominant, contextual)
            assert ties, f"{size} R={ratio}: differs from the reference without a near tie"
        assert (stats.patch_tokens_kept, stats.separators_kept) == (reference.shape[0], 0)
        assert (stats.tokens_before, stats.patch_tokens_before) == (layout.num_tokens, layout.num_patches)
        assert stats.tokens_after == layout.num_views * dominant + layout.num_views * contextual


@pytest.mark.parametrize(
    ("sizes", "ratio"), [([(672, 672)], 0.25), ([(1008, 336)], 1 / 9), ([(800, 600), (336, 336)], 0.5)]
)
def test_logits_equal_the_unmodified_model_fed_the_reference(model, eager_tiny, sizes, ratio):
    eager, processor = eager_tiny
    inputs = prompt_inputs(processor, [synthetic_image(*s) for s in sizes], "Compare.")
    dominant, contextual = view_budget(ratio, 10 / 64)
    reference = [
        visionzip_reference_image(eager, states, dominant, contextual)
        for states in reference_clip_states(eager, inputs)
    ]
    with torch.no_grad():
        with attach(model, "visionzip", retention_ratio=ratio) as handle:
            hooked = model(**inputs).logits[0, -1]
            assert [s.tokens_after for s in handle.stats] == [r.shape[0] for r in reference]
        unmodified = model(**inputs_with_features(model, inputs, reference)).logits[0, -1]
    torch.testing.assert_close(hooked, unmodified, atol=1e-5, rtol=0)


# --- identity, batches, determinism ----------------------------------------------------------------------


def test_ratio_one_is_bit_identical_forward_and_generate_and_remove_restores(model, processor, images):
    inputs = prompt_inputs(processor, images[(800, 600)])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=4)
    attention = model.model.vision_tower.encoder.layers[-2]
    hooks = (len(attention._forward_hooks), len(attention.self_attn.k_proj._forward_hooks))

    with attach(model, "visionzip", retention_ratio=1.0) as handle, torch.no_grad():
        assert handle.method.vision_capture_layer is None  # nothing is captured at R = 1
        assert torch.equal(model(**inputs).logits, reference_logits)
        tokens, steps = generate_steps(model, inputs, steps=4)
        assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
        assert handle.stats[-1].patch_tokens_kept == handle.stats[-1].patch_tokens_before

    with attach(model, "visionzip", retention_ratio=0.25), torch.no_grad():
        assert len(attention._forward_hooks) == hooks[0] + 1
        compressed = model(**inputs).logits
    assert compressed.shape[1] < reference_logits.shape[1]
    assert (len(attention._forward_hooks), len(attention.self_attn.k_proj._forward_hooks)) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
    tokens, steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)


def test_deterministic_and_params_rebuild(model, processor, images):
    inputs = prompt_inputs(processor, images[(672, 672)])
    with attach(model, "visionzip", retention_ratio=1 / 9, contextual_fraction=0.25) as handle:
        first, again = hooked_features(model, inputs)[0], hooked_features(model, inputs)[0]
        method = handle.method
    assert torch.equal(first, again) and first.shape[0] == 5 * 64
    assert method.params() == {"retention_ratio": 1 / 9, "contextual_fraction": 0.25}
    assert METHODS.create("visionzip", **method.params()).params() == method.params()


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "error", "pattern"),
    [
        ({"retention_ratio": 0}, ValueError, r"retention_ratio must be in \(0, 1\].*got 0"),
        ({"retention_ratio": 1e-3}, ValueError, r"retention_ratio must be in \[1/576, 1\], got 0\.001"),
        ({"retention_ratio": "0.5"}, TypeError, r"retention_ratio must be a real number.*'0\.5'"),
        ({"retention_ratio": 0.5, "contextual_fraction": 1.0}, ValueError, r"in \[0, 1\).*got 1\.0"),
        ({"retention_ratio": 0.5, "contextual_fraction": -0.1}, ValueError, r"in \[0, 1\).*got -0\.1"),
        ({"retention_ratio": 0.5, "contextual_fraction": float("nan")}, ValueError, r"in \[0, 1\).*got nan"),
        ({"retention_ratio": 0.5, "contextual_fraction": True}, ValueError, r"in \[0, 1\).*got True"),
    ],
)
def test_bad_params_name_the_value_and_the_range(model, params, error, pattern):
    with pytest.raises(error, match=pattern):
        attach(model, "visionzip", **params)


def test_refuses_a_model_whose_feature_layer_is_not_minus_two(model):
    method = METHODS.create("visionzip", retention_ratio=0.25)
    config = model.config
    original = config.vision_feature_layer
    config.vision_feature_layer = -1
    try:
        with pytest.raises(ValueError, match=r"hidden_states\[-2\].*vision_feature_layer=-1"):
            method.check_model_config(config)
        with pytest.raises(ValueError, match=r"hidden_states\[-2\].*vision_feature_layer=-1"):
            attach(model, method)  # the public door checks it too, before any change to the model
    finally:
        config.vision_feature_layer = original
    method.check_model_config(config)
    attach(model, method).remove()  # the failed attach left the pre-LLM slot free


# --- costs ----------------------------------------------------------------------------------------------


def test_analytic_flops_equal_the_flop_counter(eager_tiny):
    model, processor = eager_tiny
    inputs = processor(images=synthetic_image(800, 600), text=vicuna_v1_prompt("Where?"), return_tensors="pt")
    with attach(model, "visionzip", retention_ratio=0.25) as handle:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs, logits_to_keep=1)
        stats = handle.stats[-1]
    counted = sum(
        counter.get_flop_counts()["LlavaNextForConditionalGeneration.model.language_model"].values()
    )
    prompt = inputs["input_ids"].shape[1] - stats.tokens_before + stats.tokens_after
    assert stats.tokens_after == 5 * 144
    assert model_prefill_flops(LlmDims.from_config(model.config.text_config), prompt) == counted


def test_prefill_adds_at_most_three_host_reads(model, processor, images):
    inputs = prompt_inputs(processor, images[(672, 672)])

    def count() -> HostSyncCounter:
        with torch.inference_mode():
            model(**inputs, use_cache=True)  # warm: cached geometry constants are built outside the count
            with HostSyncCounter() as syncs:
                model(**inputs, use_cache=True)
        return syncs

    baseline = count().total
    with attach(model, "visionzip", retention_ratio=0.25):
        syncs = count()
    assert syncs.total - baseline <= 3, dict(syncs.by_line)


def test_the_hook_free_path_refuses_a_method_that_builds_new_tokens(model, processor, images):
    """``pre_llm_sources`` returns kept packed positions; VisionZip keeps none (it merges tokens from the
    CLIP states the hook captures), so it is refused by name instead of failing inside ``select``."""
    from globalcom2.methods.direct import pre_llm_sources

    inputs = prompt_inputs(processor, images[(672, 672)])
    with pytest.raises(TypeError, match=r"'visionzip' builds its tokens from captured CLIP layer states"):
        pre_llm_sources(model, METHODS.create("visionzip", retention_ratio=0.25), inputs)
