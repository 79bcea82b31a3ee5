"""How much of the pool is the target domain, and the curvature mix CHIPS takes from it (docs/methods.md, "How
much negative curvature").

CHIPS's curvature is ``M = (1 - alpha) Phi_pos + alpha Phi_neg + lambda I``. The paper's ``alpha = 0.7`` leans on
the softmax term ``Phi_neg``, the curvature of telling a pair from the bank's hard negatives. Measured on pools
that are mostly the target domain (docs/benchmarks/quality.md), that term is also the curvature of the target task
itself, and the Newton step divides out the directions the target gradient follows: at small budgets the
selection drifts to the rare classes and trails a positive-only curvature (and TRAK) by several points, while on
pools where the target domain is a minority ``alpha = 0.7`` is the better choice. ``alpha="auto"`` sets

.. math::

    \\alpha_{eff} = \\alpha_0\\,(1 - \\hat\\pi_T)

from :func:`estimate_target_share`'s ``hat pi_T``: the paper's curvature on a pool with little of the target
domain, (almost) positive-only curvature on a pool that is mostly the target domain.

The estimate compares each pool pair with the target set: its statistic ``r(z)`` is the mean of its ``k = 3``
largest similarities to target pairs, ``(1 - beta) x . x_t + beta y . y_t`` (image and caption cosines mixed
like CHIPS's relevance weight). The target set is a sample of what target-domain pairs look like, so its own
statistics (each target pair against the *other* target pairs, so that a pair is not its own neighbour) give the
distribution of ``r`` under the target domain. With ``t`` its ``q`` quantile (``q = 0.1``), a target-domain pool
pair reaches ``t`` with probability ``1 - q`` and a pair of another domain rarely does, so
``P_pool(r >= t) ~ pi_T (1 - q)`` and ``hat pi_T = P_pool(r >= t) / (1 - q)``, clipped to ``[0, 1]``. Nearest
neighbours rather than the distance to the target's mean, so a target domain of several distinct kinds of pairs
is counted whole. It over-counts when pairs of other domains come close to target pairs, and under-counts
target-domain pool pairs unlike every target pair (a kind the target set lacks, or captions that do not describe
their image, which lower the caption cosine). Cost: one ``N x T`` similarity per round, on the curvature sample.

Example::

    >>> import torch, torch.nn.functional as F
    >>> g = torch.Generator().manual_seed(0)
    >>> centre = F.normalize(torch.randn(16, generator=g), dim=0)
    >>> near = lambda n: F.normalize(centre + 0.2 * torch.randn(n, 16, generator=g), dim=1)
    >>> far = lambda n: F.normalize(torch.randn(n, 16, generator=g), dim=1)
    >>> pool = torch.cat([near(300), far(700)])
    >>> target = near(64)
    >>> share = estimate_target_share(pool, pool, target, target, beta=0.5)
    >>> round(share.share, 1)
    0.3
    >>> round(adaptive_alpha(0.7, share.share), 2)
    0.48
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TARGET_NEIGHBOURS", "TARGET_QUANTILE", "TargetShare", "adaptive_alpha", "estimate_target_share"]

TARGET_QUANTILE = 0.1
"""``q``: the quantile of the target set's own relevance statistic that a target-domain pool pair exceeds with
probability ``1 - q``."""
TARGET_NEIGHBOURS = 3
"""``k``: the nearest target pairs each pair's statistic averages over."""


@dataclass(frozen=True)
class TargetShare:
    """An estimate of the pool's target-domain share (:func:`estimate_target_share`)."""

    share: float
    """``hat pi_T`` in ``[0, 1]``."""
    threshold: float
    """``t``, the target set's ``q`` quantile of the relevance statistic."""
    above: float
    """``P_pool(r >= t)``, the pool sample's share at or above it."""


def _nearest(
    image: Tensor, text: Tensor, target_image: Tensor, target_text: Tensor, beta: float, k: int, exclude_self: bool
) -> Tensor:
    r"""``[N]`` mean of each row's ``k`` largest ``(1 - beta) x . x_t + beta y . y_t`` over the target pairs."""
    sim = (1.0 - beta) * (image @ target_image.T) + beta * (text @ target_text.T)
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    return sim.topk(min(k, sim.shape[1] - int(exclude_self)), dim=1).values.mean(1)


@torch.no_grad()
def estimate_target_share(
    pool_image: Tensor,
    pool_text: Tensor,
    target_image: Tensor,
    target_text: Tensor,
    *,
    beta: float,
    quantile: float = TARGET_QUANTILE,
    neighbours: int = TARGET_NEIGHBOURS,
    chunk: int = 4096,
) -> TargetShare:
    """The pool's share of target-domain pairs, from normalised embeddings (module docstring).

    Args:
        pool_image, pool_text: ``[N, e]`` unit embeddings of the pool sample.
        target_image, target_text: ``[T, e]`` unit embeddings of the target set, ``T >= 2`` (each target pair is
            compared with the others).
        beta: the caption share of the similarity (CHIPS's relevance ``beta``).
        quantile: ``q`` in ``(0, 1)``.
        neighbours: ``k``, the target pairs each statistic averages over.
        chunk: pool rows per similarity block (bounded memory: ``chunk x T``).

    Raises:
        ValueError: with fewer than 2 target pairs, an empty pool or ``quantile`` outside ``(0, 1)``.
    """
    if len(target_image) < 2:
        raise ValueError(f"estimate_target_share needs at least 2 target pairs, got {len(target_image)}.")
    if len(pool_image) == 0:
        raise ValueError("estimate_target_share needs a non-empty pool sample.")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"`quantile` must be in (0, 1), got {quantile}.")
    if neighbours < 1:
        raise ValueError(f"`neighbours` must be >= 1, got {neighbours}.")
    own = _nearest(target_image, target_text, target_image, target_text, beta, neighbours, exclude_self=True)
    pool = torch.cat([
        _nearest(pool_image[i : i + chunk], pool_text[i : i + chunk], target_image, target_text, beta, neighbours,
                 exclude_self=False)
        for i in range(0, len(pool_image), chunk)
    ])  # fmt: skip
    threshold = torch.quantile(own.double(), quantile)
    above = float((pool.double() >= threshold).double().mean())
    return TargetShare(min(1.0, above / (1.0 - quantile)), float(threshold), above)


def adaptive_alpha(alpha: float, target_share: float) -> float:
    """``alpha * (1 - target_share)``: the curvature mix ``alpha="auto"`` uses (module docstring)."""
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"`target_share` must be in [0, 1], got {target_share}.")
    return alpha * (1.0 - target_share)
