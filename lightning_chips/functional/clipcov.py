"""ClipCov (Joshi et al., AISTATS 2024): keep the pairs that preserve the image-caption cross-covariance.

Within each latent class ``c`` (labels, zero-shot pseudo-labels, or k-means clusters **[ours]**), greedily pick the
pair with the largest gain

.. math::

    \\text{gain}(i) = \\sum_{j \\in c} \\big[\\max(0, x_i \\cdot y_j) + \\max(0, x_j \\cdot y_i)\\big]
                    + 2\\, x_i \\cdot y_i,

and after each pick ``k`` subtract its similarity ``max(0, x_j . y_k) + max(0, x_k . y_j)`` from every remaining
pair ``j`` of the class (redundancy). :func:`clipcov_order` returns the per-class greedy rank of every pair;
:func:`clipcov_select` keeps, per class, the first ``quota_c`` picks with quotas proportional to class size
summing to the budget. Cost ``O(sum_c n_c^2 e)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_chips.selection import stratified_quotas

__all__ = ["clipcov_order", "clipcov_select", "kmeans"]


def _pair_similarity(x: Tensor, y: Tensor) -> Tensor:
    """``sim[j, k] = max(0, x_j . y_k) + max(0, x_k . y_j)`` (symmetric)."""
    cross = (x @ y.T).clamp(min=0)
    return cross + cross.T


def clipcov_order(image_emb: Tensor, text_emb: Tensor, labels: Tensor) -> Tensor:
    """``[N]`` greedy pick position of each pair within its class (0 = picked first)."""
    order = torch.empty(len(labels), dtype=torch.long)
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        x, y = image_emb[members].double(), text_emb[members].double()
        sim = _pair_similarity(x, y)
        gain = sim.sum(1) + 2.0 * (x * y).sum(1)
        available = torch.ones(len(members), dtype=torch.bool)
        for position in range(len(members)):
            masked = torch.where(available, gain, torch.full_like(gain, -torch.inf))
            pick = int(torch.argmax(masked))  # first maximum: ties go to the lower index
            order[members[pick]] = position
            available[pick] = False
            gain = gain - sim[:, pick]
    return order


def clipcov_select(image_emb: Tensor, text_emb: Tensor, labels: Tensor, budget: int) -> Tensor:
    """Indices of the ``budget`` pairs ClipCov keeps (per-class quotas proportional to class size)."""
    if not 1 <= budget <= len(labels):
        raise ValueError(f"`budget` must be in [1, {len(labels)}], got {budget}.")
    order = clipcov_order(image_emb, text_emb, labels)
    quotas = stratified_quotas(labels.numpy(), budget)
    keep = np.zeros(len(labels), dtype=bool)
    labels_np, order_np = labels.numpy(), order.numpy()
    for c, quota in quotas.items():
        keep |= (labels_np == c) & (order_np < quota)
    return torch.from_numpy(np.flatnonzero(keep))


def kmeans(points: Tensor, k: int, *, iterations: int = 50, seed: int = 0) -> Tensor:
    """Cluster ids ``[N]`` from seeded k-means (k-means++ init) on L2-normalised points (cosine k-means)."""
    if not 1 <= k <= len(points):
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={len(points)}.")
    generator = torch.Generator().manual_seed(int(seed))
    points = points.double()
    centers = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        dist = torch.cdist(points, centers).min(1).values.square()
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / len(dist))
        centers = torch.cat([centers, points[torch.multinomial(probs, 1, generator=generator)]])
    assign = torch.cdist(points, centers).argmin(1)
    for _ in range(iterations):
        new_centers = torch.stack([
            points[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(k)
        ])  # fmt: skip
        new_assign = torch.cdist(points, new_centers).argmin(1)
        centers = new_centers
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign
