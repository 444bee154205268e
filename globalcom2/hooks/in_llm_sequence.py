"""Sequence surgery for in-LLM compression: pure tensor functions, no model access.

A stage of an in-LLM method keeps some rows of the sequence entering a decoder layer and may insert new
(merged) rows right after each image's kept rows. Rows stay in their order, every batch row may keep a
different number, and the batch is left-padded again so that every row ends at the last column (where
``generate`` reads the next-token logits). Everything is vectorised over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from globalcom2.methods.base import MergedTokens
from globalcom2.scoring.ranking import int64_tensor
from globalcom2.scoring.selection import masked_positions


@dataclass(frozen=True)
class Relayout:
    """Where every row of the new sequence comes from.

    Attributes:
        source: ``[B, L']`` index into ``cat(current rows [L], inserted rows [M])`` of every new row.
        valid: ``[B, L']`` True for real rows (left padding is False).
        inserted_hidden: ``[B, M, D]`` merged rows placed per batch row, or ``None`` when nothing is inserted.
        inserted_image: ``[B, M]`` image of each inserted row (-1 for unused slots), or ``None``.
    """

    source: torch.Tensor
    valid: torch.Tensor
    inserted_hidden: torch.Tensor | None
    inserted_image: torch.Tensor | None


def plan_relayout(
    keep: torch.Tensor,
    image: torch.Tensor,
    new_length: int,
    merged: MergedTokens | None = None,
    image_row: tuple[int, ...] = (),
) -> Relayout:
    """Keep the rows marked in ``keep`` and insert each image's merged rows after that image's last row.

    Every size comes from the host (``new_length``, the merged counts and the images' batch rows), so the
    relayout is a fixed sequence of kernels that never waits for the device.

    Args:
        keep: ``[B, L]`` bool, True for the real rows that go on (padding must be False).
        image: ``[B, L]`` image index of each visual row (scatter order over the batch), -1 elsewhere.
        new_length: the most rows any batch row keeps, merged rows included.
        merged: per-image merged rows, or ``None``.
        image_row: the batch row of each image (needed with ``merged``).
    """
    batch, length = keep.shape
    device = keep.device
    columns = torch.arange(length, device=device).expand(batch, length)  # [B, L]
    total = sum(merged.count) if merged is not None else 0
    if merged is None or total == 0:
        keys, selected = columns, keep
        inserted_hidden = inserted_image = None
    else:
        images, per_image, dim = merged.hidden_states.shape
        if len(image_row) != images or len(merged.count) != images:
            raise ValueError(f"{images} images of merged rows need {images} batch rows and counts")
        count = int64_tensor(merged.count, device)  # [I]
        owner_row = int64_tensor(image_row, device)  # [I] batch row of each image
        per_row = [0] * batch
        for row, rows_of_image in zip(image_row, merged.count, strict=True):
            per_row[row] += rows_of_image
        width = max(per_row)
        stride = per_image + 1  # sort keys: an image's merged rows fall between its last row and the next row
        owners = torch.where(image >= 0, image, images).flatten()  # [B L], non-visual rows to a scratch slot
        anchor = torch.full((images + 1,), -1, dtype=torch.long, device=device)
        anchor = anchor.scatter_reduce(0, owners, columns.flatten(), "amax")[:images]  # last column per image
        # Slots of each batch row: its images' merged rows one after the other (images of a row are consecutive).
        before = count.cumsum(0) - count  # [I] merged rows of all earlier images
        row_start = torch.full((batch,), total + 1, dtype=torch.long, device=device)
        row_start = row_start.scatter_reduce(0, owner_row, before, "amin")
        offset = before - row_start[owner_row]  # [I] first slot of each image within its batch row
        slots = torch.arange(per_image, device=device)[None, :] < count[:, None]  # [I, M] real merged rows
        flat = masked_positions(slots.flatten(), total)  # [T]
        slot_image, slot_rank = flat // per_image, flat % per_image  # [T] image and rank of every merged row
        dst_row, dst_col = owner_row[slot_image], offset[slot_image] + slot_rank
        inserted_hidden = merged.hidden_states.new_zeros(batch, width, dim)
        inserted_hidden[dst_row, dst_col] = merged.hidden_states[slot_image, slot_rank]
        inserted_image = torch.full((batch, width), -1, dtype=torch.long, device=device)
        inserted_image[dst_row, dst_col] = slot_image
        # Not `inserted_valid[dst_row, dst_col] = True`: a number put at tensor indices is a blocking copy on CUDA.
        inserted_valid = inserted_image >= 0  # [B, width]
        inserted_keys = torch.zeros(batch, width, dtype=torch.long, device=device)
        inserted_keys[dst_row, dst_col] = anchor[slot_image] * stride + 1 + slot_rank
        keys = torch.cat([columns * stride, inserted_keys], dim=1)  # [B, L + M]
        selected = torch.cat([keep, inserted_valid], dim=1)
    sort_key = torch.where(selected, keys, -1)  # padding first, then rows in order
    order = torch.argsort(sort_key, dim=1, stable=True)  # [B, L + M]
    source = order[:, order.shape[1] - new_length :]  # [B, L']
    return Relayout(source, selected.gather(1, source), inserted_hidden, inserted_image)


def gather_rows(
    rows: torch.Tensor, source: torch.Tensor, inserted: torch.Tensor | None = None
) -> torch.Tensor:
    """``cat(rows, inserted)[b, source[b, j]]`` for every ``b, j``; ``rows`` is ``[B, L, *]``."""
    full = rows if inserted is None else torch.cat([rows, inserted.to(rows.dtype)], dim=1)
    index = source.view(*source.shape, *([1] * (full.dim() - 2))).expand(*source.shape, *full.shape[2:])
    return full.gather(1, index)


def renumber_positions(valid: torch.Tensor, first_position: torch.Tensor) -> torch.Tensor:
    """Contiguous positions ``first_position[b], first_position[b] + 1, ...`` over each row's real rows.

    Padding gets 1 (``generate`` gives it 0; it is masked out either way, so the value is never read).
    """
    positions = valid.long().cumsum(1) - 1 + first_position[:, None]
    return positions.masked_fill(~valid, 1)
