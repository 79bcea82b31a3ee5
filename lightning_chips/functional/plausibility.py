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

Cost: the reference adaptation is ``steps`` full-batch Adam steps on the end point over the target pairs and the
bank (no backbone pass), once per round; scoring adds two projections and two bank similarity rows per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_chips.endpoint import TENSOR_FIELDS, EndPoint

__all__ = ["adapt_endpoint", "bank_rank", "plausibility_weight"]


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
    value, the mean of the per-sample bank loss of :mod:`.endpoint` with the other targets and the bank as
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
    if not power > 0:
        raise ValueError(f"The plausibility power must be > 0, got {power}.")
    return torch.stack(ranks).amax(0).pow(power)
