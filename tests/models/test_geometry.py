"""The LLaVA geometry (protocol=llava): LLaVA's grid ties and unpadding, consistent in the processor, the
model, our layout and every method, and exact at R = 1.0.

Expected counts are worked by hand from haotian-liu/LLaVA c121f043: ``select_best_resolution`` (pinpoints
as (width, height), first candidate wins a tie), ``unpad_image`` with ``int()``, and
576 + rows x (cols + 1) tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import generate_steps, prompt_inputs, synthetic_image

from globalcom2 import attach
from globalcom2.anyres import SEPARATOR, packed_layout, unpad_rounding
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS
from globalcom2.models.geometry import apply_geometry, llava_order
from globalcom2.models.loader import load_llava_next
from globalcom2.models.tiny import tiny_checkpoint

# (height, width) -> ((rows, cols), visual tokens) under LLaVA and under transformers
HAND_WORKED = {
    # 300 x 200 (W x H): every candidate ties on effective area; LLaVA's first is 336 wide x 672 tall.
    # Canvas 48 x 24 tokens; new_h = int(200 * 24 / 300) = 16, pad 16 -> 16 rows of 24 (+1) -> 576 + 400.
    # transformers: 672 wide; canvas 24 x 48; new_w = 36, pad 6 -> 24 rows of 36 (+1) -> 576 + 888.
    (200, 300): (((2, 1), 976), ((1, 2), 1464)),
    # Square small images: both keep 24 x 24 tokens, but split the canvas top/bottom vs left/right.
    (64, 64): (((2, 1), 1176), ((1, 2), 1176)),
    (336, 336): (((2, 1), 1176), ((1, 2), 1176)),
    # 861 x 328 on a 1 x 3 canvas (24 x 72): 861 * (24 / 328) = 62.99999999999999; int() -> 62, pad 5 ->
    # 62 columns; int(round(., 7)) -> 63, pad 4 -> 64 columns. 576 + 24 * 63 vs 576 + 24 * 65.
    (328, 861): (((1, 3), 2088), ((1, 3), 2136)),
}
SWEEP = [*HAND_WORKED, (672, 672), (600, 800), (1000, 600), (1001, 333), (2000, 300), (333, 334), (480, 640)]


@pytest.fixture(scope="module")
def llava_tiny():
    return load_llava_next(tiny_checkpoint(0), geometry="llava")


@pytest.mark.parametrize("size", list(HAND_WORKED))
def test_grid_and_token_counts_match_llava_by_hand(size):
    (llava_grid, llava_tokens), (hf_grid, hf_tokens) = HAND_WORKED[size]
    llava = packed_layout(size, llava_order(LLAVA_V16_GRID_PINPOINTS), rounding="llava")
    hf = packed_layout(size, LLAVA_V16_GRID_PINPOINTS)
    assert (llava.grid, llava.num_tokens) == (llava_grid, llava_tokens)
    assert (hf.grid, hf.num_tokens) == (hf_grid, hf_tokens)


@pytest.mark.parametrize("size", SWEEP)
def test_processor_model_and_layout_agree_under_the_llava_geometry(llava_tiny, size):
    model, processor = llava_tiny
    config = model.config
    assert unpad_rounding(config) == "llava" and config.image_grid_pinpoints == llava_order(
        LLAVA_V16_GRID_PINPOINTS
    )
    layout = packed_layout(size, config.image_grid_pinpoints, rounding=unpad_rounding(config))
    image = synthetic_image(size[1], size[0])
    inputs = prompt_inputs(processor, image)
    image_token = config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == layout.num_tokens  # the processor's count
    assert inputs["pixel_values"].shape[1] == layout.num_views  # the crops it cut
    tagged = (torch.arange(layout.num_views)[:, None] * 1000 + torch.arange(576)[None, :]).double()[..., None]
    packed, _ = model.model.pack_image_features(
        [tagged], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    expected = torch.where(layout.view == SEPARATOR, -1, layout.view * 1000 + layout.token).double()
    assert torch.equal(packed[0][:, 0], expected)  # the model's packing, position by position


def test_only_the_given_instances_change(llava_tiny, tiny):
    llava_model, _ = llava_tiny
    plain_model, plain_processor = tiny
    assert plain_model.config.image_grid_pinpoints == LLAVA_V16_GRID_PINPOINTS
    assert unpad_rounding(plain_model.config) == "transformers"
    assert type(plain_model.model).__name__ == "LlavaNextModel"
    assert type(llava_model.model).__name__ == "LlavaGeometryLlavaNextModel"
    # transformers' own unpadding is untouched outside the LLaVA-geometry model's calls
    inputs = prompt_inputs(plain_processor, synthetic_image(861, 328))
    assert int((inputs["input_ids"] == plain_model.config.image_token_id).sum()) == 2136
    with pytest.raises(RuntimeError, match="already applied"):
        apply_geometry(*llava_tiny, "llava")
    with pytest.raises(ValueError, match="geometry='anyres'; valid: transformers, llava"):
        load_llava_next("tiny", geometry="anyres")


@pytest.mark.exactness
@pytest.mark.parametrize("method", ["vanilla", "random", "globalcom2", "fastv", "sparsevlm"])
def test_ratio_one_is_bit_identical_under_the_llava_geometry(llava_tiny, method):
    model, processor = llava_tiny
    inputs = prompt_inputs(processor, synthetic_image(300, 200))  # a size where the geometries differ
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference_tokens, reference_steps = generate_steps(model, inputs, steps=3)
    params = {} if method == "vanilla" else {"retention_ratio": 1.0}
    with attach(model, method, **params), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)
        tokens, steps = generate_steps(model, inputs, steps=3)
    assert torch.equal(tokens, reference_tokens) and torch.equal(steps, reference_steps)
    assert type(model.model).__name__ == "LlavaGeometryLlavaNextModel"  # detaching restores the geometry


@pytest.mark.parametrize("method", ["random", "globalcom2"])
def test_methods_budget_the_llava_geometrys_patch_tokens(llava_tiny, method):
    model, processor = llava_tiny
    inputs = prompt_inputs(processor, synthetic_image(300, 200))
    with attach(model, method, retention_ratio=0.25) as handle, torch.no_grad():
        model(**inputs)
    (stats,) = handle.stats
    assert stats.tokens_before == 976 and stats.patch_tokens_before == 576 + 16 * 24
    assert stats.separators_kept == 16  # one per kept canvas row of LLaVA's 2 x 1 grid
    if method == "random":
        assert stats.patch_tokens_kept == (576 + 16 * 24) // 4
    else:  # GlobalCom² floors each crop's share, as its reference does: at most floor(R * N)
        assert 0.9 * 240 <= stats.patch_tokens_kept <= 240


def test_overlapping_packs_restore_transformers_unpadding():
    """Two LLaVA-geometry packs that overlap (two threads): the first out used to restore the second's
    patched function as the original, leaving every model of the process on LLaVA's rounding for good."""
    from transformers.models.llava_next import modeling_llava_next

    from globalcom2.models import geometry

    original = modeling_llava_next.unpad_image
    first, second = geometry._llava_unpadding(), geometry._llava_unpadding()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first pack ends while the second still packs
    assert modeling_llava_next.unpad_image is geometry._llava_unpad_image
    second.__exit__(None, None, None)
    assert modeling_llava_next.unpad_image is original
