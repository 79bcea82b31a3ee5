"""Johnson-Lindenstrauss sketches of end-point gradients that never form a per-sample ``d_v x e`` gradient.

METHODS.md 1.5. A gradient block ``h (x) d`` (``vec(h d^T)``) is sketched with a Kronecker-structured map
``P = P_h (x) P_d``: ``P vec(h d^T) = (P_h h) (x) (P_d d)``, costing ``O(d_v k_h + e k_d)`` instead of
``O(d_v e k)``. A bias block rides along by augmenting ``h`` with a constant 1 (``vec([h; 1] d^T)`` holds both
the matrix and the bias gradient). The logit-scale coordinate is kept as is. Entries are i.i.d. Gaussian
``N(0, 1/k_.)`` or Rademacher ``+-1/sqrt(k_.)`` per factor, so ``E[P^T P] = I`` on every block, drawn on the
CPU from ``torch.Generator().manual_seed(seed)`` (the same sketch on every device and rank).

The sketch budget ``sketch_dim`` is split between the image and text blocks in proportion to their sizes, and
each block's ``k_h x k_d`` grid follows the block's aspect ratio; :attr:`EndPointSketch.dim` is the realised
dimension (at most ``sketch_dim``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_chips.functional.endpoint import EndPointDirection, EndPointGrads

__all__ = ["EndPointSketch", "IdentitySketch", "SketchKind", "make_sketch"]

SketchKind = Literal["gaussian", "rademacher"]


def _random_matrix(rows: int, cols: int, kind: SketchKind, generator: torch.Generator) -> Tensor:
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(rows)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int64)
        return (2.0 * signs.to(torch.float64) - 1.0) / math.sqrt(rows)
    raise ValueError(f"Unknown sketch kind {kind!r}; use 'gaussian' or 'rademacher'.")


def _augment(h: Tensor, bias: bool) -> Tensor:
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1) if bias else h


def _grid(budget: int, rows: int, cols: int) -> tuple[int, int]:
    """Split a block budget into ``k_h x k_d`` following the block's aspect ratio ``rows : cols``."""
    budget = max(1, budget)
    k_h = max(1, min(budget, round(math.sqrt(budget * rows / cols))))
    k_d = max(1, budget // k_h)
    return k_h, k_d


class EndPointSketch:
    """A seeded Kronecker JL sketch ``P`` of theta-space, applied to factored gradients and dense directions.

    Args:
        image_dim: ``d_v``.
        text_dim: ``d_t``.
        embed_dim: ``e``.
        sketch_dim: total budget ``k``.
        image_bias: the end point has an image bias.
        text_bias: the end point has a text bias.
        kind: ``"gaussian"`` or ``"rademacher"``.
        seed: seed of the random factors.
        dtype: dtype of the factors when applied.
        device: device of the factors when applied.

    Example::

        >>> sk = EndPointSketch(64, 32, 16, sketch_dim=256, seed=0)
        >>> sk.dim <= 256
        True
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int,
        *,
        sketch_dim: int,
        image_bias: bool = False,
        text_bias: bool = False,
        kind: SketchKind = "gaussian",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if sketch_dim < 3:
            raise ValueError(f"`sketch_dim` must be >= 3 (image, text and scale coordinates), got {sketch_dim}.")
        self.image_bias, self.text_bias = image_bias, text_bias
        rows_v, rows_t = image_dim + int(image_bias), text_dim + int(text_bias)
        size_v, size_t = rows_v * embed_dim, rows_t * embed_dim
        budget = sketch_dim - 1
        budget_v = max(1, round(budget * size_v / (size_v + size_t)))
        budget_t = max(1, budget - budget_v)
        kv_h, kv_d = _grid(budget_v, rows_v, embed_dim)
        kt_h, kt_d = _grid(budget_t, rows_t, embed_dim)
        generator = torch.Generator().manual_seed(int(seed))
        factors = [
            _random_matrix(kv_h, rows_v, kind, generator),
            _random_matrix(kv_d, embed_dim, kind, generator),
            _random_matrix(kt_h, rows_t, kind, generator),
            _random_matrix(kt_d, embed_dim, kind, generator),
        ]
        self.image_h, self.image_d, self.text_h, self.text_d = (f.to(device=device, dtype=dtype) for f in factors)
        self.kind = kind
        self.seed = seed

    @property
    def dim(self) -> int:
        """Realised sketch dimension ``k_v + k_t + 1``."""
        return self.image_h.shape[0] * self.image_d.shape[0] + self.text_h.shape[0] * self.text_d.shape[0] + 1

    def sketch_grads(self, grads: EndPointGrads) -> Tensor:
        """``[N, k]`` sketched gradients ``P g_i`` from the factors."""
        dtype = self.image_h.dtype
        hv = _augment(grads.h_image.to(dtype), grads.image_bias) @ self.image_h.T
        dv = grads.d_image.to(dtype) @ self.image_d.T
        ht = _augment(grads.h_text.to(dtype), grads.text_bias) @ self.text_h.T
        dt = grads.d_text.to(dtype) @ self.text_d.T
        n = len(grads)
        return torch.cat(
            [
                (hv[:, :, None] * dv[:, None, :]).reshape(n, -1),
                (ht[:, :, None] * dt[:, None, :]).reshape(n, -1),
                grads.scale.to(dtype)[:, None],
            ],
            dim=1,
        )

    def _blocks(self, direction: EndPointDirection) -> tuple[Tensor, Tensor]:
        wv, wt = direction.image_proj, direction.text_proj
        if self.image_bias:
            wv = torch.cat([wv, direction.image_bias[None, :]], dim=0)
        if self.text_bias:
            wt = torch.cat([wt, direction.text_bias[None, :]], dim=0)
        return wv, wt

    def sketch_direction(self, direction: EndPointDirection) -> Tensor:
        """``[k]`` sketch ``P v`` of a dense direction: ``P_h V P_d^T`` per block."""
        dtype = self.image_h.dtype
        wv, wt = self._blocks(direction)
        return torch.cat(
            [
                (self.image_h @ wv.to(dtype) @ self.image_d.T).reshape(-1),
                (self.text_h @ wt.to(dtype) @ self.text_d.T).reshape(-1),
                direction.logit_scale.to(dtype).reshape(1),
            ]
        )

    def transpose(self, z: Tensor) -> EndPointDirection:
        """``P^T z`` as a dense direction: ``P_h^T Z P_d`` per block."""
        kv = self.image_h.shape[0] * self.image_d.shape[0]
        kt = self.text_h.shape[0] * self.text_d.shape[0]
        zv = z[:kv].reshape(self.image_h.shape[0], self.image_d.shape[0])
        zt = z[kv : kv + kt].reshape(self.text_h.shape[0], self.text_d.shape[0])
        wv = self.image_h.T @ zv @ self.image_d
        wt = self.text_h.T @ zt @ self.text_d
        image_bias = text_bias = None
        if self.image_bias:
            wv, image_bias = wv[:-1], wv[-1]
        if self.text_bias:
            wt, text_bias = wt[:-1], wt[-1]
        return EndPointDirection(wv, wt, z[kv + kt], image_bias, text_bias)


class IdentitySketch:
    """The exact path (no sketch): ``P = I`` on the flattened theta-space."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, *, image_bias: bool, text_bias: bool) -> None:
        self.shapes = (image_dim, text_dim, embed_dim)
        self.image_bias, self.text_bias = image_bias, text_bias

    @property
    def dim(self) -> int:
        d_v, d_t, e = self.shapes
        return d_v * e + d_t * e + 1 + e * (int(self.image_bias) + int(self.text_bias))

    def sketch_grads(self, grads: EndPointGrads) -> Tensor:
        return grads.flatten()

    def sketch_direction(self, direction: EndPointDirection) -> Tensor:
        return direction.flatten()

    def transpose(self, z: Tensor) -> EndPointDirection:
        d_v, d_t, e = self.shapes
        wv, z = z[: d_v * e].reshape(d_v, e), z[d_v * e :]
        wt, z = z[: d_t * e].reshape(d_t, e), z[d_t * e :]
        scale, z = z[0], z[1:]
        image_bias = text_bias = None
        if self.image_bias:
            image_bias, z = z[:e], z[e:]
        if self.text_bias:
            text_bias = z[:e]
        return EndPointDirection(wv, wt, scale, image_bias, text_bias)


def make_sketch(
    image_dim: int,
    text_dim: int,
    embed_dim: int,
    *,
    sketch_dim: int | None,
    image_bias: bool = False,
    text_bias: bool = False,
    kind: SketchKind = "gaussian",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    exact_when_small: bool = True,
) -> EndPointSketch | IdentitySketch:
    """A Kronecker sketch, or the identity when ``sketch_dim`` is None or (with ``exact_when_small``)
    ``dim(theta) <= sketch_dim``."""
    exact = IdentitySketch(image_dim, text_dim, embed_dim, image_bias=image_bias, text_bias=text_bias)
    if sketch_dim is None or (exact_when_small and exact.dim <= sketch_dim):
        return exact
    return EndPointSketch(
        image_dim, text_dim, embed_dim, sketch_dim=sketch_dim, image_bias=image_bias, text_bias=text_bias,
        kind=kind, seed=seed, dtype=dtype, device=device,
    )  # fmt: skip
