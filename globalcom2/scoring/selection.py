"""Vectorised selection with output sizes the host already knows: no device read in a prefill.

Boolean-mask indexing, ``nonzero`` and ``bincount`` size their output by the data, so on a GPU they make the
host wait until every queued kernel has run. A compression method knows its counts on the host (kept tokens
follow from the image size and R), so every function here takes the count or width as an argument and runs
as a fixed-size kernel sequence (``globalcom2/efficiency/host_syncs.py`` counts the calls that would wait).
"""

from __future__ import annotations

import torch


def masked_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` int64 indices of the True entries of the 1-D ``mask``, ascending: ``mask.nonzero()`` with
    the size given.

    ``count`` must equal ``mask.sum()``, which is checked on the device (``torch._assert_async``: an error at
    once on CPU, a device-side assert on CUDA), never by waiting for it.
    """
    torch._assert_async(mask.sum() == count, f"masked_positions: the mask does not have {count} entries")
    return padded_positions(mask)[:count]


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64: the indices of the True entries of the 1-D ``mask`` ascending, then -1 to the end.

    The output's size is fixed by the mask's, for a compiled or graph-captured caller; a caller who knows the
    count on the host slices ``[:count]`` (a view: no kernel), as :func:`masked_positions` does.
    """
    size = mask.numel()
    slot = torch.where(mask, mask.long().cumsum(0) - 1, size)  # [N] output slot, False entries past the end
    out = torch.full((size + 1,), -1, dtype=torch.long, device=mask.device)
    out.scatter_(0, slot, torch.arange(size, device=mask.device))
    return out[:size]


def top_k_per_group(scores: torch.Tensor, group: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mark, in every group, the ``k[g]`` positions with the highest score.

    Ties go to the earlier position (row-major), so the choice is deterministic. Every position is sorted
    (non-candidates last), so the kernels' sizes never depend on the data.

    Args:
        scores: ``[B, L]`` scores (higher is better).
        group: ``[B, L]`` group of every position (e.g. its image), ``-1`` for positions that are no candidate.
        k: ``[G]`` how many to keep per group (clipped to the group's size), on ``scores``' device.

    Returns:
        ``[B, L]`` bool, True at the chosen positions.
    """
    groups = k.numel()
    device = scores.device
    owner = group.flatten()  # [N]
    owner = torch.where(owner >= 0, owner, groups)  # [N] non-candidates form a last group that keeps none
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices  # best first, ties by position
    order = order[torch.sort(owner[order], stable=True).indices]  # grouped, best first within a group
    sizes = torch.zeros(groups + 1, dtype=torch.long, device=device).scatter_add_(
        0, owner, torch.ones_like(owner)
    )  # [G + 1]
    starts = sizes.cumsum(0) - sizes  # [G + 1]
    owner_sorted = owner[order]  # [N]
    rank = torch.arange(order.numel(), device=device) - starts[owner_sorted]  # rank within the group
    limit = torch.cat([k.long(), torch.zeros(1, dtype=torch.long, device=device)])  # [G + 1]
    chosen = torch.zeros(owner.numel(), dtype=torch.bool, device=device)
    chosen.scatter_(0, order, rank < limit[owner_sorted])
    return chosen.view_as(group)


def compact_rows(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the True entries of each row, left-aligned and padded to ``width``.

    Args:
        mask: ``[B, L]`` bool.
        width: at least the largest number of True entries in a row (known on the host; entries past it
            are dropped).

    Returns:
        ``(index [B, width], valid [B, width])``: ``index[b, :n_b]`` are the True columns of row ``b`` in
        increasing order, ``valid`` marks them; padded slots hold an arbitrary column.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # True columns first
    valid = torch.arange(order.shape[1], device=mask.device)[None, :] < mask.sum(1)[:, None]
    return order, valid
