"""Plausibility of an image-caption pair: a noise gate for CHIPS (beyond the paper; docs/methods.md, CHIPS section).

CHIPS's alignment ``A(z) = g(z)^T M^{-1} u`` rewards pairs whose gradient points towards the target. A pair with a
mismatched or uninformative caption has a *large* gradient (the model cannot match it), and when its image is from
the target domain that gradient still points towards the target, so the paper's utility ranks such pairs high; its
learnability weight ``w_L`` even boosts them (they are "violated"). Nothing in ``U = A w_L w_R`` asks whether the
caption belongs to the image. The plausibility weight does:

.. math::

    \\pi_m(z) = \\tfrac12 \\Big[ \\frac{|\\{j \\in B: x_z \\cdot y_j < x_z \\cdot y_z\\}|}{|B_z|}
              + \\frac{|\\{j \\in B: x_j \\cdot y_z < x_z \\cdot y_z\\}|}{|B_z|} \\Big],
    \\qquad w_P(z) = \\max\\big(\\pi_{\\theta}(z),\\ \\pi_{\\theta_{ref}}(z)\\big)^{\\gamma}

* ``pi_m(z)`` is the *bank rank* of the true partner under the end point ``m``: the share of the round's negative
  bank ``B`` (pool pairs, ``z`` itself excluded: ``B_z``) whose caption is less similar to ``z``'s image than
  ``z``'s own caption, averaged with the same share for images against ``z``'s caption. 1 means no bank caption
  fits the image better; a caption drawn from another class or a generic string ("an image.") ranks lower. It is
  a rank, so it does not depend on the logit scale.
* ``theta`` is the model being scored (it knows the domains it was trained on); ``theta_ref`` is a *reference*:
  a copy of the end point adapted to the target set for a few steps (:func:`adapt_endpoint`), so that it knows
  which captions fit target-domain images, which the model being adapted does not yet. A pair is plausible when
  either model finds it so: clean general-domain pairs pass under ``theta``, clean target-domain pairs under
  ``theta_ref``, and a caption that fits its image under neither is damped.
* ``gamma`` (default 10) sets how sharply: ``pi^gamma ~ exp(-gamma (1 - pi))``, so a pair whose caption is beaten
  by 10 % of the bank keeps about ``e^-1`` of its utility and one beaten by 30 % about 5 %.

**How strong: the pool's noise share.** A fixed ``gamma`` also reorders clean pairs (a clean pair beaten by 5 % of
the bank loses 40 % of its utility), which costs accuracy on a clean pool. :func:`estimate_noise_share` estimates
the share ``eta`` of the pool whose caption does not belong to its image, from the bank alone: the bank pairs'
plausibility ``pi`` is compared with that of the same bank with its captions *shuffled* (each image with another
bank pair's caption, both true partners excluded from the ranks): the distribution a mismatched pair has, by
construction of the pool's own captions. With ``F`` the bank's distribution of ``pi`` and ``F_0`` the shuffled one,
and clean pairs rarely below the shuffled median ``t``,

.. math::

    F(t) = (1 - \\eta) F_{clean}(t) + \\eta F_0(t) \\quad\\Rightarrow\\quad
    \\hat\\eta = \\min\\Big(1, \\frac{F(t)}{F_0(t)}\\Big) \\ \\ (t = \\mathrm{median}\\ F_0)

(Storey's estimator of the null share, with the shuffled captions as the null). It over-estimates by
``(1 - eta) F_clean(t) / F_0(t)`` (clean pairs neither model finds plausible, e.g. a target domain the reference has
not learnt) and by what captions *worse* than a random one add (a generic string fits no image: its ``pi`` sits below
the shuffled one); it under-estimates when mismatched captions still fit their images better than a random caption
(e.g. a caption of a near-duplicate). With a bank of ``B`` pairs its standard error is about ``sqrt(eta / B)``.
:func:`adaptive_power` then scales ``gamma`` with it: ``gamma_eff = gamma * clip((eta - a) / (b - a), 0, 1)``, so a
pool estimated below ``a`` gets the paper's utility (``w_P = 1``) and one above ``b`` the full weight.

Cost: the reference adaptation is ``steps`` full-batch Adam steps on the end point over the target pairs and the
bank (no backbone pass), once per round; the noise estimate ranks the bank against itself (``B x B`` similarities
per end point and shuffle); scoring adds two projections and two bank similarity rows per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_chips.endpoint import TENSOR_FIELDS, EndPoint

NOISE_LEVEL = 0.35
"""The quantile ``F_0(t)`` of the shuffled pairs at which the noise share is read (module docstring)."""

__all__ = ["adapt_endpoint", "adaptive_power", "bank_rank", "estimate_noise_share", "plausibility_weight"]


def adapt_endpoint(
    endpoint: EndPoint,
    target_image: Tensor,
    target_text: Tensor,
    bank_image: Tensor,
    bank_text: Tensor,
    *,
    steps: int = 50,
    lr: float = 1e-3,
) -> EndPoint:
    """A copy of ``endpoint`` adapted to the target pairs: ``steps`` full-batch Adam steps on the model's own loss.

    The loss is the symmetric CLIP loss of the ``T`` target pairs (pre-projection features ``target_image``,
    ``target_text``), with the pre-projection features of the bank pairs (``bank_image``, ``bank_text``) embedded
    by the current copy and detached as extra negatives, so the reference learns the target captions without
    collapsing the rest of the space onto them. With a logit bias (:attr:`EndPoint.loss` ``"sigmoid"``) it is
    SigLIP's sigmoid loss on the same logits (``s x . y + beta_l``, +1 for the ``T`` true pairs, -1 for every
    other target and bank entry), half image->text and half text->image rows, averaged over the ``T`` pairs (in
    value, the mean of the per-sample bank loss of :mod:`.bank` with the other targets and the bank as
    negatives; the targets are live on both sides, as in a training batch), and the logit bias adapts with the rest.
    Deterministic (full batch, no sampling); the input end point is not modified.

    Args:
        endpoint: the end point to start from.
        target_image: ``[T, d_v]`` target image features.
        target_text: ``[T, d_t]`` target text features.
        bank_image: ``[B, d_v]`` pre-projection image features of the bank pairs (negatives).
        bank_text: ``[B, d_t]`` pre-projection text features of the bank pairs.
        steps: Adam steps (0 returns a detached copy of ``endpoint``).
        lr: Adam learning rate.

    Returns:
        A detached :class:`EndPoint` in the dtype and device of ``endpoint``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> ep = EndPoint(torch.randn(8, 4, generator=g), torch.randn(6, 4, generator=g), torch.tensor(2.0))
        >>> ref = adapt_endpoint(ep, torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g),
        ...                      torch.randn(20, 8, generator=g), torch.randn(20, 6, generator=g), steps=5)
        >>> bool((ref.image_proj != ep.image_proj).any())
        True
    """
    if steps < 0:
        raise ValueError(f"`steps` must be >= 0, got {steps}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}.")
    start = endpoint.detach()  # detached clones
    if steps == 0:
        return start
    params = {name: getattr(start, name) for name in TENSOR_FIELDS}
    live = [p.requires_grad_(True) for p in params.values() if p is not None]
    optimizer = torch.optim.Adam(live, lr=lr)
    labels = torch.arange(len(target_image), device=target_image.device)
    with torch.enable_grad():
        for _ in range(steps):
            ep = start.replace(**params)
            x, y = ep.embed_image(target_image), ep.embed_text(target_text)
            with torch.no_grad():
                bx, by = ep.embed_image(bank_image), ep.embed_text(bank_text)
            s = ep.logit_scale.exp()
            logits_i2t = s * x @ torch.cat([y, by]).T
            logits_t2i = s * y @ torch.cat([x, bx]).T
            if ep.logit_bias is None:
                loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
            else:
                loss = 0.5 * (_sigmoid_rows(logits_i2t + ep.logit_bias) + _sigmoid_rows(logits_t2i + ep.logit_bias))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return start.replace(**{name: None if p is None else p.detach() for name, p in params.items()})


def _sigmoid_rows(logits: Tensor) -> Tensor:
    """SigLIP's loss of ``[T, T + B]`` logits whose first ``T`` columns hold the true pairs on the diagonal: the sum
    over a row of ``softplus(-z)`` for the pair and ``softplus(z)`` for the rest, averaged over the rows."""
    t = logits.shape[0]
    signs = -torch.ones_like(logits)
    signs[:, :t].fill_diagonal_(1.0)
    return F.softplus(-signs * logits).sum(1).mean()


def bank_rank(x: Tensor, y: Tensor, bank_image: Tensor, bank_text: Tensor, exclude: Tensor | None = None) -> Tensor:
    """``[N]`` bank rank ``pi(z)`` of each pair's true partner (module docstring), in ``[0, 1]``.

    Args:
        x: ``[N, e]`` normalised image embeddings of the pairs.
        y: ``[N, e]`` normalised text embeddings of the pairs.
        bank_image: ``[B, e]`` normalised bank image embeddings.
        bank_text: ``[B, e]`` normalised bank text embeddings.
        exclude: optional ``[N, B]`` mask of bank entries that are the pair itself (not counted).

    Example::

        >>> x = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
        >>> bank = F.normalize(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), dim=1)
        >>> bank_rank(x, x, bank, bank)  # each pair's own caption fits better than both bank captions
        tensor([1., 1.])
    """
    pos = (x * y).sum(1, keepdim=True)
    below_i2t = (x @ bank_text.T) < pos
    below_t2i = (y @ bank_image.T) < pos
    count = torch.full_like(pos[:, 0], float(bank_text.shape[0]))
    if exclude is not None:
        below_i2t = below_i2t & ~exclude
        below_t2i = below_t2i & ~exclude
        count = count - exclude.sum(1).to(count.dtype)
    count = count.clamp(min=1.0)
    return 0.5 * (below_i2t.sum(1).to(pos.dtype) + below_t2i.sum(1).to(pos.dtype)) / count


def plausibility_weight(ranks: list[Tensor], power: float) -> Tensor:
    """``w_P = max_m(pi_m)^gamma`` over the bank ranks of several end points (module docstring)."""
    if not ranks:
        raise ValueError("plausibility_weight needs the bank ranks of at least one end point.")
    if not power >= 0:
        raise ValueError(f"The plausibility power must be >= 0, got {power}.")
    return torch.stack(ranks).amax(0).pow(power)


def _max_rank(embeddings: list[tuple[Tensor, Tensor]], rows: Tensor, captions: Tensor, chunk: int) -> Tensor:
    """``max_m pi_m`` of bank images ``rows`` paired with bank captions ``captions``, both partners excluded."""
    out = []
    for start in range(0, len(rows), chunk):
        r, c = rows[start : start + chunk], captions[start : start + chunk]
        exclude = torch.zeros(len(r), len(embeddings[0][0]), dtype=torch.bool, device=rows.device)
        exclude[torch.arange(len(r), device=rows.device), r] = True
        exclude[torch.arange(len(r), device=rows.device), c] = True
        ranks = [bank_rank(image[r], text[c], image, text, exclude) for image, text in embeddings]
        out.append(torch.stack(ranks).amax(0))
    return torch.cat(out)


@dataclass(frozen=True)
class NoiseEstimate:
    """What :func:`estimate_noise_share` measured on a bank: the estimate and the two distributions it compares."""

    share: float
    """``eta``: the estimated share of pairs whose caption does not belong to the image, in ``[0, 1]``."""
    threshold: float
    """``t``: the ``level`` quantile of the shuffled pairs' plausibility."""
    plausibility: Tensor
    """``[B]`` ``pi`` of the bank pairs (max over the end points)."""
    shuffled: Tensor
    """``[draws * B]`` ``pi`` of the shuffled pairs."""


def estimate_noise_share(
    embeddings: list[tuple[Tensor, Tensor]],
    *,
    seed: int = 0,
    draws: int = 4,
    level: float = NOISE_LEVEL,
    chunk: int = 1024,
) -> NoiseEstimate:
    """The share of a bank's pairs whose caption does not belong to the image (module docstring).

    ``pi`` of each bank pair is its bank rank against the rest of the bank under every end point, the max taken;
    the shuffled pairs are ``draws`` seeded derangements of the captions (image ``i`` with caption ``sigma(i)``,
    entries ``i`` and ``sigma(i)`` excluded from its ranks). ``eta = min(1, F(t) / F_0(t))`` at ``t`` the
    ``level`` quantile of the shuffled pairs' ``pi``.

    Args:
        embeddings: per end point (the model, the reference), the ``[B, e]`` normalised image and text embeddings
            of the same bank pairs, row ``i`` the pair ``i``.
        seed: seed of the shuffles.
        draws: shuffles (each adds ``B`` shuffled pairs to ``F_0``).
        level: ``F_0(t)``: lower counts fewer implausible clean pairs as noise, more of the captions that fit worse
            than a random one, and has more variance.
        chunk: bank rows ranked at once (memory ``chunk x B`` per end point).

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = F.normalize(torch.randn(400, 16, generator=g), dim=1)
        >>> y = F.normalize(x + 0.3 * torch.randn(400, 16, generator=g), dim=1)  # captions that fit their images
        >>> y_noisy = torch.cat([y[:300], y[300:].roll(1, 0)])  # the last quarter mismatched
        >>> abs(estimate_noise_share([(x, y_noisy)]).share - 0.25) < 0.1  # 100 of 400 are noisy
        True
    """
    if not embeddings:
        raise ValueError("estimate_noise_share needs the bank embeddings under at least one end point.")
    n = len(embeddings[0][0])
    if n < 3:
        raise ValueError(f"estimate_noise_share needs a bank of at least 3 pairs, got {n}.")
    if draws < 1:
        raise ValueError(f"`draws` must be >= 1, got {draws}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1), got {level}.")
    device = embeddings[0][0].device
    rows = torch.arange(n, device=device)
    pi = _max_rank(embeddings, rows, rows, chunk)
    generator = torch.Generator().manual_seed(int(seed))
    shuffled = []
    for _ in range(draws):
        order = torch.randperm(n, generator=generator).to(device)
        sigma = torch.empty_like(order)
        sigma[order] = order.roll(-1)  # one cycle through a random order: no pair keeps its caption
        shuffled.append(_max_rank(embeddings, rows, sigma, chunk))
    pi0 = torch.cat(shuffled)
    t = float(pi0.quantile(level))
    below0 = float((pi0 <= t).double().mean())
    share = min(1.0, float((pi <= t).double().mean()) / below0)
    return NoiseEstimate(share, t, pi, pi0)


def adaptive_power(power: float, share: float, noise_range: tuple[float, float]) -> float:
    """``gamma_eff = gamma * clip((eta - a) / (b - a), 0, 1)`` with ``(a, b) = noise_range``: no plausibility weight
    on a pool estimated cleaner than ``a``, the full ``gamma`` above ``b``.

    Example::

        >>> [round(adaptive_power(10.0, eta, (0.05, 0.15)), 3) for eta in (0.02, 0.1, 0.3)]
        [0.0, 5.0, 10.0]
    """
    low, high = noise_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"`noise_range` must be (a, b) with 0 <= a < b <= 1, got {noise_range}.")
    return power * min(1.0, max(0.0, (share - low) / (high - low))) if share < high else power
