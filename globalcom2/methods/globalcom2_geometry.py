"""Per-geometry constants of GlobalCom² (:mod:`globalcom2.methods.globalcom2`), built once and cached.

Everything here depends only on the crop grid, the unpadded region and the device, never on the image's
scores, so it is computed once per geometry (a handful per benchmark) and every image then runs only the
score-dependent steps. The steps work on the *view grid* ``[1 + n, W]`` (``W = side * side = 576``):
row 0 is the thumbnail, row ``1 + j`` is crop j's tile, row-major, exactly as the vision tower scored the
views. Letterbox padding leaves some tile entries without a packed token; they are invalid and rank last.
Within a row, tile order restricted to the unpadded tokens is their unpadded ("valid") row-major order,
so ties break as in the reference's index space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from globalcom2.anyres import SEPARATOR, PackedLayout, packed_provenance
from globalcom2.scoring.ranking import INVALID_TIE_BREAK, column_tie_break
from globalcom2.tensor_cache import cached_constants


@dataclass(frozen=True)
class CropGeometry:
    """Constants of one image geometry on the view grid.

    Attributes:
        positions: ``[Nc]`` packed positions of the crop tokens.
        crop: ``[Nc]`` crop index (row-major over the grid) of each crop token.
        valid_index: ``[Nc]`` index of the token within its crop's unpadded rectangle, row-major.
        tokens_per_crop: ``[n]`` N_j, unpadded tokens of each crop.
        tokens_per_crop_host: the same, as host integers.
        invalid: ``[n, W]`` bool, crop tile entries without a packed token (padding), or ``None`` when
            every crop token survives unpadding.
        tie_break: ``[1 + n, W]`` int64 for ``ranking_keys``: ``65535 - column``, and
            ``INVALID_TIE_BREAK`` on invalid entries.
        row_weights: ``[n, side, side]`` float32; crop j's block of the bilinear row weights (tile row
            by thumbnail row, :func:`bilinear_weights` of the unpadded canvas rows; 0 on padding).
        col_weights_t: ``[n, side, side]`` float32; the same for columns, transposed (thumbnail column
            by tile column).
        packed_index: ``[N]`` each packed position's entry in the flattened view grid (0 for a separator).
        is_separator: ``[N]`` bool, the packed position is a row separator.
        reference_view_index: ``[Nc + rows * side]`` the reference layout's crop part with every token
            kept (:func:`reference_canvas_order`): each item's entry in the flattened view grid (0 for a
            separator).
        reference_is_separator: ``[Nc + rows * side]`` bool, the item is a separator.
        reference_sources: ``[Nc + rows * side]`` the packed position each item copies.
        reference_separators: ``rows * side``, the separators of the reference layout (host int).
    """

    positions: torch.Tensor
    crop: torch.Tensor
    valid_index: torch.Tensor
    tokens_per_crop: torch.Tensor
    tokens_per_crop_host: tuple[int, ...]
    invalid: torch.Tensor | None
    tie_break: torch.Tensor
    row_weights: torch.Tensor
    col_weights_t: torch.Tensor
    packed_index: torch.Tensor
    is_separator: torch.Tensor
    reference_view_index: torch.Tensor
    reference_is_separator: torch.Tensor
    reference_sources: torch.Tensor
    reference_separators: int


def crop_geometry(layout: PackedLayout, device: torch.device | str = "cpu") -> CropGeometry:
    """View-grid constants of ``layout`` on ``device`` (cached by grid, unpadded region and device)."""
    return _geometry(layout.side, layout.grid, layout.valid_rows, layout.valid_cols, torch.device(device))


def bilinear_weights(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` float32 matrix of 1-D bilinear resizing (``align_corners=False``).

    Taken from ``F.interpolate`` itself (resizing the unit vectors), so the weights are exactly those the
    reference's ``F.interpolate(..., mode="bilinear")`` applies along that axis.
    """
    unit_vectors = torch.eye(size_in).view(size_in, 1, size_in, 1)  # [in, 1, in, 1]
    resized = F.interpolate(unit_vectors, size=(size_out, 1), mode="bilinear", align_corners=False)
    return resized[:, 0, :, 0].T.contiguous()  # [out, in]


def reference_canvas_order(
    crop: torch.Tensor, valid_index: torch.Tensor, side: int, grid: tuple[int, int]
) -> torch.Tensor:
    """The reference layout's crop part (``llava_arch.py`` of xuyang-liu16/GlobalCom2 @ 96b2d00) with every
    crop token kept.

    Each crop token is written to the slot of its crop's ``side x side`` tile given by its *unpadded*
    index (the reference's quirk), the canvas is read row by row, and a separator follows every one of
    the ``rows * side`` canvas rows, padded ones included. Keeping a subset of the crop tokens keeps their
    relative order, so the layout of any selection is this order restricted to the kept tokens.

    Args:
        crop, valid_index: ``[Nc]`` crop index and unpadded index of each crop token.

    Returns:
        ``[Nc + rows * side]`` for each item in canvas order, the index of its crop token (into the
        ``[Nc]`` arrays), or -1 for a separator.
    """
    (rows, cols), width = grid, grid[1] * side + 1  # canvas columns plus the separator column
    slot_row = (crop // cols) * side + valid_index // side  # [Nc] canvas row of the slot
    slot_col = (crop % cols) * side + valid_index % side  # [Nc]
    canvas_rows = torch.arange(rows * side)  # [H]
    keys = torch.cat([slot_row * width + slot_col, canvas_rows * width + width - 1])  # [Nc + H], distinct
    return torch.cat([torch.arange(crop.numel()), torch.full_like(canvas_rows, -1)])[keys.argsort()]


def _interpolation_blocks(
    side: int, grid: tuple[int, int], valid_rows: tuple[int, int], valid_cols: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_weights, col_weights_t)`` of :class:`CropGeometry`, ``[n, side, side]`` each.

    Tile row y of crop (a, b) is canvas row ``a * side + y``, i.e. unpadded row ``a * side + y - r0``
    when that lies inside the unpadded rectangle (columns alike); padded tile rows get zero weights.
    """
    rows, cols = grid

    def blocks(count: int, valid: tuple[int, int]) -> torch.Tensor:  # [count, side, side]
        if valid[1] == valid[0]:  # a sliver image (aspect ratio past ~48:1) unpads an axis to no token
            return torch.zeros(count, side, side)
        weights = bilinear_weights(side, valid[1] - valid[0])  # [unpadded, side]
        unpadded = torch.arange(count)[:, None] * side + torch.arange(side) - valid[0]  # [count, side]
        inside = (unpadded >= 0) & (unpadded < weights.shape[0])  # [count, side]
        return weights[unpadded.clamp(0, weights.shape[0] - 1)] * inside[..., None]

    crop = torch.arange(rows * cols)  # [n]
    row_weights = blocks(rows, valid_rows)[crop // cols]  # [n, side, side]
    col_weights_t = blocks(cols, valid_cols)[crop % cols].transpose(1, 2)  # [n, side, side]
    return row_weights.contiguous(), col_weights_t.contiguous()


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]``, or zeros where ``values`` is empty (a crop part with no token: every item then is a
    separator, and ``torch.where`` takes none of these)."""
    return values[index] if values.numel() else torch.zeros_like(index)


@cached_constants(maxsize=1024)
def _geometry(
    side: int,
    grid: tuple[int, int],
    valid_rows: tuple[int, int],
    valid_cols: tuple[int, int],
    device: torch.device,
) -> CropGeometry:
    view, token = packed_provenance(side, grid, valid_rows, valid_cols)  # [N], [N]
    num_views, width = 1 + grid[0] * grid[1], side * side
    positions = (view > 0).nonzero().squeeze(1)  # [Nc]
    crop = view[positions] - 1  # [Nc]
    one_hot = F.one_hot(crop, num_views - 1)  # [Nc, n]
    # Packed order walks canvas rows, so within one crop it is that crop's unpadded row-major order.
    valid_index = ((one_hot.cumsum(0) - 1) * one_hot).sum(1)  # [Nc]
    view_index = (crop + 1) * width + token[positions]  # [Nc] entry in the flattened view grid

    valid = torch.zeros(num_views * width, dtype=torch.bool)  # [(1 + n) W]
    valid[:width] = True
    valid[view_index] = True
    tie_break = column_tie_break(num_views, width).flatten().masked_fill(~valid, INVALID_TIE_BREAK)
    packed_index = torch.zeros_like(view)  # [N], separators read entry 0 and are kept by is_separator
    packed_index[:width] = torch.arange(width)  # thumbnail token t sits at packed position t
    packed_index[positions] = view_index
    item = reference_canvas_order(crop, valid_index, side, grid)  # [Nc + H]
    item_is_separator, item_token = item < 0, item.clamp(min=0)
    is_separator = view == SEPARATOR  # [N]
    # [1]; every separator carries the same vector (an image unpadded to no row has none: the clean layout
    # reads none, and the reference layout refuses such an image, ``GlobalCom2.select``)
    first_separator = (
        is_separator.nonzero()[0] if bool(is_separator.any()) else torch.zeros(1, dtype=torch.long)
    )
    row_weights, col_weights_t = _interpolation_blocks(side, grid, valid_rows, valid_cols)
    tokens_per_crop = one_hot.sum(0)  # [n]
    geometry = CropGeometry(
        positions=positions,
        crop=crop,
        valid_index=valid_index,
        tokens_per_crop=tokens_per_crop,
        tokens_per_crop_host=tuple(tokens_per_crop.tolist()),
        invalid=None if bool(valid.all()) else (~valid).view(num_views, width)[1:],
        tie_break=tie_break.view(num_views, width),
        row_weights=row_weights,
        col_weights_t=col_weights_t,
        packed_index=packed_index,
        is_separator=is_separator,
        reference_view_index=torch.where(item_is_separator, 0, _at(view_index, item_token)),
        reference_is_separator=item_is_separator,
        reference_sources=torch.where(item_is_separator, first_separator, _at(positions, item_token)),
        reference_separators=grid[0] * side,
    )
    return CropGeometry(
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(geometry).items()}
    )
