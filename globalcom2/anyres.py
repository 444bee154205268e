"""Geometry of LLaVA-NeXT's AnyRes packing: where every visual token of one image comes from.

transformers' ``LlavaNextModel.pack_image_features`` turns the per-view CLIP features of one image into
one sequence::

    [thumbnail: 576 tokens, row-major 24x24]
    ++ for each canvas row r kept by unpadding: [crop tokens of row r, left to right] ++ [separator]

The crops tile a canvas of ``rows x cols`` crops (``24*rows x 24*cols`` tokens) chosen by
``select_best_resolution``; ``unpad_image`` then drops the letterbox rows or columns symmetrically. This
module reproduces that arithmetic (including ``int(round(x, 7))`` and the ``padding : size - padding``
slice) so that compression methods can reason about crops, rows and separators without touching the
model. ``tests/unit/test_anyres.py`` checks it position by position against the model's own packing.

Two geometries exist (``globalcom2.models.geometry``): transformers' (the default), and the original LLaVA
code's, which breaks grid ties the other way (handled by the pinpoints' order) and truncates with ``int(x)``
when unpadding (``rounding="llava"`` here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_processing_utils import select_best_resolution

from globalcom2.tensor_cache import cached_constants

SEPARATOR = -1  # `view` value of the row-separator ("image_newline") tokens


@dataclass(frozen=True)
class PackedLayout:
    """Provenance of each position of one image's packed visual sequence.

    Attributes:
        image_size: original image size ``(height, width)`` in pixels.
        grid: crop grid ``(rows, cols)``; the thumbnail is not part of it.
        side: tokens per view side (24 for CLIP-L/14 at 336 px).
        valid_rows: ``[start, stop)`` of the canvas token rows that survive unpadding.
        valid_cols: ``[start, stop)`` of the canvas token columns that survive unpadding.
        view: ``[N]`` int64; 0 for the thumbnail, ``1 + crop index`` (row-major) for crops,
            ``SEPARATOR`` for row separators.
        token: ``[N]`` int64; token index within its view (row-major ``side x side``), -1 for separators.
    """

    image_size: tuple[int, int]
    grid: tuple[int, int]
    side: int
    valid_rows: tuple[int, int]
    valid_cols: tuple[int, int]
    view: torch.Tensor
    token: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Packed length N: patches plus separators."""
        return self.view.numel()

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        """Thumbnail plus crops: the number of CLIP forward passes for this image."""
        return 1 + self.num_crops

    @property
    def num_separators(self) -> int:
        """One per canvas row that survives unpadding."""
        return self.valid_rows[1] - self.valid_rows[0]

    @property
    def num_patches(self) -> int:
        """Patch tokens (thumbnail plus unpadded crops): what ``retention_ratio`` is a fraction of."""
        return self.num_tokens - self.num_separators

    @property
    def is_separator(self) -> torch.Tensor:
        """``[N]`` bool."""
        return self.view == SEPARATOR

    @property
    def patch_positions(self) -> torch.Tensor:
        """``[num_patches]`` int64: packed positions of the patch tokens, in packed order (cached, CPU)."""
        return _positions(self.side, self.grid, self.valid_rows, self.valid_cols)[0]

    @property
    def separator_positions(self) -> torch.Tensor:
        """``[num_separators]`` int64: packed positions of the row separators, in packed order (cached, CPU)."""
        return _positions(self.side, self.grid, self.valid_rows, self.valid_cols)[1]

    def check_features(self, features: torch.Tensor) -> None:
        """Raise unless ``features`` (``[N, D]``, one image's packed features) has this layout's ``N``: the
        methods index packed positions by the layout, so another model's packing would be mis-compressed
        (host metadata only: no device read)."""
        if features.shape[0] != self.num_tokens:
            raise RuntimeError(
                f"packed features of an image of size {self.image_size} have {features.shape[0]} tokens, the "
                f"AnyRes geometry predicts {self.num_tokens}; is this a LLaVA-NeXT AnyRes model?"
            )


def crop_grid(
    image_size: tuple[int, int], grid_pinpoints: list[list[int]], crop_size: int
) -> tuple[int, int]:
    """``(rows, cols)`` of crops that LLaVA-NeXT uses for an image of ``(height, width)`` pixels."""
    height, width = select_best_resolution(tuple(image_size), grid_pinpoints)
    return height // crop_size, width // crop_size


ROUNDINGS = ("transformers", "llava")


def unpadded_region(
    image_size: tuple[int, int], canvas: tuple[int, int], rounding: str = "transformers"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns ``[start, stop)`` of a ``canvas = (H, W)`` token grid kept by ``unpad_image``.

    Same arithmetic as transformers' ``unpad_image`` (strict ``>`` on aspect ratios, ``int(round(., 7))``,
    symmetric ``padding : size - padding`` slice). ``rounding="llava"`` truncates with ``int(.)`` instead, as
    haotian-liu/LLaVA's ``unpad_image`` does (c121f043, ``llava/model/llava_arch.py`` L100-128): where the
    exact value is a whole number that float arithmetic lands just below (861 x 328 on a 1 x 3 canvas:
    62.99999999999999), LLaVA keeps two columns fewer.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    orig_h, orig_w = image_size
    canvas_h, canvas_w = canvas

    def size(value: float) -> int:
        return int(value) if rounding == "llava" else int(round(value, 7))

    if orig_w / orig_h > canvas_w / canvas_h:
        new_h = size(orig_h * (canvas_w / orig_w))
        pad = (canvas_h - new_h) // 2
        return (pad, canvas_h - pad), (0, canvas_w)
    new_w = size(orig_w * (canvas_h / orig_h))
    pad = (canvas_w - new_w) // 2
    return (0, canvas_h), (pad, canvas_w - pad)


@cached_constants(maxsize=1024)
def packed_provenance(
    side: int, grid: tuple[int, int], valid_rows: tuple[int, int], valid_cols: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view [N], token [N])`` of the packed sequence; depends only on the grid and the unpadded region,
    so images of different sizes with the same geometry share one cached copy."""
    cols = grid[1]
    (r0, r1), (c0, c1) = valid_rows, valid_cols
    # Crop part: canvas rows r0..r1-1, each with columns c0..c1-1 plus one separator column.
    canvas_rows = torch.arange(r0, r1)  # [Hv]
    canvas_cols = torch.arange(c0, c1 + 1)  # [Wv + 1]; the last one is the separator
    r = canvas_rows[:, None].expand(-1, canvas_cols.numel())  # [Hv, Wv + 1]
    c = canvas_cols[None, :].expand(canvas_rows.numel(), -1)  # [Hv, Wv + 1]
    crop_view = 1 + (r // side) * cols + (c // side)  # [Hv, Wv + 1]
    crop_token = (r % side) * side + (c % side)  # [Hv, Wv + 1]
    separator = c == c1
    crop_view = crop_view.masked_fill(separator, SEPARATOR).flatten()
    crop_token = crop_token.masked_fill(separator, -1).flatten()

    thumb = side * side
    view = torch.cat([torch.zeros(thumb, dtype=torch.long), crop_view])  # [N]
    token = torch.cat([torch.arange(thumb), crop_token])  # [N]
    return view, token


@cached_constants(maxsize=1024)
def _positions(
    side: int, grid: tuple[int, int], valid_rows: tuple[int, int], valid_cols: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(patch positions, separator positions)`` of one geometry, each ascending."""
    view, _ = packed_provenance(side, grid, valid_rows, valid_cols)
    return (view != SEPARATOR).nonzero().squeeze(1), (view == SEPARATOR).nonzero().squeeze(1)


@cached_constants(maxsize=512)
def _cached_layout(
    image_size: tuple[int, int],
    pinpoints: tuple[tuple[int, int], ...],
    crop_size: int,
    patch_size: int,
    rounding: str,
) -> PackedLayout:
    side = crop_size // patch_size
    grid = crop_grid(image_size, [list(p) for p in pinpoints], crop_size)
    valid_rows, valid_cols = unpadded_region(image_size, (grid[0] * side, grid[1] * side), rounding)
    view, token = packed_provenance(side, grid, valid_rows, valid_cols)
    return PackedLayout(image_size, grid, side, valid_rows, valid_cols, view, token)


def packed_layout(
    image_size: tuple[int, int] | torch.Tensor,
    grid_pinpoints: list[list[int]],
    crop_size: int = 336,
    patch_size: int = 14,
    rounding: str = "transformers",
) -> PackedLayout:
    """The :class:`PackedLayout` of an image of ``image_size = (height, width)`` pixels (cached, CPU).

    ``rounding``: the unpadding arithmetic, ``unpad_rounding(model.config)`` for a loaded model.
    """
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    height, width = (int(v) for v in image_size)
    pinpoints = tuple(tuple(int(v) for v in p) for p in grid_pinpoints)
    return _cached_layout((height, width), pinpoints, int(crop_size), int(patch_size), rounding)


def config_layout(config: Any, image_size: tuple[int, int] | torch.Tensor | list[int]) -> PackedLayout:
    """The :class:`PackedLayout` of ``image_size`` under a loaded ``LlavaNextConfig`` (its pinpoints, crop and
    patch size, and its unpadding arithmetic)."""
    vision = config.vision_config
    return packed_layout(
        image_size,
        config.image_grid_pinpoints,
        crop_size=vision.image_size,
        patch_size=vision.patch_size,
        rounding=unpad_rounding(config),
    )


def unpad_rounding(config: object) -> str:
    """The unpadding arithmetic of a model config: ``"llava"`` once ``globalcom2.models.geometry`` set it."""
    return getattr(config, UNPAD_ROUNDING_ATTR, "transformers")


#: The attribute of a LLaVA-NeXT config that records its unpadding arithmetic (absent: transformers').
UNPAD_ROUNDING_ATTR = "globalcom2_unpad_rounding"
