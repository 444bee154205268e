"""DPC-kNN clustering and mean merging, batched over groups of different sizes (SparseVLM's recycling).

SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417; Gumpest/SparseVLMs@v1.5 ``utils.py`` ``cluster_and_merge``)
merges a part of the dropped visual tokens back: density-peaks clustering with k nearest neighbours
(DPC-kNN, after Du et al. 2016 and TCFormer), each cluster replaced by the mean of its members. This is a fresh,
vectorised implementation for many groups at once (the reference handles one image of one sample).

Differences from the reference, all numerical or tie-breaking:

* the reference adds ``torch.rand * 1e-6`` to the densities to break ties; here ties are broken by position
  (the earlier token counts as denser), so results are deterministic;
* distances run in float32 (the reference uses the model dtype);
* the merge is the exact mean, returned in the tokens' dtype (the reference divides by ``count + 1e-6``),
  summed in float64 as a product with the one-hot membership, so it does not depend on the order of addition
  (float ``index_add_`` on CUDA adds in a different order on every call).
"""

from __future__ import annotations

import torch


def dpc_knn_merge(
    tokens: torch.Tensor, count: torch.Tensor, clusters: torch.Tensor, max_clusters: int
) -> torch.Tensor:
    """Cluster each group's tokens into ``clusters[g]`` clusters and return the cluster means.

    Args:
        tokens: ``[G, M, C]`` tokens of each group; rows ``>= count[g]`` are padding.
        count: ``[G]`` real tokens per group.
        clusters: ``[G]`` clusters per group, ``1 <= clusters[g] <= count[g]`` (0 for an empty group); also the
            ``k`` of the k-nearest-neighbour density, as in the reference.
        max_clusters: ``max(clusters)``, known on the host (it sizes the output).

    Returns:
        ``[G, K, C]`` merged tokens (``K = max_clusters``) in the dtype of ``tokens``, ordered by decreasing
        cluster-centre score; rows ``>= clusters[g]`` are zero.
    """
    groups, size, channels = tokens.shape
    device = tokens.device
    if max_clusters == 0:
        return tokens.new_zeros(groups, 0, channels)
    x = tokens.float()
    index = torch.arange(size, device=device)
    real = index[None, :] < count[:, None]  # [G, M]
    pair = real[:, :, None] & real[:, None, :]  # [G, M, M]

    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / channels**0.5  # [G, M, M]
    dist_to_real = dist.masked_fill(~real[:, None, :], float("inf"))

    # Local density: exp(-mean squared distance to the k nearest tokens), itself included (distance 0).
    nearest = torch.topk(dist_to_real, max_clusters, dim=-1, largest=False).values  # [G, M, K]
    use = torch.arange(max_clusters, device=device)[None, :] < clusters[:, None]  # [G, K]
    mean_sq = (
        torch.where(use[:, None, :], nearest.square(), 0.0).sum(-1) / clusters.clamp(min=1)[:, None]
    )  # [G, M]
    density = torch.exp(-mean_sq).masked_fill(~real, -1.0)  # [G, M]

    # Distance to the nearest denser token (ties: the earlier token is denser); the densest gets the max.
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None])
    )  # [G, i, j]: j is denser than i
    denser &= pair
    dist_max = dist.masked_fill(~pair, 0.0).flatten(1).max(dim=1).values  # [G]
    parent = torch.where(denser, dist, dist_max[:, None, None]).min(dim=-1).values  # [G, M]

    # Centres: the highest density x parent-distance; every token joins its nearest centre.
    centre_score = (parent * density).masked_fill(~real, float("-inf"))  # [G, M]
    centres = torch.topk(centre_score, max_clusters, dim=-1).indices  # [G, K]
    to_centre = dist.gather(2, centres[:, None, :].expand(-1, size, -1))  # [G, M, K]
    to_centre = to_centre.masked_fill(~use[:, None, :], float("inf"))
    assign = to_centre.argmin(dim=-1)  # [G, M]
    slots = torch.arange(max_clusters, device=device).expand(groups, -1)
    assign = assign.scatter(1, centres, torch.where(use, slots, assign.gather(1, centres)))  # centres -> self

    # Mean of each cluster's members, as a product with the one-hot membership (padding rows belong to none).
    # Float atomics (index_add_ on CUDA) would add the members in a different order on every call; in float64 the
    # sum of a few hundred float32 values is exact in practice, so neither the order nor the batch's padded
    # widths (M, K) nor TF32 can change the float32 mean.
    members = ((assign[:, :, None] == slots[:, None, :]) & real[:, :, None]).double()  # [G, M, K]
    sums = members.transpose(1, 2) @ x.double()  # [G, K, C]
    merged = sums / members.sum(dim=1).clamp(min=1)[:, :, None]  # [G, K, C]
    return merged.to(tokens.dtype)
