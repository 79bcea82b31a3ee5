"""The end-point parameters of a CLIP (docs/methods.md, CHIPS): the two projection heads and the logit scale (and
SigLIP's logit bias).

A module of its own so that the pure math (:mod:`lightning_chips.functional`) can use the type without importing
the adapters, which know open_clip's internals. :mod:`lightning_chips.adapters` re-exports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch.nn.functional as F
from torch import Tensor

__all__ = ["EndPoint"]


@dataclass
class EndPointTensors:
    """The tensor fields of theta-space, block-wise and in canonical order: ``image_proj`` ``[d_v, e]``, ``text_proj``
    ``[d_t, e]``, ``logit_scale`` (0-d), then the optional ``image_bias`` ``[e]``, ``text_bias`` ``[e]`` and
    ``logit_bias`` (0-d). The parameters themselves (:class:`EndPoint`) and a vector in their space
    (:class:`~lightning_chips.functional.gradients.EndPointDirection`) both hold them."""

    image_proj: Tensor
    text_proj: Tensor
    logit_scale: Tensor
    image_bias: Tensor | None = None
    text_bias: Tensor | None = None
    logit_bias: Tensor | None = None


@dataclass
class EndPoint(EndPointTensors):
    """The end-point parameters of a CLIP: two projection heads and the logit scale (and SigLIP's logit bias).

    The tensors are the model's *live* parameters (or views of them, e.g. the transpose of an ``nn.Linear``
    weight), so autograd through them reaches the model, and an optimiser step is visible on the next read.

    Attributes:
        image_proj: ``W_v`` of shape ``[d_v, e]``.
        text_proj: ``W_t`` of shape ``[d_t, e]``.
        logit_scale: 0-d tensor, ``log(1 / tau)``; the similarity scale is ``logit_scale.exp()``.
        image_bias: optional ``b_v`` of shape ``[e]`` (ModifiedResNet's attention-pool output projection has one).
        text_bias: optional ``b_t`` of shape ``[e]`` (open_clip text towers built with ``proj_bias=True``).
        logit_bias: optional 0-d tensor ``beta`` of SigLIP's sigmoid loss (logits ``s x.y + beta``). Its presence
            says which loss the model trains with (:attr:`loss`): ``"sigmoid"`` with a logit bias, ``"infonce"``
            (softmax) without one. The softmax is unchanged by a constant added to every logit, so a CLIP trained
            with InfoNCE has no use for one.
        image_residual: the image head is a residual block ending in a linear map: the unnormalised image embedding
            is ``W_v^T h + b_v + r``, with ``r`` a per-sample term that no end-point parameter changes (SigLIP's
            attention-pool head, ``r + mlp(norm(r))``, whose end point is the MLP's last layer). The image features
            are then ``[h, r]`` (``d_v + e`` columns): :meth:`image_factor` is ``h``, the factor of the image head's
            per-sample gradient ``h (d^v)^T``, and :meth:`project_image` adds ``r``.

    Example::

        >>> ep = EndPoint(torch.eye(3, 2), torch.eye(4, 2), torch.tensor(2.0))
        >>> ep.embed_dim, ep.image_dim, ep.text_dim, ep.num_parameters
        (2, 3, 4, 15)
        >>> ep.embed_image(torch.tensor([[3.0, 4.0, 1.0]]))
        tensor([[0.6000, 0.8000]])
    """

    image_residual: bool = False

    def __post_init__(self) -> None:
        if self.image_proj.dim() != 2 or self.text_proj.dim() != 2:
            raise ValueError(
                "EndPoint.image_proj and text_proj must be 2-d [d_in, e] matrices, got shapes "
                f"{tuple(self.image_proj.shape)} and {tuple(self.text_proj.shape)}."
            )
        if self.image_proj.shape[1] != self.text_proj.shape[1]:
            raise ValueError(
                "EndPoint.image_proj and text_proj must map to the same embedding dimension, got "
                f"{self.image_proj.shape[1]} and {self.text_proj.shape[1]}."
            )
        if self.logit_scale.numel() != 1:
            raise ValueError(f"EndPoint.logit_scale must hold one value, got shape {tuple(self.logit_scale.shape)}.")
        if self.logit_scale.dim() != 0:
            self.logit_scale = self.logit_scale.reshape(())
        if self.logit_bias is not None:
            if self.logit_bias.numel() != 1:
                raise ValueError(f"EndPoint.logit_bias must hold one value, got shape {tuple(self.logit_bias.shape)}.")
            if self.logit_bias.dim() != 0:
                self.logit_bias = self.logit_bias.reshape(())
        if not isinstance(self.image_residual, bool):
            raise TypeError(f"EndPoint.image_residual must be a bool, got {type(self.image_residual).__name__}.")
        for name, bias in (("image_bias", self.image_bias), ("text_bias", self.text_bias)):
            if bias is not None and tuple(bias.shape) != (self.embed_dim,):
                raise ValueError(f"EndPoint.{name} must have shape [{self.embed_dim}], got {tuple(bias.shape)}.")

    @property
    def embed_dim(self) -> int:
        """Joint embedding dimension ``e``."""
        return int(self.image_proj.shape[1])

    @property
    def image_dim(self) -> int:
        """Input dimension ``d_v`` of the image head's linear map (the image gradient factor's width)."""
        return int(self.image_proj.shape[0])

    @property
    def image_feature_dim(self) -> int:
        """Width of the image features: ``d_v``, or ``d_v + e`` with :attr:`image_residual`."""
        return self.image_dim + (self.embed_dim if self.image_residual else 0)

    @property
    def text_dim(self) -> int:
        """Pre-projection text feature dimension ``d_t``."""
        return int(self.text_proj.shape[0])

    @property
    def loss(self) -> str:
        """The loss the model trains with: ``"sigmoid"`` (SigLIP, with :attr:`logit_bias`) or ``"infonce"``."""
        return "infonce" if self.logit_bias is None else "sigmoid"

    @property
    def num_parameters(self) -> int:
        """``dim(theta)``: the number of scalars in the end-point subspace."""
        return sum(t.numel() for t in self.tensors())

    def tensors(self) -> Iterator[Tensor]:
        """The tensors in canonical order: image_proj, text_proj, logit_scale, image_bias, text_bias, logit_bias (if
        any)."""
        for name in TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                yield value

    def replace(self, **tensors: Tensor | None) -> EndPoint:
        """A copy with some tensors replaced (``image_residual`` kept)."""
        current = {name: getattr(self, name) for name in TENSOR_FIELDS}
        return EndPoint(**(current | tensors), image_residual=self.image_residual)

    def image_factor(self, image: Tensor) -> Tensor:
        """The input ``h`` of the image head's linear map: the image features, without the residual ``r`` when
        :attr:`image_residual` (the first :attr:`image_dim` columns)."""
        return image[..., : self.image_dim] if self.image_residual else image

    def scale(self) -> Tensor:
        """The similarity scale ``s = exp(logit_scale) = 1 / tau``."""
        return self.logit_scale.exp()

    def project_image(self, h_v: Tensor) -> Tensor:
        """Unnormalised image embedding ``W_v^T h_v + b_v`` of pre-projection features ``[B, d_v]`` (plus the residual
        ``r`` of features ``[h_v, r]`` with :attr:`image_residual`)."""
        if self.image_residual:
            if h_v.shape[-1] != self.image_feature_dim:
                raise ValueError(f"EndPoint with image_residual: image features must have d_v + e = "
                                 f"{self.image_feature_dim} columns ([h, r]), got {h_v.shape[-1]}.")  # fmt: skip
            h_v, residual = h_v[..., : self.image_dim], h_v[..., self.image_dim :]
        e = h_v @ self.image_proj
        e = e if self.image_bias is None else e + self.image_bias
        return e + residual if self.image_residual else e

    def project_text(self, h_t: Tensor) -> Tensor:
        """Unnormalised text embedding ``W_t^T h_t + b_t`` of pre-projection features ``[B, d_t]``."""
        e = h_t @ self.text_proj
        return e if self.text_bias is None else e + self.text_bias

    def embed_image(self, h_v: Tensor) -> Tensor:
        """L2-normalised image embedding ``x``."""
        return F.normalize(self.project_image(h_v), dim=-1)

    def embed_text(self, h_t: Tensor) -> Tensor:
        """L2-normalised text embedding ``y``."""
        return F.normalize(self.project_text(h_t), dim=-1)

    def detach(self) -> EndPoint:
        """A copy holding detached clones: a snapshot that later optimiser steps do not change."""
        return self.replace(**{name: _detach(getattr(self, name)) for name in TENSOR_FIELDS})

    def to(self, *args, **kwargs) -> EndPoint:
        """``Tensor.to`` applied to every tensor (device and/or dtype)."""
        return self.replace(**{name: _to(getattr(self, name), *args, **kwargs) for name in TENSOR_FIELDS})


TENSOR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EndPointTensors))
"""The names of :class:`EndPoint`'s tensor fields, in canonical order."""


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


def _to(t: Tensor | None, *args, **kwargs) -> Tensor | None:
    return None if t is None else t.to(*args, **kwargs)
