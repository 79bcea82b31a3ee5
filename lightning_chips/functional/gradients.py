"""Per-sample end-point gradients in factored form (:class:`EndPointGrads`) and dense theta-space directions
(:class:`EndPointDirection`): the algebra every scorer runs on.

docs/methods.md, CHIPS (per-sample loss). theta = ``(W_v [d_v x e], W_t [d_t x e], logit_scale, [b_v], [b_t],
[logit_bias])``. Since the heads are linear, the per-sample gradient of a loss of the normalised embeddings is rank
one per block: ``dl/dW_v = h^v (d^v)^T``, ``dl/dW_t = h^t (d^t)^T``, ``dl/db_v = d^v``, with ``d`` the loss's
gradient w.r.t. the unnormalised embedding (:func:`through_normalisation`). :class:`EndPointGrads` keeps exactly
these factors, so no per-sample ``d_v x e`` matrix is ever formed, and inner products factor:
``g_i . g_j = (h^v_i . h^v_j + [b_v])(d^v_i . d^v_j) + (h^t_i . h^t_j + [b_t])(d^t_i . d^t_j) + s_i s_j``.
The gradients of the bank loss itself are :func:`lightning_chips.functional.bank.endpoint_per_sample_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPointTensors

__all__ = ["EndPointDirection", "EndPointGrads", "through_normalisation"]


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
class EndPointDirection(EndPointTensors):
    """A dense vector in theta-space, stored block-wise (``image_proj`` is ``[d_v, e]``, etc.; ``logit_bias`` is
    0-d, present when the end point has SigLIP's logit bias): the fields of :class:`EndPointTensors`."""

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


def through_normalisation(v: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """``(I - u u^T) v / ||e||``: back-propagation of ``v = dl/du`` (``[..., e]``) through ``u = e / ||e||``
    (``unit`` ``[..., e]`` and ``norm`` ``[...]`` broadcast against ``v``)."""
    return (v - (v * unit).sum(-1, keepdim=True) * unit) / norm[..., None]
