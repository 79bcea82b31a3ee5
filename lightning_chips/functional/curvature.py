"""The curvature atoms of a CHIPS round (docs/methods.md, CHIPS; :mod:`lightning_chips.functional.chips`, module
docstring): atoms ``a_r`` and weights ``w_r`` with ``(1 - alpha) Phi_pos + alpha Phi_neg = sum_r w_r a_r a_r^T``.

* InfoNCE: ``Phi_pos`` the empirical Fisher of the pool sample's gradients; ``Phi_neg`` **[ours]** the Gauss-Newton
  term of the softmax, ``J^T (diag p - p p^T) J = sum_j p_j (J_j - Jbar)(J_j - Jbar)^T``, estimated without bias
  by ``K`` draws ``j ~ p`` per sample and direction, each an atom ``J_j - Jbar`` of weight ``1 / (2 K R)``.
* SigLIP's sigmoid loss: the GGN ``v(z_0) J_0 J_0^T + 1/2 sum_j v(a_j) J_{a_j} J_{a_j}^T + 1/2 sum_j v(b_j)
  J_{b_j} J_{b_j}^T`` with ``v = sigma (1 - sigma)``: the positive logit exactly, the bank logits importance-sampled
  (``j ~ v_j / V``, weight ``alpha V / (2 K R)``).

Every atom keeps the rank-one structure of a gradient, so atoms are
:class:`~lightning_chips.functional.gradients.EndPointGrads` and both solvers (:mod:`.linalg`) run on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.functional.bank import BankStats, grads_from_stats
from lightning_chips.functional.gradients import EndPointGrads, through_normalisation

__all__ = ["curvature_atoms"]


def _atoms_one_direction(
    h_same: Tensor,
    h_other: Tensor,
    u_same: Tensor,
    norm_same: Tensor,
    u_other: Tensor,
    norm_other: Tensor,
    candidates: Tensor,
    probs: Tensor,
    logits: Tensor,
    s: Tensor,
    index: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Factors of GGN atoms ``J_j - Jbar`` of one softmax direction for drawn indices ``index`` ``[R, K]``.

    For the image->text direction: ``same`` = image side (``x``), ``other`` = text side (``y``); logits
    ``a_j = s u_same . c_j`` with ``c_0 = u_other`` and ``c_{j>0}`` the bank rows of the other modality.
    Returns ``d_same [R, K, e]``, ``d_other [R, K, e]``, ``scale [R, K]``.
    """
    # c_j for the drawn j: the positive partner for j = 0, a bank row otherwise.
    bank_rows = candidates[(index - 1).clamp(min=0)]  # [R, K, e]
    c = torch.where((index == 0)[..., None], u_other[:, None, :], bank_rows)
    c_bar = probs[:, :1] * u_other + probs[:, 1:] @ candidates  # [R, e]
    d_same = s * through_normalisation(c - c_bar[:, None, :], u_same[:, None, :], norm_same[:, None])  # [R, K, e]
    # Only the positive logit depends on the other head: coefficient (delta_j0 - p_0).
    coef = (index == 0).to(probs.dtype) - probs[:, :1]  # [R, K]
    # (I - yy^T) x / ||e_t||
    d_other_dir = through_normalisation(u_same[:, None, :].expand_as(c), u_other[:, None, :], norm_other[:, None])
    d_other = s * coef[..., None] * d_other_dir
    pa = torch.where(probs > 0, probs * logits, torch.zeros_like(logits)).sum(1, keepdim=True)
    scale = logits.gather(1, index) - pa
    return d_same, d_other, scale


def curvature_atoms(
    h_image: Tensor,
    h_text: Tensor,
    stats: BankStats,
    bank_image: Tensor,
    bank_text: Tensor,
    endpoint: EndPoint,
    *,
    alpha: float,
    negatives_per_sample: int,
    generator: torch.Generator,
) -> tuple[EndPointGrads, Tensor]:
    """Atoms ``a_r`` and weights ``w_r`` with ``(1 - alpha) Phi_pos + alpha Phi_neg = sum_r w_r a_r a_r^T``.

    InfoNCE: positive atoms are the gradients (weight ``(1 - alpha) / R``); negative atoms are ``K`` softmax-sampled
    GGN atoms per sample and direction (weight ``alpha / (2 K R)``). Sigmoid loss (``stats`` of an end point with a
    logit bias): positive atoms are the positive logit's Jacobians (weight ``(1 - alpha) v_0 / R``), negative atoms
    ``K`` bank logits' Jacobians per sample and direction drawn with probability proportional to their
    ``v = sigma (1 - sigma)`` (weight ``alpha V / (2 K R)``, ``V`` the sum of ``v`` over the bank). See the module
    docstring.
    """
    h_image = endpoint.image_factor(h_image)  # the image head's input (features without a residual)
    if stats.logit_bias is not None:
        return _sigmoid_atoms(
            h_image, h_text, stats, bank_image, bank_text, endpoint, alpha=alpha,
            negatives_per_sample=negatives_per_sample, generator=generator,
        )  # fmt: skip
    grads = grads_from_stats(h_image, h_text, stats, bank_image, bank_text, endpoint)
    n = len(grads)
    weights = [torch.full((n,), (1.0 - alpha) / n, dtype=h_image.dtype, device=h_image.device)]
    parts = [grads]
    if alpha > 0 and negatives_per_sample > 0:
        k = negatives_per_sample
        draw = dict(num_samples=k, replacement=True, generator=generator)
        idx_a = torch.multinomial(stats.p.cpu().float(), **draw).to(h_image.device)
        idx_b = torch.multinomial(stats.q.cpu().float(), **draw).to(h_image.device)
        # image -> text: same side = image.
        dv_a, dt_a, s_a = _atoms_one_direction(
            h_image, h_text, stats.x, stats.norm_image, stats.y, stats.norm_text, bank_text, stats.p,
            stats.logits_i2t, stats.s, idx_a,
        )  # fmt: skip
        # text -> image: same side = text.
        dt_b, dv_b, s_b = _atoms_one_direction(
            h_text, h_image, stats.y, stats.norm_text, stats.x, stats.norm_image, bank_image, stats.q,
            stats.logits_t2i, stats.s, idx_b,
        )  # fmt: skip
        e = stats.x.shape[1]
        rep = lambda h: h.repeat_interleave(k, dim=0)  # noqa: E731  (rows r*K + j)
        for d_v, d_t, sc in ((dv_a, dt_a, s_a), (dv_b, dt_b, s_b)):
            parts.append(
                EndPointGrads(
                    rep(h_image),
                    d_v.reshape(-1, e),
                    rep(h_text),
                    d_t.reshape(-1, e),
                    sc.reshape(-1),
                    grads.image_bias,
                    grads.text_bias,
                )  # fmt: skip
            )
            weights.append(torch.full((n * k,), alpha / (2 * k * n), dtype=h_image.dtype, device=h_image.device))
    return EndPointGrads.cat(parts), torch.cat(weights)


def _sigmoid_atoms(
    h_image: Tensor, h_text: Tensor, stats: BankStats, bank_image: Tensor, bank_text: Tensor, endpoint: EndPoint, *,
    alpha: float, negatives_per_sample: int, generator: torch.Generator,
) -> tuple[EndPointGrads, Tensor]:  # fmt: skip
    """:func:`curvature_atoms` of the sigmoid loss: the GGN ``sum_z v(z) J_z J_z^T`` over its logits, split into the
    positive logit (``Phi_pos``, exact) and the bank logits (``Phi_neg``, importance-sampled), module docstring.

    A logit ``z = s x . c + beta_l`` has the Jacobian ``J_z = (h_v (x) s (I - x x^T) c / ||e_v||, [text block],
    s x . c, [d_v], [d_t], 1)``: for the positive (``c = y``) both heads, for an image->text bank logit only the
    image head (the bank text is a constant), for a text->image one only the text head.
    """
    n, e = len(h_image), stats.x.shape[1]
    dtype, device = h_image.dtype, h_image.device
    s, beta = stats.s, stats.logit_bias
    has_v, has_t = endpoint.image_bias is not None, endpoint.text_bias is not None
    a, b = stats.logits_i2t, stats.logits_t2i
    # v = sigma(z)(1 - sigma(z)) = sigma(z) sigma(-z), exact for |z| large; 0 for excluded entries (z = -inf).
    v_a, v_b = stats.p * torch.sigmoid(-a), stats.q * torch.sigmoid(-b)
    ones = torch.ones(n, dtype=dtype, device=device)
    positive = EndPointGrads(
        h_image, through_normalisation(s * stats.y, stats.x, stats.norm_image),
        h_text, through_normalisation(s * stats.x, stats.y, stats.norm_text),
        a[:, 0] - beta, has_v, has_t, ones,
    )  # fmt: skip
    parts, weights = [positive], [(1.0 - alpha) * v_a[:, 0] / n]
    if alpha > 0 and negatives_per_sample > 0:
        k = negatives_per_sample
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731  (rows r*K + j)
        for v, logits, same, norm, bank, image_side in (
            (v_a, a, stats.x, stats.norm_image, bank_text, True),
            (v_b, b, stats.y, stats.norm_text, bank_image, False),
        ):
            total = v[:, 1:].sum(1)  # V: the weight of this direction's bank logits
            probs = v[:, 1:] / total.clamp_min(torch.finfo(dtype).tiny)[:, None]
            probs = torch.where((total > 0)[:, None], probs, torch.ones_like(probs))  # V = 0: any draw, weight 0
            idx = torch.multinomial(probs.cpu().float(), k, replacement=True, generator=generator).to(device)
            d_same = through_normalisation(s * bank[idx].reshape(n * k, e), rep(same), rep(norm))
            zeros = torch.zeros_like(d_same)
            scale = logits[:, 1:].gather(1, idx).reshape(-1) - beta
            d_image, d_text = (d_same, zeros) if image_side else (zeros, d_same)
            parts.append(EndPointGrads(rep(h_image), d_image, rep(h_text), d_text, scale, has_v, has_t,
                                       torch.ones(n * k, dtype=dtype, device=device)))  # fmt: skip
            weights.append(rep(alpha * total / (2 * k * n)))
    return EndPointGrads.cat(parts), torch.cat(weights)
