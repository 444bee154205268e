"""The analytic packed layout must match transformers' own packing position by position."""

import pytest
import torch

from globalcom2.anyres import SEPARATOR, packed_layout
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS

# (height, width) pixels: every canvas, letterboxing on both axes, odd and extreme sizes.
SIZES = [
    (336, 336),
    (672, 672),
    (336, 1008),
    (1008, 336),
    (600, 800),
    (480, 640),
    (800, 800),
    (600, 1000),
    (1000, 600),
    (400, 1200),
    (1001, 333),
    (500, 1500),
    (64, 64),
    (337, 1000),
    (2000, 300),
    (333, 334),
]


@pytest.mark.parametrize("size", SIZES)
def test_layout_matches_hf_packing(tiny, size):
    """Pack index tensors with the model's own pack_image_features and read provenance back."""
    model, _ = tiny
    layout = packed_layout(size, LLAVA_V16_GRID_PINPOINTS)
    views = layout.num_views
    # feature value = view * 1000 + token, so every packed position names its source
    tagged = (torch.arange(views)[:, None] * 1000 + torch.arange(576)[None, :]).double()[
        ..., None
    ]  # [V, 576, 1]
    packed, _ = model.model.pack_image_features(
        [tagged], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    packed = packed[0][:, 0]  # [N]
    expected = torch.where(layout.view == SEPARATOR, -1, layout.view * 1000 + layout.token).double()
    assert torch.equal(packed, expected)
    assert layout.num_patches + layout.num_separators == layout.num_tokens == packed.numel()


@pytest.mark.parametrize(
    ("size", "tokens"),
    # counts transformers 5.23's LlavaNextProcessor gives these sizes (H x W), measured on the tiny model
    [
        ((336, 336), 1176),
        ((672, 672), 2928),
        ((336, 1008), 2328),
        ((1008, 336), 2376),
        ((600, 800), 2340),
        ((1500, 500), 2376),
    ],
)
def test_reference_token_counts(size, tokens):
    assert packed_layout(size, LLAVA_V16_GRID_PINPOINTS).num_tokens == tokens


def test_grid_and_unpadding_of_a_letterboxed_image():
    layout = packed_layout((600, 1000), LLAVA_V16_GRID_PINPOINTS)  # wide: rows padded on a 2x2 canvas
    assert layout.grid == (2, 2)
    assert layout.valid_cols == (0, 48) and layout.valid_rows == (10, 38)
    assert layout.num_separators == 28 and layout.num_patches == 576 + 28 * 48


def test_features_of_another_packing_are_refused_naming_both_counts():
    """The hook and the hook-free path (``pre_llm_sources``) both check: DivPrune drew repeated indices from
    100 features for a 2,928-position layout, and GlobalCom² returned indices past them, without an error."""
    layout = packed_layout((800, 800), LLAVA_V16_GRID_PINPOINTS)
    layout.check_features(torch.zeros(layout.num_tokens, 8))
    with pytest.raises(
        RuntimeError, match=rf"have 100 tokens, the AnyRes geometry predicts {layout.num_tokens}"
    ):
        layout.check_features(torch.zeros(100, 8))
