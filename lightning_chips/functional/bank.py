"""The per-sample *bank loss* in CLIP's end-point subspace and its closed-form per-sample gradients: InfoNCE, or
SigLIP's sigmoid loss when the end point has a logit bias (:attr:`EndPoint.loss`).

One module because it is one object: the per-sample bank loss of either loss, its negative bank
(:class:`NegativeBank`), the forward quantities it yields (:class:`BankStats`) and its closed-form gradients, in
the factored form of :mod:`lightning_chips.functional.gradients` (:class:`EndPointGrads`,
:class:`EndPointDirection`).

docs/methods.md, CHIPS (per-sample loss) and SigLIP's sigmoid loss. InfoNCE: for a pair ``i`` with embeddings
``x_i = normalize(W_v^T h^v_i + b_v)``, ``y_i = normalize(W_t^T h^t_i + b_t)`` and a constant negative bank
``(X_B, Y_B)`` of normalised embeddings,

.. math::

    a = s\\,[x_i \\cdot y_i,\\ x_i \\cdot Y_B], \\qquad b = s\\,[x_i \\cdot y_i,\\ X_B \\cdot y_i], \\qquad
    \\ell_i = \\tfrac12 (\\operatorname{lse}(a) - a_0) + \\tfrac12 (\\operatorname{lse}(b) - b_0),
    \\qquad s = e^{\\texttt{logit\\_scale}}.

With ``p = softmax(a)``, ``q = softmax(b)``:

.. math::

    \\partial_{x_i} \\ell = \\tfrac{s}{2}\\big[(p_0 + q_0 - 2)\\, y_i + Y_B^\\top p_{1:}\\big], \\quad
    \\partial_{y_i} \\ell = \\tfrac{s}{2}\\big[(p_0 + q_0 - 2)\\, x_i + X_B^\\top q_{1:}\\big], \\quad
    \\partial_{\\texttt{logit\\_scale}} \\ell = \\tfrac12\\big[(p \\cdot a - a_0) + (q \\cdot b - b_0)\\big].

Through the normalisation ``d^v = \\partial_{e^v} \\ell = (I - x x^\\top)\\, \\partial_x \\ell / \\lVert e^v \\rVert``
(and likewise ``d^t``), and since the heads are linear every block is rank one:
``dl/dW_v = h^v (d^v)^T``, ``dl/dW_t = h^t (d^t)^T``, ``dl/db_v = d^v``.
:class:`EndPointGrads` keeps exactly these factors, so no per-sample ``d_v x e`` matrix is ever formed, and
inner products factor:
``g_i . g_j = (h^v_i . h^v_j + [b_v])(d^v_i . d^v_j) + (h^t_i . h^t_j + [b_t])(d^t_i . d^t_j) + s_i s_j``.

Sigmoid (SigLIP; the end point has a logit bias ``beta_l``): logits ``z = s x . y + beta_l``, and

.. math::

    \\ell_i = \\operatorname{sp}(-z_0) + \\tfrac12 \\textstyle\\sum_j \\operatorname{sp}(a_j)
              + \\tfrac12 \\textstyle\\sum_j \\operatorname{sp}(b_j),
    \\qquad z_0 = s\\, x_i \\cdot y_i + \\beta_l,\\ a_j = s\\, x_i \\cdot Y_{B,j} + \\beta_l,\\
    b_j = s\\, X_{B,j} \\cdot y_i + \\beta_l

(``sp`` = softplus): half the pair's row and half its column of SigLIP's loss on the batch ``{i} + bank``, so the
mean of ``l_i`` over a batch whose bank is the rest of the batch is open_clip's ``SigLipLoss``, as the mean of the
InfoNCE ``l_i`` is the CLIP loss. With ``sigma`` the logistic function:

.. math::

    \\partial_{x_i} \\ell = s\\big[(\\sigma(z_0) - 1)\\, y_i + \\tfrac12 Y_B^\\top \\sigma(a)\\big], \\quad
    \\partial_{y_i} \\ell = s\\big[(\\sigma(z_0) - 1)\\, x_i + \\tfrac12 X_B^\\top \\sigma(b)\\big],

    \\partial_{\\texttt{logit\\_scale}} \\ell = (\\sigma(z_0) - 1)(z_0 - \\beta_l)
        + \\tfrac12 \\textstyle\\sum_j \\sigma(a_j)(a_j - \\beta_l)
        + \\tfrac12 \\sum_j \\sigma(b_j)(b_j - \\beta_l), \\quad
    \\partial_{\\beta_l} \\ell = \\sigma(z_0) - 1 + \\tfrac12 \\textstyle\\sum_j \\sigma(a_j)
        + \\tfrac12 \\sum_j \\sigma(b_j),

the heads again rank one through the normalisation, and the logit bias one more scalar per sample
(:attr:`EndPointGrads.bias`), last in :meth:`EndPoint.tensors` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.functional.gradients import EndPointDirection, EndPointGrads, through_normalisation
from lightning_chips.functional.rounds import subsample

__all__ = [
    "BankStats",
    "NegativeBank",
    "bank_loss",
    "bank_stats",
    "endpoint_per_sample_grads",
    "grads_from_stats",
    "make_bank",
]


@dataclass
class BankStats:
    """Everything the bank loss of a batch yields: embeddings, logits, probabilities, loss and gradient factors.

    ``logits_i2t[:, 0]`` / ``logits_t2i[:, 0]`` are the positive logit ``s x_i . y_i`` (``+ beta_l`` with SigLIP's
    logit bias); columns ``1:`` are the bank (excluded entries are ``-inf``). ``p`` / ``q`` are their softmaxes
    (InfoNCE) or, for the sigmoid loss (:attr:`logit_bias` set), their element-wise logistic ``sigma(z)``: the
    model's probability that each pair matches (0 for excluded entries).
    """

    x: Tensor
    y: Tensor
    norm_image: Tensor
    norm_text: Tensor
    s: Tensor
    logits_i2t: Tensor
    logits_t2i: Tensor
    p: Tensor
    q: Tensor
    loss: Tensor
    logit_bias: Tensor | None = None
    """SigLIP's logit bias ``beta_l`` (the end point's), None for InfoNCE."""

    @property
    def loss_kind(self) -> str:
        """``"sigmoid"`` (with :attr:`logit_bias`) or ``"infonce"``, as :attr:`EndPoint.loss`."""
        return "infonce" if self.logit_bias is None else "sigmoid"

    def p_corr(self) -> Tensor:
        """``[N]`` the model's probability of the true partner: ``(p_0 + q_0) / 2`` (the softmax probability of
        the positive in either direction, InfoNCE), or ``sigma(z_ii)`` for the sigmoid loss, whose positive logit
        is one Bernoulli term of its own (docs/methods.md, SigLIP's sigmoid loss)."""
        if self.logit_bias is not None:
            return self.p[:, 0]
        return 0.5 * (self.p[:, 0] + self.q[:, 0])

    def learnability(self) -> Tensor:
        """``w_L = (1 - p_corr)(1 + sigmoid(-m))`` (docs/methods.md, CHIPS: learnability).

        ``p_corr`` is :meth:`p_corr`: ``(p_0 + q_0) / 2``, or ``sigma(z_ii)`` for the sigmoid loss; ``m`` is the
        positive logit minus the hardest bank logit, averaged over the two directions (logit units, i.e. scaled by
        ``s``; a logit bias cancels). Range ``[0, 2)`` (2 itself can appear in floating point for extremely
        violated pairs at a large logit scale).
        """
        p_corr = self.p_corr()
        margin = 0.5 * (
            (self.logits_i2t[:, 0] - self.logits_i2t[:, 1:].amax(1))
            + (self.logits_t2i[:, 0] - self.logits_t2i[:, 1:].amax(1))
        )
        return (1.0 - p_corr) * (1.0 + torch.sigmoid(-margin))


def bank_stats(
    h_image: Tensor,
    h_text: Tensor,
    endpoint: EndPoint,
    bank_image: Tensor,
    bank_text: Tensor,
    *,
    exclude: Tensor | None = None,
) -> BankStats:
    """Forward quantities of the per-sample bank loss (docs/methods.md, CHIPS: per-sample loss) for a batch.

    The loss is the end point's (:attr:`EndPoint.loss`): InfoNCE, or SigLIP's sigmoid loss when it has a logit bias
    (module docstring).

    Args:
        h_image: ``[N, d_v]`` pre-projection image features.
        h_text: ``[N, d_t]`` pre-projection text features.
        endpoint: the end-point parameters (detached or live).
        bank_image: ``[M, e]`` normalised bank image embeddings (negatives only, constants).
        bank_text: ``[M, e]`` normalised bank text embeddings.
        exclude: optional ``[N, M]`` bool mask of bank entries that are sample ``i`` itself (dropped from its
            negatives).
    """
    if bank_image.shape[0] == 0:
        raise ValueError(
            f"The negative bank is empty: the per-sample {_LOSS_NAMES[endpoint.loss]} bank loss needs at least one "
            "negative."
        )
    e_v, e_t = endpoint.project_image(h_image), endpoint.project_text(h_text)
    norm_v, norm_t = e_v.norm(dim=1), e_t.norm(dim=1)
    x, y = e_v / norm_v[:, None], e_t / norm_t[:, None]
    s = endpoint.logit_scale.exp()
    if endpoint.logit_bias is not None:
        return _sigmoid_stats(x, y, norm_v, norm_t, s, endpoint.logit_bias, bank_image, bank_text, exclude)
    pos = s * (x * y).sum(1, keepdim=True)
    neg_i2t = s * (x @ bank_text.T)
    neg_t2i = s * (y @ bank_image.T)
    if exclude is not None:
        neg_i2t = neg_i2t.masked_fill(exclude, float("-inf"))
        neg_t2i = neg_t2i.masked_fill(exclude, float("-inf"))
    logits_i2t = torch.cat([pos, neg_i2t], dim=1)
    logits_t2i = torch.cat([pos, neg_t2i], dim=1)
    lse_a, lse_b = torch.logsumexp(logits_i2t, 1), torch.logsumexp(logits_t2i, 1)
    p, q = torch.exp(logits_i2t - lse_a[:, None]), torch.exp(logits_t2i - lse_b[:, None])
    loss = 0.5 * (lse_a - pos[:, 0]) + 0.5 * (lse_b - pos[:, 0])
    return BankStats(x, y, norm_v, norm_t, s, logits_i2t, logits_t2i, p, q, loss)


_LOSS_NAMES = {"infonce": "InfoNCE", "sigmoid": "sigmoid (SigLIP)"}


def _sigmoid_stats(
    x: Tensor,
    y: Tensor,
    norm_v: Tensor,
    norm_t: Tensor,
    s: Tensor,
    logit_bias: Tensor,
    bank_image: Tensor,
    bank_text: Tensor,
    exclude: Tensor | None,
) -> BankStats:
    """:func:`bank_stats` of SigLIP's sigmoid loss: ``l = sp(-z_0) + 1/2 sum_j sp(a_j) + 1/2 sum_j sp(b_j)``."""
    beta = logit_bias.to(x.dtype)
    pos = s * (x * y).sum(1, keepdim=True) + beta
    neg_i2t = s * (x @ bank_text.T) + beta
    neg_t2i = s * (y @ bank_image.T) + beta
    if exclude is not None:
        neg_i2t = neg_i2t.masked_fill(exclude, float("-inf"))
        neg_t2i = neg_t2i.masked_fill(exclude, float("-inf"))
    logits_i2t = torch.cat([pos, neg_i2t], dim=1)
    logits_t2i = torch.cat([pos, neg_t2i], dim=1)
    p, q = torch.sigmoid(logits_i2t), torch.sigmoid(logits_t2i)  # sigma(-inf) = 0: excluded entries drop out
    softplus = torch.nn.functional.softplus  # softplus(-inf) = 0
    loss = softplus(-pos[:, 0]) + 0.5 * (softplus(neg_i2t).sum(1) + softplus(neg_t2i).sum(1))
    return BankStats(x, y, norm_v, norm_t, s, logits_i2t, logits_t2i, p, q, loss, logit_bias=beta)


def bank_loss(
    h_image: Tensor, h_text: Tensor, endpoint: EndPoint, bank_image: Tensor, bank_text: Tensor, *,
    exclude: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``[N]`` per-sample bank losses ``l(z_i)`` (docs/methods.md, CHIPS: per-sample loss)."""
    return bank_stats(h_image, h_text, endpoint, bank_image, bank_text, exclude=exclude).loss


def grads_from_stats(
    h_image: Tensor, h_text: Tensor, stats: BankStats, bank_image: Tensor, bank_text: Tensor, endpoint: EndPoint
) -> EndPointGrads:
    """Factored per-sample gradients from precomputed :class:`BankStats` (of either loss)."""
    h_image = endpoint.image_factor(h_image)  # the image head's input (features without a residual)
    if stats.logit_bias is not None:
        return _sigmoid_grads(h_image, h_text, stats, bank_image, bank_text, endpoint)
    s, p, q = stats.s, stats.p, stats.q
    coef = (p[:, 0] + q[:, 0] - 2.0)[:, None]
    grad_x = 0.5 * s * (coef * stats.y + p[:, 1:] @ bank_text)
    grad_y = 0.5 * s * (coef * stats.x + q[:, 1:] @ bank_image)
    a, b = stats.logits_i2t, stats.logits_t2i
    # p * a with a = -inf where p = 0: use where() so excluded entries contribute 0, not nan.
    pa = torch.where(p > 0, p * a, torch.zeros_like(a)).sum(1)
    qb = torch.where(q > 0, q * b, torch.zeros_like(b)).sum(1)
    g_scale = 0.5 * ((pa - a[:, 0]) + (qb - b[:, 0]))
    return _factored(h_image, h_text, stats, grad_x, grad_y, g_scale, endpoint)


def _factored(
    h_image: Tensor,
    h_text: Tensor,
    stats: BankStats,
    grad_x: Tensor,
    grad_y: Tensor,
    scale: Tensor,
    endpoint: EndPoint,
    bias: Tensor | None = None,
) -> EndPointGrads:
    """Per-sample gradients from the loss's gradients w.r.t. the normalised embeddings, the logit scale and bias."""
    return EndPointGrads(
        h_image=h_image,
        d_image=through_normalisation(grad_x, stats.x, stats.norm_image),
        h_text=h_text,
        d_text=through_normalisation(grad_y, stats.y, stats.norm_text),
        scale=scale,
        image_bias=endpoint.image_bias is not None,
        text_bias=endpoint.text_bias is not None,
        bias=bias,
    )


def _sigmoid_grads(
    h_image: Tensor, h_text: Tensor, stats: BankStats, bank_image: Tensor, bank_text: Tensor, endpoint: EndPoint
) -> EndPointGrads:
    """The sigmoid loss's factored gradients (module docstring): ``dl/dz_0 = sigma(z_0) - 1``, ``dl/da_j =
    sigma(a_j) / 2``, ``dl/db_j = sigma(b_j) / 2``, chained through ``z = s x . y + beta_l``."""
    s, p, q, beta = stats.s, stats.p, stats.q, stats.logit_bias
    coef = (p[:, 0] - 1.0)[:, None]
    grad_x = s * (coef * stats.y + 0.5 * (p[:, 1:] @ bank_text))
    grad_y = s * (coef * stats.x + 0.5 * (q[:, 1:] @ bank_image))
    a, b = stats.logits_i2t, stats.logits_t2i
    # sigma(z) (z - beta_l) with z = -inf where sigma = 0 (excluded): where() so they contribute 0, not nan.
    pa = torch.where(p[:, 1:] > 0, p[:, 1:] * (a[:, 1:] - beta), torch.zeros_like(p[:, 1:])).sum(1)
    qb = torch.where(q[:, 1:] > 0, q[:, 1:] * (b[:, 1:] - beta), torch.zeros_like(q[:, 1:])).sum(1)
    g_scale = coef[:, 0] * (a[:, 0] - beta) + 0.5 * (pa + qb)
    g_bias = coef[:, 0] + 0.5 * (p[:, 1:].sum(1) + q[:, 1:].sum(1))
    return _factored(h_image, h_text, stats, grad_x, grad_y, g_scale, endpoint, bias=g_bias)


def endpoint_per_sample_grads(
    h_image: Tensor, h_text: Tensor, endpoint: EndPoint, bank_image: Tensor, bank_text: Tensor, *,
    exclude: Tensor | None = None,
) -> EndPointGrads:  # fmt: skip
    """Closed-form per-sample gradients of the bank loss (the end point's: InfoNCE, or sigmoid with a logit bias)
    w.r.t. the end-point parameters.

    ``result.flatten()`` is ``[N, dim(theta)]`` in the order image_proj (row-major), text_proj (row-major),
    logit_scale, then image_bias, text_bias and logit_bias if the end point has them; equal to
    ``torch.func.vmap(torch.func.grad(bank_loss))`` (tested to 1e-5 relative in float64; the sigmoid loss to 1e-10).

    Args:
        h_image: ``[N, d_v]`` pre-projection image features.
        h_text: ``[N, d_t]`` pre-projection text features.
        endpoint: end-point parameters.
        bank_image: ``[M, e]`` normalised bank image embeddings, used as negatives only; they must not contain the
            samples themselves (or pass ``exclude``).
        bank_text: ``[M, e]`` normalised bank text embeddings.
        exclude: optional ``[N, M]`` bool mask of bank entries to drop from sample ``i``'s negatives.

    Example::

        >>> import torch
        >>> from lightning_chips.endpoint import EndPoint
        >>> ep = EndPoint(torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
        ...               torch.tensor(2.0, dtype=torch.float64))
        >>> bank = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
        >>> g = endpoint_per_sample_grads(torch.randn(2, 5, dtype=torch.float64),
        ...                               torch.randn(2, 4, dtype=torch.float64), ep, bank, bank)
        >>> g.flatten().shape
        torch.Size([2, 28])
    """
    stats = bank_stats(h_image, h_text, endpoint, bank_image, bank_text, exclude=exclude)
    return grads_from_stats(h_image, h_text, stats, bank_image, bank_text, endpoint)


@dataclass
class NegativeBank:
    """The constant negatives of the bank loss: normalised embeddings of ``bank_size`` pool pairs and their ids.

    A pool pair whose id is in the bank is never its own negative (:meth:`exclusion`).
    """

    image: Tensor
    text: Tensor
    ids: Tensor

    def exclusion(self, ids: Tensor | None) -> Tensor | None:
        """``[N, M]`` mask of bank entries that are the samples themselves (None without ids)."""
        return None if ids is None else ids.to(self.ids.device)[:, None] == self.ids[None, :]

    def stats(self, image: Tensor, text: Tensor, endpoint: EndPoint, ids: Tensor | None = None) -> BankStats:
        """:func:`bank_stats` of a batch against this bank (``ids`` = pool ids, None for non-pool pairs)."""
        return bank_stats(image, text, endpoint, self.image, self.text, exclude=self.exclusion(ids))

    def grads(self, image: Tensor, text: Tensor, endpoint: EndPoint, ids: Tensor | None = None) -> EndPointGrads:
        """Per-sample end-point gradients of a batch against this bank."""
        return grads_from_stats(image, text, self.stats(image, text, endpoint, ids), self.image, self.text, endpoint)

    def mean_gradient(self, image: Tensor, text: Tensor, endpoint: EndPoint) -> EndPointDirection:
        """The mean bank-loss gradient of (non-pool) pairs, e.g. the target gradient ``u`` (the end point's loss)."""
        grads = self.grads(image, text, endpoint)
        return grads.weighted_sum(torch.full((len(grads),), 1.0 / len(grads), dtype=image.dtype, device=image.device))


def make_bank(
    endpoint: EndPoint, pool_image: Tensor, pool_text: Tensor, pool_ids: Tensor, *, bank_size: int, seed: int
) -> NegativeBank:
    """Embed ``bank_size`` pool pairs drawn with ``seed`` (all of them when ``bank_size >= N``) as the bank."""
    idx = subsample(len(pool_image), bank_size, seed, pool_image.device)
    return NegativeBank(endpoint.embed_image(pool_image[idx]), endpoint.embed_text(pool_text[idx]), pool_ids[idx])
