"""Closed-form per-sample gradients of the per-sample *bank loss* in CLIP's end-point subspace: InfoNCE, or SigLIP's
sigmoid loss when the end point has a logit bias (:attr:`EndPoint.loss`).

One module because it is one object: the per-sample bank loss of either loss, the forward quantities it yields, its
closed-form gradients and the factored algebra (:class:`EndPointGrads`, :class:`EndPointDirection`) every scorer
runs on them.

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

__all__ = [
    "BankStats",
    "NegativeBank",
    "EndPointDirection",
    "EndPointGrads",
    "bank_loss",
    "bank_stats",
    "endpoint_per_sample_grads",
    "make_bank",
    "round_inputs",
    "subsample",
    "through_normalisation",
]


@dataclass
class EndPointGrads:
    """Per-sample end-point gradients in factored (rank-one block) form.

    ``g_i = (vec(h^v_i (d^v_i)^T), vec(h^t_i (d^t_i)^T), scale_i, [d^v_i], [d^t_i], [bias_i])``; blocks are
    flattened row-major, in :meth:`EndPoint.tensors` order: image_proj, text_proj, logit_scale, image_bias,
    text_bias, logit_bias.

    Attributes:
        h_image: ``[N, d_v]`` pre-projection image features.
        d_image: ``[N, e]`` gradient w.r.t. the unnormalised image embedding.
        h_text: ``[N, d_t]``.
        d_text: ``[N, e]``.
        scale: ``[N]`` gradient w.r.t. ``logit_scale``.
        image_bias: whether the end point has an image bias (its gradient is ``d_image``).
        text_bias: whether the end point has a text bias (its gradient is ``d_text``).
        bias: ``[N]`` gradient w.r.t. SigLIP's ``logit_bias``, or None when the end point has none (InfoNCE).
    """

    h_image: Tensor
    d_image: Tensor
    h_text: Tensor
    d_text: Tensor
    scale: Tensor
    image_bias: bool = False
    text_bias: bool = False
    bias: Tensor | None = None

    def __len__(self) -> int:
        return int(self.scale.shape[0])

    @property
    def dim(self) -> int:
        """``dim(theta)``."""
        d_v, e = self.h_image.shape[1], self.d_image.shape[1]
        d_t = self.h_text.shape[1]
        return d_v * e + d_t * e + 1 + e * (int(self.image_bias) + int(self.text_bias)) + int(self.bias is not None)

    def flatten(self) -> Tensor:
        """The dense ``[N, dim(theta)]`` gradient matrix (for tests and tiny models only)."""
        n = len(self)
        parts = [
            (self.h_image[:, :, None] * self.d_image[:, None, :]).reshape(n, -1),
            (self.h_text[:, :, None] * self.d_text[:, None, :]).reshape(n, -1),
            self.scale[:, None],
        ]
        if self.image_bias:
            parts.append(self.d_image)
        if self.text_bias:
            parts.append(self.d_text)
        if self.bias is not None:
            parts.append(self.bias[:, None])
        return torch.cat(parts, dim=1)

    def _h_aug(self) -> tuple[Tensor, Tensor]:
        """Features augmented with a constant 1 for a bias: ``h (x) d`` then also covers the bias block."""
        hv, ht = self.h_image, self.h_text
        if self.image_bias:
            hv = torch.cat([hv, hv.new_ones(hv.shape[0], 1)], dim=1)
        if self.text_bias:
            ht = torch.cat([ht, ht.new_ones(ht.shape[0], 1)], dim=1)
        return hv, ht

    def gram(self, other: EndPointGrads | None = None) -> Tensor:
        """``[N, M]`` matrix of inner products ``g_i . g'_j``, from the factors (no gradient is formed)."""
        other = self if other is None else other
        hv, ht = self._h_aug()
        ohv, oht = other._h_aug()
        out = (
            (hv @ ohv.T) * (self.d_image @ other.d_image.T)
            + (ht @ oht.T) * (self.d_text @ other.d_text.T)
            + self.scale[:, None] * other.scale[None, :]
        )
        if self.bias is not None:
            out = out + self.bias[:, None] * other.bias[None, :]
        return out

    def sq_norms(self) -> Tensor:
        """``[N]`` squared norms ``||g_i||^2``."""
        hv, ht = self._h_aug()
        out = (
            hv.square().sum(1) * self.d_image.square().sum(1)
            + ht.square().sum(1) * self.d_text.square().sum(1)
            + self.scale.square()
        )
        return out if self.bias is None else out + self.bias.square()

    def dot(self, direction: EndPointDirection) -> Tensor:
        """``[N]`` inner products ``g_i . v`` with a dense direction ``v`` in theta-space.

        Costs ``O(N (d_v + d_t) e)``: ``h^T V d`` per block.
        """
        out = ((self.h_image @ direction.image_proj) * self.d_image).sum(1)
        out = out + ((self.h_text @ direction.text_proj) * self.d_text).sum(1)
        out = out + self.scale * direction.logit_scale
        if self.image_bias:
            out = out + self.d_image @ direction.image_bias
        if self.text_bias:
            out = out + self.d_text @ direction.text_bias
        if self.bias is not None:
            out = out + self.bias * direction.logit_bias
        return out

    def weighted_sum(self, weights: Tensor) -> EndPointDirection:
        """The dense direction ``sum_i w_i g_i`` (e.g. the mean target gradient with ``w = 1/N``)."""
        return EndPointDirection(
            image_proj=(self.h_image * weights[:, None]).T @ self.d_image,
            text_proj=(self.h_text * weights[:, None]).T @ self.d_text,
            logit_scale=(weights * self.scale).sum(),
            image_bias=weights @ self.d_image if self.image_bias else None,
            text_bias=weights @ self.d_text if self.text_bias else None,
            logit_bias=None if self.bias is None else (weights * self.bias).sum(),
        )

    def index(self, idx: Tensor) -> EndPointGrads:
        """Rows ``idx`` of every factor."""
        return EndPointGrads(
            self.h_image[idx], self.d_image[idx], self.h_text[idx], self.d_text[idx], self.scale[idx],
            self.image_bias, self.text_bias, None if self.bias is None else self.bias[idx],
        )  # fmt: skip

    @staticmethod
    def cat(parts: list[EndPointGrads]) -> EndPointGrads:
        """Concatenate along the sample axis."""
        first = parts[0]
        return EndPointGrads(
            *(torch.cat([getattr(p, name) for p in parts]) for name in ("h_image", "d_image", "h_text", "d_text")),
            torch.cat([p.scale for p in parts]),
            first.image_bias,
            first.text_bias,
            None if first.bias is None else torch.cat([p.bias for p in parts]),
        )


@dataclass
class EndPointDirection:
    """A dense vector in theta-space, stored block-wise (``image_proj`` is ``[d_v, e]``, etc.; ``logit_bias`` is
    0-d, present when the end point has SigLIP's logit bias)."""

    image_proj: Tensor
    text_proj: Tensor
    logit_scale: Tensor
    image_bias: Tensor | None = None
    text_bias: Tensor | None = None
    logit_bias: Tensor | None = None

    def flatten(self) -> Tensor:
        """The ``[dim(theta)]`` vector in :class:`EndPointGrads` order."""
        parts = [self.image_proj.reshape(-1), self.text_proj.reshape(-1), self.logit_scale.reshape(1)]
        parts += [b for b in (self.image_bias, self.text_bias) if b is not None]
        if self.logit_bias is not None:
            parts.append(self.logit_bias.reshape(1))
        return torch.cat(parts)

    def dot(self, other: EndPointDirection) -> Tensor:
        """Inner product of two directions."""
        return self.flatten() @ other.flatten()

    def __add__(self, other: EndPointDirection) -> EndPointDirection:
        return _combine(self, other, lambda a, b: a + b)

    def __sub__(self, other: EndPointDirection) -> EndPointDirection:
        return _combine(self, other, lambda a, b: a - b)

    def __mul__(self, factor: float | Tensor) -> EndPointDirection:
        return _combine(self, self, lambda a, _: a * factor)

    __rmul__ = __mul__


def _combine(a: EndPointDirection, b: EndPointDirection, op) -> EndPointDirection:
    def f(x, y):
        return None if x is None else op(x, y)

    return EndPointDirection(
        f(a.image_proj, b.image_proj),
        f(a.text_proj, b.text_proj),
        f(a.logit_scale, b.logit_scale),
        f(a.image_bias, b.image_bias),
        f(a.text_bias, b.text_bias),
        f(a.logit_bias, b.logit_bias),
    )


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
    h_image: Tensor,
    h_text: Tensor,
    endpoint: EndPoint,
    bank_image: Tensor,
    bank_text: Tensor,
    *,
    exclude: Tensor | None = None,
) -> Tensor:
    """``[N]`` per-sample bank losses ``l(z_i)`` (docs/methods.md, CHIPS: per-sample loss)."""
    return bank_stats(h_image, h_text, endpoint, bank_image, bank_text, exclude=exclude).loss


def through_normalisation(v: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """``(I - u u^T) v / ||e||``: back-propagation of ``v = dl/du`` (``[N, e]``) through ``u = e / ||e||``."""
    return (v - (v * unit).sum(1, keepdim=True) * unit) / norm[:, None]


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
    h_image: Tensor,
    h_text: Tensor,
    endpoint: EndPoint,
    bank_image: Tensor,
    bank_text: Tensor,
    *,
    exclude: Tensor | None = None,
) -> EndPointGrads:
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


def subsample(n: int, size: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Sorted indices of a seeded subset of ``size`` out of ``n`` (all of them when ``size >= n``)."""
    if size >= n:
        return torch.arange(n, device=device)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:size].sort().values.to(device)


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


def round_inputs(
    endpoint: EndPoint,
    target_image: Tensor,
    target_text: Tensor,
    pool_image: Tensor,
    pool_text: Tensor,
    pool_ids: Tensor | None,
    dtype: torch.dtype,
) -> tuple[EndPoint, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The inputs of a scoring round in one dtype on the pool's device, with a detached end point and pool ids
    (``arange(N)`` when None).

    Raises:
        FloatingPointError: NaN or inf in the features (naming the first target rows and pool ids), which would
            otherwise spread into every score or fail deep inside the solve.
    """
    device = pool_image.device
    ep = endpoint.detach().to(dtype=dtype, device=device)
    ids = torch.arange(len(pool_image), device=device) if pool_ids is None else pool_ids.to(device)
    for what, image, text, names in (
        ("target rows", target_image, target_text, None),
        ("pool ids", pool_image, pool_text, ids),
    ):
        bad = ~(torch.isfinite(image).all(1) & torch.isfinite(text).all(1))
        if bool(bad.any()):
            where = torch.nonzero(bad).flatten() if names is None else names[bad]
            raise FloatingPointError(
                f"{int(bad.sum())} feature rows hold NaN or inf ({what} {where[:5].tolist()}): the model may have "
                "diverged or the features are corrupt."
            )
    return (
        ep, target_image.to(device, dtype), target_text.to(device, dtype), pool_image.to(dtype), pool_text.to(dtype),
        ids,
    )  # fmt: skip
