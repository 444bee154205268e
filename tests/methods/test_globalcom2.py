"""GlobalCom²: the spec's test vectors, equality with a literal re-statement, properties, and the model."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from globalcom2_spec import spec_globalcom2, symbolic
from helpers import generate_steps, shortened_inputs, synthetic_image

from globalcom2 import attach
from globalcom2.anyres import config_layout, packed_layout
from globalcom2.methods import METHODS
from globalcom2.methods.base import ImageContext
from globalcom2.methods.direct import pre_llm_sources
from globalcom2.methods.globalcom2 import (
    GlobalCom2,
    block_scores,
    crop_geometry,
    crop_retention_ratios,
    global_crop_scores,
    thumbnail_keep,
)
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS as PINPOINTS
from globalcom2.models.loader import load_tiny_llava_next
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.scoring.vision_attention import ClsAttentionCapture

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

# one (height, width) per AnyRes grid (1x2, 2x1, 2x2, 1x3, 3x1) plus letterboxed and odd sizes
GRID_SIZES = [(336, 672), (672, 336), (672, 672), (336, 1008), (1008, 336)]
ODD_SIZES = [(1000, 600), (600, 1000), (1001, 333), (500, 1500), (64, 64), (400, 1200), (333, 334)]


def vector_scores(num_crops: int) -> torch.Tensor:
    """Test-vector inputs: s^G_i = 3 sin(0.05 i) + 0.01 i, s^L_{j,i} = 2 cos(0.07 (j+1) i); the expected
    outputs below come from the reference's own functions (xuyang-liu16/GlobalCom2 @ 96b2d00,
    ``llava/model/llava_arch.py``) run unmodified on CPU in float32."""
    i = torch.arange(576, dtype=torch.float64)
    rows = [3 * torch.sin(0.05 * i) + 0.01 * i] + [
        2 * torch.cos(0.07 * (j + 1) * i) for j in range(num_crops)
    ]
    return torch.stack(rows).float()


def run(method: GlobalCom2, size, scores):
    layout = packed_layout(size, PINPOINTS)
    ctx = ImageContext(layout=layout, pixel_values=torch.zeros(1), vision_scores=scores)
    return layout, method.select(torch.zeros(layout.num_tokens, 1), ctx)


# --- reference test vectors ------------------------------------------------------------------------------


def test_thumbnail_top5():
    for ratio in (0.1, 0.25, 1.0):
        assert thumbnail_keep(vector_scores(0)[0], ratio)[:5].tolist() == [535, 536, 534, 537, 533]


VECTORS = [
    # (width, height), R, r, k, reference-layout total
    ((800, 800), 0.1, [0.075, 0.075, 0.14745, 0.10255], [43, 43, 84, 59], 334),
    ((800, 800), 0.25, [0.1875, 0.1875, 0.36863, 0.25637], [108, 108, 212, 147], 767),
    ((800, 800), 0.5, [0.375, 0.375, 0.73726, 0.51274], [216, 216, 424, 295], 1487),
    ((800, 800), 0.75, [0.5625, 0.5625, 1.0, 0.76912], [324, 324, 576, 443], 2147),
    ((800, 800), 1.0, [0.75, 0.75, 1.0, 1.0], [432, 432, 576, 576], 2640),
    ((1000, 600), 0.25, [0.1875, 0.1875, 0.36863, 0.25637], [63, 63, 123, 86], 527),
    ((1200, 400), 0.25, [0.18271, 0.23677, 0.33052], [105, 136, 190], 599),
    ((1200, 400), 1.0, [0.73083, 0.94707, 1.0], [420, 545, 576], 2141),
]


@pytest.mark.parametrize(("wh", "ratio", "r", "k", "total"), VECTORS)
def test_spec_vectors(wh, ratio, r, k, total):
    size = (wh[1], wh[0])
    layout = packed_layout(size, PINPOINTS)
    scores = vector_scores(layout.num_crops)
    ratios = crop_retention_ratios(scores[0], layout.grid, ratio)
    torch.testing.assert_close(ratios, torch.tensor(r, dtype=torch.float64), atol=1e-5, rtol=0)
    keep_per_crop = torch.floor(crop_geometry(layout).tokens_per_crop.double() * ratios).long()
    assert keep_per_crop.tolist() == k
    _, reference = run(GlobalCom2(retention_ratio=ratio, layout="reference"), size, scores)
    assert reference.numel() == total
    # the spec's crop totals: 575 / 1151 / 229 / 1667 / 2016 (800x800), 335 (1000x600), 431 (1200x400)
    assert int(layout.is_separator[reference].sum()) == layout.grid[0] * 24


def test_clean_layout_totals():
    """Same selection as the reference, separators as vanilla: 1000x600 has 28 unpadded rows, not 48."""
    for (w, h), ratio, total in [((800, 800), 0.25, 767), ((1000, 600), 0.25, 507), ((1200, 400), 0.25, 599)]:
        layout = packed_layout((h, w), PINPOINTS)
        _, clean = run(GlobalCom2(retention_ratio=ratio), (h, w), vector_scores(layout.num_crops))
        assert clean.numel() == total


# --- equality with the literal re-statement -----------------------------------------------------------


def random_scores(num_crops: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5 + 4 * torch.rand(1, generator=generator)
    return (scale * torch.randn(1 + num_crops, 576, generator=generator) + 3).float()


@pytest.mark.parametrize("size", GRID_SIZES + ODD_SIZES)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_vectorised_equals_spec_on_random_maps(size, ratio):
    layout = packed_layout(size, PINPOINTS)
    geometry = crop_geometry(layout)
    valid_index = torch.full((layout.num_tokens,), -1)
    valid_index[geometry.positions] = geometry.valid_index  # packed position -> unpadded index
    for seed in range(3):
        scores = random_scores(layout.num_crops, seed)
        spec = spec_globalcom2(scores, size, PINPOINTS, ratio)
        ratios = crop_retention_ratios(scores[0], layout.grid, ratio)
        torch.testing.assert_close(ratios, torch.tensor(spec["r"], dtype=torch.float64), atol=1e-9, rtol=0)
        assert crop_geometry(layout).tokens_per_crop.tolist() == spec["n_valid"]
        _, reference = run(GlobalCom2(retention_ratio=ratio, layout="reference"), size, scores)
        assert symbolic(reference, layout, valid_index) == spec["reference"]
        if ratio < 1.0:  # the clean layout bypasses R = 1 (vanilla)
            _, clean = run(GlobalCom2(retention_ratio=ratio), size, scores)
            assert symbolic(clean, layout, valid_index) == spec["clean"]


@pytest.mark.filterwarnings("ignore:retention_ratio=0.001 keeps floor")
@pytest.mark.parametrize("layout", ["clean", "reference"])
@pytest.mark.parametrize("size", [(672, 672), (336, 1008), (1000, 600)])
def test_a_ratio_that_keeps_no_patch_token_keeps_the_separators_alone(size, layout):
    """At R = 0.001 every count is 0 (floor of fewer than 1,000 tokens): the selection still runs, and keeps
    what the reference keeps, the row separators alone (the eager top-k needs a bound of at least 1)."""
    packed = packed_layout(size, PINPOINTS)
    geometry = crop_geometry(packed)
    valid_index = torch.full((packed.num_tokens,), -1)
    valid_index[geometry.positions] = geometry.valid_index
    scores = random_scores(packed.num_crops, seed=0)
    _, kept = run(GlobalCom2(retention_ratio=0.001, layout=layout), size, scores)
    expected = spec_globalcom2(scores, size, PINPOINTS, 0.001)[layout]
    assert expected and all(item[0] == "sep" for item in expected)
    assert symbolic(kept, packed, valid_index) == expected


def test_column_padded_reference_layout_is_scrambled_like_the_reference():
    """For a tall image the reference packs each crop's kept tokens by unpadded index, so its
    order differs from vanilla's raster order while the multiset of tokens is the same."""
    size = (1000, 600)  # (h, w): tall, columns padded on a 2x2 canvas
    layout = packed_layout(size, PINPOINTS)
    scores = random_scores(layout.num_crops, 0)
    _, reference = run(GlobalCom2(retention_ratio=0.5, layout="reference"), size, scores)
    _, clean = run(GlobalCom2(retention_ratio=0.5), size, scores)
    crops_ref = reference[layout.view[reference] > 0]
    crops_clean = clean[layout.view[clean] > 0]
    assert sorted(crops_ref.tolist()) == sorted(crops_clean.tolist())
    assert crops_ref.tolist() != crops_clean.tolist()


# --- properties over many random maps and all five grids --------------------------------------------


@pytest.mark.parametrize("size", GRID_SIZES)
def test_allocation_bounds_and_budget(size):
    layout = packed_layout(size, PINPOINTS)
    n = layout.num_crops
    for seed in range(100):
        scores = random_scores(n, seed)
        for ratio in (0.1, 0.25, 0.5, 0.75, 1.0):
            r = crop_retention_ratios(scores[0], layout.grid, ratio)
            assert bool((r >= ratio * (1 - 1 / n) - 1e-6).all())
            assert bool((r <= min(1.0, ratio * (2 - 1 / n)) + 1e-6).all())
            unclipped = crop_retention_ratios(scores[0], layout.grid, ratio, clip=False)
            assert math.isclose(float(unclipped.sum()), n * ratio, abs_tol=1e-5)
        for ratio in (0.1, 0.25, 0.5, 0.75):
            _, source = run(GlobalCom2(retention_ratio=ratio), size, scores)
            patches = int((~layout.is_separator[source]).sum())
            assert patches <= 576 * ratio * (1 + n)  # the paper's "retain up to 576 R (1 + n)"
            assert int(layout.is_separator[source].sum()) == layout.num_separators


def test_allocation_variants():
    scores = random_scores(4, 1)
    uniform = crop_retention_ratios(scores[0], (2, 2), 0.25, allocation="uniform")
    assert uniform.tolist() == [0.25] * 4
    by_max = crop_retention_ratios(scores[0], (2, 2), 0.25, allocation="softmax_max")
    by_sum = crop_retention_ratios(scores[0], (2, 2), 0.25)
    assert not torch.allclose(by_max, by_sum)
    assert math.isclose(
        float(crop_retention_ratios(scores[0], (2, 2), 0.25, allocation="softmax_max", clip=False).sum()),
        1.0,
        abs_tol=1e-9,
    )


@pytest.mark.parametrize("grid", [(2, 2), (1, 3), (5, 1), (3, 7)])
def test_block_sums_follow_the_reference_partition(grid):
    """Equal and uneven blocks (the last row/column of blocks absorbs the remainder, as in the reference)."""
    rows, cols = grid
    thumbnail = random_scores(0, 3)[0]
    expected = [0.0] * (rows * cols)
    for token, score in enumerate(thumbnail.tolist()):
        block_row = min(token // 24 // max(24 // rows, 1), rows - 1)
        block_col = min(token % 24 // max(24 // cols, 1), cols - 1)
        expected[block_row * cols + block_col] += score
    got = block_scores(thumbnail, grid, "softmax_sum")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("size", GRID_SIZES + ODD_SIZES)
def test_global_scores_equal_the_interpolated_thumbnail(size):
    """The two-matmul stretch equals F.interpolate onto the unpadded region, read at each crop token."""
    layout = packed_layout(size, PINPOINTS)
    geometry = crop_geometry(layout)
    thumbnail = random_scores(0, 7)[0]
    (r0, r1), (c0, c1) = layout.valid_rows, layout.valid_cols
    stretched = F.interpolate(thumbnail.view(1, 1, 24, 24), size=(r1 - r0, c1 - c0), mode="bilinear")[0, 0]
    crop, token = geometry.crop, layout.token[geometry.positions]  # [Nc]
    canvas_row = (crop // layout.grid[1]) * 24 + token // 24 - r0
    canvas_col = (crop % layout.grid[1]) * 24 + token % 24 - c0
    got = global_crop_scores(thumbnail, geometry)  # [n, 576]
    # a few float32 ulps of the inputs: the rounding of another summation order, nothing more
    tolerance = 4 * torch.finfo(torch.float32).eps * float(thumbnail.abs().max())
    torch.testing.assert_close(got[crop, token], stretched[canvas_row, canvas_col], atol=tolerance, rtol=0)
    padded = torch.ones_like(got, dtype=torch.bool)
    padded[crop, token] = False
    assert not got[padded].any()  # padding reads exact zeros


# --- [CLS] scores from the vision tower -------------------------------------------------------------


@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_scores_equal_eager_attention(images, layer):
    """Captured while the tower runs SDPA; compared with a separate eager model's attention maps."""
    sdpa, processor = load_tiny_llava_next(seed=0)
    eager, _ = load_tiny_llava_next(
        seed=0, attn_implementation={"vision_config": "eager", "text_config": "sdpa"}
    )
    inputs = processor(images=images[(800, 600)], text=vicuna_v1_prompt("Q"), return_tensors="pt")
    pixels = inputs["pixel_values"][0, :5]  # [V, 3, 336, 336]
    assert sdpa.config.vision_config._attn_implementation == "sdpa"

    probs_capture = ClsAttentionCapture(sdpa.model.vision_tower, layer, "softmax")
    logits_capture = ClsAttentionCapture(sdpa.model.vision_tower, layer, "logits")
    with torch.no_grad(), probs_capture.capture() as probs, logits_capture.capture() as logits:
        sdpa.model.vision_tower(pixels)
    probs_capture.remove()
    logits_capture.remove()
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    expected_probs = out.attentions[layer][:, :, 0, 1:].mean(1)  # [V, 576]
    torch.testing.assert_close(probs[0], expected_probs, atol=1e-6, rtol=1e-5)

    # logits: softmax of each head's recomputed row must be the eager row, and their head-mean is ours
    attention = eager.model.vision_tower.encoder.layers[layer]
    normed = attention.layer_norm1(out.hidden_states[layer if layer >= 0 else len(out.attentions) + layer])
    q = attention.self_attn.q_proj(normed)[:, :1].view(5, 1, 4, 16).transpose(1, 2)  # [V, h, 1, hd]
    k = attention.self_attn.k_proj(normed).view(5, 577, 4, 16).transpose(1, 2)  # [V, h, 577, hd]
    head_logits = (q @ k.transpose(-1, -2)).squeeze(2) * attention.self_attn.scale  # [V, h, 577]
    torch.testing.assert_close(head_logits.softmax(-1), out.attentions[layer][:, :, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits[0], head_logits.mean(1)[:, 1:], atol=1e-5, rtol=1e-5)


def test_score_layer_out_of_range(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"score_layer must be an int in \[-4, 3\].*got 4"):
        attach(model, "globalcom2", retention_ratio=0.5, score_layer=4)
    assert type(model.model).__name__ == "LlavaNextModel"  # a failed attach leaves no trace


# --- through the model ------------------------------------------------------------------------------


def test_clean_ratio_one_is_bit_identical(model, processor, images):
    inputs = processor(images=images[(1008, 336)], text=vicuna_v1_prompt("What is it?"), return_tensors="pt")
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=4)
    with attach(model, "globalcom2", retention_ratio=1.0):
        tokens, steps = generate_steps(model, inputs, steps=4)
    assert torch.equal(steps, reference_steps) and torch.equal(tokens, reference_tokens)


@pytest.mark.parametrize("layout", ["clean", "reference"])
@pytest.mark.parametrize("wh", [(800, 600), (600, 1000)])
def test_generate_equals_shortened_input(model, processor, images, layout, wh):
    image = images.get(wh) or synthetic_image(*wh)
    inputs = processor(images=image, text=vicuna_v1_prompt("Where is the red square?"), return_tensors="pt")
    with attach(model, "globalcom2", retention_ratio=0.25, layout=layout) as handle:
        tokens, steps = generate_steps(model, inputs, steps=4)
        stats = handle.stats[-1]
    sources = pre_llm_sources(model, handle.method, inputs)
    assert stats.patch_tokens_kept + stats.separators_kept == sources[0].numel()
    reference_tokens, reference_steps = generate_steps(
        model, shortened_inputs(model, inputs, sources), steps=4
    )
    assert torch.equal(steps, reference_steps) and torch.equal(tokens, reference_tokens)


def test_mixed_batch_equals_single_runs(model, processor, images):
    batch_images = [images[(336, 1008)], images[(672, 672)], images[(800, 600)]]
    texts = [
        vicuna_v1_prompt(q) for q in ["Count the shapes.", "What colour is the top-left shape?", "Where?"]
    ]
    batch = processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
    with attach(model, "globalcom2", retention_ratio=0.25):
        tokens, steps = generate_steps(model, batch, steps=3)
        for row, (image, text) in enumerate(zip(batch_images, texts, strict=True)):
            alone = processor(images=image, text=text, return_tensors="pt")
            row_tokens, row_steps = generate_steps(model, alone, steps=3)
            torch.testing.assert_close(steps[:, row : row + 1], row_steps, atol=1e-4, rtol=0)  # see PATH_ATOL
            assert torch.equal(tokens[row : row + 1], row_tokens)


@pytest.mark.parametrize("wh", [(600, 1000), (1000, 600), (333, 1001), (1500, 500), (64, 64)])
@pytest.mark.parametrize("layout", ["clean", "reference"])
def test_odd_sizes_give_the_counts_the_spec_predicts(model, processor, wh, layout):
    inputs = processor(images=synthetic_image(*wh), text=vicuna_v1_prompt("Q"), return_tensors="pt")
    with attach(model, "globalcom2", retention_ratio=0.25, layout=layout) as handle:
        generate_steps(model, inputs, steps=1)
        stats = handle.stats[-1]
        captured = pre_llm_sources(model, handle.method, inputs)  # exercises the same scores
    size = (wh[1], wh[0])
    layout_ = packed_layout(size, PINPOINTS)
    capture = ClsAttentionCapture(model.model.vision_tower, -1)
    with torch.no_grad(), capture.capture() as scores:
        model.model.vision_tower(inputs["pixel_values"][0, : layout_.num_views])
    capture.remove()
    spec = spec_globalcom2(scores[0], size, PINPOINTS, 0.25)
    expected = spec[layout]
    assert stats.patch_tokens_kept == sum(item[0] != "sep" for item in expected)
    assert stats.separators_kept == sum(item[0] == "sep" for item in expected)
    assert captured[0].numel() == len(expected)


@pytest.mark.parametrize(
    "params",
    [
        {"allocation": "uniform"},
        {"allocation": "softmax_max"},
        {"score": "local_only"},
        {"score": "global_only"},
        {"alpha": 0.3, "temperature": 5.0},
        {"score_layer": -2, "attention": "softmax"},
    ],
)
def test_ablations_run_and_differ_from_the_default(model, processor, images, params):
    inputs = processor(images=images[(672, 672)], text=vicuna_v1_prompt("Q"), return_tensors="pt")
    with attach(model, "globalcom2", retention_ratio=0.25, **params) as handle:
        ablated = pre_llm_sources(model, handle.method, inputs)[0]
    with attach(model, "globalcom2", retention_ratio=0.25) as handle:
        default = pre_llm_sources(model, handle.method, inputs)[0]
    assert not torch.equal(ablated, default)


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"temperature": 0}, r"temperature must be a finite number > 0, got 0"),
        ({"temperature": -1.0}, r"temperature must be a finite number > 0, got -1.0"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"alpha must be a number in \[0, 1\], got -0.1"),
        ({"layout": "faithful"}, r"layout must be one of clean, reference; got 'faithful'"),
        (
            {"allocation": "n_topk"},
            r"allocation must be one of softmax_sum, uniform, softmax_max; got 'n_topk'",
        ),
        ({"score": "both"}, r"score must be one of holistic, local_only, global_only; got 'both'"),
        ({"retention_ratio": 0}, r"retention_ratio must be in \(0, 1\]"),
        # a knob its variant never reads would be recorded as an ablation that did not happen
        ({"score": "local_only", "alpha": 0.3}, r"alpha=0.3 is read only by score='holistic'"),
        ({"allocation": "uniform", "temperature": 5.0}, r"temperature=5.0 is read only by the softmax"),
    ],
)
def test_bad_parameters(model, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        attach(model, "globalcom2", **{"retention_ratio": 0.25, **params})


@pytest.mark.parametrize("score_layer", [True, "x", 1.5])
def test_a_score_layer_that_is_not_an_index_is_refused_when_built(score_layer):
    with pytest.raises(TypeError, match=r"score_layer must be an integer CLIP layer index"):
        METHODS.create("globalcom2", retention_ratio=0.25, score_layer=score_layer)


def test_scores_of_the_wrong_shape_are_refused_naming_both_shapes():
    layout = packed_layout((800, 800), PINPOINTS)
    method = METHODS.create("globalcom2", retention_ratio=0.25)
    for shape in ((layout.num_views - 1, 576), (layout.num_views, 577)):
        context = ImageContext(
            layout=layout,
            pixel_values=torch.zeros(layout.num_views, 3, 4, 4),
            vision_scores=torch.randn(shape),
        )
        with pytest.raises(
            ValueError,
            match=re.escape(f"scores of shape {list(shape)}") + rf".*expected \[{layout.num_views}, 576\]",
        ):
            method.select(torch.zeros(layout.num_tokens, 8), context)


def test_at_r1_the_clean_layout_captures_no_scores():
    """Its selection keeps everything without reading them, so no hook computes them on every forward."""
    assert METHODS.create("globalcom2", retention_ratio=1.0).vision_score_layer is None
    assert METHODS.create("globalcom2", retention_ratio=1.0, layout="reference").vision_score_layer == -1
    assert METHODS.create("globalcom2", retention_ratio=0.5).vision_score_layer == -1


@pytest.mark.parametrize("size", [(3000, 2), (2, 3000), (1500, 20), (20, 1500)])  # (width, height)
def test_a_sliver_image_whose_crops_unpad_to_nothing_is_compressed_not_a_crash(model, processor, size):
    """Past about 48:1 the unpadded crop region has no token row or column (every other method ran; GlobalCom²
    raised inside the interpolation weights). The thumbnail keeps its budget, the crops keep nothing; the
    reference layout, which copies a packed separator, refuses an image that has none."""
    width, height = size
    inputs = processor(images=synthetic_image(width, height), text=vicuna_v1_prompt("x"), return_tensors="pt")
    layout = config_layout(model.config, (height, width))
    assert layout.num_patches == 576  # the thumbnail's only
    with attach(model, "globalcom2", retention_ratio=0.25) as handle, torch.no_grad():
        model(**inputs)
    (stats,) = handle.stats
    assert (stats.patch_tokens_kept, stats.separators_kept) == (144, layout.num_separators)
    with attach(model, "globalcom2", retention_ratio=0.25, layout="reference") as handle, torch.no_grad():
        if layout.num_separators:
            model(**inputs)
            assert handle.stats[0].patch_tokens_kept == 144
        else:
            with pytest.raises(ValueError, match="unpads its crops to no row, so there is none to copy"):
                model(**inputs)
