"""Deterministic per-row top-k: each row keeps its own count, ties break by column, all rows at once.

``torch.topk`` leaves the order of equal values unspecified (and CPU and CUDA differ), while a stable
sort is several times slower than a top-k on CPU. Ranking on int64 keys that encode (score, column) makes
every key in a row distinct, so one plain ``topk`` gives a deterministic, device-independent selection
with the rule "higher score first, then lower column".
"""

from __future__ import annotations

from array import array

import torch

from globalcom2.tensor_cache import cached_constants

TIE_BREAK_BITS = 16  # low bits of a ranking key; rows are narrower than 2**16 columns
INVALID_TIE_BREAK = -(2**62)  # below every valid key, whose magnitude stays under 2**47


def ranking_keys(scores: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """int64 keys that order by score descending, then by ``tie_break`` descending, with no two equal.

    The float32 bit pattern is mapped to an int32 with the same order (the magnitude bits of negative
    floats are flipped), shifted up by :data:`TIE_BREAK_BITS`, and ``tie_break`` (distinct values in
    ``[0, 2**16)`` within a row, e.g. :func:`column_tie_break`) fills the low bits. A tie break of
    :data:`INVALID_TIE_BREAK` puts an entry below every valid one. The one pair of equal floats the keys
    do not treat as a tie is -0.0 and +0.0 (-0.0 ranks just below).

    Args:
        scores: ``[..., W]`` float scores.
        tie_break: ``[..., W]`` int64.

    Returns:
        ``[..., W]`` int64 keys.
    """
    bits = scores.float().contiguous().view(torch.int32)  # [..., W]
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # [..., W] int32 in the order of the float values
    return torch.add(tie_break, monotone, alpha=2**TIE_BREAK_BITS)  # [..., W] int64


@cached_constants(maxsize=64)
def column_tie_break(rows: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[rows, width]`` int64 ``65535 - column``: lower columns win ties in :func:`ranking_keys`."""
    return (2**TIE_BREAK_BITS - 1 - torch.arange(width)).expand(rows, -1).contiguous().to(device)


def int64_tensor(values: list[int] | tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=torch.int64, device=device)`` without a device sync or type inference.

    ``torch.tensor(..., device="cuda")`` copies from pageable host memory and then waits for the stream, i.e.
    for every kernel queued before it; here the values go through pinned memory with ``non_blocking=True``,
    so the copy is queued like a kernel (the caching host allocator keeps the buffer alive until it ran).
    On CPU, ``frombuffer`` over a typed array costs a third of ``torch.tensor`` of a short list; the tensor
    keeps the array alive.
    """
    host = (
        torch.frombuffer(array("q", values), dtype=torch.int64)
        if values
        else torch.zeros(0, dtype=torch.long)
    )
    return host_to_device(host, device)


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, queued without waiting for the device (pinned, non-blocking);
    ``host`` itself on CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def top_counts_per_row(keys: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``counts[i]`` largest keys of each row ``i``, for all rows at once.

    Args:
        keys: ``[R, W]`` int64, distinct within each row (:func:`ranking_keys`).
        counts: ``R`` host integers, entries kept per row; at most the row's valid entries.

    Returns:
        ``(kept [R, W] bool, order [R, K])``: the kept mask and each row's best ``K = max(counts)``
        columns, best first.
    """
    # a top-k of the largest count is a partial sort, cheaper than a full one at the usual ratios
    bound = max(counts)
    if bound == 0:
        return torch.zeros_like(keys, dtype=torch.bool), keys.new_empty((keys.shape[0], 0))
    return top_counts_per_row_fixed(keys, int64_tensor(counts, keys.device), bound)


def top_counts_per_row_fixed(
    keys: torch.Tensor, counts: torch.Tensor, bound: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``counts[r]`` largest keys of each row ``r``, the counts on the device (what
    :func:`top_counts_per_row` runs once it has put them there): every output's shape follows ``keys`` and
    ``bound``, never the counts' values. For a compiled or graph-captured caller, where a new size is a new
    graph, ``bound`` is the row width (a top-k of it is a sort); an eager caller passes the largest count,
    whose partial sort costs a third of a full one on a CPU.

    Args:
        keys: ``[R, W]`` int64, distinct within each row (:func:`ranking_keys`).
        counts: ``[R]`` int64 on ``keys``' device, entries kept per row (0 allowed), each at most ``bound``.
        bound: ``1 <= bound <= W``, at least every count (the caller knows the counts on the host).

    Returns:
        ``(kept [R, W] bool, order [R, bound])``: the kept mask and each row's ``bound`` best columns.
    """
    best, order = keys.topk(bound, dim=1)  # [R, bound] x 2, best first
    threshold = best.gather(1, (counts - 1).clamp(min=0).unsqueeze(1))  # [R, 1] the counts[r]-th best key
    return (keys >= threshold) & (counts > 0).unsqueeze(1), order  # [R, W], [R, bound]
