"""Embedding-quality baselines (docs/methods.md: CLIPScore, negCLIPLoss, NormSim): CLIPScore, negCLIPLoss (and its
analogue for SigLIP's sigmoid loss, negSigLIPLoss), NormSim.

All take L2-normalised embeddings ``[N, e]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_score", "negclip_loss", "negsiglip_loss", "normsim", "sigmoid_threshold"]


def clip_score(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """CLIPScore ``cos(x_i, y_i)`` of each pair (Hessel et al. 2021, as a data filter in DataComp).

    Example::

        >>> clip_score(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]))
        tensor([0.6000])
    """
    _check_pairs(image_emb, text_emb)
    return (image_emb * text_emb).sum(-1)


def negclip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    *,
    temperature: float = 0.01,
    batch_size: int = 32768,
    repeats: int = 10,
    seed: int = 0,
) -> Tensor:
    """negCLIPLoss (Wang et al., NeurIPS 2024; "s-CLIPLoss" in v2): CLIPScore minus a batch normaliser.

    .. math::

        negCLIPLoss(i) = 1/K sum_k [ s_ii - tau/2 log sum_{j in B_k(i)} exp(s_ij / tau)
                                           - tau/2 log sum_{j in B_k(i)} exp(s_ji / tau) ]

    where ``B_k(i)`` is the batch of ``i`` in the ``k``-th seeded random partition of the pool into batches of
    ``batch_size`` and ``s`` the cosine similarity. It equals ``-tau`` times the per-sample symmetric CLIP loss,
    averaged over the ``K = repeats`` batchings; with ``batch_size >= N`` the batch is the whole pool (one
    partition suffices). The last batch of a partition holds the remainder.

    Args:
        image_emb: ``[N, e]`` normalised image embeddings.
        text_emb: ``[N, e]`` normalised text embeddings.
        temperature: ``tau`` (paper: 0.01, the teacher CLIP's).
        batch_size: batch size of the random partitions (paper: 32768).
        repeats: number of random partitions ``K`` (paper: 10).
        seed: seed of the partitions.
    """
    _check_pairs(image_emb, text_emb)
    if temperature <= 0 or batch_size < 1 or repeats < 1:
        raise ValueError(
            f"need temperature > 0, batch_size >= 1, repeats >= 1; got {temperature}, {batch_size}, {repeats}."
        )

    def per_batch(sims: Tensor) -> Tensor:
        rows = torch.logsumexp(sims / temperature, dim=1)
        cols = torch.logsumexp(sims / temperature, dim=0)
        return sims.diagonal() - 0.5 * temperature * (rows + cols)

    return _over_random_batches(image_emb, text_emb, per_batch, batch_size=batch_size, repeats=repeats, seed=seed)


def sigmoid_threshold(logit_scale: Tensor | float, logit_bias: Tensor | float) -> float:
    """``c_0 = -beta_l / s``: the cosine at which a SigLIP model's pair probability ``sigma(s cos + beta_l)`` is 1/2
    (``s = exp(logit_scale)``), the logit bias in cosine units (:func:`negsiglip_loss`)."""
    scale = torch.as_tensor(logit_scale, dtype=torch.float64).exp()
    return float(-torch.as_tensor(logit_bias, dtype=torch.float64) / scale)


def negsiglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    *,
    threshold: float,
    temperature: float = 0.01,
    batch_size: int = 32768,
    repeats: int = 10,
    seed: int = 0,
) -> Tensor:
    """negSigLIPLoss: negCLIPLoss (:func:`negclip_loss`) for a model trained with SigLIP's sigmoid loss (ours; the
    paper defines it for InfoNCE only): minus ``tau`` times the pair's per-sample sigmoid loss in random batches.

    .. math::

        negSigLIPLoss(i) = -tau/K sum_k [ sp(-z_ii) + 1/2 sum_{j in B_k(i), j != i} (sp(z_ij) + sp(z_ji)) ],
        z_ij = (s_ij - c_0) / tau

    with ``sp`` = softplus, ``s`` the cosine similarity, ``B_k(i)`` the batch of ``i`` in the ``k``-th seeded random
    partition of the pool into batches of ``batch_size`` (the same partitions as :func:`negclip_loss` for the same
    seed), and ``c_0 = -beta_l / s_model`` the model's threshold (:func:`sigmoid_threshold`): the logit bias in cosine
    units, so ``temperature`` keeps negCLIPLoss's meaning (the sharpness, paper: 0.01) whatever the model's scale.
    The bracket is the per-sample sigmoid bank loss (docs/methods.md, SigLIP's sigmoid loss) against the batch-mates:
    half the pair's row and half its column of SigLIP's batch loss. At ``temperature = 1 / s_model`` the logits are
    the model's own, ``-negSigLIPLoss / tau`` is the model's per-sample loss, and with ``batch_size >= N`` its mean
    over the pool is open_clip's ``SigLipLoss`` of the pool as one batch. Like negCLIPLoss it is ``s_ii`` minus a
    batch normaliser: far above the threshold ``-tau sp(-z_ii) -> 0``, far below it ``-> s_ii - c_0``, and each
    batch-mate that fits the pair's image or caption better than ``c_0`` costs it about half its excess.

    Args:
        image_emb: ``[N, e]`` normalised image embeddings.
        text_emb: ``[N, e]`` normalised text embeddings.
        threshold: ``c_0`` (:func:`sigmoid_threshold` of the model's ``logit_scale`` and ``logit_bias``).
        temperature: ``tau``.
        batch_size: batch size of the random partitions (paper: 32768).
        repeats: number of random partitions ``K`` (paper: 10).
        seed: seed of the partitions.
    """
    _check_pairs(image_emb, text_emb)
    if temperature <= 0 or batch_size < 1 or repeats < 1 or not math.isfinite(threshold):
        raise ValueError(
            "need temperature > 0, batch_size >= 1, repeats >= 1 and a finite threshold; got "
            f"{temperature}, {batch_size}, {repeats}, {threshold}."
        )

    def per_batch(sims: Tensor) -> Tensor:
        z = (sims - threshold) / temperature
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        negatives = F.softplus(z).masked_fill(eye, 0.0)
        loss = F.softplus(-z.diagonal()) + 0.5 * (negatives.sum(1) + negatives.sum(0))
        return -(temperature * loss)

    return _over_random_batches(image_emb, text_emb, per_batch, batch_size=batch_size, repeats=repeats, seed=seed)


def _check_pairs(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape, got {image_emb.shape}, {text_emb.shape}."
        )


def _over_random_batches(
    image_emb: Tensor,
    text_emb: Tensor,
    per_batch: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    repeats: int,
    seed: int,
) -> Tensor:
    """``1/K sum_k per_batch(S_k)[i]`` over ``K = repeats`` seeded random partitions of the pool into batches of
    ``batch_size`` (the whole pool with ``batch_size >= N``; the last batch holds the remainder), ``S_k`` the float64
    cosine matrix ``[b, b]`` of the batch holding ``i`` (:func:`negclip_loss`, :func:`negsiglip_loss`)."""
    n = image_emb.shape[0]
    total = torch.zeros(n, dtype=torch.float64, device=image_emb.device)
    x, y = image_emb.double(), text_emb.double()
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(repeats):
        order = torch.randperm(n, generator=generator) if batch_size < n else torch.arange(n)
        order = order.to(image_emb.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            total[idx] += per_batch(x[idx] @ y[idx].T)
    return (total / repeats).to(image_emb.dtype)


def normsim(image_emb: Tensor, target_image_emb: Tensor, *, p: float = 2.0, chunk_size: int = 8192) -> Tensor:
    """NormSim_p (Wang et al., NeurIPS 2024): ``|| (x_i . x_t)_{t in target} ||_p`` over target image embeddings.

    ``p = 2`` measures alignment with the target's second moment (``NormSim_2(f)^2 = |T| f^T Sigma_T f`` with
    ``Sigma_T`` the mean of ``x_t x_t^T``); ``p = inf`` is the largest absolute similarity to any target image.

    Args:
        image_emb: ``[N, e]`` normalised pool image embeddings.
        target_image_emb: ``[T, e]`` normalised target image embeddings.
        p: ``2`` or ``float("inf")``.
        chunk_size: target images per matrix product (bounds memory at ``N x chunk_size``).
    """
    if p not in (2, 2.0) and not math.isinf(p):
        raise ValueError(f"NormSim supports p = 2 or p = float('inf'), got {p}.")
    if target_image_emb.shape[0] == 0:
        raise ValueError("NormSim needs at least one target image.")
    acc = None
    for start in range(0, target_image_emb.shape[0], chunk_size):
        sims = image_emb @ target_image_emb[start : start + chunk_size].T
        part = sims.abs().amax(dim=1) if math.isinf(p) else sims.square().sum(dim=1)
        acc = part if acc is None else (torch.maximum(acc, part) if math.isinf(p) else acc + part)
    return acc if math.isinf(p) else acc.sqrt()
