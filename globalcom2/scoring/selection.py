"""Vectorised top-k within groups (each image of a batch keeps its own budget)."""

from __future__ import annotations

import torch


def top_k_per_group(scores: torch.Tensor, group: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mark, in every group, the ``k[g]`` positions with the highest score.

    Ties go to the earlier position (row-major), so the choice is deterministic.

    Args:
        scores: ``[B, L]`` scores (higher is better).
        group: ``[B, L]`` group of every position (e.g. its image), ``-1`` for positions that are no candidate.
        k: ``[G]`` how many to keep per group (clipped to the group's size).

    Returns:
        ``[B, L]`` bool, True at the chosen positions.
    """
    flat_group = group.flatten()
    candidates = (flat_group >= 0).nonzero().squeeze(1)  # [C] flat indices
    chosen = torch.zeros(flat_group.numel(), dtype=torch.bool, device=scores.device)
    if candidates.numel() == 0:
        return chosen.view_as(group)
    values = scores.flatten()[candidates]  # [C]
    owner = flat_group[candidates]  # [C]
    order = torch.sort(values, descending=True, stable=True).indices  # best first, ties by position
    order = order[torch.sort(owner[order], stable=True).indices]  # grouped, best first within a group
    sizes = torch.bincount(owner, minlength=k.numel())  # [G]
    starts = sizes.cumsum(0) - sizes  # [G]
    owner_sorted = owner[order]
    rank = torch.arange(order.numel(), device=scores.device) - starts[owner_sorted]  # rank within the group
    chosen[candidates[order[rank < k.to(scores.device)[owner_sorted]]]] = True
    return chosen.view_as(group)


def compact_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the True entries of each row, left-aligned and padded to the longest row.

    Args:
        mask: ``[B, L]`` bool.

    Returns:
        ``(index [B, Q], valid [B, Q])`` with ``Q = max(mask.sum(1))``: ``index[b, :n_b]`` are the True columns of
        row ``b`` in increasing order, ``valid`` marks them; padded slots hold an arbitrary column.
    """
    counts = mask.sum(1)  # [B]
    width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # True columns first
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return order, valid
