"""Influence baselines in the end-point subspace (docs/methods.md, influence baselines): Dot, TracIn, TRAK.

All use the same per-sample bank loss and closed-form end-point gradients as CHIPS
(:mod:`lightning_chips.functional.bank`; the model's own loss: InfoNCE, or SigLIP's sigmoid loss when the end
point has a logit bias), with ``u`` the mean target gradient:

* **Dot**: ``g(z)^T u`` (exact from the factors; with ``sketch_dim`` the JL estimate ``(P g)^T (P u)``).
* **TracIn** (Pruthi et al. 2020): ``sum_c eta_c g_c(z)^T u_c`` over checkpoints ``c`` with learning rates
  ``eta_c`` (:func:`tracin_scores`).
* **TRAK** (Park et al. 2023): ``phi(z)^T (Phi^T Phi + lambda I)^{-1} phi_u * Q(z)`` with ``phi = P g`` over
  the training (pool) sample, ``phi_u = P u`` and the out-to-loss term ``Q(z) = 1 - p_corr(z)`` (``p_corr =
  sigma(z_ii)`` for the sigmoid loss: TRAK's ``Q`` of a binary logistic output ``z_ii``); an ensemble
  averages the kernel scores over checkpoints and multiplies by the average ``Q`` (:func:`trak_scores`).

Each prepared state is a theta-space direction ``v`` (``u``, ``P^T P u`` or ``P^T (Phi^T Phi + lambda I)^{-1}
P u``), so streaming a pool pair costs one factored inner product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.functional.bank import NegativeBank, grads_from_stats, make_bank
from lightning_chips.functional.gradients import EndPointDirection
from lightning_chips.functional.linalg import solve_direction
from lightning_chips.functional.rounds import round_inputs, subsample
from lightning_chips.functional.sketch import SketchKind, make_sketch

__all__ = [
    "InfluenceState",
    "grad_dot",
    "influence_prepare",
    "influence_score_batch",
    "tracin_scores",
    "trak_scores",
]

Method = Literal["dot", "trak"]


@dataclass
class InfluenceState:
    """A prepared Dot or TRAK round: the bank, the theta-space direction and whether to multiply by ``Q``."""

    endpoint: EndPoint
    bank: NegativeBank
    direction: EndPointDirection
    out_to_loss: bool
    damping: float
    sketch_dim: int


def influence_prepare(
    endpoint: EndPoint, target_image: Tensor, target_text: Tensor, pool_image: Tensor, pool_text: Tensor,
    pool_ids: Tensor | None = None, *, method: Method = "dot", sketch_dim: int | None = None,
    sketch: SketchKind = "gaussian", damping: float | None = None, bank_size: int = 1024, train_samples: int = 8192,
    seed: int = 0, dtype: torch.dtype = torch.float64,
) -> InfluenceState:  # fmt: skip
    """Prepare Dot (``method="dot"``) or TRAK (``"trak"``) from target pairs and a pool sample.

    TRAK's kernel ``Phi^T Phi`` sums over ``train_samples`` seeded pool pairs; ``damping`` is its ``lambda``
    (``None``: ``1e-3 * trace / k``). ``sketch_dim=None`` is TRAK with an identity projection (exact).
    """
    if method not in ("dot", "trak"):
        raise ValueError(f"Unknown influence method {method!r}; use 'dot' or 'trak'.")
    if len(target_image) == 0:
        raise ValueError(f"{method}: the target set is empty; pass at least one target pair.")
    device = pool_image.device
    ep, target_image, target_text, pool_image, pool_text, pool_ids = round_inputs(
        endpoint, target_image, target_text, pool_image, pool_text, pool_ids, dtype
    )
    bank = make_bank(ep, pool_image, pool_text, pool_ids, bank_size=bank_size, seed=seed)
    u = bank.mean_gradient(target_image, target_text, ep)
    d_v, e = u.image_proj.shape
    if method == "dot":
        projector = make_sketch(
            d_v, u.text_proj.shape[0], e, sketch_dim=sketch_dim, image_bias=u.image_bias is not None,
            text_bias=u.text_bias is not None, logit_bias=u.logit_bias is not None, kind=sketch, seed=seed + 3,
            dtype=dtype, device=device,
        )  # fmt: skip
        direction = projector.transpose(projector.sketch_direction(u))
        return InfluenceState(ep, bank, direction, out_to_loss=False, damping=0.0, sketch_dim=projector.dim)
    idx = subsample(len(pool_image), train_samples, seed + 1, device)
    atoms = bank.grads(pool_image[idx], pool_text[idx], ep, pool_ids[idx])
    weights = torch.ones(len(atoms), dtype=dtype, device=device)
    direction, lam, k = solve_direction(
        atoms, weights, u, solver="sketch", sketch_dim=sketch_dim, sketch=sketch, damping=damping, seed=seed + 3,
        exact_when_small=True, method="TRAK",
    )  # fmt: skip
    return InfluenceState(ep, bank, direction, out_to_loss=True, damping=lam, sketch_dim=k)


def _kernel_and_q(
    state: InfluenceState, image: Tensor, text: Tensor, ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``g . v`` and the out-to-loss term ``Q = 1 - p_corr`` of a batch (``p_corr = sigma(z_ii)`` for the sigmoid
    loss: :meth:`~lightning_chips.functional.bank.BankStats.p_corr`)."""
    dtype, device = state.bank.image.dtype, state.bank.image.device
    image, text = image.to(device, dtype), text.to(device, dtype)
    stats = state.bank.stats(image, text, state.endpoint, ids)
    grads = grads_from_stats(image, text, stats, state.bank.image, state.bank.text, state.endpoint)
    return grads.dot(state.direction), 1.0 - stats.p_corr()


def influence_score_batch(state: InfluenceState, image: Tensor, text: Tensor, ids: Tensor | None = None) -> Tensor:
    """Scores of a batch of pool pairs (pure given the state); ``ids`` exclude bank members from their negatives."""
    kernel, q = _kernel_and_q(state, image, text, ids)
    return kernel * q if state.out_to_loss else kernel


def _all_scores(state: InfluenceState, image: Tensor, text: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    ids = torch.arange(len(image), device=image.device)
    parts = [
        _kernel_and_q(state, image[i : i + batch_size], text[i : i + batch_size], ids[i : i + batch_size])
        for i in range(0, len(image), batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _at(values: Sequence[Tensor] | Tensor, c: int) -> Tensor:
    """Checkpoint ``c``'s features: one tensor for all checkpoints (frozen towers) or one per checkpoint."""
    return values if isinstance(values, Tensor) else values[c]


def tracin_scores(
    checkpoints: Sequence[tuple[EndPoint, float]],
    pool_image: Sequence[Tensor] | Tensor,
    pool_text: Sequence[Tensor] | Tensor,
    target_image: Sequence[Tensor] | Tensor,
    target_text: Sequence[Tensor] | Tensor,
    *,
    bank_size: int = 1024,
    seed: int = 0,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """TracIn ``sum_c eta_c g_c(z)^T u_c`` over ``checkpoints`` = ``[(endpoint_c, eta_c), ...]``.

    Features may be one tensor (frozen towers: the same features at every checkpoint) or one tensor per
    checkpoint (towers that trained).
    """
    if not checkpoints:
        raise ValueError("TracIn needs at least one (endpoint, learning rate) checkpoint.")

    total = None
    for c, (endpoint, lr) in enumerate(checkpoints):
        image, text = _at(pool_image, c).to(dtype), _at(pool_text, c).to(dtype)
        state = influence_prepare(
            endpoint, _at(target_image, c), _at(target_text, c), image, text, method="dot", bank_size=bank_size,
            seed=seed, dtype=dtype,
        )  # fmt: skip
        term = float(lr) * _all_scores(state, image, text, batch_size)[0]
        total = term if total is None else total + term
    return total


def trak_scores(
    checkpoints: Sequence[EndPoint],
    pool_image: Sequence[Tensor] | Tensor,
    pool_text: Sequence[Tensor] | Tensor,
    target_image: Sequence[Tensor] | Tensor,
    target_text: Sequence[Tensor] | Tensor,
    *,
    sketch_dim: int | None = 512,
    sketch: SketchKind = "gaussian",
    damping: float | None = None,
    bank_size: int = 1024,
    train_samples: int = 8192,
    seed: int = 0,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """TRAK over an ensemble of checkpoints: the average kernel score times the average ``Q = 1 - p_corr``."""
    if not checkpoints:
        raise ValueError("TRAK needs at least one checkpoint end point.")

    kernel, q = None, None
    for c, endpoint in enumerate(checkpoints):
        state = influence_prepare(
            endpoint, _at(target_image, c), _at(target_text, c), _at(pool_image, c), _at(pool_text, c), method="trak",
            sketch_dim=sketch_dim, sketch=sketch, damping=damping, bank_size=bank_size, train_samples=train_samples,
            seed=seed, dtype=dtype,
        )  # fmt: skip
        k_c, q_c = _all_scores(state, _at(pool_image, c).to(dtype), _at(pool_text, c).to(dtype), batch_size)
        kernel = k_c if kernel is None else kernel + k_c
        q = q_c if q is None else q + q_c
    n = len(checkpoints)
    return (kernel / n) * (q / n)


def grad_dot(
    pool_image: Tensor, pool_text: Tensor, target_image: Tensor, target_text: Tensor, endpoint: EndPoint, *,
    sketch_dim: int | None = None, bank_size: int = 1024, seed: int = 0, batch_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> Tensor:  # fmt: skip
    """Dot ``g(z)^T u`` of every pool pair (pre-projection features; JL-sketched with ``sketch_dim``)."""
    state = influence_prepare(endpoint, target_image, target_text, pool_image, pool_text, method="dot",
                              sketch_dim=sketch_dim, bank_size=bank_size, seed=seed, dtype=dtype)  # fmt: skip
    return _all_scores(state, pool_image.to(dtype), pool_text.to(dtype), batch_size)[0]
